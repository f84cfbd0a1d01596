"""Celery settings shared by the workers (which define the tasks) and the scheduler (which only
sends them by name, so it never imports torch). Redis is the record of truth; Celery only
dispatches, so results are ignored and nothing but JSON is ever accepted."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE
from lorafleet.common.redis.url import kombu_broker, parse_redis_url

TASK_ROLLOUT = "lf.rollout_batch"
TASK_TRAIN = "lf.train_batch"
TASK_OPS = "lf.ops_batch"  # client-driven models' ops, on the node queue of their worker
TASK_SAMPLE = "lf.sample_batch"  # client sample requests, on the shared rollout queue
VISIBILITY_TIMEOUT_S = 6 * 3600  # last-resort redelivery; the reaper re-publishes far sooner
# kombu's Redis transport with poison isolation: a queue item that is not a valid lorafleet
# message is dead-lettered before kombu parses it, instead of stopping the worker
BROKER_TRANSPORT = "lorafleet.common.messaging.broker_transport:Transport"
SENTINEL_TRANSPORT = "lorafleet.common.messaging.broker_transport:SentinelTransport"


def broker_transport_config(broker_url: str) -> dict[str, Any]:
    """Select lorafleet's transport for redis://, rediss:// and redis+sentinel:// brokers (kombu's
    own otherwise). A Sentinel URL becomes kombu's `sentinel://...;sentinel://...` with the master
    name in the transport options; lorafleet's own URL parameters never reach kombu.

    A transport named explicitly bypasses kombu's URL-scheme alias, and with it kombu's TLS
    default for `rediss://` without `ssl_*` parameters, so that default is made explicit here:
    verify the server's certificate, as lorafleet's own Redis clients of the same URL do."""
    target = parse_redis_url(broker_url)
    if target.is_sentinel:
        url, options = kombu_broker(target)
        return {"broker_url": url, "broker_transport": SENTINEL_TRANSPORT,
                "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S, **options}}
    parts = urlsplit(target.url)
    if parts.scheme not in ("redis", "rediss"):
        return {"broker_url": target.url}
    conf: dict[str, Any] = {"broker_url": target.url, "broker_transport": BROKER_TRANSPORT}
    if parts.scheme == "rediss" and not any(k.startswith("ssl_") for k in parse_qs(parts.query)):
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf


def celery_config(broker_url: str, max_deliveries: int | None = None) -> dict[str, Any]:
    """The Celery settings of a lorafleet app on `broker_url`; `max_deliveries` (workers:
    LORAFLEET_MAX_DELIVERIES) bounds how often the screening transport hands one message to Celery
    before it dead-letters it instead (None: the transport's default)."""
    transport = broker_transport_config(broker_url)
    options = {"visibility_timeout": VISIBILITY_TIMEOUT_S, **transport.pop("broker_transport_options", {})}
    if max_deliveries is not None:
        options["max_deliveries"] = max_deliveries
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
        # no remote control: workers do not listen on the broadcast (pidbox) exchange, so no
        # broker client can shut them down, restart their pool, revoke, or change rate and time
        # limits (`celery control ...`, `app.control.*`). lorafleet never uses it: cancel and
        # placement go through Redis. Monitoring works from events (-E) and heartbeats.
        "worker_enable_remote_control": False,
        "task_send_sent_event": True,
        "worker_proc_alive_timeout": 300,  # the hot model loads in worker_process_init
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,  # structlog writes its own lines to stderr
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": options,
        "task_default_queue": TRAIN_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": {TASK_ROLLOUT: {"queue": ROLLOUT_QUEUE}, TASK_TRAIN: {"queue": TRAIN_QUEUE},
                        TASK_SAMPLE: {"queue": ROLLOUT_QUEUE}},
        **transport,
    }


def make_sender(broker_url: str):  # -> celery.Celery
    """A task-less Celery app that publishes by task name."""
    from celery import Celery

    app = Celery("lorafleet-scheduler")
    app.conf.update(celery_config(broker_url))
    return app
