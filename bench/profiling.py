"""py-spy around one benchmark run: collapsed stacks, and the hottest functions summarised.

py-spy samples the proxy from outside (it needs ptrace: root, or CAP_SYS_PTRACE), so
the proxy runs unmodified while it is measured. Sampling costs the proxy a little
CPU; compare profiles with profiles, not with unprofiled runs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 250


@dataclass
class Recorder:
    proc: subprocess.Popen[bytes]
    stacks: Path


def start(pid: int, base: Path) -> Recorder | None:
    spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed; no profile (pip install py-spy)")
        return None
    base.parent.mkdir(parents=True, exist_ok=True)
    stacks = base.with_suffix(".txt")
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw"]
    cmd += ["--output", str(stacks), "--nonblocking"]
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
    if recorder.stacks.exists():
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


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)": lines differ per sample
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name
