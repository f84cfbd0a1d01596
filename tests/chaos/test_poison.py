"""Poison on every lorafleet queue while experiments run: each payload is dead-lettered (counted,
with its queue and a reason), the worker never dies, and no step is lost or repeated. Poison
includes valid envelopes of real lorafleet tasks with headers a real Celery worker dies on
(`timelimit: "soon"` stopped the worker's main process), and a message whose every delivery
ends its worker process, which is dead-lettered after LORAFLEET_MAX_DELIVERIES deliveries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from lf_testkit import wait_until

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
from lorafleet.common.messaging.celery_config import TASK_ROLLOUT, make_sender
from lorafleet.common.messaging.dead_letters import DeadLetters
from lorafleet.common.messaging.messages import BatchItem, BatchMessage
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow

QUEUES = (ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue("w0"))
SCRATCH = "chaos.scratch"  # no one consumes it: where valid envelopes are made, then copied


def spec(name: str, env: str, env_args: dict, steps: int, seed: int) -> dict:
    return {"name": name, "env": env, "env_args": env_args, "steps": steps, "prompts_per_step": 4,
            "group_size": 4, "max_new_tokens": 8, "temperature": 0.3,
            "train": {"seed": seed, "lora": {"rank": 8, "alpha": 16},
                      "optimizer": {"lr": 3e-3, "max_grad_norm": 1.0}}}


SPECS = [spec("digits", "char_class", {"cls": "digits"}, 10, 1),
         spec("nearz", "near_char", {"char": "z"}, 12, 2),
         spec("target", "target_string", {"target": "lorafleet"}, 8, 3)]


def envelope(r, sender, task: str, body: object) -> bytes:
    """A raw kombu envelope exactly as Celery publishes it (taken off an unconsumed queue)."""
    sender.send_task(task, args=[body], queue=SCRATCH)
    raw = r.rpop(SCRATCH)
    assert raw is not None
    return raw.encode()


# a value of each header that lorafleet's sender never writes (Celery reads every one of them)
BAD_HEADERS = {"lang": 1, "id": 42, "root_id": ["r"], "parent_id": {"p": 1}, "shadow": "os.system",
               "eta": "2030-01-01T00:00:00", "expires": "soon", "group": 7, "group_index": "0",
               "retries": "0", "timelimit": [1, 2, 3], "argsrepr": 5, "kwargsrepr": ["k"], "origin": 9,
               "ignore_result": "yes", "replaced_task_nesting": "0", "stamped_headers": "s",
               "stamps": [1], "redelivered": "yes", "lf_deliveries": "1"}


def with_header(raw: bytes, name: str, value: object) -> str:
    env = json.loads(raw)
    env["headers"][name] = value
    return json.dumps(env)


def poison(r, sender) -> list[tuple[bytes | str, str]]:
    """(payload, expected reason) of every kind of poison."""
    batch = {"batch_id": "p1", "phase": "train", "node": "w0", "epoch": 0,
             "items": [{"exp_id": "nope", "step": 0}]}
    real = envelope(r, sender, TASK_ROLLOUT, {**batch, "phase": "rollout", "node": None})
    headers = [(with_header(real, name, value), f"header_{name}") for name, value in BAD_HEADERS.items()]
    return [
        (with_header(real, "timelimit", "soon"), "header_timelimit"),
        (with_header(real, "x-unknown", 1), "header_unknown"),
        (envelope(r, sender, TASK_ROLLOUT, {**batch, "batch_id": "b" * 100_000}), "invalid_batch"),
        (envelope(r, sender, TASK_ROLLOUT, {**batch, "batch_id": "b" * (20 << 20)}), "too_large"),
        *headers,
        ("this is not json", "not_json"),
        ("[1, 2, 3]", "not_envelope"),
        ("42", "not_envelope"),
        (b"\xff\xfe", "not_utf8"),
        ("", "not_json"),
        ("{}", "not_envelope"),
        (envelope(r, sender, "lf.no_such_task", batch), "unknown_task"),
        (envelope(r, sender, TASK_ROLLOUT, {"batch_id": "x", "items": "../../etc"}), "invalid_batch"),
        ("\x01garbage" * (1 << 17), "not_json"),  # 1 MiB
    ]



def train_commits(r) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, f in r.xrange(Keys.events):
        if f.get("type") == "train_committed":
            out[f["exp"]] = out.get(f["exp"], 0) + 1
    return out


def test_poison_on_every_queue_is_dead_lettered_and_costs_nothing(make_fleet, redis_url, fleet_env, r,
                                                                  tmp_path):
    fleet = make_fleet(workers=1)
    worker = fleet.procs["w0"]
    pid = json.loads(r.get(Keys.worker("w0")))["pid"]  # the Celery child that holds the runtime
    sender = make_sender(redis_url)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = client.submit_many(SPECS)

    payloads = poison(r, sender)
    total = sum(sp["steps"] for sp in SPECS)
    pushed: list[tuple[str, str]] = []  # (queue, expected reason)
    # a third right away (rollouts queued), a third after the first train step, a third a third
    # of the way through: poison interleaved with real work on every queue
    for i, at_least in enumerate((0, 1, total // 3)):
        wait_until(lambda n=at_least: sum(train_commits(r).values()) >= n, 300, f"{at_least} train steps")
        for payload, why in payloads[i::3]:
            for queue in QUEUES:
                r.lpush(queue, payload)
                pushed.append((queue, why))
    assert sum(train_commits(r).values()) < total  # all of it was pushed while experiments ran
    letters = DeadLetters(r)
    wait_until(lambda: letters.count() >= len(pushed), 120, f"{len(pushed)} dead letters")

    states = client.wait(ids, timeout_s=600)
    assert [s.status for s in states] == ["completed"] * len(SPECS), [s.error for s in states]
    commits = train_commits(r)
    for exp, sp in zip(ids, SPECS, strict=True):  # no step lost, none repeated
        assert [m["step"] for m in client.metrics(exp)] == list(range(sp["steps"]))
        assert commits.get(exp) == sp["steps"]
        assert {m["worker"] for m in client.metrics(exp)} == {f"w0:{pid}"}

    assert worker.poll() is None  # the worker never died, its runtime was never replaced
    assert json.loads(r.get(Keys.worker("w0")))["pid"] == pid
    assert "Unrecoverable error" not in (tmp_path / "logs" / "w0.log").read_text(errors="replace")
    assert worker.poll() is None  # ... and never exited (a crash would have exited non-zero)

    records = letters.recent(1000)
    assert letters.count() == len(records) == len(pushed) == len(payloads) * len(QUEUES)
    assert sorted((x["queue"], x["reason"]) for x in records) == sorted(pushed)
    assert all(x["queue"] in QUEUES and x["reason"] and x["at"] > 0 for x in records)
    huge = [x for x in records if x["size"] >= 1 << 20]
    assert len(huge) == 2 * len(QUEUES) and all(x["truncated"] and len(x["payload"]) <= 4096 for x in huge)
    by_reason = {x["reason"]: x for x in records}
    assert by_reason["header_timelimit"]["detail"].startswith("must be [null, null]")
    assert all(len(x["detail"]) <= 500 for x in records)  # no field recorded whole
    log_text = (tmp_path / "logs" / "w0.log").read_text(errors="replace")
    assert "b" * 1000 not in log_text  # nor logged whole
    wait_until(lambda: all(r.llen(q) == 0 for q in QUEUES), 30, "empty queues")
    assert r.zcard("unacked_index") == 0 and r.llen(SCRATCH) == 0
    # the operator sees them where people look: `lorafleet status` and `lorafleet fleet --json`
    cli = [sys.executable, "-m", "lorafleet.scheduler.cli"]
    out = subprocess.run([*cli, "status", "--redis-url", redis_url], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and f"dead letters: {len(pushed)}" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([*cli, "fleet", "--json", "--redis-url", redis_url], capture_output=True, text=True,
                         timeout=60)
    status = json.loads(out.stdout)
    assert status["dead_letters"] == len(pushed) and len(status["recent_dead_letters"]) == 5


def test_a_message_that_kills_its_worker_every_time_is_dead_lettered_after_the_bound(
        make_fleet, redis_url, fleet_env, r, tmp_path):
    """A train message whose every delivery ends the worker process holding it (SIGKILL of the
    Celery pool child while it runs the step: what a payload that crashes the process does).
    Celery rejects it with requeue each time and kombu puts it back; the transport counts the
    deliveries in the message and dead-letters it after LORAFLEET_MAX_DELIVERIES, instead of
    feeding it to every new child forever. The worker stays up and the experiment then completes."""
    bound = 3
    fleet = make_fleet(workers=1, schedulers=0, env={"LORAFLEET_TEST_TRAIN_DELAY_S": "20",
                                                      "LORAFLEET_MAX_DELIVERIES": str(bound)})
    worker = fleet.procs["w0"]
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(spec("victim", "char_class", {"cls": "digits"}, 2, 5))
    proto, sender = StepProtocol(r), make_sender(redis_url)
    assert proto.acquire_leader("test", 600_000) and proto.activate("test", exp)

    def publish(phase: str, batch_id: str, queue: str, task: str) -> str:
        msg = BatchMessage(batch_id=batch_id, phase=phase, node=None, epoch=1,  # type: ignore[arg-type]
                           items=(BatchItem(exp_id=exp, step=0),))
        return sender.send_task(task, args=[msg.model_dump(mode="json")], queue=queue).id

    assert proto.mark_inflight("test", [(exp, 0)], "b-roll", "rollout", "") == [True]
    publish("rollout", "b-roll", ROLLOUT_QUEUE, TASK_ROLLOUT)
    wait_until(lambda: r.hget(Keys.experiment(exp), "phase") == "train", 300, "the rollout commit")
    assert proto.mark_inflight("test", [(exp, 0)], "b-train", "train", "w0") == [True]
    task = Keys.task(exp, 0, "train")
    publish("train", "b-train", node_queue("w0"), "lf.train_batch")

    letters = DeadLetters(r)
    kills = 0
    while True:
        def held_or_dead_lettered(n=kills):
            t = r.hgetall(task)
            if t.get("status") == "claimed" and int(t.get("claims") or 0) == n + 1:
                return "held"
            return "dead-lettered" if letters.count() else None

        state = wait_until(held_or_dead_lettered, 300, f"delivery {kills + 1} of the train message")
        if state == "dead-lettered":
            break
        child = int(r.hget(task, "owner").split(":")[1])
        # freeze the child (no lease renewal), expire its claim so that the next delivery can
        # claim the step again, then end the process: the next delivery goes to a new child
        os.kill(child, signal.SIGSTOP)
        r.hset(task, "lease_until", 0)
        os.kill(child, signal.SIGKILL)
        kills += 1
        assert kills <= bound, "delivered past the bound"
    assert kills == bound
    (rec,) = letters.recent()
    assert (rec["queue"], rec["reason"]) == (node_queue("w0"), "delivery_limit")
    assert f"delivered {bound} times" in rec["detail"]
    assert json.loads(rec["payload"])["headers"]["lf_deliveries"] == bound
    wait_until(lambda: r.llen(node_queue("w0")) == 0 and r.zcard("unacked_index") == 0, 60, "nothing queued")
    assert worker.poll() is None  # the worker (its Celery main process) stayed up throughout

    # the fleet goes on: a scheduler publishes the step again (a new message) and it completes
    r.delete(Keys.leader)
    r.hset(task, "lease_until", 0)
    fleet.start_scheduler()
    (state,) = client.wait([exp], timeout_s=600)
    assert state.status == "completed", state.error
    assert [m["step"] for m in client.metrics(exp)] == [0, 1]
    assert worker.poll() is None and letters.count() == 1
