"""`FleetStatus`: what an operator looks at besides experiments, read from Redis in one pass.

Celery's queues are kept nearly empty by design (the scheduler publishes one batch per node and
decides fairness late), so queue lengths alone hide the backlog: `waiting` counts the experiments
that are ready for a batch and not yet in one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from lorafleet.common.keys import NODE_QUEUE_PREFIX, ROLLOUT_QUEUE, TRAIN_QUEUE, Keys
from lorafleet.common.messaging.dead_letters import DeadLetters
from lorafleet.common.redis.replication import replication_health
from lorafleet.common.state.phases import PHASES


@dataclass
class FleetStatus:
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # live node -> heartbeat
    queues: dict[str, int] = field(default_factory=dict)  # Celery queue -> messages waiting
    queued: int = 0  # experiments submitted, not started
    running: int = 0
    waiting: int = 0  # running, ready for a batch, not in one (the real backlog)
    backing_off: int = 0  # running, waiting out the backoff after a failed attempt
    # the backlog by phase: "rollout"/"train" (the `waiting` above, by phase), "ops" (client
    # models with an op ready: the Tinker endpoint) and "samples" (sample requests not yet sent)
    backlog: dict[str, int] = field(default_factory=dict)
    # the Redis primary's replication: {role, replicas online, wait_replicas, ok}
    redis: dict[str, Any] = field(default_factory=dict)
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
        by_phase = ", ".join(f"{n} {p}" for p, n in self.backlog.items() if n)
        if by_phase:
            exps += f" ({by_phase})"
        if self.backing_off:
            exps += f", {self.backing_off} backing off"
        parts = [f"workers: {len(self.workers)} live ({busy} busy)", exps,
                 f"queued messages: {queued_msgs}",
                 f"dead letters: {self.dead_letters}"]
        red = self.redis
        if red.get("wait_replicas"):
            held = "" if red.get("ok") else " (WRITES HELD: steps pause until a replica is back)"
            parts.append(f"redis: {red.get('replicas')} replica(s) online, "
                         f"writes wait for {red['wait_replicas']}{held}")
        return " · ".join(parts)


def read_fleet_status(r: redis.Redis, recent: int = 5) -> FleetStatus:
    """From the experiment indexes (common/state/ready_index.py): O(nodes), not O(experiments)."""
    out = FleetStatus()
    pipe = r.pipeline(transaction=False)
    pipe.smembers(Keys.workers)
    pipe.smembers(Keys.idx_nodes)
    pipe.time()
    nodes, index_nodes, (sec, usec) = pipe.execute()
    nodes = sorted(nodes)
    now_ms = int(sec) * 1000 + int(usec) // 1000
    queues = [ROLLOUT_QUEUE, TRAIN_QUEUE, *(NODE_QUEUE_PREFIX + n for n in nodes)]
    ready = [Keys.ready(phase, n) for n in ["", *sorted(index_nodes)] for phase in PHASES]
    pipe = r.pipeline(transaction=False)
    for n in nodes:
        pipe.get(Keys.worker(n))
    for q in queues:
        pipe.llen(q)
    pipe.scard(Keys.idx_queued)
    pipe.scard(Keys.active)  # queued and running
    pipe.zcount(Keys.idx_backoff, "-inf", now_ms)  # backoff over, not yet moved to ready
    pipe.zcount(Keys.idx_backoff, f"({now_ms}", "+inf")
    for key in ready:
        pipe.zcard(key)
    pipe.scard(Keys.tk_ready)
    pipe.zcard(Keys.tk_samples)
    res = pipe.execute()
    ops_ready, samples = int(res[-2]), int(res[-1])
    res = res[:-2]
    k = len(nodes) + len(queues)
    beats, lengths = res[:len(nodes)], res[len(nodes):k]
    queued, active, due, backing_off = (int(x) for x in res[k:k + 4])
    out.workers = {n: json.loads(b) for n, b in zip(nodes, beats, strict=True) if b}
    out.queues = dict(zip(queues, (int(x) for x in lengths), strict=True))
    out.queued, out.running = queued, max(0, active - queued)
    out.waiting, out.backing_off = due + sum(int(x) for x in res[k + 4:]), backing_off
    ready_counts = [int(x) for x in res[k + 4:]]
    for i, key in enumerate(ready):  # `ready` is ordered node by node, phase by phase
        phase = key.removeprefix(Keys.idx_ready_prefix).split(":", 1)[0]
        out.backlog[phase] = out.backlog.get(phase, 0) + ready_counts[i]
    out.backlog["ops"], out.backlog["samples"] = ops_ready, samples
    out.redis = replication_health(r)
    letters = DeadLetters(r)
    out.dead_letters = letters.count()
    out.recent_dead_letters = letters.recent(recent)
    return out
