"""`ScoringPool`: rewards that may be slow scored in child processes, each job with a deadline.

Why processes: a reward is user-controlled code (a regex of the spec, a plugin of the
`lorafleet.rewards` / `lorafleet.envs` entry-point groups) and may run for long inside C code (the
`regex` engine) where no Python thread can be interrupted. A child process can: a job past its
deadline has its process killed and replaced, and the pool keeps serving the other jobs.

Each process runs `python -m lorafleet.workers.scoring` (spawned with `subprocess`, which works
inside Celery's daemonic prefork child where `multiprocessing` may not start children). Requests
go down its stdin as length-prefixed pickles (the parent is trusted); answers come back on a
private pipe as length-prefixed JSON, so nothing the reward code prints, and nothing it could
forge, is unpickled by the worker. The child's stdout is pointed at stderr so a `print` in a
plugin cannot corrupt the frames.

A job's deadline counts from when a process starts it (not from when it was queued), so a job
queued behind another tenant's slow job is not failed for that tenant's slowness.

Torch-free: the child imports only the reward and env registries.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.tasks.envs import BUILTIN_ENVS
from lorafleet.common.tasks.rewards import BUILTIN_REWARDS

_HEADER = struct.Struct(">Q")
_START_TIMEOUT_S = 120.0  # a loaded machine may take long to import pydantic and the registries
# built-in rewards whose run time is bounded by the completion's length with patterns of ours;
# `regex_match` runs the spec's own pattern, so it is scored in the pool
_BOUNDED_REWARDS = frozenset(BUILTIN_REWARDS) - {"regex_match"}


class ScoreTimeout(RuntimeError):
    """A scoring job ran past its deadline; its process was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"scoring ran past its deadline of {seconds:g} s")
        self.seconds = seconds


class ScoreFailed(RuntimeError):
    """The reward raised in the child: `index` is the sample, `error` the exception's repr."""

    def __init__(self, index: int, error: str) -> None:
        super().__init__(error)
        self.index, self.error = index, error


@dataclass(frozen=True)
class ScoreJob:
    """One experiment's samples of one step. `reward`: a `RewardSpec` as a dict (dataset tasks)
    or None with `env` / `env_args` (env tasks); `items`: (prompt, row, completion) per sample."""

    reward: Mapping[str, Any] | None
    env: str | None
    env_args: Mapping[str, Any]
    items: Sequence[tuple[str, Mapping[str, Any], str]]


def needs_pool(spec: ExperimentSpec) -> bool:
    """Whether `spec`'s scoring may be slow: a plugin env or reward, or a regex of the spec's.
    The built-in envs and the other built-in rewards are scored in-process (microseconds)."""
    if spec.env is not None:
        return spec.env not in BUILTIN_ENVS
    reward = spec.reward
    if reward is None:
        return False
    return reward.fn not in _BOUNDED_REWARDS or reward.format_regex is not None


def job_of(spec: ExperimentSpec, prompts: Sequence[Any], texts: Sequence[Sequence[str]]) -> ScoreJob:
    """The pool job scoring `texts` (one list of completions per prompt) of `spec`'s task."""
    items = [(str(p), dict(getattr(p, "row", {}) or {}), t)
             for p, group in zip(prompts, texts, strict=True) for t in group]
    reward = spec.reward.model_dump(mode="json") if spec.env is None and spec.reward is not None else None
    return ScoreJob(reward, spec.env, dict(spec.env_args or {}), items)


@dataclass
class _Task:
    job: ScoreJob
    deadline_s: float
    future: Future


class _Child:
    """One scoring process and its pipes."""

    def __init__(self, python: str) -> None:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [python, "-m", "lorafleet.workers.scoring", str(write_fd)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, pass_fds=(write_fd,), env=env, close_fds=True)
        os.close(write_fd)
        self.answers = os.fdopen(read_fd, "rb", buffering=0)
        assert self.proc.stdin is not None
        self.stdin: BinaryIO = self.proc.stdin
        # the child says "ready" once its imports are done: start-up never counts against a job
        try:
            if self.receive(_START_TIMEOUT_S) != ["ready"]:
                raise EOFError("the scoring process did not start")
        except BaseException:
            self.kill()
            raise

    def send(self, job: ScoreJob) -> None:
        data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self.stdin.write(_HEADER.pack(len(data)) + data)
        self.stdin.flush()

    def receive(self, timeout_s: float) -> Any:
        """The answer, or raise TimeoutError (none by then) / EOFError (the process died)."""
        ready, _, _ = select.select([self.answers], [], [], max(0.0, timeout_s))
        if not ready:
            raise TimeoutError
        header = _read_exactly(self.answers, _HEADER.size)
        return json.loads(_read_exactly(self.answers, _HEADER.unpack(header)[0]))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.stdin, self.answers):
            with contextlib.suppress(OSError):
                f.close()


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            raise EOFError("the scoring process exited")
        out += chunk
    return bytes(out)


class ScoringPool:
    """`processes` scoring processes, fed from one queue: jobs of different experiments run at
    once, each up to its own deadline."""

    def __init__(self, processes: int = 2, python: str = sys.executable, eager: bool = False) -> None:
        """`eager`: start the processes now; else each on its slot's first job (a worker whose
        experiments never need the pool never starts one). Start-up is never counted against a
        job's deadline, and a killed process's replacement is started at once."""
        self.python = python
        self.eager = eager
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._closed = False
        self.killed = 0  # processes killed at a deadline (tests, logs)
        self.start_error = ""  # why the last process could not start
        self._slots = [threading.Thread(target=self._serve, name=f"lorafleet-score-{i}", daemon=True)
                       for i in range(processes)]
        for t in self._slots:
            t.start()

    def submit(self, job: ScoreJob, deadline_s: float) -> Future:
        """-> a future of (rewards, seconds the job ran); its exception is `ScoreTimeout`,
        `ScoreFailed`, or a RuntimeError if a process could not run it."""
        if self._closed:
            raise RuntimeError("the scoring pool is closed")
        future: Future = Future()
        self._tasks.put(_Task(job, deadline_s, future))
        return future

    def close(self) -> None:
        self._closed = True
        for _ in self._slots:
            self._tasks.put(None)

    def _start(self) -> _Child | None:
        try:
            return _Child(self.python)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            self.start_error = repr(exc)
            return None

    def _serve(self) -> None:
        child = self._start() if self.eager else None
        try:
            while (task := self._tasks.get()) is not None:
                if not task.future.set_running_or_notify_cancel():
                    continue
                if child is None or child.proc.poll() is not None:
                    child = self._start()
                    if child is None:
                        task.future.set_exception(RuntimeError(f"no scoring process: {self.start_error}"))
                        continue
                started = time.perf_counter()
                try:
                    child.send(task.job)
                    answer = child.receive(task.deadline_s - (time.perf_counter() - started))
                except TimeoutError:
                    child.kill()  # the only way to stop a reward inside C code
                    self.killed += 1
                    task.future.set_exception(ScoreTimeout(task.deadline_s))
                    child = self._start()
                    continue
                except (OSError, EOFError, ValueError) as exc:
                    child.kill()
                    task.future.set_exception(RuntimeError(f"the scoring process failed: {exc!r}"))
                    child = self._start()
                    continue
                seconds = time.perf_counter() - started
                if answer[0] == "ok":
                    task.future.set_result(([float(x) for x in answer[1]], seconds))
                else:
                    task.future.set_exception(ScoreFailed(int(answer[1]), str(answer[2])))
        finally:
            if child is not None:
                child.kill()


# ---- the child process ---------------------------------------------------------------------
def _scorer(job: ScoreJob, cache: dict[str, Any]) -> Any:
    """(prompt, row, completion) -> reward, built once per distinct reward or env spec."""
    from lorafleet.common.schemas import RewardSpec
    from lorafleet.common.tasks.envs import get_env
    from lorafleet.common.tasks.rewards import make_reward

    key = json.dumps([job.reward, job.env, job.env_args], sort_keys=True, default=str)
    if key not in cache:
        if job.reward is not None:
            fn = make_reward(RewardSpec.model_validate(job.reward))
            cache[key] = lambda p, row, t: fn(p, t, row)
        else:
            env = get_env(job.env or "", job.env_args)
            cache[key] = lambda p, row, t: env.reward(p, t)
    return cache[key]


def _child_main(answer_fd: int) -> None:
    answers = os.fdopen(answer_fd, "wb", buffering=0)
    os.dup2(2, 1)  # a print in reward code goes to stderr, never into the frames
    # a notch below the worker: on a busy CPU a slow reward yields to the batch's generation and
    # training, which its co-tenants wait for (its own deadline is wall time, so it only slows itself)
    os.nice(5)
    # the worker's process group may be signalled as a whole (a supervisor's SIGTERM, a ^C): this
    # process ends with its worker (stdin closes), not before it with a half-scored job
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests = sys.stdin.buffer
    cache: dict[str, Any] = {}
    import lorafleet.common.tasks.rewards  # noqa: F401 - the registries and pydantic, before "ready"

    _send(answers, ["ready"])
    while True:
        try:
            header = _read_exactly(requests, _HEADER.size)
        except EOFError:
            return
        job: ScoreJob = pickle.loads(_read_exactly(requests, _HEADER.unpack(header)[0]))
        index = -1
        try:
            score = _scorer(job, cache)
            out = []
            for prompt, row, text in job.items:
                index += 1  # which sample raised, for the error
                out.append(float(score(prompt, row, text)))
            answer: list[Any] = ["ok", out]
        except Exception as exc:  # noqa: BLE001 - reported to the worker, which fails the experiment
            answer = ["error", index, repr(exc)[:2000]]
        _send(answers, answer)


def _send(f: BinaryIO, answer: list[Any]) -> None:
    data = json.dumps(answer).encode()
    f.write(_HEADER.pack(len(data)) + data)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
