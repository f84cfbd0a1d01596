"""The Celery app of the workers: two tasks, a hot runtime per worker process.

`lorafleet worker` builds the process's `Settings` and calls `start_worker`, which runs a prefork
Celery worker with one child (`-c 1`) in this same process: the child inherits the settings,
loads the base model once in `worker_process_init` and keeps it for its lifetime. This module
stays torch-free at import time so the prefork parent forks before torch starts threads.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from pydantic import ValidationError

from lorafleet.common.celery_config import TASK_ROLLOUT, TASK_TRAIN, celery_config
from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue
from lorafleet.common.logging import bound_context, configure_logging, get_logger
from lorafleet.common.messages import BatchMessage
from lorafleet.common.settings import Settings

log = get_logger("lorafleet.worker")
app = Celery("lorafleet")  # configured by start_worker: there is no default broker

_settings: Settings | None = None  # set in the parent by start_worker, inherited by the child
_runtime = None  # WorkerRuntime, created in the worker child process


def start_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Run an always-hot worker for `settings.node` in this process until it is stopped."""
    global _settings
    _settings = settings
    app.conf.update(celery_config(settings.require_redis_url()))
    queues = ",".join([ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue(settings.node)])
    app.worker_main(["worker", "-Q", queues, "-n", f"{settings.node}@%h", "-c", "1", "-P", "prefork",
                     "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle"])


@worker_init.connect
def _require_settings(**_: object) -> None:
    if _settings is None:
        raise RuntimeError("start lorafleet workers with `lorafleet worker`, which configures them")


@worker_process_init.connect
def _load_runtime(**_: object) -> None:
    global _runtime
    assert _settings is not None
    configure_logging(_settings.log_format, _settings.log_level)
    from lorafleet.common.redis_conn import connect
    from lorafleet.workers.runtime import WorkerRuntime

    if _settings.device.startswith("cuda"):
        os.environ.setdefault("LOCAL_RANK", "0")
    _runtime = WorkerRuntime(_settings, connect(_settings.require_redis_url()))
    log.info("worker ready", node=_settings.node, device=_settings.device, model=_settings.base_model)


@worker_process_shutdown.connect
def _close_runtime(**_: object) -> None:
    if _runtime is not None:
        _runtime.close()


def _message(body: object) -> BatchMessage | None:
    try:
        return BatchMessage.model_validate(body)
    except ValidationError as exc:  # a malformed message is dropped (acked), never crashes
        log.error("invalid batch message dropped", error=str(exc)[:500])
        return None


def _handle(task_id: str, kind: str, body: object) -> None:
    msg = _message(body)
    if _runtime is None:
        return
    started, outcome = time.time(), "error"
    try:
        if msg is not None:
            with bound_context(task_id=task_id, worker=_runtime.name):
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
