"""Celery settings shared by the workers (which define the tasks) and the scheduler (which only
sends them by name, so it never imports torch). Redis is the record of truth; Celery only
dispatches, so results are ignored and nothing but JSON is ever accepted."""

from __future__ import annotations

from typing import Any

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE

TASK_ROLLOUT = "lf.rollout_batch"
TASK_TRAIN = "lf.train_batch"
VISIBILITY_TIMEOUT_S = 6 * 3600  # last-resort redelivery; the reaper re-publishes far sooner


def celery_config(broker_url: str) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_proc_alive_timeout": 300,  # the hot model loads in worker_process_init
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,  # structlog writes its own lines to stderr
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        "task_default_queue": TRAIN_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": {TASK_ROLLOUT: {"queue": ROLLOUT_QUEUE}, TASK_TRAIN: {"queue": TRAIN_QUEUE}},
    }


def make_sender(broker_url: str):  # -> celery.Celery
    """A task-less Celery app that publishes by task name."""
    from celery import Celery

    app = Celery("lorafleet-scheduler")
    app.conf.update(celery_config(broker_url))
    return app
