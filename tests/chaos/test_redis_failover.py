"""Redis failover under a running fleet: a Sentinel-managed primary, one replica and three
sentinels (tests/sentinel_cluster.py). Every lorafleet process reaches Redis only through the
sentinels (`redis+sentinel://`, `wait_replicas=1`): its own clients and Celery's broker.

The primary is killed -9 mid-run, twice. The sentinels promote the replica; the dead server comes
back empty as the new primary's replica. Every experiment must still end exactly as an
uninterrupted run (`assert_exact`: each step committed once, versions contiguous, float64 weights
equal), with every process that was not killed still running."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from chaoskit import assert_exact, specs, wait_until
from sentinel_cluster import SentinelCluster

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect, free_port
from lorafleet.common.redis.replication import ReplicationShortfall, replication_health
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet

pytestmark = pytest.mark.slow

FAST_FAULTS = {"LORAFLEET_REDIS_SOCKET_TIMEOUT_S": "2", "LORAFLEET_RETRY_BACKOFF_MAX_S": "1"}


@pytest.fixture
def cluster():
    c = SentinelCluster().start()
    yield c
    c.stop()


def _progress(client: FleetClient, ids: list[str]) -> int | None:
    """Committed steps of all experiments; None while Redis does not answer."""
    try:
        return sum(client.get(i).step for i in ids)
    except redis.RedisError:
        return None


def _api_get(port: int, path: str, key: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_primary_killed_twice_mid_run_loses_and_repeats_no_step(cluster: SentinelCluster, fleet_env,
                                                                model_cache, tmp_path: Path) -> None:
    """Two failovers: the primary is killed -9, the replica promoted, the dead server restarted
    as its replica; then the new primary is killed too. Workers, a leader and a standby
    scheduler and the HTTP API all reach Redis through the sentinels only."""
    url = cluster.url(wait_replicas=1, wait_timeout_ms=1000)
    env = {**fleet_env, **FAST_FAULTS, "LORAFLEET_TEST_TRAIN_DELAY_S": "0.2"}
    port = free_port()
    fleet = LocalFleet(workers=2, redis_url=url, log_dir=tmp_path / "logs", env=env)
    fleet.start(schedulers=2)
    try:
        fleet.start_api(port)
        fleet.wait_for_api(port)
        _, key = ApiKeyStore(connect(url)).create("failover", admin=True)
        client = FleetClient(url, fleet_env["LORAFLEET_STORE_URL"])
        sp = specs(3, steps=16)
        ids = client.submit_many(sp)
        rounds = []
        for at in (2, 8):  # committed steps of the slowest experiment when the primary dies
            wait_until(lambda at=at: min(client.get(i).step for i in ids) >= at, what=f"step {at}")
            before = _progress(client, ids) or 0
            t0 = time.monotonic()
            old = cluster.kill9_primary()
            failover_s = cluster.wait_failover(old)
            cluster.restart_as_replica(old)
            wait_until(lambda before=before: (_progress(client, ids) or 0) > before, timeout_s=120,
                       what="a step committed after the failover")
            rounds.append({"failover_s": round(failover_s, 2), "recover_s": round(time.monotonic() - t0, 2)})
            # the API follows the primary too: it answers (not 503) for a running experiment
            wait_until(lambda: _api_get(port, f"/v1/experiments/{ids[0]}", key) == 200, timeout_s=60,
                       what="the API answering after the failover")
        client.wait(ids, timeout_s=600)
        dead = {name: p.returncode for name, p in fleet.procs.items() if p.poll() is not None}
        assert dead == {}, dead  # no scheduler, no worker and not the API exited
        r = connect(url)
        assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, r)
        assert _api_get(port, "/readyz", key) == 200
        commits = [f["exp"] for _, f in r.xrange(Keys.events) if f["type"] == "train_committed"]
        want = {i: s["steps"] for i, s in zip(ids, sp, strict=True)}
        figures = {"rounds": rounds, "steps": sum(want.values()), "commits": len(commits),
                   "steps_lost": sum(max(0, n - commits.count(i)) for i, n in want.items()),
                   "steps_repeated": sum(max(0, commits.count(i) - n) for i, n in want.items()),
                   "refusals": {i: StepProtocol(r).refusals(i) for i in ids}}
        (tmp_path / "failover.json").write_text(json.dumps(figures))
        print("failover figures", json.dumps(figures))
    finally:
        fleet.stop()


def test_a_write_no_replica_confirmed_is_never_reported_done(cluster: SentinelCluster) -> None:
    """The replica stopped (SIGSTOP): a write (a plain command, a protocol script) reaches the
    primary but cannot be confirmed, so the caller gets ReplicationShortfall (a Redis fault: its
    loop retries), never a success. Once the replica is back, the same writes are confirmed."""
    r = connect(cluster.url(wait_replicas=1, wait_timeout_ms=300))
    assert replication_health(r) == {"role": "master", "replicas": 1, "wait_replicas": 1, "ok": True}
    incr = r.register_script("return redis.call('INCR', KEYS[1])")
    assert incr(keys=[Keys.fence]) == 1
    replica = cluster.procs["replica"].pid
    os.kill(replica, signal.SIGSTOP)
    try:
        with pytest.raises(ReplicationShortfall, match="0 of 1 replica"):
            r.set("lf:test:x", 1)
        with pytest.raises(ReplicationShortfall, match="EVALSHA"):
            incr(keys=[Keys.fence])
        pipe = r.pipeline(transaction=False)
        pipe.incr(Keys.fence)
        with pytest.raises(ReplicationShortfall, match="pipeline"):
            pipe.execute()
        assert r.get(Keys.fence) == "3"  # reads need no replica; the writes did reach the primary
        # a write of another connection (no WAIT of its own), then a script of ours that writes
        # nothing: its WAIT still covers that write (the fence), so it is not confirmed either
        redis.Redis(port=cluster.primary_port()).set("lf:test:other", 1)
        noop = r.register_script("return 7")
        with pytest.raises(ReplicationShortfall, match="EVALSHA"):
            noop(keys=[], args=[])
    finally:
        os.kill(replica, signal.SIGCONT)
    assert wait_until(lambda: incr(keys=[Keys.fence]), what="the replica confirming again") == 4
    assert redis.Redis(port=cluster.ports["replica"], decode_responses=True).get(Keys.fence) == "4"
