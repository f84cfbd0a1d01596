"""Keeps other processes from spoiling the throughput benchmark's timings: waits for a quiet
machine and measures the CPU that other processes used during a run. Imports none of the other
throughput_* modules."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "processor": platform.processor(), "loadavg_start": os.getloadavg()}


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        pid = _ppid(pid)
        out.add(pid)
    return out


def other_benchmarks() -> list[str]:
    """Command lines of `ops/bench/` processes that are neither us, our ancestors nor children."""
    me = os.getpid()
    mine = _ancestors(me) | {me}
    proc = subprocess.run(["pgrep", "-af", "ops/bench/"], capture_output=True, text=True, check=False)
    others = []
    for line in proc.stdout.splitlines():
        pid_s, _, cmd = line.partition(" ")
        pid = int(pid_s)
        if pid not in mine and me not in _ancestors(pid):
            others.append(line)
    return others


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    waited-for descendants: the cold-solo children, every fleet process once stopped)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def foreign_cores(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """Mean number of cores other people's processes used between two snapshots."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / max(wall_s, 1e-9)


def machine_quiet(max_foreign: float, window_s: float = 2.0) -> tuple[bool, str]:
    others = other_benchmarks()
    if others:
        return False, f"another benchmark is running: {others[0][:150]}"
    before, t0 = cpu_snapshot(), time.monotonic()
    time.sleep(window_s)
    used = foreign_cores(before, cpu_snapshot(), time.monotonic() - t0)
    return used <= max_foreign, f"other processes use {used:.2f} cores"


def wait_for_quiet(console: Any, max_wait_s: float, max_foreign: float) -> float:
    """Wait until no other `ops/bench/` process runs and other processes use < max_foreign cores."""
    t0 = time.monotonic()
    quiet, why = machine_quiet(max_foreign)
    while not quiet and time.monotonic() - t0 < max_wait_s:
        console.print(f"[yellow]waiting for a quiet machine: {why}[/]")
        time.sleep(10)
        quiet, why = machine_quiet(max_foreign)
    if not quiet:
        console.print(f"[red]gave up waiting ({why}); timings may be contaminated[/]")
    return time.monotonic() - t0
