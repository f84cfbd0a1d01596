"""`FleetStatus`: what an operator looks at besides experiments, read from Redis in one pass.

Celery's queues are kept nearly empty by design (the scheduler publishes one batch per node and
decides fairness late), so queue lengths alone hide the backlog: `waiting` counts the experiments
that are ready for a batch and not yet in one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from lorafleet.common.dead_letters import DeadLetters
from lorafleet.common.experiment import ExperimentRecord
from lorafleet.common.keys import NODE_QUEUE_PREFIX, ROLLOUT_QUEUE, TRAIN_QUEUE, Keys


@dataclass
class FleetStatus:
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # live node -> heartbeat
    queues: dict[str, int] = field(default_factory=dict)  # Celery queue -> messages waiting
    queued: int = 0  # experiments submitted, not started
    running: int = 0
    waiting: int = 0  # running, ready for a batch, not in one (the real backlog)
    backing_off: int = 0  # running, waiting out the backoff after a failed attempt
    dead_letters: int = 0  # poison payloads taken off the queues, ever
    recent_dead_letters: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for the bottom of `lorafleet status`."""
        busy = sum(1 for w in self.workers.values() if w.get("busy"))
        queued_msgs = sum(self.queues.values())
        exps = (f"experiments: {self.running} running, {self.queued} queued, "
                f"{self.waiting} waiting for a batch")
        if self.backing_off:
            exps += f", {self.backing_off} backing off"
        parts = [f"workers: {len(self.workers)} live ({busy} busy)", exps,
                 f"queued messages: {queued_msgs}",
                 f"dead letters: {self.dead_letters}"]
        return " · ".join(parts)


def read_fleet_status(r: redis.Redis, recent: int = 5) -> FleetStatus:
    out = FleetStatus()
    nodes = sorted(r.smembers(Keys.workers))
    queues = [ROLLOUT_QUEUE, TRAIN_QUEUE, *(NODE_QUEUE_PREFIX + n for n in nodes)]
    ids = sorted(r.smembers(Keys.active))
    fields = ("status", "inflight", "not_before")
    pipe = r.pipeline(transaction=False)
    for n in nodes:
        pipe.get(Keys.worker(n))
    for q in queues:
        pipe.llen(q)
    for exp_id in ids:
        pipe.hmget(Keys.experiment(exp_id), fields)
    pipe.time()
    res = pipe.execute()
    k = len(nodes) + len(queues)
    beats, lengths, exps = res[:len(nodes)], res[len(nodes):k], res[k:-1]
    sec, usec = res[-1]
    now_ms = int(sec) * 1000 + int(usec) // 1000
    out.workers = {n: json.loads(b) for n, b in zip(nodes, beats, strict=True) if b}
    out.queues = dict(zip(queues, (int(x) for x in lengths), strict=True))
    for exp_id, values in zip(ids, exps, strict=True):
        e = ExperimentRecord.from_values(exp_id, fields, values)
        if e.status == "queued":
            out.queued += 1
        elif e.status == "running":
            out.running += 1
            if not e.inflight:
                if e.not_before > now_ms:
                    out.backing_off += 1
                else:
                    out.waiting += 1
    letters = DeadLetters(r)
    out.dead_letters = letters.count()
    out.recent_dead_letters = letters.recent(recent)
    return out
