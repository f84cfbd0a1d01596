"""The scheduler: one leader (a Redis lease with a fencing epoch) forms fair, mixed-adapter
batches from the experiments that are ready, publishes them with backpressure, routes train
batches to the node that holds the adapters hot, and reaps tasks whose worker went away.

All state lives in Redis, so a restarted (or standby) scheduler simply carries on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from typing import Any, Protocol

import redis
from kombu.exceptions import OperationalError

from lorafleet.common.celery_config import TASK_ROLLOUT, TASK_TRAIN
from lorafleet.common.experiment import ACTIVE, SCHEDULING_FIELDS, ExperimentRecord
from lorafleet.common.keys import Keys, node_queue
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import BatchItem, BatchMessage
from lorafleet.common.protocol import Backoff, StepProtocol
from lorafleet.common.retry import Outage
from lorafleet.common.settings import Settings

log = get_logger("lorafleet.scheduler")


class TaskSender(Protocol):
    """What the scheduler needs of Celery: publish a task by name to a queue."""

    def send_task(self, name: str, args: list[Any], queue: str) -> Any: ...


class Scheduler:
    def __init__(self, r: redis.Redis, sender: TaskSender, settings: Settings) -> None:
        self.r = r
        self.sender = sender  # a Celery app used only for send_task (tests inject a recorder)
        self.config = settings
        self.protocol = StepProtocol(r)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.epoch = 0
        self.is_leader = False
        self._last_event = "$"
        self._rebalancing = False  # this scheduler set the rebalance flag
        self.backoff = Backoff(cap_ms=int(settings.retry_backoff_max_s * 1000))
        self.redis_outage = Outage("redis", log, cap_s=settings.retry_backoff_max_s)

    # ---- leadership ------------------------------------------------------------------------
    def _hold_lease(self) -> bool:
        ttl = self.config.leader_ttl_ms
        if self.is_leader:
            self.is_leader = self.protocol.renew_leader(self.id, ttl)
            if not self.is_leader:
                log.warning("lost leadership", scheduler=self.id)
        else:
            epoch = self.protocol.acquire_leader(self.id, ttl)
            if epoch:
                self.is_leader, self.epoch = True, epoch
                log.info("became leader", scheduler=self.id, epoch=epoch)
        return self.is_leader

    def run(self, stop: threading.Event | None = None) -> None:
        """Lead (or stand by) until `stop`. Redis faults of any length (a hang raises
        `redis.TimeoutError` after the socket timeout, a restart `ConnectionError`, a failover
        `ReadOnlyError`) never end the loop: it steps down, backs off, and carries on once Redis
        answers; leadership is then won again through the lease like after any restart."""
        stop = stop or threading.Event()
        log.info("scheduler started", scheduler=self.id)
        while not stop.is_set():
            try:
                if self._hold_lease():
                    self.tick()
                    self._wait_for_events(self.config.tick_s)
                else:
                    stop.wait(self.config.leader_ttl_ms / 3000)
                self.redis_outage.ok()
            except (redis.RedisError, OperationalError) as exc:  # OperationalError: Celery's publish
                self.is_leader = False
                stop.wait(self.redis_outage.failed(exc))

    def _wait_for_events(self, timeout_s: float) -> None:
        got = self.r.xread({Keys.events: self._last_event}, count=1000, block=int(timeout_s * 1000))
        if got:
            self._last_event = got[0][1][-1][0]

    # ---- one tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        workers, exps, now = self._snapshot()
        for e in exps:
            if e.status == "queued" and self.protocol.activate(self.id, e.id):
                e.status = "running"
        running = [e for e in exps if e.status == "running"]
        for node in self._reap(running, workers, now):  # nodes whose leases lapsed: dead or stuck
            workers.pop(node, None)
        if workers:
            self._publish(running, workers, now)

    def _snapshot(self) -> tuple[dict[str, dict], list[ExperimentRecord], int]:
        """(live workers' heartbeats, active experiments, Redis clock in ms) in two round trips:
        every tick sits between a commit and the next batch, so it is kept short."""
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(Keys.workers)
        pipe.smembers(Keys.active)
        pipe.time()
        nodes, ids, (sec, usec) = pipe.execute()
        nodes, ids = sorted(nodes), sorted(ids)
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.get(Keys.worker(node))
        for exp_id in ids:
            pipe.hmget(Keys.experiment(exp_id), SCHEDULING_FIELDS)
        out = pipe.execute() if nodes or ids else []
        workers = {n: json.loads(b) for n, b in zip(nodes, out[:len(nodes)], strict=True) if b}
        exps = [ExperimentRecord.from_values(exp_id, SCHEDULING_FIELDS, values)
                for exp_id, values in zip(ids, out[len(nodes):], strict=True)]
        return workers, [e for e in exps if e.status in ACTIVE], int(sec) * 1000 + int(usec) // 1000

    # ---- reaper --------------------------------------------------------------------------------
    def _reap(self, running: list[ExperimentRecord], workers: dict[str, dict], now: int) -> set[str]:
        """Re-publish tasks whose worker went away. Returns the nodes to avoid this tick."""
        suspect: set[str] = set()
        inflight = [e for e in running if e.inflight]
        pipe = self.r.pipeline(transaction=False)
        for e in inflight:
            pipe.hgetall(Keys.task(e.id, e.step, e.phase))
        for e, task in zip(inflight, pipe.execute() if inflight else [], strict=True):
            status = task.get("status")
            if status == "claimed" and int(task.get("lease_until", 0)) >= now:
                continue  # a live worker holds it, claimed from this message or an older one
            if status == "claimed" and task.get("batch") == e.inflight:  # a live worker renews leases
                suspect.add(task.get("owner", "").split(":")[0])
                self._retry(e, f"step {e.step} {e.phase}: lease of worker {task.get('owner')} expired "
                               "(worker died, hung, or lost Redis)")
            elif status not in ("committed", "failed"):  # an expired claim of an older message counts
                # as no claim: the current message is still waiting for a worker
                if e.node not in workers:
                    self._retry(e, f"node {e.node!r} has no live worker", count=False)
                elif now - e.inflight_at > self.config.unclaimed_timeout_s * 1000:
                    self._retry(e, f"step {e.step} {e.phase}: not claimed within "
                                   f"{self.config.unclaimed_timeout_s:g} s")
        return suspect

    def _retry(self, e: ExperimentRecord, reason: str, count: bool = True) -> None:
        attempts = self.protocol.clear_inflight(self.id, e.id, e.inflight, reason, count, self.backoff) - 1
        if attempts < 0:
            return
        log.warning("re-publishing task", experiment_id=e.id, step=e.step, phase=e.phase,
                    reason=reason, attempts=attempts)
        if attempts >= self.config.max_attempts:
            self.protocol.finish(e.id, "failed", f"{reason} (gave up after {attempts} attempts)")
        else:
            e.inflight = ""
            if attempts > 1:
                e.not_before = 1 << 62  # backing off: not this tick

    # ---- batch forming -------------------------------------------------------------------------
    def _publish(self, running: list[ExperimentRecord], workers: dict[str, dict], now: int) -> None:
        """Place unplaced experiments on the least-loaded live node, then give every idle node
        one batch: its largest ready group (train before rollout on ties), fair order inside.

        One batch per node at a time keeps queues empty, decides fairness late, and lets the
        experiments of a node fall into step with each other, so batches stay mixed."""
        busy = {e.node for e in running if e.inflight}
        # an experiment backing off after a failed attempt waits, its co-tenants go on
        ready = sorted((e for e in running if not e.inflight and e.not_before <= now),
                       key=lambda e: (e.fair_key, e.created_at))
        load = {n: 0 for n in workers}  # placed running experiments per live node
        for e in running:
            if e.node in load:
                load[e.node] += 1
        for e in ready:
            if e.node not in workers:  # new, or its worker is gone
                e.node = min(load, key=lambda n: (load[n], n))
                load[e.node] += 1
        self._rebalance(ready, load)
        groups: dict[str, dict[str, list[ExperimentRecord]]] = {}
        for e in ready:
            groups.setdefault(e.node, {}).setdefault(e.phase, []).append(e)
        for node, by_phase in sorted(groups.items()):
            if node in busy:
                continue
            phase, items = max(by_phase.items(), key=lambda kv: (len(kv[1]), kv[0] == "train"))
            self._send(phase, self._fill(items), node)

    def _rebalance(self, ready: list[ExperimentRecord], load: dict[str, int]) -> None:
        """Move ready experiments off a node that holds 2+ more than another live node (a worker
        joined, or one node's experiments finished first) to the least-loaded one, lowest fair
        priority first; the receiving worker loads the committed version from the store. While
        an imbalance remains, a flag stops workers from chaining their next rollouts, so their
        experiments come back to the scheduler at the next commit and can be moved."""
        for e in reversed(ready):
            light = min(load, key=lambda n: (load[n], n))
            if load[e.node] - load[light] >= 2:
                load[e.node], load[light], e.node = load[e.node] - 1, load[light] + 1, light
        if load and max(load.values()) - min(load.values()) >= 2:
            self.r.set(Keys.rebalance, self.id, px=int(self.config.tick_s * 4000))
            self._rebalancing = True
        elif self._rebalancing:
            self.r.delete(Keys.rebalance)
            self._rebalancing = False

    def _fill(self, items: list[ExperimentRecord]) -> list[ExperimentRecord]:
        """Take items in fair order until the row budget is used (always at least one)."""
        out, rows = [], 0
        for e in items:
            if out and rows + e.rows > self.config.max_batch_rows:
                break
            out.append(e)
            rows += e.rows
        return out

    def _send(self, phase: str, items: list[ExperimentRecord], node: str) -> None:
        """Rollouts and train steps of an adapter go to the node that holds it hot."""
        batch_id = uuid.uuid4().hex[:16]
        marks = self.protocol.mark_inflight(self.id, [(e.id, e.step) for e in items], batch_id, phase, node)
        marked = [e for e, ok in zip(items, marks, strict=True) if ok]
        if not marked:
            return
        msg = BatchMessage(batch_id=batch_id, phase=phase, node=node, epoch=self.epoch,  # type: ignore[arg-type]
                           items=tuple(BatchItem(exp_id=e.id, step=e.step) for e in marked))
        queue = node_queue(node)
        try:
            self.sender.send_task(TASK_TRAIN if phase == "train" else TASK_ROLLOUT,
                                  args=[msg.model_dump(mode="json")], queue=queue)
        except Exception:
            # never published: free the marks uncounted (if Redis answers), else the reaper does
            for e in marked:
                self.protocol.clear_inflight(self.id, e.id, batch_id, "publish failed", count=False)
            raise
        log.debug("published", phase=phase, batch=batch_id, queue=queue, n=len(marked),
                  experiments=[e.id for e in marked])


def run_scheduler(settings: Settings) -> None:
    from lorafleet.common.celery_config import make_sender
    from lorafleet.common.redis_conn import connect

    url = settings.require_redis_url()
    r = connect(url, settings.redis_socket_timeout_s, settings.redis_connect_timeout_s)
    Scheduler(r, make_sender(url), settings).run()

