"""Results of a harness run: ratios, the markdown table, the JSON, the machine line.

A result row is a plain dict (see ``row()``), so the JSON written is exactly
what the table is built from. Ratios compare TPS with the run of the same
script, protocol and client count against direct Postgres and against
PgBouncer; "added latency" is the row's average latency minus direct's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.pgbench import Measurement, Workload

Row = dict[str, Any]


def row(target: str, load: Workload, result: Measurement, proxy_cpu_s: float | None) -> Row:
    lat = result.latency
    per_1k = None
    if proxy_cpu_s is not None and result.transactions:
        per_1k = proxy_cpu_s / result.transactions * 1000
    return {
        "target": target,
        "script": load.script,
        "protocol": load.protocol,
        "clients": load.clients,
        "threads": load.threads,
        "duration_s": load.duration,
        "tps": result.tps,
        "transactions": result.transactions,
        "failed": result.failed,
        "latency_avg_ms": lat.avg_ms if lat else None,
        "latency_stddev_ms": lat.stddev_ms if lat else None,
        "latency_p50_ms": lat.p50_ms if lat else None,
        "latency_p99_ms": lat.p99_ms if lat else None,
        "proxy_cpu_s": proxy_cpu_s,
        "proxy_cpu_s_per_1k_tx": per_1k,
        "error": result.error,
    }


def representative(runs: list[Row]) -> Row:
    """The run with the median TPS (or the first failed one), plus every run's TPS."""
    failed = [r for r in runs if r["error"]]
    chosen = failed[0] if failed else sorted(runs, key=lambda r: r["tps"])[(len(runs) - 1) // 2]
    return {**chosen, "tps_runs": [r["tps"] for r in runs]}


def add_ratios(rows: list[Row]) -> None:
    """Fill tps_vs_direct, tps_vs_pgbouncer and added_latency_ms in place."""
    by_key = {(r["target"], r["script"], r["protocol"], r["clients"]): r for r in rows}
    for r in rows:
        key = (r["script"], r["protocol"], r["clients"])
        base, bouncer = by_key.get(("direct", *key)), by_key.get(("pgbouncer", *key))
        r["tps_vs_direct"] = _ratio(r, base, "tps")
        r["tps_vs_pgbouncer"] = _ratio(r, bouncer, "tps")
        r["added_latency_ms"] = _difference(r, base, "latency_avg_ms")


def _valid(r: Row | None, field: str) -> bool:
    return r is not None and r["error"] is None and r[field] is not None


def _ratio(r: Row, base: Row | None, field: str) -> float | None:
    if not (_valid(r, field) and _valid(base, field)) or not base or not base[field]:
        return None
    return float(r[field]) / float(base[field])


def _difference(r: Row, base: Row | None, field: str) -> float | None:
    if not (_valid(r, field) and _valid(base, field)) or base is None:
        return None
    return float(r[field]) - float(base[field])


# --- machine -------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> str:
    rev = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "guardproxy"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return rev + ("+uncommitted" if dirty else "")


def machine(
    pg_bindir: str, pgbouncer: str | None, guardproxy_python: Path, repo: Path
) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "postgres": _first_line([f"{pg_bindir}/postgres", "--version"]),
        "pgbouncer": _first_line([pgbouncer, "--version"]) if pgbouncer else "not used",
        "python": _first_line([str(guardproxy_python), "--version"]),
        "guardproxy_git": git_revision(repo),
        "loadavg_at_end": round(os.getloadavg()[0], 2),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']} · {m['nproc']} CPUs ({m['cpu']}) · Linux {m['kernel']} · {m['postgres']} · "
        f"{m['pgbouncer']} · {m['python']} · guardproxy {m['guardproxy_git']} · "
        f"load average at start {m['loadavg_at_start']}, at end {m['loadavg_at_end']}"
    )


# --- output --------------------------------------------------------------------------

COLUMNS = (
    "target",
    "script",
    "protocol",
    "clients",
    "TPS",
    "lat avg ms",
    "p50 ms",
    "p99 ms",
    "vs direct",
    "vs PgBouncer",
    "added lat ms",
    "proxy CPU s / 1k tx",
)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _tps(r: Row) -> str:
    """Median TPS, with the range over the repeats when there were several runs."""
    runs = [t for t in r.get("tps_runs", []) if t is not None]
    spread = f" ({min(runs):,.0f}-{max(runs):,.0f})" if len(runs) > 1 else ""
    return _num(r["tps"], ",.0f") + spread


def _cells(r: Row) -> list[str]:
    head = [r["target"], r["script"], r["protocol"], str(r["clients"])]
    if r["error"]:
        return [*head, "error", "", "", "", "", "", "", ""]
    return [
        *head,
        _tps(r),
        _num(r["latency_avg_ms"], ".3f"),
        _num(r["latency_p50_ms"], ".3f"),
        _num(r["latency_p99_ms"], ".3f"),
        _num(r["tps_vs_direct"], ".2f") + ("x" if r["tps_vs_direct"] is not None else ""),
        _num(r["tps_vs_pgbouncer"], ".2f") + ("x" if r["tps_vs_pgbouncer"] is not None else ""),
        _num(r["added_latency_ms"], "+.3f"),
        _num(r["proxy_cpu_s_per_1k_tx"], ".3f"),
    ]


def document(
    rows: list[Row],
    mach: dict[str, Any],
    config: dict[str, Any],
    skipped: dict[str, str],
    notes: dict[str, str],
) -> dict[str, Any]:
    """Everything one run produced: what latest.json holds and latest.md shows."""
    return {"machine": mach, "config": config, "skipped": skipped, "notes": notes, "results": rows}


def markdown(doc: dict[str, Any]) -> str:
    rows: list[Row] = doc["results"]
    out = [
        "# guardproxy benchmark",
        "",
        f"Machine: {machine_line(doc['machine'])}",
        "",
        f"Settings: {_settings(doc['config'])}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    notes = [f"- {name} not measured: {why}" for name, why in doc["skipped"].items()]
    notes += [f"- {name}: {note}" for name, note in doc["notes"].items()]
    notes += [
        f"- error: {r['target']} {r['script']} -M {r['protocol']} -c {r['clients']}: {r['error']}"
        for r in rows
        if r["error"]
    ]
    return "\n".join([*out, *([""] if notes else []), *notes]) + "\n"


def _settings(config: dict[str, Any]) -> str:
    keys = ("scale", "duration_s", "repeat", "pool_size", "warmup_s", "proxy_args")
    return ", ".join(
        f"{k}={config[k]!r}" if k == "proxy_args" else f"{k}={config[k]}" for k in keys
    )


def write(out_dir: Path, doc: dict[str, Any]) -> str:
    """Write latest.json and latest.md into out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (out_dir / "latest.md").write_text(text)
    return text
