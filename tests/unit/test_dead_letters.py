"""Poison isolation at the broker transport: what counts as a valid lorafleet message, the
dead-letter record, and kombu consuming through lorafleet's transport (on the real Redis of the
`redis_url`/`r` fixtures)."""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import ssl
import time
from queue import Empty

import pytest
from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
from lorafleet.common.messaging import dead_letters as dl
from lorafleet.common.messaging.broker_transport import (
    Channel,
    PoisonMessage,
    SentinelTransport,
    Transport,
    check_item,
    is_task_queue,
)
from lorafleet.common.messaging.celery_config import (
    BROKER_TRANSPORT,
    SENTINEL_TRANSPORT,
    TASK_ROLLOUT,
    TASK_TRAIN,
    broker_transport_config,
    celery_config,
    make_sender,
)
from lorafleet.common.messaging.dead_letters import DeadLetters

NODE_Q = node_queue("w0")
BATCH = {"batch_id": "b1", "phase": "train", "node": "w0", "epoch": 3,
         "items": [{"exp_id": "exp-1", "step": 0}]}


def sent_items(redis_url: str, r, *sends: tuple[str, list, str]) -> list[str]:
    """The raw list items that make_sender().send_task puts on the queues, oldest first."""
    sender = make_sender(redis_url)
    out = []
    for name, args, queue in sends:
        sender.send_task(name, args=args, queue=queue)
        out.append(r.lrange(queue, 0, 0)[0])
    return out


@pytest.fixture
def envelope(redis_url, r) -> dict:
    (raw,) = sent_items(redis_url, r, (TASK_TRAIN, [BATCH], NODE_Q))
    r.delete(NODE_Q)
    return json.loads(raw)


def reencode(env: dict, body: object) -> str:
    out = json.loads(json.dumps(env))
    out["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(out)


def reason(queue: str, raw: bytes | str) -> str:
    with pytest.raises(PoisonMessage) as caught:
        check_item(queue, raw)
    return caught.value.reason


# ---- the check ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(plain_redis_url: str) -> str:
    """One server (also under LORAFLEET_TEST_REDIS=sentinel): these tests are about it."""
    return plain_redis_url

def test_valid_envelopes_from_the_sender_are_accepted(redis_url, r):
    rollout = {**BATCH, "phase": "rollout", "node": None}
    raws = sent_items(redis_url, r, (TASK_TRAIN, [BATCH], NODE_Q), (TASK_ROLLOUT, [rollout], ROLLOUT_QUEUE),
                      (TASK_TRAIN, [BATCH], TRAIN_QUEUE))
    for raw, queue in zip(raws, (NODE_Q, ROLLOUT_QUEUE, TRAIN_QUEUE), strict=True):
        assert check_item(queue, raw) == json.loads(raw)
        assert check_item(queue, raw.encode()) == json.loads(raw)  # as BRPOP returns it
    redelivered = json.loads(raws[0])  # what kombu's restore puts back after a visibility timeout
    redelivered["headers"]["redelivered"] = True
    redelivered["redelivered"] = True
    check_item(NODE_Q, json.dumps(redelivered))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("this is not json", "not_json"),
        ("", "not_json"),
        ("   ", "not_json"),
        (b"\xff\xfe", "not_utf8"),
        (b'{"body": "\xc3\x28"}', "not_utf8"),
        ("[1, 2, 3]", "not_envelope"),
        ("42", "not_envelope"),
        ('"a string"', "not_envelope"),
        ("null", "not_envelope"),
        ("{}", "not_envelope"),
        ('{"body": "x", "headers": {}}', "not_envelope"),
        ('{"body": "x", "headers": {}, "properties": []}', "not_envelope"),
        ('{"body": "x", "headers": {}, "properties": {"delivery_tag": "t"}}', "not_envelope"),
        ('{"body": "x", "headers": [], "properties": {"delivery_tag": "t", '
         '"delivery_info": {"exchange": "", "routing_key": "q"}}}', "not_envelope"),
        ('{"body": 7, "headers": {}, "properties": {"delivery_tag": "t", '
         '"delivery_info": {"exchange": "", "routing_key": "q"}}}', "not_envelope"),
        ('{"body": "x", "headers": {}, "properties": {"delivery_tag": {"a": 1}, '
         '"delivery_info": {"exchange": "", "routing_key": "q"}}}', "not_envelope"),
        ("[" * 100_000, "not_json"),
        ('{"__type__": "no_such_type", "__value__": 1}', "not_json"),  # kombu's type hooks raise
        ('{"__type__": "datetime", "__value__": "not a date"}', "not_json"),
        ("x" * (1 << 20), "not_json"),
    ],
)
def test_what_is_not_a_kombu_envelope(raw, expected):
    for queue in (NODE_Q, ROLLOUT_QUEUE, TRAIN_QUEUE, "some.reply.celery.pidbox"):
        assert reason(queue, raw) == expected


def test_valid_envelopes_that_are_not_lorafleet_messages(envelope):
    def variant(**changes) -> str:
        env = json.loads(json.dumps(envelope))
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = env
            for p in parents:
                node = node[p]
            node[leaf.replace("_", "-") if leaf.startswith("content") else leaf] = value
        return json.dumps(env)

    assert reason(NODE_Q, variant(content_type="application/x-python-serialize")) == "content_type"
    assert reason(NODE_Q, variant(content_type=None)) == "content_type"
    assert reason(NODE_Q, variant(content_encoding="binary")) == "content_type"
    assert reason(NODE_Q, variant(headers__task="celery.ping")) == "unknown_task"
    assert reason(NODE_Q, variant(headers__task="os.system")) == "unknown_task"
    assert reason(NODE_Q, variant(headers={})) == "unknown_task"  # task protocol 1 is not spoken
    assert reason(NODE_Q, variant(headers__id=None)) == "header_id"
    assert reason(NODE_Q, variant(body="%%%not base64")) == "bad_body"
    assert reason(NODE_Q, variant(body=base64.b64encode(b"\xff").decode())) == "bad_body"
    assert reason(NODE_Q, variant(body=base64.b64encode(b"not json").decode())) == "bad_body"
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert reason(NODE_Q, reencode(envelope, {"args": [BATCH]})) == "bad_body"
    assert reason(NODE_Q, reencode(envelope, [[], {}, embed])) == "bad_body"
    assert reason(NODE_Q, reencode(envelope, [[BATCH, BATCH], {}, embed])) == "bad_body"
    assert reason(NODE_Q, reencode(envelope, [[BATCH], {"x": 1}, embed])) == "bad_body"
    assert reason(NODE_Q, variant(body=base64.b64encode(b'{"__type__": "x", "__value__": 1}').decode())) \
        == "bad_body"
    linked = {**embed, "callbacks": [{"task": "celery.ping"}]}
    assert reason(NODE_Q, reencode(envelope, [[BATCH], {}, linked])) == "bad_body"
    for body in ("not even a dict", {"batch_id": "x"}, {**BATCH, "items": []}, {**BATCH, "phase": "eval"},
                 {**BATCH, "items": [{"exp_id": "../../etc", "step": 0}]}, {**BATCH, "extra": 1}):
        assert reason(NODE_Q, reencode(envelope, [[body], {}, embed])) == "invalid_batch", body
    assert check_item(NODE_Q, reencode(envelope, [[BATCH], {}, embed]))  # the control: valid


def test_only_lorafleet_task_queues_get_the_full_check(envelope):
    assert all(map(is_task_queue, (ROLLOUT_QUEUE, TRAIN_QUEUE, NODE_Q, "celery")))
    other = "0f3a.reply.celery.pidbox"
    assert not is_task_queue(other)
    foreign = dict(envelope, headers={**envelope["headers"], "task": "celery.ping"})
    assert check_item(other, json.dumps(foreign))  # kombu can build a Message of it: fine there
    assert reason("celery", json.dumps(foreign)) == "unknown_task"


# ---- the record ---------------------------------------------------------------------------------

def test_dead_letters_add_count_recent(r):
    letters = DeadLetters(r)
    assert letters.count() == 0 and letters.recent() == []
    rec = letters.add(NODE_Q, "this is not json", "not_json", "Expecting value")
    binary = letters.add(ROLLOUT_QUEUE, b"\xff\xfe", "not_utf8")
    assert binary["payload"] == base64.b64encode(b"\xff\xfe").decode()
    big = "é" * (1 << 19)  # 1 MiB of UTF-8, two bytes a character
    letters.add(TRAIN_QUEUE, big.encode(), "not_json")
    assert letters.count() == 3 and int(r.get(Keys.dead_letter_count)) == 3
    newest, middle, oldest = letters.recent(10)
    assert oldest == rec and set(rec) == {"queue", "reason", "detail", "at", "by", "size", "payload",
                                          "payload_encoding", "truncated"}
    assert (oldest["queue"], oldest["reason"], oldest["payload"], oldest["payload_encoding"],
            oldest["truncated"], oldest["size"]) == (NODE_Q, "not_json", "this is not json", "text",
                                                     False, 16)
    assert abs(oldest["at"] - time.time()) < 60
    assert (middle["queue"], middle["payload_encoding"], middle["size"]) == (ROLLOUT_QUEUE, "base64", 2)
    assert newest["truncated"] and newest["size"] == 1 << 20 and newest["payload_encoding"] == "text"
    assert newest["payload"] == "é" * (dl.PAYLOAD_LIMIT // 2)
    assert len(r.lindex(Keys.dead_letters, 0)) < 2 * dl.PAYLOAD_LIMIT
    assert [x["queue"] for x in letters.recent(1)] == [TRAIN_QUEUE] and letters.recent(0) == []


def test_dead_letter_list_is_bounded_but_the_count_is_not(r, monkeypatch):
    monkeypatch.setattr(dl, "MAX_RECORDS", 5)
    letters = DeadLetters(r)
    for i in range(12):
        letters.add(NODE_Q, f"junk {i}", "not_json")
    assert r.llen(Keys.dead_letters) == 5 and letters.count() == 12
    assert [x["payload"] for x in letters.recent(100)] == [f"junk {i}" for i in range(11, 6, -1)]


# ---- kombu consuming through the transport ------------------------------------------------------

POISON = ["this is not json", "[1, 2, 3]", "42", b"\xff\xfe", "", "{}"]


def test_plain_kombu_dies_on_poison_and_lorafleet_transport_does_not(redis_url, r):
    """The bug at its depth: kombu's own Redis transport raises on the raw item."""
    r.lpush(NODE_Q, "[1, 2, 3]")
    with (Connection(redis_url) as conn, conn.Consumer(Queue(NODE_Q), callbacks=[lambda *_: None]),
          pytest.raises(TypeError)):
        conn.drain_events(timeout=2)
    assert r.llen(NODE_Q) == 0 and DeadLetters(r).count() == 0  # ... and the item is gone, unrecorded


@pytest.mark.parametrize("path", ["brpop", "get"])
def test_transport_dead_letters_poison_and_delivers_the_rest_untouched(redis_url, r, path):
    sender = make_sender(redis_url)
    batches = [{**BATCH, "batch_id": f"b{i}"} for i in range(3)]
    bad_task = None
    for i, batch in enumerate(batches):  # poison before, between and after the valid messages
        for item in POISON:
            r.lpush(NODE_Q, item)
        sender.send_task(TASK_TRAIN, args=[batch], queue=NODE_Q)
        if i == 0:
            sender.send_task("lf.not_a_task", args=[batch], queue=NODE_Q)
            bad_task = r.lindex(NODE_Q, 0)
    n_poison = len(POISON) * len(batches) + 1

    got: list[dict] = []
    app = make_sender(redis_url)
    with app.connection_for_read() as conn:
        assert isinstance(conn.transport, Transport) and conn.default_channel.__class__ is Channel
        if path == "brpop":  # the consumer's path: BRPOP through kombu's MultiChannelPoller
            def on_message(body, message):
                got.append(body[0][0])
                message.ack()

            with conn.Consumer(Queue(NODE_Q), callbacks=[on_message], accept=["json"]):
                for _ in range(50):
                    if len(got) == len(batches):
                        break
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=1)
        else:  # basic_get: RPOP, skipping poison to the next valid item
            queue = conn.SimpleQueue(NODE_Q, no_ack=True, serializer="json")
            for _ in batches:
                got.append(queue.get(block=False).payload[0][0])
            with pytest.raises(queue.Empty):
                queue.get(block=False)
            queue.close()

    assert got == batches  # every valid message, in order, as sent
    letters = DeadLetters(r)
    assert letters.count() == n_poison and r.llen(NODE_Q) == 0
    records = letters.recent(100)
    assert {x["queue"] for x in records} == {NODE_Q}
    assert sorted(x["reason"] for x in records) == sorted(
        ["not_json", "not_envelope", "not_envelope", "not_utf8", "not_json", "not_envelope"] * len(batches)
        + ["unknown_task"])
    assert any(x["payload"] == bad_task for x in records)
    assert r.zcard("unacked_index") == 0  # nothing of the poison entered kombu's ack emulation


def test_fanout_messages_that_are_not_envelopes_are_dead_lettered(redis_url, r):
    """Broadcast (pub/sub) messages: kombu skips what is not JSON; JSON that is not an envelope
    would raise in Message(), so the channel dead-letters it instead."""
    with Connection(redis_url, transport=BROKER_TRANSPORT) as conn:
        channel = conn.default_channel
        for junk in ([1, 2, 3], 42, {}):
            with pytest.raises(Empty):
                channel._deliver_fanout_message(junk, "celery.pidbox")
    records = DeadLetters(r).recent()
    assert [(x["queue"], x["reason"]) for x in records] == [("celery.pidbox", "not_envelope")] * 3


def test_a_check_that_trips_dead_letters_instead_of_raising(redis_url, r, monkeypatch):
    from lorafleet.common.messaging import broker_transport
    def broken(queue, raw):
        raise RuntimeError("bug in the check")

    monkeypatch.setattr(broker_transport, "check_item", broken)
    with Connection(redis_url, transport=BROKER_TRANSPORT) as conn:
        assert conn.default_channel._screen(NODE_Q, b"whatever") is None
    (rec,) = DeadLetters(r).recent()
    assert (rec["queue"], rec["reason"]) == (NODE_Q, "unreadable")
    assert rec["detail"] == "RuntimeError: bug in the check"


def test_visibility_timeout_redelivery_still_works(redis_url, r):
    """A valid message taken and not acked comes back after the visibility timeout (kombu's own
    restore path, untouched by the screening), and is accepted again."""
    make_sender(redis_url).send_task(TASK_TRAIN, args=[BATCH], queue=NODE_Q)
    opts = {"visibility_timeout": 1, "unacked_restore_throttle": 1}
    with Connection(redis_url, transport=BROKER_TRANSPORT, transport_options=opts) as taker:
        first = taker.SimpleQueue(NODE_Q).get(timeout=5)  # taken, never acked: a stuck consumer
        assert first.payload[0][0] == BATCH and r.zcard("unacked_index") == 1 and r.llen(NODE_Q) == 0
        time.sleep(1.5)
        with Connection(redis_url, transport=BROKER_TRANSPORT, transport_options=opts) as conn:
            conn.default_channel.qos.restore_visible(num=10)  # what a worker's poller does
            assert r.llen(NODE_Q) == 1
            queue = conn.SimpleQueue(NODE_Q)
            again = queue.get(timeout=5)
            assert again.payload[0][0] == BATCH and again.headers.get("redelivered") is True
            assert again.delivery_tag == first.delivery_tag
            again.ack()
            queue.close()
    assert r.llen(NODE_Q) == 0 and r.zcard("unacked_index") == 0 and DeadLetters(r).count() == 0


def test_kombu_still_has_the_shape_the_overrides_copy():
    """Channel._brpop_read and _get mirror kombu's; a kombu upgrade that changes them must be
    looked at (the override would silently drop what kombu added)."""
    brpop = inspect.getsource(kombu_redis.Channel._brpop_read)
    assert "self.connection._deliver(loads(bytes_to_str(item)), dest)" in brpop
    assert "self._queue_cycle.rotate(dest)" in brpop and "self._in_poll = None" in brpop
    get = inspect.getsource(kombu_redis.Channel._get)
    assert "return loads(bytes_to_str(item))" in get and "client.rpop(" in get


# ---- the wiring ---------------------------------------------------------------------------------

def test_celery_config_selects_the_transport_for_redis_and_rediss(redis_url):
    assert celery_config(redis_url)["broker_transport"] == BROKER_TRANSPORT
    assert broker_transport_config("redis://h:6379/0") == {"broker_url": "redis://h:6379/0",
                                                           "broker_transport": BROKER_TRANSPORT}
    # lorafleet's own URL parameters never reach kombu
    assert broker_transport_config("redis://h:6379/0?wait_replicas=1&wait_timeout_ms=5")["broker_url"] == \
        "redis://h:6379/0"
    tls = broker_transport_config("rediss://:pw@h:6380/0")
    assert tls == {"broker_url": "rediss://:pw@h:6380/0", "broker_transport": BROKER_TRANSPORT,
                   "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED}}
    assert "broker_use_ssl" not in broker_transport_config("rediss://h:6380/0?ssl_cert_reqs=optional")
    assert broker_transport_config("memory://") == {"broker_url": "memory://"}
    with make_sender(redis_url).connection_for_write() as conn:
        assert conn.get_transport_cls() is Transport
    app = make_sender("rediss://:pw@h.example:6380/1")
    with app.connection_for_write() as conn:
        assert conn.get_transport_cls() is Transport
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        assert (conn.hostname, conn.port, conn.virtual_host) == ("h.example", 6380, "1")


def test_celery_config_sends_sentinel_urls_through_the_screening_sentinel_transport():
    conf = celery_config("redis+sentinel://:p%40ss@s1:26379,s2:26380/lorafleet/2?sentinel_password=sp&wait_replicas=1")
    assert conf["broker_url"] == "sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@s2:26380/2"
    assert conf["broker_transport"] == SENTINEL_TRANSPORT
    opts = conf["broker_transport_options"]
    assert opts["master_name"] == "lorafleet" and opts["sentinel_kwargs"]["password"] == "sp"
    assert opts["sentinel_kwargs"]["socket_timeout"] > 0  # a hung sentinel never blocks forever
    assert opts["visibility_timeout"] == celery_config("redis://h/0")["broker_transport_options"]["visibility_timeout"]
    app = make_sender("redis+sentinel://:p%40ss@s1:26379,s2:26380/lorafleet/2")
    with app.connection_for_write() as conn:
        cls = conn.get_transport_cls()
        assert cls is SentinelTransport and issubclass(cls.Channel, kombu_redis.SentinelChannel)
        assert cls.Channel._brpop_read is Channel._brpop_read  # the same screening as redis://
        assert (conn.hostname, conn.port, conn.password, conn.virtual_host) == ("s1", 26379, "p@ss", "2")


def test_the_workers_own_guard_records_to_the_same_dead_letters(r, monkeypatch):
    """Second line: a body that reached a task anyway (e.g. published around the transport) is
    dropped by the worker and counted in the same list, once."""
    from types import SimpleNamespace

    from lorafleet.workers import app as worker_app
    monkeypatch.setattr(worker_app, "_runtime", SimpleNamespace(r=r))
    assert worker_app._message({"batch_id": "x"}, TRAIN_QUEUE) is None
    assert worker_app._message(BATCH, TRAIN_QUEUE) is not None
    (rec,) = DeadLetters(r).recent()
    assert (rec["queue"], rec["reason"], json.loads(rec["payload"])) == (TRAIN_QUEUE, "invalid_batch",
                                                                         {"batch_id": "x"})
    assert DeadLetters(r).count() == 1


def test_client_ops_and_sample_tasks_pass_the_transport_and_bad_bodies_do_not(redis_url, r):
    """lf.ops_batch carries a BatchMessage (phase ops) on a node queue; lf.sample_batch a
    SampleMessage on the rollout queue. A sample task with a batch body is poison."""
    from lorafleet.common.messaging.celery_config import TASK_OPS, TASK_SAMPLE

    ops = {**BATCH, "phase": "ops"}
    sample = {"batch_id": "s1", "epoch": 3, "request_ids": ["tk-1", "tk-2"]}
    raw_ops, raw_sample, raw_bad = sent_items(redis_url, r, (TASK_OPS, [ops], NODE_Q),
                                              (TASK_SAMPLE, [sample], ROLLOUT_QUEUE),
                                              (TASK_SAMPLE, [BATCH], ROLLOUT_QUEUE))
    assert check_item(NODE_Q, raw_ops)["headers"]["task"] == TASK_OPS
    assert check_item(ROLLOUT_QUEUE, raw_sample)["headers"]["task"] == TASK_SAMPLE
    assert reason(ROLLOUT_QUEUE, raw_bad) == "invalid_batch"
