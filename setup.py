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
    # Build with the dependencies installed (pip install --no-build-isolation, after
    # them): a class compiled without its base's type (subclassing Any) would get the
    # wrong memory layout and crash at run time, so that is an error here. Only the
    # compiled modules' own errors count: the rest was checked by mypy --strict.
    ext_modules = mypycify(
        [
            "--config-file=",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            "--disallow-subclassing-any",
            *native["compiled_sources"](),
        ],
        group_name=native["GROUP"],
    )

setup(ext_modules=ext_modules)
