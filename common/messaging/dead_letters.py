"""The dead-letter list: every payload taken off a lorafleet queue that was not a valid lorafleet
message, with why, where and when.

Poison never reaches a task and never costs a worker: the broker transport
(`lorafleet.common.messaging.broker_transport`) screens each raw list item before kombu parses it, and the
worker's own message guard (`lorafleet.workers.app`) is a second line. Whichever layer catches a
payload records it here once: LPUSH of one JSON record onto `Keys.dead_letters` (bounded to the
newest `MAX_RECORDS`) and INCR of `Keys.dead_letter_count` (every payload ever dead-lettered).

A record is a JSON object:

    queue             the queue the payload was taken off (e.g. "lf.node.w0")
    reason            a short stable code: too_large (over MAX_ITEM_BYTES), not_utf8, not_json,
                      not_envelope, content_type, unknown_task, header_<name> (a header of
                      the wrong type or value), header_unknown (one lorafleet never sends),
                      property_<name>, property_unknown, bad_body, invalid_batch,
                      delivery_limit (delivered LORAFLEET_MAX_DELIVERIES times, never acked),
                      unreadable (the check itself failed on it); see common/messaging/screen.py
    detail            what exactly was wrong, one line (bounded text; quoted values are cut to
                      message_screen.SHOWN_CHARS characters)
    at                epoch seconds (float) when it was dead-lettered
    by                "<host>:<pid>" of the process that caught it
    size              length of the raw payload in bytes
    payload           the raw payload, truncated to PAYLOAD_LIMIT bytes: as text when it is UTF-8,
                      else base64 (see payload_encoding)
    payload_encoding  "text" or "base64"
    truncated         whether `payload` is a prefix of the raw payload
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from typing import Any

from lorafleet.common.keys import Keys

MAX_RECORDS = 10_000  # the list keeps the newest records; the counter counts them all
PAYLOAD_LIMIT = 4096  # bytes of each raw payload kept in its record
DETAIL_LIMIT = 500  # characters of each record's detail


def _payload_fields(payload: bytes | str) -> dict[str, Any]:
    raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else bytes(payload)
    head = raw[:PAYLOAD_LIMIT]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(head).decode("ascii"), "base64"
    else:  # the cut may split a multi-byte character: drop only that partial tail
        text, encoding = head.decode("utf-8", "ignore"), "text"
    return {"size": len(raw), "payload": text, "payload_encoding": encoding,
            "truncated": len(raw) > PAYLOAD_LIMIT}


class DeadLetters:
    """Owns the dead-letter list and counter. `r` is any redis-py client (decoded or not)."""

    list_key = Keys.dead_letters
    count_key = Keys.dead_letter_count

    def __init__(self, r: Any) -> None:
        self.r = r

    @staticmethod
    def record(queue: str, payload: bytes | str, reason: str, detail: str = "",
               at: float | None = None) -> dict[str, Any]:
        """The JSON-ready record of one dead-lettered payload."""
        return {"queue": queue, "reason": reason, "detail": detail[:DETAIL_LIMIT],
                "at": time.time() if at is None else at, "by": f"{socket.gethostname()}:{os.getpid()}",
                **_payload_fields(payload)}

    def add(self, queue: str, payload: bytes | str, reason: str, detail: str = "") -> dict[str, Any]:
        """Record one poison payload (one MULTI: push, trim, count) and return its record."""
        rec = self.record(queue, payload, reason, detail)
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(self.list_key, json.dumps(rec, sort_keys=True, ensure_ascii=False))
        pipe.ltrim(self.list_key, 0, MAX_RECORDS - 1)
        pipe.incr(self.count_key)
        pipe.execute()
        return rec

    def count(self) -> int:
        """Payloads ever dead-lettered (the list itself keeps only the newest MAX_RECORDS)."""
        return int(self.r.get(self.count_key) or 0)

    def recent(self, n: int = 100) -> list[dict[str, Any]]:
        """The newest `n` records, newest first."""
        if n <= 0:
            return []
        return [json.loads(item) for item in self.r.lrange(self.list_key, 0, n - 1)]
