"""A sampling profiler around one benchmark run, and its hottest functions summarised.

The proxy is sampled from outside (root, or CAP_SYS_PTRACE / perf_event access), so
it runs unmodified while it is measured. Sampling costs the proxy a little CPU;
compare profiles with profiles, not with unprofiled runs.

Interpreted Python is sampled with py-spy (Python frames). A compiled hot path
(``--native``) runs as C functions that leave no Python frames, so it is sampled
with Linux ``perf`` instead (no pause per sample, kernel time included): the
summary splits the samples by library (kernel, interpreter, guardproxy's
compiled modules as ``guardproxy__mypyc``, libpg_query in pglast's ``parser``,
uvloop) and lists the hottest symbols; mypyc's functions are named
``CPyDef_<module>___<name>``. Without perf (Debian: ``linux-perf``) py-spy
unwinds native stacks itself, pausing the proxy at every sample.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 250
PERF_HZ = 999


@dataclass
class Recorder:
    proc: subprocess.Popen[bytes]
    stacks: Path
    perf: bool = False


def start(pid: int, base: Path, native: bool = False) -> Recorder | None:
    perf = shutil.which("perf")
    if native and perf:
        base.parent.mkdir(parents=True, exist_ok=True)
        data = base.with_suffix(".perf.data")
        cmd = [perf, "record", "--quiet", "-F", str(PERF_HZ), "-p", str(pid), "-o", str(data)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return Recorder(proc, data, perf=True)
    spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed; no profile (pip install py-spy)")
        return None
    base.parent.mkdir(parents=True, exist_ok=True)
    stacks = base.with_suffix(".txt")
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw"]
    # native unwinding must pause the process for each sample (py-spy refuses otherwise)
    cmd += ["--output", str(stacks), "--native" if native else "--nonblocking"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Recorder(proc, stacks)


def finish(recorder: Recorder | None) -> None:
    if recorder is None:
        return
    recorder.proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
    try:
        recorder.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        recorder.proc.kill()
        return
    if recorder.perf:
        summary = summarise_perf(recorder.stacks)
        recorder.stacks.with_suffix("").with_suffix(".summary.md").write_text(summary)
    elif recorder.stacks.exists():
        summary = summarise(recorder.stacks.read_text())
        recorder.stacks.with_suffix(".summary.md").write_text(summary)


def summarise(collapsed: str, top: int = 25) -> str:
    """Self and total share of samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples\n", "| self | total | function |", "|---|---|---|"]
    for frame, count in own.most_common(top):
        lines.append(f"| {count / samples:.1%} | {total[frame] / samples:.1%} | `{frame}` |")
    return "\n".join(lines) + "\n"


def summarise_perf(data: Path, top: int = 25) -> str:
    """Shares of samples by library, then by symbol, from ``perf report``."""
    parts = []
    for key, limit in (("dso", 10), ("dso,symbol", top)):
        cmd = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", key]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        rows = [
            [*line.split(None, 1), ""][:2]
            for line in out.splitlines()
            if line.strip()[:1].isdigit()
        ]
        parts.append(f"| share | {key.replace(',', ': ')} |\n|---|---|")
        for share, rest in rows[:limit]:
            parts.append(f"| {share} | `{' '.join(rest.split()).removesuffix(' - -')}` |")
        parts.append("")
    return "\n".join(parts)


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)": lines differ per sample
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({module})" if module else name
