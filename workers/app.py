"""The Celery app of the workers: four tasks (rollout, train, client ops, client samples), a hot
runtime per worker process.

`lorafleet worker` builds the process's `Settings` and calls `start_worker`, which runs a prefork
Celery worker with one child (`-c 1`) in this same process: the child inherits the settings,
loads the base model once in `worker_process_init` and keeps it for its lifetime. This module
stays torch-free at import time so the prefork parent forks before torch starts threads.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutting_down
from pydantic import BaseModel, ValidationError

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue
from lorafleet.common.logging import bound_context, configure_logging, get_logger
from lorafleet.common.messaging.celery_config import (
    TASK_OPS,
    TASK_ROLLOUT,
    TASK_SAMPLE,
    TASK_TRAIN,
    celery_config,
)
from lorafleet.common.messaging.dead_letters import DeadLetters
from lorafleet.common.messaging.messages import BatchMessage, SampleMessage
from lorafleet.common.settings import Settings

log = get_logger("lorafleet.worker")
app = Celery("lorafleet")  # configured by start_worker: there is no default broker

_settings: Settings | None = None  # set in the parent by start_worker, inherited by the child
_runtime = None  # WorkerRuntime, created in the worker child process
# Set by the Celery parent when it starts shutting down (SIGTERM, SIGINT); created before the
# pool forks, so the child's heartbeat sees it and stops chaining work at once.
_shutting_down = multiprocessing.get_context("fork").Event()


def start_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run an always-hot worker for `settings.node` in this process until it is stopped; -> the
    worker's exit status (0 after a requested shutdown, non-zero after an unrecoverable error).

    Celery's command line is run directly (what `app.worker_main` does): worker_main, and
    `app.start` under it, drop the exit status the worker command ends with, so a worker whose
    main process died of an unexpected exception ("Unrecoverable error") exited 0, and a
    supervisor that restarts on failure left it down."""
    global _settings
    _settings = settings
    app.conf.update(celery_config(settings.require_redis_url(), max_deliveries=settings.max_deliveries))
    queues = ",".join([ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue(settings.node)])
    return run_celery(["worker", "-Q", queues, "-n", f"{settings.node}@%h", "-c", "1", "-P", "prefork",
                       "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle"])


def run_celery(argv: list[str]) -> int:
    """`celery <argv>` on this app -> its exit status (click's, returned in non-standalone mode
    or raised as Exit; a status that is not an int counts as a failure)."""
    from celery.bin.celery import celery as celery_command
    from click.exceptions import Exit

    celery_command.params[0].default = app  # the --app option, as `app.start` sets it
    try:
        code = celery_command.main(args=argv, standalone_mode=False)
    except Exit as exc:
        code = exc.exit_code
    finally:
        celery_command.params[0].default = None
    if code is None:
        return 0
    return code if isinstance(code, int) and not isinstance(code, bool) else 1


@worker_init.connect
def _require_settings(**_: object) -> None:
    if _settings is None:
        raise RuntimeError("start lorafleet workers with `lorafleet worker`, which configures them")


@worker_process_init.connect
def _load_runtime(**_: object) -> None:
    global _runtime
    assert _settings is not None
    configure_logging(_settings.log_format, _settings.log_level)
    from lorafleet.common.redis.connection import connect
    from lorafleet.workers.runtime import WorkerRuntime

    if _settings.device.startswith("cuda"):
        os.environ.setdefault("LOCAL_RANK", "0")
    s = _settings
    r = connect(s.require_redis_url(), s.redis_socket_timeout_s, s.redis_connect_timeout_s)
    _runtime = WorkerRuntime(s, r, stop_signal=_shutting_down)
    log.info("worker ready", node=s.node, device=s.device, model=s.base_model)


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    _shutting_down.set()


@worker_process_shutdown.connect
def _close_runtime(**_: object) -> None:
    if _runtime is not None:
        _runtime.close()


def _message(body: object, queue: str = "", kind: type[BaseModel] = BatchMessage) -> Any:
    """The batch of a task's body, or None: a malformed message is dropped (acked), never crashes.

    The broker transport (lorafleet.common.messaging.broker_transport) dead-letters invalid messages before
    they reach a task; this is the second line, and records what it drops in the same place."""
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        log.error("invalid batch message dropped", queue=queue, error=str(exc)[:500])
        if _runtime is not None:
            try:
                DeadLetters(_runtime.r).add(queue, json.dumps(body, default=repr), "invalid_batch",
                                            f"reached the task: {exc}")
            except Exception as err:  # recording must not fail the drop
                log.error("invalid batch message not recorded", queue=queue, error=repr(err))
        return None


def _finish_step_on_sigterm() -> None:
    """A prefork child exits at once on SIGTERM (billiard installs that handler right after
    `worker_process_init`, so it is replaced here, in the first task). A process-group SIGTERM
    (docker stop, systemd, Ctrl-C of `lorafleet run`) must instead let the current step finish or
    be released (`WorkerRuntime.stop_requested`), chaining nothing; the parent then ends the
    child. Idle children keep billiard's handler until their first task: nothing to finish."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(*_: object) -> None:
    _shutting_down.set()


def _handle(task_id: str, kind: str, body: object) -> None:
    _finish_step_on_sigterm()
    request = getattr(app.current_task, "request", None)  # the queue, for the dead-letter record
    queue = str((getattr(request, "delivery_info", None) or {}).get("routing_key") or "")
    msg = _message(body, queue, SampleMessage if kind == "sample" else BatchMessage)
    if isinstance(msg, BatchMessage) and (msg.phase == "ops") != (kind == "ops"):
        log.error("batch message of the wrong phase for its task dropped", task=kind, phase=msg.phase)
        msg = None
    if _runtime is None:
        return
    started, outcome = time.time(), "error"
    try:
        if msg is not None:
            with bound_context(task_id=task_id, worker=_runtime.name):
                if kind == "sample":
                    _runtime.client.run_samples(msg)
                elif kind == "ops":
                    _runtime.client.run_ops(msg)
                else:
                    _runtime.run(msg)
            outcome = "ok"
        else:
            outcome = "invalid"
    finally:
        _runtime.record_task(task_id, kind, started, time.time(), outcome)


@app.task(name=TASK_ROLLOUT, bind=True)
def rollout_batch(self, body: dict) -> None:
    _handle(self.request.id, "rollout", body)


@app.task(name=TASK_TRAIN, bind=True)
def train_batch(self, body: dict) -> None:
    _handle(self.request.id, "train", body)


@app.task(name=TASK_OPS, bind=True)
def ops_batch(self, body: dict) -> None:
    _handle(self.request.id, "ops", body)


@app.task(name=TASK_SAMPLE, bind=True)
def sample_batch(self, body: dict) -> None:
    _handle(self.request.id, "sample", body)
