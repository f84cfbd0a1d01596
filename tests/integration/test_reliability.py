"""Exactly-once steps and nothing lost: duplicate deliveries, a worker killed with SIGKILL in
the middle of a train step, the scheduler killed and restarted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from lf_testkit import wait_until
from test_fleet import spec

from lorafleet.common.keys import ROLLOUT_QUEUE, Keys, node_queue
from lorafleet.common.messaging.celery_config import TASK_ROLLOUT, TASK_TRAIN, make_sender
from lorafleet.common.messaging.messages import BatchItem, BatchMessage
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow



def finished_tasks(r, task_ids) -> dict[str, dict[str, str]]:
    """The lf:worker_tasks entries (written when a worker's Celery task ENDS) of `task_ids`."""
    wanted = set(task_ids)
    return {f["task_id"]: f for _, f in r.xrange(Keys.worker_tasks) if f.get("task_id") in wanted}


def wait_finished(r, task_ids, what: str, timeout_s: float = 120) -> dict[str, dict[str, str]]:
    """Positive evidence that every task of `task_ids` was delivered and ran to its end."""
    ids = list(task_ids)

    def all_done():
        done = finished_tasks(r, ids)
        return done if len(done) == len(ids) else None

    return wait_until(all_done, timeout_s=timeout_s, what=what)


def refusals(log_path, task_id: str) -> list[str]:
    """Reasons of the "not claimed" lines a worker logged (JSON lines) while running `task_id`."""
    reasons = []
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue  # Celery's own plain-text lines
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "not claimed" and event.get("task_id") == task_id:
            reasons.append(event["reason"])
    return reasons


def test_same_train_message_delivered_twice_concurrently_commits_once(make_fleet, redis_url, fleet_env, r,
                                                                      tmp_path):
    """No scheduler: the test is the leader and publishes the same train batch to two workers."""
    make_fleet(workers=2, schedulers=0, env={"LORAFLEET_TEST_TRAIN_DELAY_S": "1.5"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    proto, sender = StepProtocol(r), make_sender(redis_url)
    exp = client.submit(spec("dup", "char_class", {"cls": "digits"}, steps=3))
    assert proto.acquire_leader("test", 600_000) and proto.activate("test", exp)

    def publish(phase: str, batch_id: str, queue: str, task: str) -> str:
        msg = BatchMessage(batch_id=batch_id, phase=phase, node=None, epoch=1,  # type: ignore[arg-type]
                           items=(BatchItem(exp_id=exp, step=0),))
        return sender.send_task(task, args=[msg.model_dump(mode="json")], queue=queue).id

    def train_commits() -> int:
        return sum(1 for _, f in r.xrange(Keys.events)
                   if f.get("exp") == exp and f["type"] == "train_committed")

    assert proto.mark_inflight("test", [(exp, 0)], "b-roll", "rollout", "") == [True]
    publish("rollout", "b-roll", ROLLOUT_QUEUE, TASK_ROLLOUT)
    wait_until(lambda: r.hget(Keys.experiment(exp), "phase") == "train", what="rollout commit")
    assert proto.mark_inflight("test", [(exp, 0)], "b-train", "train", "w0") == [True]
    first = publish("train", "b-train", node_queue("w0"), TASK_TRAIN)
    dup = publish("train", "b-train", node_queue("w1"), TASK_TRAIN)  # the duplicate, to the other worker
    # evidence that BOTH deliveries ran to their end, each on the worker it was sent to
    done = wait_finished(r, [first, dup], what="both deliveries of the train batch to finish")
    assert {t: (done[t]["node"], done[t]["kind"], done[t]["outcome"]) for t in done} == {
        first: ("w0", "train", "ok"), dup: ("w1", "train", "ok")}
    # ... and that exactly one of them claimed the step: the other was refused its claim
    logs = tmp_path / "logs"

    def refused_deliveries() -> dict[str, list[str]]:
        reasons = {t: refusals(logs / f"{node}.log", t) for t, node in ((first, "w0"), (dup, "w1"))}
        return {t: rs for t, rs in reasons.items() if rs}

    refused = wait_until(refused_deliveries, timeout_s=60, what="the losing delivery's 'not claimed' line")
    assert len(refused) == 1, refused
    assert next(iter(refused.values())) in (["claimed"], ["committed"]), refused
    assert r.hget(Keys.task(exp, 0, "train"), "claims") == "1"
    assert [m["step"] for m in client.metrics(exp)] == [0]
    assert train_commits() == 1
    assert client.get(exp).version == 1
    assert AdapterStore(fleet_env["LORAFLEET_STORE_URL"]).versions(exp) == [0, 1]
    assert r.llen(node_queue("w0")) == 0 and r.llen(node_queue("w1")) == 0

    # a late redelivery after the commit is acked and does nothing
    late = publish("train", "b-train", node_queue("w1"), TASK_TRAIN)
    done = wait_finished(r, [late], what="the late redelivery to finish")
    assert (done[late]["node"], done[late]["kind"], done[late]["outcome"]) == ("w1", "train", "ok")
    late_refused = wait_until(lambda: refusals(logs / "w1.log", late), timeout_s=60,
                              what="the late delivery's 'not claimed' line")
    assert late_refused in (["stale"], ["committed"]), late_refused  # the step had moved on
    assert r.llen(node_queue("w1")) == 0
    assert r.hget(Keys.task(exp, 0, "train"), "claims") == "1"
    assert [m["step"] for m in client.metrics(exp)] == [0] and client.get(exp).version == 1
    assert train_commits() == 1
    assert AdapterStore(fleet_env["LORAFLEET_STORE_URL"]).versions(exp) == [0, 1]


def _final_weights(store_url: str, exp: str):
    return AdapterStore(store_url).load(exp).weights


def test_worker_killed_mid_train_step_loses_nothing(make_fleet, redis_url, fleet_env, r, tmp_path):
    steps = 6
    sp = spec("survivor", "near_char", {"char": "k"}, steps=steps, seed=11)
    fleet = make_fleet(workers=2, env={"LORAFLEET_TEST_TRAIN_DELAY_S": "1.0"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(sp)

    def claimed_train_task():
        st = client.get(exp)
        task = r.hgetall(Keys.task(exp, st.step, "train"))
        return task if st.step >= 2 and task.get("status") == "claimed" else None

    task = wait_until(claimed_train_task, what="a claimed train step")
    victim = task["owner"].split(":")[0]
    fleet.kill(victim)  # SIGKILL to the worker's whole process group, mid-step
    killed_at = client.get(exp).step
    (state,) = client.wait([exp], timeout_s=300)
    assert state.status == "completed", state.error
    m = client.metrics(exp)
    assert [x["step"] for x in m] == list(range(steps))
    survivor = "w1" if victim == "w0" else "w0"
    assert all(x["worker"].startswith(survivor) for x in m[killed_at:]), "not retried elsewhere"
    killed_run = _final_weights(fleet_env["LORAFLEET_STORE_URL"], exp)
    fleet.stop()

    # the same experiment, uninterrupted, on a fresh fleet and store
    r.flushdb()
    store2 = f"file://{tmp_path}/store-uninterrupted"
    make_fleet(workers=1, env={"LORAFLEET_STORE_URL": store2})
    client2 = FleetClient(redis_url, store2)
    exp2 = client2.submit(sp)
    client2.wait([exp2], timeout_s=300)
    assert [x["reward_mean"] for x in client2.metrics(exp2)] == [x["reward_mean"] for x in m]
    clean = _final_weights(store2, exp2)
    # float64, identical seeds, the experiment alone in both runs, and a recovered step redone
    # bit for bit (workers/replay.py): equal in practice; 1e-9 as everywhere (README, Faults)
    assert max((clean[k] - killed_run[k]).abs().max().item() for k in clean) < 1e-9


def test_scheduler_killed_and_restarted_mid_run(make_fleet, redis_url, fleet_env, r):
    fleet = make_fleet(workers=1, schedulers=2)  # "scheduler" and a standby "scheduler1"
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = [client.submit(spec(f"s{i}", "char_class", {"cls": "vowels"}, steps=8, seed=i)) for i in range(3)]
    wait_until(lambda: max(client.get(i).step for i in ids) >= 2, what="progress")
    leader = r.get(Keys.leader)
    victim = next(n for n, p in fleet.procs.items() if n.startswith("scheduler") and f"-{p.pid}-" in leader)
    fleet.kill(victim)
    wait_until(lambda: r.get(Keys.leader) not in (None, leader), timeout_s=30, what="standby takes over")
    fleet.start_scheduler("scheduler-restarted")  # a restart joins as standby: nothing breaks
    states = client.wait(ids, timeout_s=300)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    for i in ids:
        assert [x["step"] for x in client.metrics(i)] == list(range(8))
    assert int(r.get(Keys.leader_epoch)) >= 2


def test_worker_start_removes_orphaned_temp_dirs_of_dead_publishes(make_fleet, fleet_env, r, tmp_path):
    """A publish killed mid-write leaves `.tmp-*` behind; the next worker start removes those
    older than ORPHAN_TMP_AGE_S and leaves younger ones (a live writer's) alone."""
    import os

    store = Path(fleet_env["LORAFLEET_STORE_URL"].removeprefix("file://"))
    dead, live = store / "exp-a" / ".tmp-dead", store / "exp-a" / ".tmp-live"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    make_fleet(workers=1, schedulers=0, env={"LORAFLEET_ORPHAN_TMP_AGE_S": "600"})
    wait_until(lambda: not dead.exists(), timeout_s=30, what="the orphaned temp dir removed")
    assert live.exists()
