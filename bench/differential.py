"""The long differential run: many protocol scripts on Postgres and through guardproxy.

Usage (from the repository root)::

    .venv/bin/python -m bench.differential --sequences 20000 [--shop-sequences N] [--seed S]

Contract:

* Starts a private Postgres 15 cluster (``tests/pgcluster.py``, or the server
  ``GUARDPROXY_TEST_PG`` names), the difftest database with guardproxy with pooling
  only and with a permissive policy in front of it (``tests/diffrun.py``), and the
  shop database with guardproxy and the example policies (``tests/diffpolicy.py``).
* Draws ``--sequences`` scripts of ``tests/diffgen.py`` (hypothesis, seeded by
  ``--seed``, random when omitted) and runs each on the three targets; then
  ``--shop-sequences`` scripts through the example policies. Unlike the CI test it
  does not stop at the first difference: it counts them all.
* Prints, and writes to ``bench/results/differential.json``: sequences run,
  unexplained differences (with the first scripts that show them, to paste into an
  ``@example``), differences explained by known bugs (``tests/diffbugs.py``) and by
  the documentation, the time taken, the date and the commit.
* Exit status 0 when no unexplained difference was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import diffgen  # noqa: E402  (tests/, found through sys.path above)
import diffpolicy  # noqa: E402
import diffrun  # noqa: E402
import pgcluster  # noqa: E402
import shop  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

KEEP = 5  # scripts kept per kind of difference, for the report


def commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def explore(strategy: Any, count: int, run_one: Any, chosen_seed: int) -> None:
    """Runs ``run_one`` on ``count`` scripts drawn from ``strategy`` (never raises)."""

    @seed(chosen_seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def body(script: Any) -> None:
        run_one(script)

    body()


def run_protocol(pg: Any, workdir: Path, count: int, chosen_seed: int) -> dict[str, Any]:
    unexplained: dict[str, list[str]] = {}
    explained: Counter[str] = Counter()
    with diffrun.differential(pg, workdir) as harness:

        def one(script: Any) -> None:
            outcome = harness.check(script)
            explained.update(name for name, _ in outcome.known)
            for diff in outcome.differences:
                kept = unexplained.setdefault(f"{diff.target}: {diff.where.split(' (')[0]}", [])
                if len(kept) < KEEP:
                    kept.append(f"{script!r}\n{diff}")

        explore(diffgen.scripts(end_with_sync=False), count, one, chosen_seed)
        scripts = harness.scripts
    return {"sequences": scripts, "unexplained": unexplained, "explained": dict(explained)}


def run_shop(pg: Any, workdir: Path, count: int, chosen_seed: int) -> dict[str, Any]:
    if count <= 0:
        return {"sequences": 0}
    problems: dict[str, list[str]] = {}
    _create_shop(pg)
    with diffpolicy.shop_checker(pg, workdir) as checker:

        def one(script: Any) -> None:
            for problem in checker.check(script):
                kept = problems.setdefault(problem.split(":")[0][:80], [])
                if len(kept) < KEEP:
                    kept.append(f"{script!r}\n{problem}")

        explore(diffgen.shop_scripts(), count, one, chosen_seed)
        run = checker.run
        audit = diffpolicy.audit_shortfalls(pg, run)
    return {
        "sequences": run.scripts,
        "unexplained": problems,
        "audit_shortfalls": audit,
        "explained": dict(run.known),
        "servers_left_skipping": run.pool_hangs,
        "rows_changed": sum(run.rows_changed.values()),
    }


def _create_shop(pg: Any) -> None:
    """The shop database as tests/integration/shop.py's shop_db fixture makes it."""
    pg.psql(f"DROP DATABASE IF EXISTS {shop.SHOP_DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {shop.SHOP_DB} OWNER app_owner", dbname="postgres")
    pg.psql("GRANT ALL ON SCHEMA public TO app_owner", dbname=shop.SHOP_DB)
    shop._upgrade_guardproxy_schema(pg)
    shop._load_schema(pg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=2000, help="protocol scripts")
    parser.add_argument("--shop-sequences", type=int, default=None, help="default: a tenth")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    chosen_seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    shop_count = args.shop_sequences if args.shop_sequences is not None else args.sequences // 10
    started = time.perf_counter()
    print(f"differential run: seed {chosen_seed}, {args.sequences} + {shop_count} sequences")
    with pgcluster.started_cluster() as pg, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        protocol = run_protocol(pg, workdir / "protocol", args.sequences, chosen_seed)
        (workdir / "shop").mkdir()
        policies = run_shop(pg, workdir / "shop", shop_count, chosen_seed)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "seed": chosen_seed,
        "seconds": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
        "protocol": protocol,
        "example_policies": policies,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "differential.json").write_text(json.dumps(result, indent=1))
    report(result)
    failed = (
        protocol["unexplained"] or policies.get("unexplained") or policies.get("audit_shortfalls")
    )
    return 1 if failed else 0


def report(result: dict[str, Any]) -> None:
    protocol, policies = result["protocol"], result["example_policies"]
    print(
        f"\n{result['date']}, commit {result['commit']}, seed {result['seed']}, "
        f"{result['seconds']} s on {result['cpus']} CPUs"
    )
    print(f"protocol scripts (Postgres vs pooling vs permissive policy): {protocol['sequences']}")
    print(
        f"  unexplained differences: {sum(len(v) for v in protocol['unexplained'].values())} "
        f"kinds {list(protocol['unexplained'])}"
    )
    print(f"  explained (documented / known bugs): {protocol['explained']}")
    print(f"example-policy scripts: {policies.get('sequences', 0)}")
    if policies.get("sequences"):
        print(f"  problems: {list(policies['unexplained'])}; audit: {policies['audit_shortfalls']}")
        print(f"  known bugs: {policies['explained']}; rows changed {policies['rows_changed']}")
    for kind, scripts in {**protocol["unexplained"], **policies.get("unexplained", {})}.items():
        print(f"\n== {kind}\n{scripts[0]}")


if __name__ == "__main__":
    sys.exit(main())
