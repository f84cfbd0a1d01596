"""`lorafleet flower`: Flower on the fleet's broker with nothing secret on its command line.

`flower_command` builds the command line and environment of `python -m celery -A
lorafleet.scheduler.flower:app flower`: the broker URL reaches Flower as LORAFLEET_REDIS_URL (read
by this module's `app`) and the basic-auth credentials as FLOWER_BASIC_AUTH (Flower reads its
options from FLOWER_* variables). `ps` and /proc/<pid>/cmdline, readable by every local user,
show neither; /proc/<pid>/environ is readable only by the same user and root.

Workers run without remote control (common/messaging/celery_config.py), so Flower cannot ask them which
queues they consume: `app` names lorafleet's queues itself (`lf.rollout`, `lf.train` and the
`lf.node.<node>` of every node that ever registered in Redis, re-read every QUEUE_REFRESH_S),
which Flower's Broker page and /api/queues/length then list with their lengths. Torch-free.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
from lorafleet.common.messaging.celery_config import celery_config

QUEUE_REFRESH_S = 15.0
# a broker URL from any of these would override the fleet's (celery reads them at start-up)
_BROKER_ENV = ("BROKER_URL", "CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")


def flower_command(python: str, port: int, address: str, redis_url: str, basic_auth: str,
                   environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that start Flower with its secrets in `env` only."""
    env = {k: v for k, v in environ.items() if k not in _BROKER_ENV}
    env.update(LORAFLEET_REDIS_URL=redis_url, FLOWER_BASIC_AUTH=basic_auth)
    env.pop("LORAFLEET_FLOWER_BASIC_AUTH", None)  # Flower reads FLOWER_BASIC_AUTH
    # --read_only: a monitor, not a console (no task sending or worker control from Flower);
    # --enable_events=false: workers start with -E, and enable_events is a remote-control
    # broadcast that they do not listen to
    argv = [python, "-m", "celery", "-A", "lorafleet.scheduler.flower:app", "flower", f"--port={port}",
            f"--address={address}", "--read_only=true", "--enable_events=false"]
    return argv, env


def queue_names(node_names: set[str] | list[str]) -> list[str]:
    """lorafleet's queues: the shared ones, then one per (valid) node name."""
    nodes = []
    for node in sorted(node_names):
        with contextlib.suppress(ValueError):
            nodes.append(node_queue(node))
    return [ROLLOUT_QUEUE, TRAIN_QUEUE, *nodes]


def make_app(redis_url: str, refresh_s: float | None = QUEUE_REFRESH_S) -> Any:  # -> celery.Celery
    """A task-less Celery app on `redis_url` whose `task_queues` are lorafleet's queues, kept up to
    date from Redis every `refresh_s` seconds by a daemon thread (None: read once)."""
    import redis
    from celery import Celery
    from kombu import Queue

    from lorafleet.common.redis.connection import connect

    conf = celery_config(redis_url)
    # kombu's own Redis transport: Flower picks its queue-length client by the broker URL's
    # scheme, which lorafleet's consumer-side transport (poison isolation) would hide
    conf.pop("broker_transport", None)
    app = Celery("lorafleet-flower")
    app.conf.update(conf)
    r = connect(redis_url)

    def refresh() -> None:
        with contextlib.suppress(redis.RedisError):
            app.conf.task_queues = [Queue(q) for q in queue_names(r.smembers(Keys.workers))]

    app.conf.task_queues = [Queue(q) for q in queue_names([])]
    refresh()
    if refresh_s:
        def loop() -> None:
            while True:
                time.sleep(refresh_s)
                refresh()

        threading.Thread(target=loop, name="lorafleet-queue-names", daemon=True).start()
    return app


_app: Any = None


def __getattr__(name: str) -> Any:
    """`app`, built on first use (by `celery -A lorafleet.scheduler.flower:app`) from LORAFLEET_*."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        from lorafleet.common.settings import Settings

        _app = make_app(Settings().require_redis_url())
    return _app
