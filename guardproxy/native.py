"""The hot path compiled to C with mypyc when a build is at hand; pure Python otherwise.

The modules every message passes through (framing, response tracking, pooling,
judging and tagging, metrics) are plain, fully typed Python. mypyc compiles them
into C extensions that run the same code with much less interpreter overhead
(docs/performance.md). There are two ways to run them:

* An installed build: ``GUARDPROXY_COMPILE=1 pip install --no-build-isolation .``
  once the dependencies are installed (mypyc needs their types; the container
  image does this) puts the extensions beside the sources, and Python prefers them.
* A source checkout: ``scripts/compile`` builds them into ``build/native/`` and
  ``GUARDPROXY_NATIVE=<that directory>`` loads them from there. Without it the
  checkout runs its sources, so an edit is never shadowed by an old build; with it,
  a build made from other sources (any module of the package: compiled code has
  the types of what it imports built in) is refused at import, naming the file.
  Never ``GUARDPROXY_COMPILE=1 pip install -e``: that puts the extensions beside the
  sources of the checkout, where they would shadow every later edit.

Only the standard library is used here: ``setup.py`` reads ``COMPILED`` from this
file before anything is installed. Keep this module out of ``COMPILED``.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

ENV = "GUARDPROXY_NATIVE"
MANIFEST = "manifest.json"
GROUP = "guardproxy"  # the shared library is guardproxy__mypyc

# Modules on every statement's path. A module leaves this list when it relies on
# what compiled classes do not allow (object.__new__ on them, attributes set from
# outside their declared types, monkeypatching): Decision and SessionContext do.
COMPILED = (
    "guardproxy.protocol.codec",
    "guardproxy.pool.pool",
    "guardproxy.pool.backend",
    "guardproxy.relay.inflight",
    "guardproxy.relay.registry",
    "guardproxy.relay.relay",
    "guardproxy.relay.judging",
    "guardproxy.relay.autoprepare",
    "guardproxy.relay.session_sql",
    "guardproxy.server.session",
    "guardproxy.jobs.managed_write",
    "guardproxy.jobs.ledger",
    "guardproxy.jobs.write_plan",
    "guardproxy.jobs.plan_check",
    "guardproxy.metrics",
    "guardproxy.analysis.shape",
    "guardproxy.policy.engine",
    "guardproxy.policy.templates",
    "guardproxy.policy.idempotency",
    "guardproxy.store.audit_writer",
)

PACKAGE_DIR = Path(__file__).resolve().parent


class NativeBuildError(ImportError):
    """GUARDPROXY_NATIVE names a build that cannot be used with these sources."""


def source_of(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def compiled_sources() -> list[str]:
    """COMPILED as paths relative to the repository root (what mypyc takes)."""
    return ["/".join(m.split(".")) + ".py" for m in COMPILED]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_sources() -> dict[str, str]:
    """The digest of every module of the package, by path relative to it."""
    return {
        path.relative_to(PACKAGE_DIR).as_posix(): _digest(path)
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def hot_path() -> str:
    """How this process runs the hot path: "compiled (mypyc)" or "pure Python"."""
    origins = []
    for module in COMPILED:
        spec = importlib.util.find_spec(module)
        origins.append(spec.origin if spec is not None and spec.origin else "")
    compiled = [o for o in origins if o.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    if len(compiled) == len(COMPILED):
        return "compiled (mypyc)"
    if compiled:
        return f"partly compiled ({len(compiled)} of {len(COMPILED)} modules)"
    return "pure Python"


# ------------------------------------------------------------ loading a checkout's build


class _BuildFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of one build directory before the sources."""

    def __init__(self, extensions: dict[str, Path]) -> None:
        self.extensions = extensions

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        file = self.extensions.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def read_build(where: Path) -> dict[str, Path]:
    """The extension files of the build in ``where``, once checked against the sources."""
    fix = f"run scripts/compile again, or unset {ENV} to run the sources as they are"
    try:
        manifest = json.loads((where / MANIFEST).read_text())
        python, compiled = manifest["python"], list(manifest["compiled"])
        sources = {str(k): str(v) for k, v in manifest["sources"].items()}
        extensions = {str(k): str(v) for k, v in manifest["extensions"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NativeBuildError(
            f"{ENV}={where} is not a guardproxy build ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    if python != sys.implementation.cache_tag:
        raise NativeBuildError(
            f"{ENV}={where} was built for {python}, this is {sys.implementation.cache_tag}; {fix}"
        )
    if set(compiled) != set(COMPILED):
        raise NativeBuildError(
            f"{ENV}={where} compiled other modules than guardproxy/native.py lists now; {fix}"
        )
    # every module, not only the compiled ones: compiled code has the types, signatures
    # and Final constants of the modules it imports built in
    now = package_sources()
    for name in sorted(set(now) | set(sources)):
        if now.get(name) != sources.get(name):
            raise NativeBuildError(
                f"{ENV}={where} was compiled from other sources: {PACKAGE_DIR / name} "
                f"changed since; {fix}"
            )
    return {name: where / relative for name, relative in extensions.items()}


def install_from_env() -> None:
    """Puts the build that GUARDPROXY_NATIVE names in front of the sources (if set)."""
    where = os.environ.get(ENV)
    if not where or any(isinstance(f, _BuildFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BuildFinder(read_build(Path(where))))


# ------------------------------------------------------------ building one


def build(where: Path) -> None:
    """Compiles COMPILED into ``where`` (extensions and manifest); sources stay untouched."""
    root = PACKAGE_DIR.parent
    if not (root / "setup.py").exists():
        raise SystemExit(f"{root} is not a guardproxy checkout (no setup.py): nothing to compile")
    where = where.resolve()
    env = dict(os.environ, GUARDPROXY_COMPILE="1")
    env.pop(ENV, None)
    command = [sys.executable, "setup.py", "-q", "build_ext"]
    command += ["--build-lib", str(where), "--build-temp", str(where / "tmp")]
    subprocess.run(command, cwd=root, env=env, check=True)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    extensions = {}
    for file in where.rglob("*"):
        if file.name.endswith(suffixes) and "tmp" not in file.relative_to(where).parts:
            relative = file.relative_to(where).as_posix()
            stem = next(relative[: -len(s)] for s in suffixes if relative.endswith(s))
            extensions[stem.replace("/", ".")] = relative
    missing = [m for m in COMPILED if m not in extensions]
    if missing:
        raise SystemExit(f"the build in {where} lacks {', '.join(missing)}")
    manifest = {
        "python": sys.implementation.cache_tag,
        "compiled": list(COMPILED),
        "sources": package_sources(),
        "extensions": extensions,
    }
    (where / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "build" or len(args) > 2:
        print("usage: scripts/compile [DIRECTORY]", file=sys.stderr)
        return 2
    where = Path(args[1] if len(args) == 2 else PACKAGE_DIR.parent / "build" / "native")
    build(where)
    print(f"compiled {len(COMPILED)} modules into {where.resolve()}")
    print(f"use them with: export {ENV}={where.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
