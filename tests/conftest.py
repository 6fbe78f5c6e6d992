"""Fixtures: a real Postgres for the session, and real guardproxy processes per test.

``pg``: the cluster (see pgcluster.py). ``start_proxy(**settings)``: starts
``guardproxy serve`` as a subprocess in front of ``pg`` and returns a handle with
its port and DSNs; its log is printed when a test fails. ``proxy``: one with
default settings (transaction mode, pool_size 5, trust auth on loopback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgcluster import APP_DB, PgCluster, free_port, started_cluster, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
GUARDPROXY = [sys.executable, "-m", "guardproxy"]


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    with started_cluster() as cluster:
        yield cluster


@dataclass
class ProxyProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def dsn(self, agent: str = "agent-1", password: str | None = None, dbname: str = APP_DB) -> str:
        auth = agent + (f":{password}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int | None = None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def proxy_args(upstream: str, port: int, settings: dict[str, Any]) -> list[str]:
    args = ["serve", "--upstream", upstream, "--listen-port", str(port)]
    merged = {"pool_size": 5, "log_level": "info", "pool_acquire_timeout": 10, **settings}
    for key, value in merged.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture
def start_proxy(
    pg: PgCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(upstream: str | None = None, **settings: Any) -> ProxyProcess:
        port = settings.pop("listen_port", None) or free_port()
        log_path = tmp_path / f"guardproxy-{len(started)}.log"
        args = proxy_args(upstream or pg.dsn(), port, settings)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*GUARDPROXY, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        handle = ProxyProcess(port, proc, log_path, args)
        started.append(handle)
        try:
            wait_for_port("127.0.0.1", port, timeout=20)
        except TimeoutError:
            handle.stop()
            raise RuntimeError(f"guardproxy did not start:\n{handle.log()}") from None
        return handle

    yield start
    failed = getattr(request.node, "rep_call", None)
    for handle in started:
        handle.stop()
        if failed is not None and failed.failed:
            print(f"\n----- guardproxy log ({' '.join(handle.args)}) -----\n{handle.log()[-6000:]}")


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
