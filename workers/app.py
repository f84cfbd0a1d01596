"""The Celery app of the workers: two tasks, a hot runtime per worker process.

Run through `lorafleet worker --node NAME --device cpu|cuda:K`, which starts a prefork worker
with one child (`-c 1`): the child loads the base model once in `worker_process_init` and keeps
it for its lifetime. This module stays torch-free at import time so the prefork parent forks
before torch starts threads.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from pydantic import ValidationError

from lorafleet.common.celery_config import TASK_ROLLOUT, TASK_TRAIN, celery_config
from lorafleet.common.logging import bound_context, configure_logging, get_logger
from lorafleet.common.messages import BatchMessage
from lorafleet.common.settings import get_settings

log = get_logger("lorafleet.worker")
settings = get_settings()
app = Celery("lorafleet")
app.conf.update(celery_config(settings.redis_url or "redis://127.0.0.1:6379/0"))

_runtime = None  # WorkerRuntime, created in the worker child process


@worker_process_init.connect
def _load_runtime(**_: object) -> None:
    global _runtime
    configure_logging(settings.log_format, settings.log_level)
    from lorafleet.common.redis_conn import connect
    from lorafleet.workers.runtime import WorkerConfig, WorkerRuntime

    config = WorkerConfig.from_env()
    if config.device.startswith("cuda"):
        os.environ.setdefault("LOCAL_RANK", "0")
    _runtime = WorkerRuntime(config, settings, connect(app.conf.broker_url))
    log.info("worker ready", node=config.node, device=config.device, model=settings.base_model)


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


@app.task(name=TASK_ROLLOUT, bind=True)
def rollout_batch(self, body: dict) -> None:
    msg = _message(body)
    if msg is not None and _runtime is not None:
        with bound_context(task_id=self.request.id, worker=_runtime.name):
            _runtime.rollout(msg)


@app.task(name=TASK_TRAIN, bind=True)
def train_batch(self, body: dict) -> None:
    msg = _message(body)
    if msg is not None and _runtime is not None:
        with bound_context(task_id=self.request.id, worker=_runtime.name):
            _runtime.train(msg)
