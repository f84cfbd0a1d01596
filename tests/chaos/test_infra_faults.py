"""Infrastructure faults around a running fleet: Redis hung (SIGSTOP), Redis killed -9 and
restarted from its AOF, a worker paused past its lease, workers killed -9 over and over, the
store gone for over a minute. In every case every process that was not killed keeps running,
and every experiment ends exactly as an uninterrupted run would (`assert_exact`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from chaoskit import ChaosRedis, assert_exact, specs, wait_until

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import TMP_PREFIX, TRAINER_TENSORS_FILE
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet

pytestmark = pytest.mark.slow

# Redis calls give up waiting after 2 s (not 10): a hang is noticed quickly; backoff capped at 1 s.
FAST_FAULTS = {"LORAFLEET_REDIS_SOCKET_TIMEOUT_S": "2", "LORAFLEET_RETRY_BACKOFF_MAX_S": "1"}


@pytest.fixture
def chaos_redis():
    server = ChaosRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chaos_fleet(chaos_redis: ChaosRedis, fleet_env: dict[str, str], tmp_path: Path):
    fleets: list[LocalFleet] = []

    def start(workers: int, schedulers: int = 1, env: dict[str, str] | None = None) -> LocalFleet:
        fleet = LocalFleet(workers=workers, redis_url=chaos_redis.url, log_dir=tmp_path / "logs",
                           env={**fleet_env, **FAST_FAULTS, **(env or {})})
        fleets.append(fleet)
        return fleet.start(schedulers=schedulers)

    yield start
    for fleet in fleets:
        fleet.stop()


def log_events(path: Path, event: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event:
                out.append(e)
    return out


def _submit(chaos_redis: ChaosRedis, fleet_env: dict, n: int, steps: int) -> tuple[FleetClient, list, list]:
    client = FleetClient(chaos_redis.url, fleet_env["LORAFLEET_STORE_URL"])
    sp = specs(n, steps)
    return client, sp, client.submit_many(sp)


def test_redis_hung_for_12s_is_ridden_out_by_leader_standby_and_workers(chaos_fleet, chaos_redis, fleet_env,
                                                                          model_cache, tmp_path):
    fleet = chaos_fleet(workers=2, schedulers=2)
    client, sp, ids = _submit(chaos_redis, fleet_env, 3, steps=6)
    wait_until(lambda: min(client.get(i).step for i in ids) >= 2, what="progress")
    chaos_redis.pause()
    time.sleep(12)  # 6x the socket timeout, 4x the lease and the leader TTL
    chaos_redis.resume()
    client.wait(ids, timeout_s=300)
    dead = {name: p.returncode for name, p in fleet.procs.items() if p.poll() is not None}
    assert dead == {}, dead  # no scheduler (leader or standby) and no worker exited
    def outages() -> list[dict]:  # the workers may finish before a scheduler's next try
        logs = [tmp_path / "logs" / f"{name}.log" for name in ("scheduler", "scheduler1")]
        found = [log_events(path, "redis back") for path in logs]
        return found if all(found) else []

    back = wait_until(outages, timeout_s=30, what="both schedulers logging the end of the outage")
    assert all(e["outage_s"] >= 8 for found in back for e in found), back  # logged, with its length
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, connect(chaos_redis.url))


def test_redis_killed_and_restarted_from_its_aof(chaos_fleet, chaos_redis, fleet_env, model_cache, tmp_path):
    fleet = chaos_fleet(workers=2)
    client, sp, ids = _submit(chaos_redis, fleet_env, 3, steps=6)
    wait_until(lambda: min(client.get(i).step for i in ids) >= 2, what="progress")
    chaos_redis.kill9()
    time.sleep(3)
    chaos_redis.start()  # same port, same AOF
    client.wait(ids, timeout_s=300)
    dead = {name: p.returncode for name, p in fleet.procs.items() if p.poll() is not None}
    assert dead == {}, dead
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, connect(chaos_redis.url))


def test_worker_paused_past_its_lease_is_fenced_out(chaos_fleet, chaos_redis, fleet_env, model_cache):
    fleet = chaos_fleet(workers=2, env={"LORAFLEET_TEST_TRAIN_DELAY_S": "1.0"})
    client, sp, ids = _submit(chaos_redis, fleet_env, 2, steps=10)  # still running after the pause
    r = connect(chaos_redis.url)

    def claimed_train():
        for i in ids:
            st = client.get(i)
            task = r.hgetall(Keys.task(i, st.step, "train"))
            if st.step >= 1 and task.get("status") == "claimed":
                return task
        return None

    victim = wait_until(claimed_train, what="a claimed train step")["owner"].split(":")[0]
    os.killpg(fleet.procs[victim].pid, signal.SIGSTOP)
    time.sleep(8)  # > 2x the 3 s lease: the step is taken over elsewhere
    os.killpg(fleet.procs[victim].pid, signal.SIGCONT)
    assert min(client.get(i).step for i in ids) < 10  # the zombie wakes up while the run goes on
    client.wait(ids, timeout_s=300)
    assert all(p.poll() is None for p in fleet.procs.values())
    refused = [StepProtocol(r).refusals(i) for i in ids]
    # the zombie's late commit, or the duplicate message of the step it held, was refused
    assert sum(sum(x.values()) for x in refused) >= 1, refused
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, r)


# kills are not the experiments' fault: a budget the storm cannot spend
STORM_ENV = {"LORAFLEET_MAX_ATTEMPTS": "50", "LORAFLEET_TEST_TRAIN_DELAY_S": "0.2"}


def kill_storm(fleet: LocalFleet, client: FleetClient, ids: list[str], kills: int = 8, seed: int = 7) -> int:
    """Kill -9 a random worker at random moments (rollout, train, publish, commit, start-up) and
    restart it, `kills` times or until every experiment is done -> the kills made."""
    rng = random.Random(seed)
    nodes = sorted(name for name in fleet.procs if name.startswith("w"))
    made = 0
    while made < kills and not all(client.get(i).done for i in ids):
        time.sleep(rng.uniform(0.5, 2.5))
        victim = rng.choice(nodes)
        fleet.kill(victim)
        made += 1
        fleet.start_worker(victim)
    fleet.wait_for_workers(len(nodes), timeout_s=120)
    return made


def test_kill_storm(chaos_fleet, chaos_redis, fleet_env, model_cache):
    """Workers killed -9 at random moments and restarted, 8 times, while 4 experiments run
    (tests/chaos/test_shared_nothing.py: the same with nothing shared but Redis and S3)."""
    fleet = chaos_fleet(workers=2, env=STORM_ENV)
    client, sp, ids = _submit(chaos_redis, fleet_env, 4, steps=24)
    kills = kill_storm(fleet, client, ids)
    client.wait(ids, timeout_s=600)
    assert kills == 8, f"the run ended after {kills} kills: make it longer"
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, connect(chaos_redis.url))


def test_store_gone_for_65s_fails_nothing(chaos_fleet, chaos_redis, fleet_env, model_cache, tmp_path):
    fleet = chaos_fleet(workers=1)
    client, sp, ids = _submit(chaos_redis, fleet_env, 2, steps=5)
    r = connect(chaos_redis.url)
    pid = json.loads(wait_until(lambda: r.get(Keys.worker("w0")), what="heartbeat"))["pid"]
    wait_until(lambda: min(client.get(i).step for i in ids) >= 1, what="progress")
    store = Path(fleet_env["LORAFLEET_STORE_URL"].removeprefix("file://"))
    away = store.with_name("store-away")
    store.rename(away)
    store.write_text("the store is unreachable")  # every read and write fails with an OSError
    stalled_at = [client.get(i).step for i in ids]
    time.sleep(65)
    assert [client.get(i).status for i in ids] == ["running"] * 2  # paused, not failed
    assert [client.get(i).step for i in ids] <= [s + 1 for s in stalled_at]
    store.unlink()
    away.rename(store)
    client.wait(ids, timeout_s=300)
    assert fleet.procs["w0"].poll() is None and json.loads(r.get(Keys.worker("w0")))["pid"] == pid
    counted = [f for _, f in r.xrange(Keys.events) if f["type"] == "attempt_released" and f["counted"] == "1"]
    assert counted == []  # the outage cost no experiment an attempt
    assert all(client.get(i).attempts == 0 for i in ids)
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, r)
    shutil.rmtree(away, ignore_errors=True)


def _staged_snapshot(store: Path) -> bool:
    """A snapshot being published: a temp dir that already holds the AdamW state file."""
    return any(store.glob(f"*/{TMP_PREFIX}*/{TRAINER_TENSORS_FILE}"))


def test_kill_9_during_snapshots_recovers_from_snapshot_and_replay(chaos_fleet, chaos_redis, fleet_env,
                                                                      model_cache, tmp_path):
    """Snapshots (AdamW state) every 4 versions, each (but v0's) staged for 1 s before it is
    renamed into place; both workers are killed -9 while one is staged (3 times) and at random
    moments after progress (3 times). Every restart rebuilds the committed versions from the
    newest snapshot + the replay log. The result is exact, and the replay log is gone once every
    experiment completed (its last version is a snapshot)."""
    env = {"LORAFLEET_MAX_ATTEMPTS": "50", "LORAFLEET_SNAPSHOT_EVERY_STEPS": "4",
           "LORAFLEET_TEST_SNAPSHOT_DELAY_S": "1.0", "LORAFLEET_MAX_RESIDENT": "1"}
    fleet = chaos_fleet(workers=2, env=env)
    client, sp, ids = _submit(chaos_redis, fleet_env, 3, steps=14)
    store = Path(fleet_env["LORAFLEET_STORE_URL"].removeprefix("file://"))
    rng = random.Random(11)
    mid_snapshot = random_kills = 0
    while (mid_snapshot < 3 or random_kills < 3) and not all(client.get(i).done for i in ids):
        if mid_snapshot < 3:
            wait_until(lambda: _staged_snapshot(store) or all(client.get(i).done for i in ids),
                       timeout_s=120, what="a snapshot being staged")
            if all(client.get(i).done for i in ids):
                break
            mid_snapshot += 1
        else:  # once every experiment made progress since the last restart, at a random moment
            floor = min(client.get(i).step for i in ids)
            wait_until(lambda f=floor: min(client.get(i).step for i in ids) > f
                       or all(client.get(i).done for i in ids), timeout_s=120, what="progress")
            time.sleep(rng.uniform(0.0, 0.5))
            random_kills += 1
        for w in ("w0", "w1"):
            fleet.kill(w)
        for w in ("w0", "w1"):
            fleet.start_worker(w)
        fleet.wait_for_workers(2, timeout_s=120)
    client.wait(ids, timeout_s=600)
    assert (mid_snapshot, random_kills) == (3, 3), "the run ended before the kills: make it longer"
    r = connect(chaos_redis.url)
    assert_exact(client, fleet_env["LORAFLEET_STORE_URL"], ids, sp, model_cache, r)
    adapters = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    for exp_id in ids:
        snaps = adapters.versions(exp_id, snapshots_only=True)
        assert {0, 4, 8, 12, 14} <= set(snaps), snaps  # time-based snapshots may add some
        assert len(snaps) < 15  # most versions hold weights only
    assert list(r.scan_iter(match="lf:traj:*")) == []  # the replay log went with the last snapshot
    rebuilt = [e for w in ("w0", "w1") for e in log_events(tmp_path / "logs" / f"{w}.log",
                                                             "adapter rebuilt from snapshot and replay log")]
    assert rebuilt and max(e["replayed"] for e in rebuilt) >= 1, len(rebuilt)
