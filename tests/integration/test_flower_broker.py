"""A fresh `lorafleet flower`, opened as a new user would (the Broker page first, no Workers
page visited, workers without remote control): it lists lorafleet's queues, not Celery's
default `celery` queue."""

from __future__ import annotations

import base64
import contextlib
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from sentinel_cluster import SentinelCluster

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect, free_port
from lorafleet.scheduler.embedded import LocalFleet

pytestmark = pytest.mark.slow


def test_broker_page_lists_lorafleet_queues_on_first_open(r: redis.Redis, redis_url: str,
                                                         tmp_path: Path) -> None:
    _check_broker_page(r, redis_url, tmp_path)


def test_broker_page_through_sentinel(tmp_path: Path) -> None:
    """The same on a Sentinel-managed Redis (`redis+sentinel://`): Flower finds the primary
    through the sentinels (kombu's Sentinel transport, the master name in its options)."""
    cluster = SentinelCluster().start()
    try:
        url = cluster.url()
        _check_broker_page(connect(url), url, tmp_path)
    finally:
        cluster.stop()


def _check_broker_page(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    r.sadd(Keys.workers, "n1")
    r.rpush("lf.train", "x")
    fleet = LocalFleet(workers=0, redis_url=redis_url, log_dir=tmp_path / "logs")
    port = free_port()
    auth = "Basic " + base64.b64encode(b"admin:pw-for-test").decode()
    try:
        flower = fleet.spawn("flower", ["flower", "--port", str(port)],
                             env={"LORAFLEET_FLOWER_BASIC_AUTH": "admin:pw-for-test"})
        deadline = time.monotonic() + 60
        while True:  # /healthcheck (no page, no auth) says when Flower listens
            assert flower.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "logs" / "flower.log").read_text()[-2000:]
            with contextlib.suppress(urllib.error.URLError, ConnectionError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5):
                break
            time.sleep(0.3)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/broker", headers={"Authorization": auth})
        with urllib.request.urlopen(req, timeout=10) as res:
            page = res.read().decode()
        rows = re.findall(r"<td>\s*([\w.-]+)\s*</td>", page)
        for q in ("lf.rollout", "lf.train", "lf.node.n1"):
            assert q in rows, rows
        assert "celery" not in rows
    finally:
        fleet.stop()
