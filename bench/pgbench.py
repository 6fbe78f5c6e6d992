"""Running pgbench and reading its results.

``run()`` executes one pgbench measurement with per-transaction logging
(``-l``) and returns a :class:`Measurement`: TPS and transaction counts come
from pgbench's summary; average, standard deviation, p50 and p99 latency are
computed from the per-transaction log (every transaction, not a sample).
A run whose pgbench exits non-zero, or that reports failed or aborted
clients, carries an ``error`` and no claim to be a valid measurement.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCRIPTS: dict[str, list[str]] = {"select-only": ["-S"], "tpcb-like": []}
PROTOCOLS = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class Endpoint:
    """Where pgbench connects: host, port, user, password, database."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    def env(self) -> dict[str, str]:
        return dict(os.environ, PGPASSWORD=self.password, PGCONNECT_TIMEOUT="10")

    def conn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user, self.dbname]


@dataclass(frozen=True)
class Workload:
    script: str  # a key of SCRIPTS
    protocol: str  # one of PROTOCOLS
    clients: int
    threads: int
    duration: int  # seconds


@dataclass
class Latency:
    avg_ms: float
    stddev_ms: float
    p50_ms: float
    p99_ms: float


@dataclass
class Measurement:
    tps: float | None
    transactions: int
    failed: int
    latency: Latency | None
    error: str | None


def initialize(bindir: str, endpoint: Endpoint, scale: int) -> None:
    """``pgbench -i`` at the given scale; raises with pgbench's output on failure."""
    cmd = [f"{bindir}/pgbench", "-i", "-q", "-s", str(scale), *endpoint.conn_args()]
    out = subprocess.run(cmd, capture_output=True, text=True, env=endpoint.env(), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{out.stdout}\n{out.stderr}")


def command(bindir: str, endpoint: Endpoint, load: Workload, log_prefix: Path | None) -> list[str]:
    cmd = [
        f"{bindir}/pgbench",
        "-n",
        *SCRIPTS[load.script],
        "-M",
        load.protocol,
        "-c",
        str(load.clients),
        "-j",
        str(load.threads),
        "-T",
        str(load.duration),
    ]
    if log_prefix is not None:
        cmd += ["-l", "--log-prefix", str(log_prefix)]
    return [*cmd, *endpoint.conn_args()]


def run(bindir: str, endpoint: Endpoint, load: Workload) -> Measurement:
    """One measured pgbench run, with latencies from its per-transaction logs."""
    with tempfile.TemporaryDirectory(prefix="guardproxy-pgbench-") as logdir:
        prefix = Path(logdir) / "tx"
        out = _execute(command(bindir, endpoint, load, prefix), endpoint, load.duration)
        latency = latency_from_logs(sorted(Path(logdir).glob("tx.*")))
    summary = parse_summary(out.stdout)
    return Measurement(
        tps=summary.get("tps"),
        transactions=int(summary.get("transactions", 0)),
        failed=int(summary.get("failed", 0)),
        latency=latency,
        error=_error(out, summary),
    )


def warm_up(bindir: str, endpoint: Endpoint, clients: int, threads: int, seconds: int) -> None:
    """An unrecorded select-only run: fills pools, caches and shared buffers."""
    if seconds > 0:
        load = Workload("select-only", "simple", clients, threads, seconds)
        _execute(command(bindir, endpoint, load, None), endpoint, seconds)


def _execute(cmd: list[str], endpoint: Endpoint, duration: int) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=endpoint.env(),
            check=False,
            timeout=duration + 120,
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, _text(exc.stdout), "pgbench timed out")


def _text(data: bytes | str | None) -> str:
    return data.decode() if isinstance(data, bytes) else (data or "")


_SUMMARY_PATTERNS = {
    "tps": re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "latency_avg_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
}


def parse_summary(stdout: str) -> dict[str, float]:
    """The numbers of pgbench's end-of-run summary that the harness uses."""
    found: dict[str, float] = {}
    for key, pattern in _SUMMARY_PATTERNS.items():
        if match := pattern.search(stdout):
            found[key] = float(match.group(1))
    return found


def _error(out: subprocess.CompletedProcess[str], summary: dict[str, float]) -> str | None:
    if out.returncode == 0 and summary.get("failed", 0) == 0 and "tps" in summary:
        return None
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return f"pgbench exit {out.returncode}: {first.strip()[:300]}"


def latency_from_logs(paths: list[Path]) -> Latency | None:
    """Latency statistics over every logged transaction (3rd field, microseconds)."""
    samples: list[int] = []
    for path in paths:
        with path.open() as log:
            for line in log:
                fields = line.split()
                if len(fields) > 2 and fields[2].isdigit():
                    samples.append(int(fields[2]))
    if not samples:
        return None
    samples.sort()
    mean = sum(samples) / len(samples)
    variance = sum((s - mean) ** 2 for s in samples) / len(samples)
    return Latency(
        avg_ms=mean / 1000,
        stddev_ms=math.sqrt(variance) / 1000,
        p50_ms=_percentile(samples, 50) / 1000,
        p99_ms=_percentile(samples, 99) / 1000,
    )


def _percentile(ordered: list[int], pct: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]
