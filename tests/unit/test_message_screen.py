"""Poison a real Celery would choke on: every header and property of a task message screened
(only what lorafleet's sender writes, typed and bounded), every field bounded and never quoted
whole, deliveries of one message bounded (kombu's restores keep the count), the worker's exit
status kept, and refusal reasons readable. Real Redis (the `redis_url`/`r` fixtures), real kombu."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kombu import Connection

from lorafleet.common.keys import node_queue
from lorafleet.common.messaging.broker_transport import PoisonMessage, check_item
from lorafleet.common.messaging.celery_config import BROKER_TRANSPORT, TASK_TRAIN, celery_config, make_sender
from lorafleet.common.messaging.dead_letters import DeadLetters
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.messaging.screen import DELIVERIES_HEADER, HEADER_RULES, SHOWN_CHARS
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.common.state.protocol_lua import REFUSAL_REASONS

NODE_Q = node_queue("w0")
BATCH = {"batch_id": "b1", "phase": "train", "node": "w0", "epoch": 3,
         "items": [{"exp_id": "exp-1", "step": 0}]}
HUGE = "x" * (20 * 1024 * 1024)


@pytest.fixture(scope="session")
def redis_url(plain_redis_url: str) -> str:
    return plain_redis_url


@pytest.fixture
def envelope(redis_url, r) -> dict:
    make_sender(redis_url).send_task(TASK_TRAIN, args=[BATCH], queue=NODE_Q)
    raw = r.rpop(NODE_Q)
    return json.loads(raw)


def _with(env: dict, part: str, name: str, value: object) -> str:
    out = json.loads(json.dumps(env))
    out[part][name] = value
    return json.dumps(out)


def _poison(queue: str, raw: str | bytes) -> PoisonMessage:
    with pytest.raises(PoisonMessage) as caught:
        check_item(queue, raw)
    return caught.value


# (header, a value lorafleet's sender never writes, the reason). Celery reads each of them in the
# worker's main process or hands it to the task; timelimit 'soon' / [1, 2, 3] stopped the worker.
BAD_HEADERS = [
    ("timelimit", "soon"), ("timelimit", [1, 2, 3]), ("timelimit", [1, 2]), ("timelimit", None),
    ("timelimit", {"soft": 1}), ("eta", "2030-01-01T00:00:00"), ("eta", 5), ("expires", "soon"),
    ("shadow", "os.system"), ("shadow", 7), ("group", "g1"), ("group_index", "0"),
    ("retries", "0"), ("retries", -1), ("retries", True), ("retries", 1e9), ("lang", "js"), ("lang", None),
    ("id", 42), ("id", ""), ("id", "a" * 65), ("id", "../x"), ("root_id", ["a"]), ("parent_id", {"a": 1}),
    ("argsrepr", 1), ("argsrepr", "a" * 5000), ("kwargsrepr", ["x"]), ("origin", "o" * 300),
    ("ignore_result", "yes"), ("replaced_task_nesting", "0"), ("replaced_task_nesting", 5),
    ("stamped_headers", ["x"]), ("stamped_headers", "x"), ("stamps", {"a": 1}), ("stamps", []),
    ("redelivered", "yes"), (DELIVERIES_HEADER, "1"), (DELIVERIES_HEADER, 0), (DELIVERIES_HEADER, -5),
    (DELIVERIES_HEADER, 10**6),
]


@pytest.mark.parametrize(("header", "value"), BAD_HEADERS, ids=[f"{h}={v!r}"[:40] for h, v in BAD_HEADERS])
def test_every_header_of_a_wrong_type_or_value_is_poison_with_a_readable_reason(envelope, header, value):
    exc = _poison(NODE_Q, _with(envelope, "headers", header, value))
    assert exc.reason == f"header_{header}"
    assert exc.detail.startswith("must be ") and ", got " in exc.detail
    assert len(exc.detail) < 200  # the value is quoted, cut to SHOWN_CHARS


def test_the_readable_reason_of_timelimit():
    """What an operator reads in the dead-letter record and the log line."""
    make = {"body": "", "content-type": "application/json", "content-encoding": "utf-8",
            "headers": {"task": TASK_TRAIN, "id": "t1", "timelimit": "soon"},
            "properties": {"delivery_tag": "d1", "delivery_info": {"exchange": "", "routing_key": NODE_Q}}}
    exc = _poison(NODE_Q, json.dumps(make))
    assert str(exc) == ("header_timelimit: must be [null, null] (lorafleet sets no Celery time limits), "
                        "got 'soon'")


def test_every_header_the_sender_writes_has_a_rule_and_unknown_ones_are_poison(envelope):
    assert set(envelope["headers"]) <= set(HEADER_RULES)  # Celery's own sender passes the table
    check_item(NODE_Q, json.dumps(envelope))
    for name in ("update", "__class__", "callbacks", "chord", "x" * 10_000, "priority"):
        exc = _poison(NODE_Q, _with(envelope, "headers", name, 1))
        assert exc.reason == "header_unknown" and len(exc.detail) < 200, name
    missing = json.loads(json.dumps(envelope))
    del missing["headers"]["id"]
    assert _poison(NODE_Q, json.dumps(missing)).reason == "header_id"


BAD_PROPERTIES = [
    ("priority", "high"), ("priority", 1000), ("priority", True), ("delivery_mode", "persistent"),
    ("correlation_id", "c" * 1000), ("correlation_id", 5), ("reply_to", ["q"]),
    ("delivery_info", {"exchange": "", "routing_key": NODE_Q, "extra": 1}),
    ("delivery_info", {"exchange": "", "routing_key": "q" * 200}),
    ("delivery_info", {"exchange": "", "routing_key": NODE_Q, "redelivered": "yes"}),
    ("delivery_tag", "t" * 200), ("body_encoding", "gzip"), ("reply_to_everyone", "x"),
]


@pytest.mark.parametrize(("prop", "value"), BAD_PROPERTIES,
                         ids=[f"{p}={v!r}"[:40] for p, v in BAD_PROPERTIES])
def test_every_property_of_a_wrong_type_or_size_is_poison(envelope, prop, value):
    exc = _poison(NODE_Q, _with(envelope, "properties", prop, value))
    assert exc.reason.startswith(("property_", "not_envelope")), exc
    assert len(str(exc)) < 300


def test_fields_are_bounded_and_never_quoted_whole(envelope):
    def body(batch: object) -> str:
        out = json.loads(json.dumps(envelope))
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        out["body"] = base64.b64encode(json.dumps([[batch], {}, embed]).encode()).decode()
        return json.dumps(out)

    big_id = "b" * 100_000
    for batch in ({**BATCH, "batch_id": big_id}, {**BATCH, "node": big_id}, {**BATCH, "batch_id": "a b"},
                  {**BATCH, "items": [{"exp_id": big_id, "step": 0}]}, {**BATCH, "epoch": 10**30}):
        exc = _poison(NODE_Q, body(batch))
        assert exc.reason == "invalid_batch" and big_id not in str(exc) and len(exc.detail) < 2000
    with pytest.raises(ValueError, match="batch_id"):
        BatchMessage.model_validate({**BATCH, "batch_id": big_id})
    # a 20 MB batch_id is refused before it is parsed at all; the record keeps 4 KiB of it
    exc = _poison(NODE_Q, body({**BATCH, "batch_id": HUGE}))
    assert exc.reason == "too_large" and len(str(exc)) < 200


def test_deliveries_are_bounded_and_kombus_restores_keep_the_count(redis_url, r):
    """A pool child that dies holding the message makes Celery reject it with requeue
    (task_reject_on_worker_lost): kombu puts back what its unacked hash holds, the count included.
    After max_deliveries deliveries the next one is dead-lettered instead, and nothing is left."""
    make_sender(redis_url).send_task(TASK_TRAIN, args=[BATCH], queue=NODE_Q)
    opts = {"max_deliveries": 3, "visibility_timeout": 1, "unacked_restore_throttle": 0}
    with Connection(redis_url, transport=BROKER_TRANSPORT, transport_options=opts) as conn:
        queue = conn.SimpleQueue(NODE_Q)
        seen = []
        m = queue.get(timeout=5)
        seen.append(m.headers[DELIVERIES_HEADER])
        m.reject(requeue=True)  # a killed pool child
        m = queue.get(timeout=5)
        seen.append(m.headers[DELIVERIES_HEADER])
        # a consumer that dies outright: the visibility timeout restores it
        time.sleep(1.5)
        with Connection(redis_url, transport=BROKER_TRANSPORT, transport_options=opts) as other:
            other.default_channel.qos.restore_visible(num=10)
        m = queue.get(timeout=5)
        seen.append(m.headers[DELIVERIES_HEADER])
        assert m.payload[0][0] == BATCH
        m.reject(requeue=True)
        with pytest.raises(queue.Empty):
            queue.get(timeout=2)  # the fourth delivery is refused
        queue.close()
    assert seen == [1, 2, 3]
    (rec,) = DeadLetters(r).recent()
    assert rec["reason"] == "delivery_limit" and rec["queue"] == NODE_Q
    assert "delivered 3 times" in rec["detail"] and "LORAFLEET_MAX_DELIVERIES" in rec["detail"]
    assert r.llen(NODE_Q) == 0 and r.zcard("unacked_index") == 0 and r.hlen("unacked") == 0


def test_the_workers_celery_config_carries_the_bound(redis_url):
    conf = celery_config(redis_url, max_deliveries=7)
    assert conf["broker_transport_options"]["max_deliveries"] == 7
    assert conf["broker_transport_options"]["visibility_timeout"] > 3600
    with Connection(conf["broker_url"], transport=conf["broker_transport"],
                    transport_options=conf["broker_transport_options"]) as conn:
        assert conn.default_channel.max_deliveries == 7
    sentinel = celery_config("redis+sentinel://:p@s1:26379/lorafleet/0", max_deliveries=2)
    assert sentinel["broker_transport_options"]["max_deliveries"] == 2
    assert sentinel["broker_transport_options"]["master_name"] == "lorafleet"


_DYING_WORKER = textwrap.dedent("""
    import sys
    from lorafleet.common.messaging.celery_config import celery_config
    from lorafleet.common.settings import Settings
    from lorafleet.workers import app as worker_app
    url = sys.argv[1]
    worker_app._settings = Settings(redis_url=url)
    worker_app.app.conf.update(celery_config(url))
    # kombu's own transport: no screen, so Celery's main process meets the bad header itself,
    # standing in for any unexpected exception there
    worker_app.app.conf.broker_transport = "redis"
    sys.exit(worker_app.run_celery(["worker", "-Q", sys.argv[2], "-P", "solo", "-c", "1",
                                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                                    "--loglevel", "INFO"]))
""")


@pytest.mark.slow
def test_a_worker_whose_main_process_dies_exits_non_zero(redis_url, r, envelope, tmp_path: Path):
    """Celery stops on an exception in its main process ("Unrecoverable error") with status 1;
    `app.worker_main` dropped that status (the worker exited 0 and a supervisor that restarts on
    failure left it down). `run_celery`, what `lorafleet worker` runs, keeps it."""
    queue = "lf.node.dying"
    r.lpush(queue, _with(envelope, "headers", "timelimit", "soon"))
    script = tmp_path / "dying_worker.py"
    script.write_text(_DYING_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), redis_url, queue], capture_output=True, text=True,
                          timeout=240, env=env)
    assert "Unrecoverable error" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]


def test_refusal_reasons_are_readable_and_documented(r):
    """A claim or commit for an experiment that does not exist counted `experiment_false` (Lua's
    tostring of a missing field); every reason the scripts count is a documented name."""
    import re

    from lorafleet.common.state import protocol_lua
    p = StepProtocol(r)
    _, refused = p.claim_batch([("no-such-exp", 0)], "rollout", "w:1", 60_000, "b1")
    assert [x.reason for x in refused] == ["unknown_experiment"]
    assert p.refusals("no-such-exp") == {"claim:unknown_experiment": 1}
    r.hset("lf:exp:gone", "status", "cancelled")
    source = "\n".join(v for v in vars(protocol_lua).values() if isinstance(v, str))
    literal = set(re.findall(r"refuse\([^,]+, '(?:claim|commit)', '(\w+)'\)", source))
    literal |= set(re.findall(r"'(committed|lease_lost)'", source))
    assert literal <= REFUSAL_REASONS.keys(), literal - REFUSAL_REASONS.keys()
    for status in ("queued", "completed", "failed", "cancelled"):
        assert f"experiment_{status}" in REFUSAL_REASONS
    assert "experiment_false" not in source and "tostring(e[1])" not in source
    assert SHOWN_CHARS <= 100
