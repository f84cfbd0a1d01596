"""What a lorafleet task message may carry, header by header and property by property.

Celery builds a `Request` from every header of a message in the worker's MAIN process (the
consumer, before any pool child runs it): a `timelimit` of `"soon"` raises there ("Unrecoverable
error"), and the worker stops. A header Celery does not know lands in the task's request context,
and some headers change what the worker does with the message (an `eta` holds it in memory, a
`timelimit` kills the child that runs it, a `shadow` renames it). So a message on a lorafleet task
queue carries exactly the headers lorafleet's own sender (`celery_config.make_sender`, Celery
5.x task protocol 2) writes, each with the one type and value range that sender gives it; anything
else is poison. Each rule's text says what was expected: the dead-letter detail reads
`header_timelimit: must be [null, null] (...), got 'soon'`.

Sizes are bounded everywhere: the whole raw item (`MAX_ITEM_BYTES`, before it is parsed), each
string header, the body's ids (`BatchMessage`, `SampleMessage`), and every value shown in a
reason (`shown`: at most `SHOWN_CHARS` characters), so no field is ever logged or recorded whole.

`DELIVERIES_HEADER` is lorafleet's own: the number of times the transport handed the message to
Celery (see `broker_transport`); it travels inside the message, so kombu's restores (a rejected
message of a killed child, a visibility-timeout redelivery, the unacked restore at shutdown) all
put it back with the count it had.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

DELIVERIES_HEADER = "lf_deliveries"
MAX_ITEM_BYTES = 2 * 1024 * 1024  # a BatchMessage of 4096 items is ~0.5 MiB base64-encoded
SHOWN_CHARS = 80  # of any value quoted in a reason, a log line or a dead-letter detail
MAX_DELIVERIES_CEILING = 1000  # the largest delivery count a header may claim

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # Celery's uuid4, or a caller's task_id
_QUEUE = re.compile(r"[A-Za-z0-9_.:-]{0,128}")


class PoisonMessage(Exception):
    """A raw queue item that is not a valid lorafleet message; `reason` is a short stable code
    (documented in `dead_letters`), `detail` one readable line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def shown(value: object) -> str:
    """`repr(value)`, cut to SHOWN_CHARS characters (a 20 MB field is never quoted whole)."""
    text = repr(value) if not isinstance(value, str | bytes) or len(value) <= 4 * SHOWN_CHARS \
        else repr(value[:4 * SHOWN_CHARS])
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


Check = Callable[[object], bool]


def _null(v: object) -> bool:
    return v is None


def _int_in(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _str_max(n: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) <= n


def _matches(pattern: re.Pattern[str]) -> Check:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _or_null(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _empty_or_null(kind: type) -> Check:
    return lambda v: v is None or (isinstance(v, kind) and not v)


_NOT_SET = "null (lorafleet never sets it)"
_TASK_ID_TEXT = "a task id (1-64 letters, digits, '_', '.', ':' or '-')"

# header -> (check, what it must be). Celery 5.7 `send_task` writes all but the last two;
# `redelivered` is kombu's (its restore of an unacked message), DELIVERIES_HEADER lorafleet's.
HEADER_RULES: dict[str, tuple[Check, str]] = {
    "lang": (lambda v: v == "py", "'py'"),
    "task": (lambda v: True, "a lorafleet task name"),  # checked against the tasks (unknown_task)
    "id": (_matches(_TASK_ID), _TASK_ID_TEXT),
    "root_id": (_or_null(_matches(_TASK_ID)), f"{_TASK_ID_TEXT} or null"),
    "parent_id": (_or_null(_matches(_TASK_ID)), f"{_TASK_ID_TEXT} or null"),
    "shadow": (_null, _NOT_SET),  # a shadow name renames the task in logs and events
    "eta": (_null, _NOT_SET),  # an ETA task is held in the worker's memory until then
    "expires": (_null, _NOT_SET),
    "group": (_null, _NOT_SET),
    "group_index": (_null, _NOT_SET),
    "retries": (_int_in(0, 1000), "an integer in [0, 1000]"),
    # a time limit kills the pool child that runs the step (and late acks redeliver it); lorafleet
    # bounds a step with its own leases instead
    "timelimit": (lambda v: isinstance(v, list) and v == [None, None],
                  "[null, null] (lorafleet sets no Celery time limits)"),
    "argsrepr": (_or_null(_str_max(4096)), "a string of at most 4096 characters or null"),
    "kwargsrepr": (_or_null(_str_max(4096)), "a string of at most 4096 characters or null"),
    "origin": (_or_null(_str_max(256)), "a string of at most 256 characters or null"),
    "ignore_result": (_or_null(lambda v: isinstance(v, bool)), "true, false or null"),
    "replaced_task_nesting": (_int_in(0, 0), "0 (lorafleet replaces no task)"),
    "stamped_headers": (_empty_or_null(list), "null or [] (lorafleet stamps no task)"),
    "stamps": (_empty_or_null(dict), "null or {} (lorafleet stamps no task)"),
    "redelivered": (lambda v: isinstance(v, bool), "true or false"),
    DELIVERIES_HEADER: (_int_in(1, MAX_DELIVERIES_CEILING), f"an integer in [1, {MAX_DELIVERIES_CEILING}]"),
}
REQUIRED_HEADERS = ("task", "id")


def _delivery_info(v: object) -> bool:
    if not isinstance(v, dict) or not set(v) <= {"exchange", "routing_key", "redelivered"}:
        return False
    return (_matches(_QUEUE)(v.get("exchange")) and _matches(_QUEUE)(v.get("routing_key"))
            and isinstance(v.get("redelivered", False), bool))


# property -> (check, what it must be); `body_encoding` is checked with the body itself
PROPERTY_RULES: dict[str, tuple[Check, str]] = {
    "correlation_id": (_or_null(_matches(_TASK_ID)), f"{_TASK_ID_TEXT} or null"),
    "reply_to": (_or_null(_matches(_TASK_ID)), f"{_TASK_ID_TEXT} or null"),
    "delivery_mode": (lambda v: v in (None, 1, 2) and not isinstance(v, bool), "1, 2 or null"),
    "delivery_info": (_delivery_info, "{exchange, routing_key[, redelivered]}: queue names of at "
                      "most 128 characters"),
    "priority": (_or_null(_int_in(0, 255)), "an integer in [0, 255] or null"),
    "body_encoding": (lambda v: v is None or (isinstance(v, str) and v.lower() in ("base64", "utf-8")),
                      "'base64', 'utf-8' or null"),
    "delivery_tag": (_matches(_TASK_ID), "a delivery tag (1-64 letters, digits, '_', '.', ':' or '-')"),
}


def _screen_fields(fields: dict[str, Any], rules: dict[str, tuple[Check, str]], what: str) -> None:
    for name in sorted(fields, key=str):
        rule = rules.get(name)
        if rule is None:
            raise PoisonMessage(f"{what}_unknown", f"{what} {shown(name)} is not one lorafleet sends")
        check, expected = rule
        if not check(fields[name]):
            raise PoisonMessage(f"{what}_{name}", f"must be {expected}, got {shown(fields[name])}")


def screen_headers(headers: dict[str, Any], tasks: frozenset[str]) -> None:
    """Every header of a task message: the ones lorafleet sends, each of its type and size."""
    task = headers.get("task")
    if not (isinstance(task, str) and task in tasks):
        raise PoisonMessage("unknown_task", f"task {shown(task)}")
    for name in REQUIRED_HEADERS:
        if name not in headers:
            raise PoisonMessage(f"header_{name}", "missing")
    _screen_fields(headers, HEADER_RULES, "header")


def screen_properties(properties: dict[str, Any]) -> None:
    """Every property of a task message, each of its type and size."""
    _screen_fields(properties, PROPERTY_RULES, "property")


def deliveries(headers: dict[str, Any]) -> int:
    """How many times the transport has delivered this (screened) message before."""
    n = headers.get(DELIVERIES_HEADER, 0)
    return n if isinstance(n, int) and not isinstance(n, bool) else 0
