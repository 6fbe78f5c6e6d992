"""What idle client connections cost the proxy in memory (issue 7: 1,000 idle
clients in at most 50 MB).

Starts a private Postgres and ``guardproxy serve`` in front of it (transaction
pooling, trust auth, optionally with policies), logs in N clients that then stay
idle (after one ``SELECT 1`` each, so every session has judged and run a
statement), and reports the proxy's resident memory (RSS, with its workers)
before and after, and per client.

    .venv/bin/python -m bench.idle_memory [--clients 1000] [--policies bench/policies]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pgcluster  # noqa: E402

from bench import run as bench_run  # noqa: E402
from bench.procs import Processes, process_tree  # noqa: E402
from bench.targets import Launch, start_guardproxy  # noqa: E402
from guardproxy.protocol import codec  # noqa: E402


def rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            continue
    return total


async def idle_client(port: int, user: str, database: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(codec.build_startup({"user": user, "database": database}))
    await _until_ready(reader)
    writer.write(codec.build_query("SELECT 1"))
    await _until_ready(reader)
    return writer


async def _until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        header = await reader.readexactly(5)
        body = await reader.readexactly(int.from_bytes(header[1:5], "big") - 4)
        if header[:1] == b"E":
            raise RuntimeError(f"the proxy refused a client: {body!r}")
        if header[:1] == b"Z":
            return


async def hold_clients(
    port: int, count: int, user: str, database: str
) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 50):  # in waves: the listen backlog and login pace
        batch = [idle_client(port, user, database) for _ in range(min(50, count - start))]
        writers += await asyncio.gather(*batch)
    return writers


def measure(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients * 2 + 256), hard))
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="guardproxy-idle-"))
    try:
        with pgcluster.started_cluster() as cluster:
            user, database = bench_run.UPSTREAM_USER, bench_run.UPSTREAM_DB
            if args.policies is not None:
                bench_run.pgbench.initialize(
                    pgcluster.PG_BINDIR, bench_run.endpoint(cluster.port), 1
                )
                bench_run.seed_policies(cluster, args.policies)
                user = "analytics-bench"
            launch = Launch(
                cluster.port, pgcluster.free_port(), 20, workdir / "guardproxy.log", REPO
            )
            extra = [*shlex.split(args.proxy_args), f"--max-client-conn={args.clients + 100}"]
            if args.policies is not None:
                extra += ["--policies", str(_roomy(args.policies, workdir, args.clients + 100))]
            command = shlex.split(bench_run.default_guardproxy_cmd())
            target = start_guardproxy(processes, launch, command, extra)
            if target.skip or target.proc is None:
                raise SystemExit(f"guardproxy did not start: {target.skip}")
            pid = target.proc.pid
            before = rss_bytes(pid)
            writers = asyncio.run(_hold_and_measure(target.port, args.clients, user, database, pid))
            after, held = writers
            per = (after - before) / args.clients
            print(
                f"guardproxy RSS: {before / 2**20:.1f} MiB at start, {after / 2**20:.1f} MiB with "
                f"{held} idle clients: {(after - before) / 2**20:.1f} MiB for them, "
                f"{per / 1024:.1f} KiB per client"
            )
    finally:
        processes.stop_all()


def _roomy(policies: Path, workdir: Path, sessions: int) -> Path:
    """A copy of the policies whose limits.max_client_sessions admit every client."""
    out = workdir / "policies"
    out.mkdir()
    for source in policies.glob("*.yaml"):
        text = re.sub(
            r"(?m)^(\s*max_client_sessions:)\s*\d+", rf"\g<1> {sessions}", source.read_text()
        )
        (out / source.name).write_text(text)
    return out


async def _hold_and_measure(
    port: int, count: int, user: str, database: str, pid: int
) -> tuple[int, int]:
    writers = await hold_clients(port, count, user, database)
    await asyncio.sleep(1.0)  # let the proxy settle (audit, stats) before reading RSS
    after = rss_bytes(pid)
    for writer in writers:
        writer.write(codec.TERMINATE)
        writer.close()
    return after, len(writers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--policies", type=Path, help="e.g. bench/policies (agent analytics-bench)")
    parser.add_argument("--proxy-args", default="", help="extra flags for guardproxy serve")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
