"""The compiled hot path (guardproxy/native.py): which build is used, and when one is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy import native

ROOT = Path(__file__).resolve().parents[2]


def _manifest(where: Path, **changes: object) -> None:
    manifest: dict[str, object] = {
        "python": sys.implementation.cache_tag,
        "compiled": list(native.COMPILED),
        "sources": native.package_sources(),
        "extensions": {"guardproxy.metrics": "guardproxy/metrics.cpython-311-x86_64-linux-gnu.so"},
    }
    manifest.update(changes)
    where.mkdir(parents=True, exist_ok=True)
    (where / native.MANIFEST).write_text(json.dumps(manifest))


def test_a_build_of_these_sources_is_accepted(tmp_path: Path) -> None:
    _manifest(tmp_path)
    assert native.read_build(tmp_path) == {
        "guardproxy.metrics": tmp_path / "guardproxy/metrics.cpython-311-x86_64-linux-gnu.so"
    }


@pytest.mark.parametrize(
    "changed",
    [
        "pool/server.py",  # a compiled module
        "policy/decision.py",  # a module compiled code imports: its types are built in
    ],
)
def test_a_build_of_other_sources_is_refused_naming_the_file(tmp_path: Path, changed: str) -> None:
    sources = native.package_sources()
    sources[changed] = "0" * 64  # as if the file changed after the build
    _manifest(tmp_path, sources=sources)
    with pytest.raises(native.NativeBuildError) as refused:
        native.read_build(tmp_path)
    message = str(refused.value)
    assert f"guardproxy/{changed} changed since" in message
    assert "scripts/compile" in message and "unset GUARDPROXY_NATIVE" in message


def test_a_module_added_since_the_build_is_noticed(tmp_path: Path) -> None:
    sources = native.package_sources()
    del sources["top.py"]  # the build did not know it
    _manifest(tmp_path, sources=sources)
    with pytest.raises(native.NativeBuildError, match=r"top\.py changed since"):
        native.read_build(tmp_path)


def test_a_build_for_another_python_or_no_build_is_refused(tmp_path: Path) -> None:
    _manifest(tmp_path, python="cpython-399")
    with pytest.raises(native.NativeBuildError, match="built for cpython-399"):
        native.read_build(tmp_path)
    with pytest.raises(native.NativeBuildError, match="is not a guardproxy build"):
        native.read_build(tmp_path / "nothing-here")
    (tmp_path / native.MANIFEST).write_text('{"python": "x"}')  # cut short
    with pytest.raises(native.NativeBuildError, match="is not a guardproxy build"):
        native.read_build(tmp_path)


def test_a_build_of_another_module_list_is_refused(tmp_path: Path) -> None:
    _manifest(tmp_path, compiled=list(native.COMPILED[1:]))
    with pytest.raises(native.NativeBuildError, match="other modules"):
        native.read_build(tmp_path)


def test_a_stale_build_stops_the_import_with_the_reason(tmp_path: Path) -> None:
    sources = dict.fromkeys(native.package_sources(), "0" * 64)
    _manifest(tmp_path, sources=sources)
    env = dict(os.environ, GUARDPROXY_NATIVE=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", "import guardproxy.server.session"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "NativeBuildError" in run.stderr and "changed since" in run.stderr


def test_the_compiled_list_names_real_modules_and_not_this_one() -> None:
    assert "guardproxy.native" not in native.COMPILED
    for module in native.COMPILED:
        assert native.source_of(module).is_file(), module
    setup = (ROOT / "setup.py").read_text()
    assert "compiled_sources" in setup and "GUARDPROXY_COMPILE" in setup


def test_the_hot_path_is_what_the_environment_asked_for() -> None:
    """CI runs the suite twice: as sources, and with GUARDPROXY_NATIVE set (scripts/check).
    In the second run every hot-path module must really be the compiled one."""
    expected = "compiled (mypyc)" if os.environ.get(native.ENV) else "pure Python"
    assert native.hot_path() == expected
    import guardproxy.server.session as session

    assert (session.__file__ or "").endswith(".py") == (expected == "pure Python")
