"""Builds guardproxy's hot path with mypyc when GUARDPROXY_COMPILE=1 (see guardproxy/native.py).

Everything else about the package is in pyproject.toml. Without the variable the
package is pure Python, as an editable (development) install should be.
"""

import os
import runpy
from pathlib import Path

from setuptools import setup

here = Path(__file__).resolve().parent
ext_modules = []
if os.environ.get("GUARDPROXY_COMPILE") == "1":
    from mypyc.build import mypycify

    native = runpy.run_path(str(here / "guardproxy" / "native.py"))
    os.chdir(here)  # mypyc takes paths relative to the package root
    # No config file: the build may run without the dependencies' type information,
    # which mypy --strict (our lint) would reject; the code is the code it checked.
    ext_modules = mypycify(
        [
            "--config-file=",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            *native["compiled_sources"](),
        ],
        group_name=native["GROUP"],
    )

setup(ext_modules=ext_modules)
