"""kombu's Redis transport, with poison isolation where poison breaks it.

kombu's Redis channel takes a raw item off a queue list (BRPOP in `_brpop_read`, RPOP in `_get`)
and runs `loads(bytes_to_str(item))` and then `Message(payload)` on it. Anything that is not a
kombu envelope (`this is not json`, `[1, 2, 3]`, `42`, invalid UTF-8, an empty string, `{}`) raises
there, inside the consumer's event loop, and Celery stops the worker ("Unrecoverable error"):
lorafleet's task code never gets a say. Valid envelopes that carry something else (another
content type, an unknown task, a body that is not a `BatchMessage`) reach Celery, which drops them
quietly or runs a task on garbage.

`Channel` here screens each raw item once, before kombu parses it (`check_item`): an item that
is not a valid lorafleet message is recorded in the dead-letter list (`DeadLetters`), logged on
one line, and skipped as if the read had found nothing (`Empty`, which kombu's poller and
Celery's event loop both treat as "nothing to deliver"); the consumer goes on with the next item.
A valid item goes on exactly as in kombu (ack emulation, the unacked hash, visibility-timeout
redelivery and the rest are kombu's own code, untouched).

Which items are screened how:

* lorafleet task queues (`lf.rollout`, `lf.train`, `lf.node.*`, and Celery's default `celery`
  queue, which lorafleet never uses): the full check: every header and property (only those
  lorafleet's sender writes, each of its type and size: `common/messaging/screen.py`; Celery reads
  them in the worker's main process, where a `timelimit` of "soon" stopped the worker), down to
  the `BatchMessage` in the body; and the delivery bound (`_count_delivery`: a message delivered
  `max_deliveries` times without an ack is dead-lettered instead of being delivered again);
* any other queue a lorafleet Celery app consumes (e.g. the reply queues of `celery inspect`):
  only what kombu itself needs to build a `Message` without raising.

The transport is selected by `lorafleet.common.messaging.celery_config.celery_config` for `redis://` and
`rediss://` URLs (TLS is the same kombu transport), with the broker transport option
`max_deliveries` (LORAFLEET_MAX_DELIVERIES). Torch-free: workers and the scheduler use it.
"""

from __future__ import annotations

import base64
import binascii
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from pydantic import ValidationError

from lorafleet.common.keys import NODE_QUEUE_PREFIX, ROLLOUT_QUEUE, TRAIN_QUEUE
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.celery_config import TASK_OPS, TASK_ROLLOUT, TASK_SAMPLE, TASK_TRAIN
from lorafleet.common.messaging.dead_letters import DeadLetters
from lorafleet.common.messaging.messages import BatchMessage, SampleMessage
from lorafleet.common.messaging.screen import (
    DELIVERIES_HEADER,
    MAX_ITEM_BYTES,
    PoisonMessage,
    deliveries,
    screen_headers,
    screen_properties,
    shown,
)

log = get_logger("lorafleet.broker")

LORAFLEET_TASKS = frozenset({TASK_ROLLOUT, TASK_TRAIN, TASK_OPS, TASK_SAMPLE})
DEFAULT_MAX_DELIVERIES = 5  # LORAFLEET_MAX_DELIVERIES: deliveries of one message before it is dead-lettered
__all__ = ["PoisonMessage", "check_item", "dead_letter", "is_task_queue", "Channel", "SentinelChannel",
           "Transport", "SentinelTransport"]
CELERY_DEFAULT_QUEUE = "celery"
CONTENT_TYPE = "application/json"
_EMBED_LINKS = ("callbacks", "errbacks", "chain", "chord")


def is_task_queue(queue: str) -> bool:
    """Queues that carry only lorafleet tasks (and so get the full check)."""
    return queue in (ROLLOUT_QUEUE, TRAIN_QUEUE, CELERY_DEFAULT_QUEUE) or queue.startswith(NODE_QUEUE_PREFIX)


def _need(cond: bool, reason: str, detail: str) -> None:
    if not cond:
        raise PoisonMessage(reason, detail)


def _json(raw: bytes | str) -> object:
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > MAX_ITEM_BYTES:  # before parsing: a 20 MB field is never decoded, logged or kept whole
        raise PoisonMessage("too_large", f"{size} bytes, over the limit of {MAX_ITEM_BYTES}")
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PoisonMessage("not_utf8", str(exc)) from None
    else:
        text = raw
    if not text.strip():
        raise PoisonMessage("not_json", "empty payload")
    try:  # kombu's own JSON decoder (with its type hooks), as kombu would have run it
        return loads(text)
    except RecursionError:
        raise PoisonMessage("not_json", "nested too deeply") from None
    except Exception as exc:  # JSONDecodeError, a type hook's error, ints beyond the digit limit
        raise PoisonMessage("not_json", f"{type(exc).__name__}: {exc}") from None


def _envelope(payload: object) -> dict[str, Any]:
    """What kombu's `Message(payload)` and Redis `QoS.append` need of a decoded item."""
    if not isinstance(payload, dict):
        raise PoisonMessage("not_envelope", f"a JSON {type(payload).__name__}, not an object")
    missing = [k for k in ("body", "headers", "properties") if k not in payload]
    _need(not missing, "not_envelope", f"missing {', '.join(missing)}")
    props, headers = payload["properties"], payload["headers"]
    _need(isinstance(props, dict), "not_envelope", "properties is not an object")
    _need(headers is None or isinstance(headers, dict), "not_envelope", "headers is not an object")
    tag = props.get("delivery_tag")
    _need(isinstance(tag, str) and bool(tag), "not_envelope", "no delivery_tag string")
    info = props.get("delivery_info")
    _need(isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")),
          "not_envelope", "no delivery_info with exchange and routing_key")
    body, encoding = payload["body"], props.get("body_encoding")
    _need(body is None or isinstance(body, str), "not_envelope", "body is not a string")
    _need(encoding is None or (isinstance(encoding, str) and encoding.lower() in ("base64", "utf-8")),
          "not_envelope", f"unknown body_encoding {shown(encoding)}")
    for key in ("content-type", "content-encoding"):
        _need(payload.get(key) is None or isinstance(payload[key], str), "not_envelope",
              f"{key} is not a string")
    return payload


def _task_body(payload: dict[str, Any]) -> BatchMessage | SampleMessage:
    """The one BatchMessage (SampleMessage for lf.sample_batch) a lorafleet task message carries
    (Celery task protocol 2)."""
    _need(payload.get("content-type") == CONTENT_TYPE, "content_type",
          f"content-type {shown(payload.get('content-type'))}, not {CONTENT_TYPE}")
    _need((payload.get("content-encoding") or "utf-8").lower() == "utf-8", "content_type",
          f"content-encoding {shown(payload.get('content-encoding'))}, not utf-8")
    headers = payload["headers"] or {}
    screen_headers(headers, LORAFLEET_TASKS)
    screen_properties(payload["properties"])
    task = headers["task"]
    body = payload["body"] or ""
    if (payload["properties"].get("body_encoding") or "utf-8").lower() == "base64":
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise PoisonMessage("bad_body", f"body is not base64 of UTF-8: {exc}") from None
    try:  # what Celery's json decoder (kombu's) will make of it
        decoded = loads(body)
    except RecursionError:
        raise PoisonMessage("bad_body", "body nested too deeply") from None
    except Exception as exc:
        raise PoisonMessage("bad_body", f"body is not JSON: {type(exc).__name__}: {exc}") from None
    _need(isinstance(decoded, list) and len(decoded) == 3, "bad_body", "body is not [args, kwargs, embed]")
    args, kwargs, embed = decoded
    _need(isinstance(args, list) and len(args) == 1, "bad_body", "args are not exactly one object")
    _need(kwargs == {}, "bad_body", "kwargs are not empty")
    _need(isinstance(embed, dict) and not any(embed.get(k) for k in _EMBED_LINKS), "bad_body",
          "embed links other tasks")
    try:
        return (SampleMessage if task == TASK_SAMPLE else BatchMessage).model_validate(args[0])
    except ValidationError as exc:
        raise PoisonMessage("invalid_batch", str(exc)) from None


def check_item(queue: str, raw: bytes | str) -> dict[str, Any]:
    """The kombu envelope of a raw item of `queue`, or PoisonMessage saying why not."""
    payload = _envelope(_json(raw))
    if is_task_queue(queue):
        _task_body(payload)
    return payload


def dead_letter(client: Any, queue: str, raw: bytes | str, exc: PoisonMessage) -> None:
    """Record and log one poison item; a failure to record is logged, never raised."""
    size = len(raw)
    try:
        DeadLetters(client).add(queue, raw, exc.reason, exc.detail)
    except Exception as err:  # the item is off the queue already: say so, keep consuming
        log.error("poison message not recorded", queue=queue, reason=exc.reason, size=size, error=repr(err))
        return
    log.warning("poison message dead-lettered", queue=queue, reason=exc.reason, detail=exc.detail[:200],
                size=size)


class _Screening:
    """Every raw item screened before kombu parses it: mixed into kombu's Redis channels."""

    max_deliveries = DEFAULT_MAX_DELIVERIES  # broker transport option `max_deliveries`

    def _screen(self, queue: str, item: bytes | str) -> dict[str, Any] | None:
        """The envelope to deliver, or None when the item was dead-lettered."""
        try:
            payload = check_item(queue, item)
            if is_task_queue(queue):
                self._count_delivery(payload)
            return payload
        except PoisonMessage as exc:
            poison = exc
        except Exception as exc:  # whatever the check trips on, kombu would have tripped on too
            poison = PoisonMessage("unreadable", f"{type(exc).__name__}: {exc}")
        with self.conn_or_acquire() as client:  # the broker's own server and database
            dead_letter(client, queue, item, poison)
        return None

    def _count_delivery(self, payload: dict[str, Any]) -> None:
        """Count this delivery in the message itself, or refuse the delivery past the bound.

        A message whose handling kills the worker process (or that Celery cannot take) comes back:
        kombu restores it from its unacked hash (a killed pool child's reject, the visibility
        timeout, the restore at shutdown). The count is written into the payload before kombu
        stores that payload in the unacked hash, so every restore brings it back with the count
        it had, and no per-message key has to live (and expire) in Redis."""
        headers = payload["headers"]
        done = deliveries(headers)
        if done >= self.max_deliveries:
            raise PoisonMessage("delivery_limit", f"delivered {done} times without being acknowledged "
                                f"(each delivery ended its worker process: LORAFLEET_MAX_DELIVERIES="
                                f"{self.max_deliveries})")
        headers[DELIVERIES_HEADER] = done + 1

    # kombu 5.x `Channel._brpop_read`, with `loads(bytes_to_str(item))` replaced by `_screen`
    # (tests/unit/test_dead_letters.py checks that the kombu method still has that shape).
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._screen(dest, item)
            if payload is None:
                raise Empty()  # nothing delivered; the poller issues the next BRPOP
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush is not None:
                flush()

    # kombu's `Channel._get` (basic_get, `queue.get()`), skipping over poison to the next item.
    def _get(self, queue: str) -> dict[str, Any]:
        update_expire = getattr(self, "_maybe_update_queues_expire", None)
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while (item := client.rpop(self._q_for_pri(queue, pri))) is not None:
                    payload = self._screen(queue, item)
                    if payload is not None:
                        if update_expire is not None:
                            update_expire(client, queue)
                        return payload
            if update_expire is not None:
                update_expire(client, queue)
            raise Empty()

    # Fanout (pub/sub: Celery's broadcast remote control): kombu already skips what is not JSON;
    # JSON that is not an envelope would still raise in Message(), so it is dead-lettered too.
    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        try:
            _envelope(message)
        except PoisonMessage as exc:
            with self.conn_or_acquire() as client:
                dead_letter(client, exchange, dumps(message), exc)
            raise Empty() from None
        return super()._deliver_fanout_message(message, exchange)


class Channel(_Screening, kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with screening."""

    from_transport_options = (*kombu_redis.Channel.from_transport_options, "max_deliveries")


class SentinelChannel(_Screening, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """kombu's Sentinel channel (the primary found through the sentinels) with screening."""

    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "max_deliveries")


class Transport(kombu_redis.Transport):
    """kombu's Redis transport (redis:// and rediss://) with the screening `Channel`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (`redis+sentinel://` URLs) with the screening channel."""

    Channel = SentinelChannel
