#!/usr/bin/env python3
"""Run a command beside a CPU hog on every core: `make test-stress` runs the test suite this way.

    python ops/scripts/cpu_hog.py [--procs N] -- COMMAND [ARG...]

Starts N busy-looping processes (default: one per core this process may run on), runs COMMAND,
and ends the hogs when COMMAND ends, whatever its outcome: on success, failure, Ctrl-C (the
command gets the SIGINT from the terminal and finishes its own way; the hogs are then ended) or a
SIGTERM to this script (passed on to the command). The hogs also die with this script if it is
killed -9 (Linux: PR_SET_PDEATHSIG). Exits with the command's status.

Why: tests that pass on an idle machine and fail on a busy one (a fixed wall-clock deadline, a
race the scheduler hides) show up only under load, and CI machines are loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys

HOG = "while True:\n    pass\n"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent (this script) dies."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: `stop_hogs` still ends them
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:  # each by its own pid: nothing else is touched
        if hog.poll() is None:
            hog.kill()
    for hog in hogs:
        hog.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)),
                        help="busy processes to start (default: one per usable core)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: cpu_hog.py [--procs N] -- COMMAND [ARG...]")
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    hogs = start_hogs(args.procs)
    print(f"cpu_hog: {args.procs} busy processes beside: {' '.join(command)}", file=sys.stderr, flush=True)
    child: subprocess.Popen | None = None

    def on_term(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)  # the command ends its own way; `wait` below returns
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        child = subprocess.Popen(command)
        while True:
            try:
                code = child.wait()
                return 128 - code if code < 0 else code  # killed by a signal: as a shell says it
            except KeyboardInterrupt:  # the terminal sent SIGINT to the command too: let it finish
                continue
    finally:
        stop_hogs(hogs)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
