"""Poison on every lorafleet queue while experiments run: each payload is dead-lettered (counted,
with its queue and a reason), the worker never dies, and no step is lost or repeated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lf_testkit import wait_until

from lorafleet.common.celery_config import TASK_ROLLOUT, make_sender
from lorafleet.common.dead_letters import DeadLetters
from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
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


def poison(r, sender) -> list[tuple[bytes | str, str]]:
    """(payload, expected reason) of every kind of poison."""
    batch = {"batch_id": "p1", "phase": "train", "node": "w0", "epoch": 0,
             "items": [{"exp_id": "nope", "step": 0}]}
    return [
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
        for payload, why in payloads[i * 3:(i + 1) * 3]:
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

    records = letters.recent(1000)
    assert letters.count() == len(records) == len(pushed) == len(payloads) * len(QUEUES)
    assert sorted((x["queue"], x["reason"]) for x in records) == sorted(pushed)
    assert all(x["queue"] in QUEUES and x["reason"] and x["at"] > 0 for x in records)
    huge = [x for x in records if x["size"] == 1 << 20]
    assert len(huge) == len(QUEUES) and all(x["truncated"] and len(x["payload"]) <= 4096 for x in huge)
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
