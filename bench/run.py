"""Benchmark harness: direct Postgres, PgBouncer and guardproxy, in one run, on one machine.

Usage (from the repository root)::

    .venv/bin/python -m bench.run [--quick] [--targets direct,pgbouncer,guardproxy] ...
    .venv/bin/python bench/run.py ...

Contract:

* Starts a private Postgres 15 cluster with ``tests/pgcluster.py``'s
  ``started_cluster()`` (or adopts ``GUARDPROXY_TEST_PG``), and loads it with
  ``pgbench -i -s SCALE`` as ``app_owner``.
* Starts PgBouncer (installing Debian's package when missing) and
  ``guardproxy serve`` on free loopback ports, both in transaction mode with
  ``--pool-size`` server connections and trust client auth. A target that
  cannot start is skipped with the reason printed; the others still run.
* For every client count x script (select-only ``-S``, TPC-B-like) x protocol
  (``-M simple|extended|prepared``), runs pgbench ``-n -T DURATION`` against
  each target back to back, so drift hits all targets alike. Before every
  TPC-B-like run, ``pgbench_branches``/``pgbench_tellers`` are vacuumed and
  ``pgbench_history`` truncated directly on Postgres (what pgbench does
  without ``-n``), so each target starts from the same state.
* Records TPS, latency avg/stddev/p50/p99 (from pgbench's per-transaction
  log), and the proxy's CPU seconds (utime+stime of the process tree) per
  1,000 transactions.
* Prints a markdown table and writes ``OUT_DIR/latest.json`` and
  ``OUT_DIR/latest.md`` (default ``bench/results/``); proxy logs go to
  ``OUT_DIR/logs/``.
* Stops every process it started, on success, error, Ctrl-C or SIGTERM.
* Exit status: 0 when results were written (failed runs are marked in the
  table), 1 when the harness itself could not run, 130 on Ctrl-C, 128+N on
  signal N (SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pgcluster  # noqa: E402  (tests/pgcluster.py, found through sys.path above)

from bench import pgbench, profiling, report  # noqa: E402
from bench.procs import Processes, cpu_seconds, raise_on_termination  # noqa: E402
from bench.targets import (  # noqa: E402
    UPSTREAM_DB,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    Launch,
    Target,
    direct,
    find_pgbouncer,
    pgbouncer_binary,
    start_guardproxy,
    start_pgbouncer,
)

TARGETS = ("direct", "pgbouncer", "guardproxy", "baseline")
PROXIES = ("guardproxy", "baseline")  # guardproxy, and an earlier checkout of it
# the baseline's own copy of the pgbench tables: its schema revisions are not ours
BASELINE_DB = "app_baseline"


def _choices(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if bad := [item for item in items if item not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("client counts must be positive")
    return values


NATIVE_ENV = "GUARDPROXY_NATIVE"  # guardproxy/native.py


def default_guardproxy_cmd() -> str:
    script = REPO / ".venv/bin/guardproxy"
    return (
        shlex.quote(str(script))
        if script.exists()
        else f"{shlex.quote(sys.executable)} -m guardproxy"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--targets",
        type=_choices(TARGETS),
        default=list(TARGETS[:3]),
        help="comma-separated subset of direct,pgbouncer,guardproxy,baseline (default: the "
        "first three; baseline comes with --baseline)",
    )
    p.add_argument(
        "--scripts",
        type=_choices(tuple(pgbench.SCRIPTS)),
        default=list(pgbench.SCRIPTS),
        help="select-only,tpcb-like (default: both)",
    )
    p.add_argument(
        "--protocols",
        type=_choices(pgbench.PROTOCOLS),
        default=list(pgbench.PROTOCOLS),
        help="simple,extended,prepared (default: all three)",
    )
    p.add_argument("--clients", type=_ints, default=[1, 20], help="client counts (default: 1,20)")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="pgbench -j for runs with more than one client (default: 2)",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default: 10)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per cell; the table shows the run with the median TPS (default: 1)",
    )
    p.add_argument("--quick", action="store_true", help="3-second runs and a 1-second warm-up")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unrecorded select-only load per target first (default: 2)",
    )
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default: 10)")
    p.add_argument(
        "--pool-size", type=int, default=20, help="server connections per proxy (default: 20)"
    )
    p.add_argument(
        "--proxy-args",
        default="",
        help=(
            'extra flags for `guardproxy serve`, e.g. --proxy-args="--policies policies/" '
            "(it runs in the repository root)"
        ),
    )
    p.add_argument(
        "--policies",
        type=Path,
        default=None,
        help=(
            "guardproxy judges every statement with these policies (e.g. bench/policies): "
            "select-only runs as agent analytics-bench, TPC-B-like as support-bench"
        ),
    )
    p.add_argument(
        "--guardproxy-cmd",
        default=default_guardproxy_cmd(),
        help="how to run guardproxy (default: .venv/bin/guardproxy, else PYTHON -m guardproxy)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="run guardproxy's hot path compiled with mypyc, as the container image does: "
        "build/native/ is (re)built with scripts/compile when missing or stale",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also measure guardproxy as an earlier checkout in DIR runs it (target "
        "'baseline', e.g. a `git worktree add DIR COMMIT`), in the same run",
    )
    p.add_argument(
        "--baseline-native",
        type=Path,
        default=None,
        help="the baseline's own compiled hot path (its scripts/compile output), to compare "
        "compiled with compiled",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record guardproxy with py-spy during each of its runs; collapsed stacks and a "
        "summary of the hottest functions go to OUT_DIR/profiles/",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=REPO / "bench/results",
        help="where latest.json, latest.md and logs/ go (default: bench/results)",
    )
    args = p.parse_args(argv)
    args.out_dir = args.out_dir.resolve()
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if "baseline" not in args.targets:
            args.targets.append("baseline")
    if args.policies is not None:
        args.policies = args.policies.resolve()  # the baseline runs in another directory
    if args.quick:
        args.duration, args.warmup = 3, min(args.warmup, 1)
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def endpoint(port: int) -> pgbench.Endpoint:
    return pgbench.Endpoint("127.0.0.1", port, UPSTREAM_USER, UPSTREAM_PASSWORD, UPSTREAM_DB)


def psql(port: int, sql: str, dbname: str = UPSTREAM_DB) -> subprocess.CompletedProcess[str]:
    ep = pgbench.Endpoint("127.0.0.1", port, UPSTREAM_USER, UPSTREAM_PASSWORD, dbname)
    cmd = [f"{pgcluster.PG_BINDIR}/psql", "-X", "-A", "-t", "-c", sql, *ep.conn_args()]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=ep.env(), timeout=60, check=False
    )


def seed_policies(
    cluster: pgcluster.PgCluster, policies: Path, dbname: str = UPSTREAM_DB, migrated: bool = True
) -> None:
    """guardproxy's schema (unless ``migrated`` is False: the baseline makes its own)
    and the policies' roles, granted to the proxy's login role."""
    from guardproxy.policy import load_policy_set
    from guardproxy.policy.tools import roles_sql
    from guardproxy.store import migrate
    from guardproxy.store.introspect import read_catalog

    dsn = cluster.dsn(UPSTREAM_USER, dbname)
    if migrated:
        migrate.upgrade(dsn)
    policy_set = load_policy_set(policies)
    cluster.psql(roles_sql(policy_set, read_catalog(dsn)), dbname=dbname)
    roles = ", ".join(f'"{p.upstream_role}"' for p in policy_set)
    cluster.psql(f"GRANT {roles} TO {UPSTREAM_USER}", dbname=dbname)


def seed_baseline(cluster: pgcluster.PgCluster, args: argparse.Namespace) -> None:
    """The baseline's database: a copy of the pgbench tables, its own schema revisions."""
    cluster.psql(f"DROP DATABASE IF EXISTS {BASELINE_DB}", dbname="postgres")
    cluster.psql(
        f"CREATE DATABASE {BASELINE_DB} TEMPLATE {UPSTREAM_DB} OWNER {UPSTREAM_USER}",
        dbname="postgres",
    )
    if args.policies is None:
        return
    from guardproxy.store import migrate

    # migrations only ever add revisions: the baseline's are ours up to its head
    where = args.baseline / "guardproxy" / "store" / "schema_version.py"
    found = re.search(r'SCHEMA_HEAD = "(\w+)"', where.read_text())
    if found is None:
        raise RuntimeError(f"no SCHEMA_HEAD in {where}")
    migrate.upgrade(cluster.dsn(UPSTREAM_USER, BASELINE_DB), found.group(1))
    seed_policies(cluster, args.policies, BASELINE_DB, migrated=False)


AGENTS = {"select-only": "analytics-bench", "tpcb-like": "support-bench"}
POLICIES: list[Path] = []  # set by main when --policies is given


def endpoint_for(target: Target, script: str) -> pgbench.Endpoint:
    """With policies, guardproxy is reached as the agent the script plays."""
    dbname = BASELINE_DB if target.name == "baseline" else UPSTREAM_DB
    if target.name in PROXIES and POLICIES:
        return pgbench.Endpoint("127.0.0.1", target.port, AGENTS[script], "", dbname)
    if target.name == "baseline":
        return pgbench.Endpoint("127.0.0.1", target.port, UPSTREAM_USER, UPSTREAM_PASSWORD, dbname)
    return endpoint(target.port)


def reachable(target: Target) -> str | None:
    """Why `SELECT 1` through the target fails, or None when it works."""
    if target.name in PROXIES and POLICIES:
        ep = endpoint_for(target, "select-only")
        cmd = [f"{pgcluster.PG_BINDIR}/psql", "-X", "-A", "-t", "-c", "SELECT 1", *ep.conn_args()]
        got = subprocess.run(
            cmd, capture_output=True, text=True, env=ep.env(), timeout=60, check=False
        )
        ok = got.returncode == 0 and got.stdout.strip() == "1"
        return (
            None
            if ok
            else f"SELECT 1 as {ep.user} failed: {(got.stderr or got.stdout).strip()[:300]}"
        )
    out = psql(target.port, "SELECT 1", BASELINE_DB if target.name == "baseline" else UPSTREAM_DB)
    if out.returncode == 0 and out.stdout.strip() == "1":
        return None
    return f"SELECT 1 through it failed: {(out.stderr or out.stdout).strip()[:300]}"


def reconnect_pgbouncer(target: Target) -> None:
    """Make PgBouncer drop its server connections (and their prepared statements)."""
    out = psql(target.port, "RECONNECT", dbname="pgbouncer")
    if out.returncode != 0:
        say(f"warning: RECONNECT on PgBouncer failed: {out.stderr.strip()}")


def start_targets(
    args: argparse.Namespace, pg_port: int, processes: Processes, workdir: Path
) -> list[Target]:
    logs = args.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    for name in TARGETS:
        if name not in args.targets:
            continue
        say(f"starting {name}")
        log = _fresh(logs / f"{name}.log")
        where = args.baseline if name == "baseline" else REPO
        launch = Launch(pg_port, pgcluster.free_port(), args.pool_size, log, cwd=where)
        try:
            target = start_target(name, args, launch, processes, workdir)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            target = Target(name, launch.port, skip=f"could not start: {exc}")
        if target.skip is None:
            target.skip = reachable(target)
        if target.skip:
            say(f"SKIPPING {name}: {target.skip}")
        targets.append(target)
    return targets


def start_target(
    name: str, args: argparse.Namespace, launch: Launch, processes: Processes, workdir: Path
) -> Target:
    if name == "direct":
        return direct(launch.pg_port)
    if name == "pgbouncer":
        return start_pgbouncer(processes, launch, pgbouncer_binary(), workdir / "pgbouncer")
    command, extra = shlex.split(args.guardproxy_cmd), shlex.split(args.proxy_args)
    if args.policies is not None:
        extra += ["--policies", str(args.policies)]
    if name == "baseline":
        if args.baseline is None:
            return Target(name, launch.port, skip="no --baseline DIR given")
        # `python -m guardproxy` in DIR imports DIR's guardproxy, not this one, and as
        # pure Python: this checkout's compiled modules are not the baseline's
        native = ["-u", NATIVE_ENV]
        if args.baseline_native is not None:
            native = [f"{NATIVE_ENV}={args.baseline_native.resolve()}"]
        command = ["env", *native, sys.executable, "-m", "guardproxy"]
        return start_guardproxy(
            processes, launch, command, extra, name="baseline", database=BASELINE_DB
        )
    return start_guardproxy(processes, launch, command, extra)


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def reset_tpcb(cluster: pgcluster.PgCluster) -> None:
    """What pgbench does before a TPC-B-like run without -n, done directly on Postgres."""
    databases = [UPSTREAM_DB]
    known = f"SELECT 1 FROM pg_database WHERE datname = '{BASELINE_DB}'"
    if cluster.psql(known, dbname="postgres").strip():
        databases.append(BASELINE_DB)
    for dbname in databases:
        for sql in (
            "VACUUM pgbench_branches",
            "VACUUM pgbench_tellers",
            "TRUNCATE pgbench_history",
        ):
            cluster.psql(sql, user=UPSTREAM_USER, dbname=dbname)


def workloads(args: argparse.Namespace) -> list[pgbench.Workload]:
    return [
        pgbench.Workload(script, protocol, clients, min(clients, args.threads), args.duration)
        for clients in args.clients
        for script in args.scripts
        for protocol in args.protocols
    ]


def measure(target: Target, load: pgbench.Workload, profile_dir: Path | None = None) -> report.Row:
    pid = target.proc.pid if target.proc else None
    before = cpu_seconds(pid) if pid else None
    recorder = None
    if profile_dir is not None and pid and target.name == "guardproxy":
        recorder = profiling.start(
            pid,
            profile_dir / f"{load.script}-{load.protocol}-c{load.clients}",
            native=bool(os.environ.get(NATIVE_ENV)),  # compiled code leaves no Python frames
        )
    result = pgbench.run(pgcluster.PG_BINDIR, endpoint_for(target, load.script), load)
    cpu = cpu_seconds(pid) - before if pid and before is not None else None
    if recorder is not None:
        profiling.finish(recorder)
    return report.row(target.name, load, result, cpu)


def describe(r: report.Row) -> str:
    if r["error"]:
        return f"ERROR {r['error']}"
    text = f"{r['tps']:,.0f} tps"
    if r["latency_avg_ms"] is not None:
        text += f", {r['latency_avg_ms']:.3f} ms avg, {r['latency_p99_ms']:.3f} ms p99"
    return text


def run_matrix(
    args: argparse.Namespace, cluster: pgcluster.PgCluster, targets: list[Target]
) -> list[report.Row]:
    """Every workload against every target, targets back to back, ``--repeat`` times."""
    active = [t for t in targets if not t.skip]
    steps = [(ld, t) for ld in workloads(args) for _ in range(args.repeat) for t in active]
    runs: dict[tuple[str, pgbench.Workload], list[report.Row]] = {}
    for i, (load, target) in enumerate(steps, 1):
        target.check_alive()
        if target.skip:
            continue
        if load.script == "tpcb-like":
            reset_tpcb(cluster)
        if load.protocol == "prepared" and target.reconnect_before_prepared:
            reconnect_pgbouncer(target)
        row = measure(target, load, args.out_dir / "profiles" if args.profile else None)
        runs.setdefault((target.name, load), []).append(row)
        say(
            f"[{i:3}/{len(steps)}] {target.name:10} {load.script:11} -M {load.protocol:8} "
            f"-c {load.clients:<3} {describe(row)}"
        )
    return [report.representative(found) for found in runs.values()]


def warm_up(args: argparse.Namespace, targets: list[Target]) -> None:
    clients = max(args.clients)
    for target in targets:
        if not target.skip:
            say(f"warming up {target.name} ({args.warmup}s)")
            pgbench.warm_up(
                pgcluster.PG_BINDIR,
                endpoint_for(target, "select-only"),
                clients,
                min(clients, args.threads),
                args.warmup,
            )


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scale": args.scale,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "pool_size": args.pool_size,
        "repeat": args.repeat,
        "clients": args.clients,
        "threads": args.threads,
        "scripts": args.scripts,
        "protocols": args.protocols,
        "targets": args.targets,
        "proxy_args": args.proxy_args,
        "policies": str(args.policies) if args.policies else None,
        "guardproxy_cmd": args.guardproxy_cmd,
        # --native sets GUARDPROXY_NATIVE; so may the caller's environment
        "hot_path": "compiled (mypyc)" if os.environ.get(NATIVE_ENV) else "as installed",
        "client_auth": "trust",
        "pool_mode": "transaction",
    }


def benchmark(
    args: argparse.Namespace, cluster: pgcluster.PgCluster, processes: Processes, workdir: Path
) -> int:
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews everything
    say(f"Postgres on port {cluster.port}; pgbench -i -s {args.scale}")
    pgbench.initialize(pgcluster.PG_BINDIR, endpoint(cluster.port), args.scale)
    if "baseline" in args.targets and args.baseline is not None:
        seed_baseline(cluster, args)  # a copy before guardproxy's schema is added
    if args.policies is not None:
        seed_policies(cluster, args.policies)
    targets = start_targets(args, cluster.port, processes, workdir)
    if any(t.name == "direct" and t.skip for t in targets):
        say("direct Postgres is not reachable; nothing to compare against")
        return 1
    warm_up(args, targets)
    rows = run_matrix(args, cluster, targets)
    for target in targets:
        target.check_alive()
    report.add_ratios(rows)
    bouncer = find_pgbouncer() if "pgbouncer" in args.targets else None
    python = _python_of(shlex.split(args.guardproxy_cmd))
    mach = report.machine(pgcluster.PG_BINDIR, bouncer, python, REPO)
    mach["loadavg_at_start"] = load_at_start
    skipped = {t.name: t.skip for t in targets if t.skip}
    prepared = "prepared" in args.protocols  # the only caveat so far is about -M prepared
    notes = {t.name: t.note for t in targets if t.note and prepared}
    doc = report.document(rows, mach, config(args), skipped, notes)
    text = report.write(args.out_dir, doc)
    print(text)
    say(f"wrote {args.out_dir / 'latest.json'} and {args.out_dir / 'latest.md'}")
    return 0


def native_build() -> Path:
    """build/native/, compiled by scripts/compile unless it matches the sources already."""
    where = REPO / "build" / "native"
    os.environ.pop(NATIVE_ENV, None)  # importing guardproxy must not load a stale build
    from guardproxy.native import NativeBuildError, read_build

    try:
        read_build(where)
    except NativeBuildError as why:
        say(f"compiling the hot path ({why})")
        subprocess.run([str(REPO / "scripts" / "compile"), str(where)], check=True)
    return where


def _python_of(command: list[str]) -> Path:
    """The interpreter that runs guardproxy: the command's own, the one next to it, or ours."""
    first = Path(command[0])
    if first.name.startswith("python"):
        return first
    sibling = first.parent / "python"
    return sibling if sibling.exists() else Path(sys.executable)


def _private_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="guardproxy-bench-"))
    workdir.chmod(0o755)  # PgBouncer runs as postgres when we are root and reads its files here
    return workdir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.policies is not None:
        POLICIES.append(args.policies)
    raise_on_termination()
    if args.native:
        os.environ[NATIVE_ENV] = str(native_build())
    processes = Processes()
    workdir = _private_workdir()
    try:
        with pgcluster.started_cluster() as cluster:
            try:
                return benchmark(args, cluster, processes, workdir)
            finally:
                processes.stop_all()  # proxies go before the cluster they point at
    except KeyboardInterrupt:
        say("interrupted; every process the harness started has been stopped")
        return 130
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
