"""Does one agent sending large statements stall the others? (issue 13)

Starts a private Postgres and ``guardproxy serve`` with the bench policies, then
measures a victim agent's ``SELECT 1`` latency (median and p99 over a fixed number
of queries) twice: alone, and while an attacker agent sends large statements as
fast as it gets answers (each about ``--size`` bytes, refused by the policy, so
the whole cost is the proxy's judging). Prints both and their ratio. With the
large statements judged in judge worker processes (the default), the victim's
latency stays close to its unloaded value; ``--proxy-args="--judge-offload-above
0"`` judges them on the event loop, for comparison.

    .venv/bin/python -m bench.judge_isolation [--size 500000] [--queries 400]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pgcluster  # noqa: E402

from bench import run as bench_run  # noqa: E402
from bench.procs import Processes  # noqa: E402
from bench.targets import Launch, start_guardproxy  # noqa: E402
from guardproxy.protocol import codec  # noqa: E402


async def _connect(port: int, user: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(codec.build_startup({"user": user, "database": bench_run.UPSTREAM_DB}))
    await _until_ready(reader)
    return reader, writer


async def _until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        header = await reader.readexactly(5)
        await reader.readexactly(int.from_bytes(header[1:5], "big") - 4)
        if header[:1] == b"Z":
            return


async def _latencies(port: int, queries: int) -> list[float]:
    reader, writer = await _connect(port, "analytics-victim")
    out = []
    for _ in range(queries):
        started = time.perf_counter()
        writer.write(codec.build_query("SELECT 1"))
        await _until_ready(reader)
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.002)
    writer.close()
    return out


async def _attack(port: int, size: int, stop: asyncio.Event) -> int:
    reader, writer = await _connect(port, "analytics-attacker")
    # many small expressions: costly to parse and to judge; a column the policy denies
    terms = ", ".join(f"id + {i}" for i in range(size // 12))
    statement = codec.build_query(f"SELECT {terms}, secret FROM pgbench_accounts")
    sent = 0
    while not stop.is_set():
        writer.write(statement)
        await _until_ready(reader)
        sent += 1
    writer.close()
    return sent


async def _run(port: int, size: int, queries: int) -> None:
    alone = await _latencies(port, queries)
    stop = asyncio.Event()
    attacker = asyncio.create_task(_attack(port, size, stop))
    await asyncio.sleep(0.5)
    loaded = await _latencies(port, queries)
    stop.set()
    sent = await attacker

    def show(name: str, values: list[float]) -> tuple[float, float]:
        ordered = sorted(values)
        p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
        print(f"{name:<28} p50 {p50 * 1000:7.3f} ms   p99 {p99 * 1000:7.3f} ms")
        return p50, p99

    a50, a99 = show("victim alone", alone)
    l50, l99 = show(f"victim, attacker {size // 1000} kB", loaded)
    print(f"attacker statements judged meanwhile: {sent}")
    print(f"ratio loaded / alone: p50 {l50 / a50:.2f}x, p99 {l99 / a99:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500_000, help="bytes per large statement")
    parser.add_argument("--queries", type=int, default=400, help="victim queries per phase")
    parser.add_argument("--proxy-args", default="", help="extra flags for guardproxy serve")
    args = parser.parse_args()
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="guardproxy-judge-"))
    try:
        with pgcluster.started_cluster() as cluster:
            bench_run.pgbench.initialize(pgcluster.PG_BINDIR, bench_run.endpoint(cluster.port), 1)
            bench_run.seed_policies(cluster, REPO / "bench" / "policies")
            launch = Launch(cluster.port, pgcluster.free_port(), 4, workdir / "gp.log", REPO)
            extra = ["--policies", str(REPO / "bench" / "policies"), *shlex.split(args.proxy_args)]
            command = shlex.split(bench_run.default_guardproxy_cmd())
            target = start_guardproxy(processes, launch, command, extra)
            if target.skip or target.proc is None:
                raise SystemExit(f"guardproxy did not start: {target.skip}")
            asyncio.run(_run(target.port, args.size, args.queries))
    finally:
        processes.stop_all()


if __name__ == "__main__":
    main()
