"""The scheduler: one leader (a Redis lease with a fencing epoch) forms fair, mixed-adapter
batches from the experiments that are ready, publishes them with backpressure, routes train
batches to the node that holds the adapters hot, and reaps tasks whose worker went away.

This module is the leader's loop: the lease, waiting for events, the tick's snapshot and the
reaper of in-flight tasks. Batch forming (placement, rebalancing, one batch per idle node) is
`scheduler/batches.py`; client-driven models (Tinker) are `scheduler/tinker/dispatch.py`.

All state lives in Redis, so a restarted (or standby) scheduler simply carries on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import redis
from kombu.exceptions import OperationalError

from lorafleet.common.keys import Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.sender import TaskSender
from lorafleet.common.redis.retry import Outage
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import SCHEDULING_FIELDS, ExperimentRecord
from lorafleet.common.state.protocol import Backoff, StepProtocol
from lorafleet.common.state.ready_index import ReadyIndex
from lorafleet.scheduler.batches import BatchFormer
from lorafleet.scheduler.owner_limits import activatable
from lorafleet.scheduler.tinker.dispatch import ClientDispatch

log = get_logger("lorafleet.scheduler")


@dataclass
class _Watched:
    e: ExperimentRecord  # an in-flight experiment as last read
    check_at: int  # when the reaper reads it and its task again (Redis clock, ms; 0: next tick)


class Scheduler:
    # the rolling index check (ready_index.RECHECK): this many experiments' entries rewritten
    # from their hashes at most once per INDEX_CHECK_S, a constant cost per second at any N
    INDEX_CHECK_S = 1.0
    INDEX_CHECK_COUNT = 16

    def __init__(self, r: redis.Redis, sender: TaskSender, settings: Settings) -> None:
        self.r = r
        self.sender = sender  # a Celery app used only for send_task (tests inject a recorder)
        self.config = settings
        self.protocol = StepProtocol(r)
        self.clients = ClientDispatch(r, sender, settings)  # client-driven models (Tinker)
        self.index = ReadyIndex(r)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.batches = BatchFormer(r, sender, settings, self.protocol, self.index, self.id, self._watch_sent)
        self._index_checked = False  # rebuilt once per leadership (first tick as leader)
        self._recheck_cursor, self._recheck_at = "0", 0.0
        self._watch: dict[str, _Watched] = {}  # in-flight experiments the reaper watches
        self._ticked_at = 0.0
        self.epoch = 0
        self.is_leader = False
        self._last_event = "$"
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
                self._index_checked = False
                log.info("became leader", scheduler=self.id, epoch=epoch)
        return self.is_leader

    def run(self, stop: threading.Event | None = None) -> None:
        """Lead (or stand by) until `stop`. Redis faults of any length (a hang raises
        `redis.TimeoutError` after the socket timeout, a restart `ConnectionError`, a failover
        `ReadOnlyError`) never end the loop: it steps down, backs off, and carries on once Redis
        answers; leadership is then won again through the lease like after any restart."""
        stop = stop or threading.Event()
        log.info("scheduler started", scheduler=self.id)
        need_tick = True
        while not stop.is_set():
            try:
                if self._hold_lease():
                    if need_tick or not self._index_checked:
                        self.tick()
                        self._ticked_at = time.monotonic()
                    need_tick = self._wait_for_events(self.clients.wait_s(self.config.tick_s))
                else:
                    stop.wait(self.config.leader_ttl_ms / 3000)
                self.redis_outage.ok()
            except (redis.RedisError, OperationalError) as exc:  # OperationalError: Celery's publish
                self.is_leader = False
                stop.wait(self.redis_outage.failed(exc))

    def _wait_for_events(self, timeout_s: float) -> bool:
        """Wait for events -> whether a tick can change anything now: after a timeout (the reaper,
        backoffs), tick_s after the last tick, on any event but a commit, and on a commit that
        leaves its node with nothing in flight that the reaper watches. A batch's commits arrive
        one by one; a tick on each cost a tick's round trips per commit, several per step with
        small batches."""
        got = self.r.xread({Keys.events: self._last_event}, count=1000, block=int(timeout_s * 1000))
        if not got:
            return True
        entries = got[0][1]
        self._last_event = entries[-1][0]
        need = time.monotonic() - self._ticked_at >= timeout_s
        left = Counter(w.e.node for w in self._watch.values())  # in flight per node, as watched
        for _, fields in entries:
            if fields.get("type") not in ("rollout_committed", "train_committed"):
                need = True
                continue
            watched = self._watch.pop(fields.get("exp", ""), None)  # (a chained claim: read anew)
            if watched is None:
                need = True
            else:
                left[watched.e.node] -= 1
                need = need or left[watched.e.node] <= 0
        return need

    # ---- one tick ----------------------------------------------------------------------------
    # A tick reads the indexes (common/state/ready_index.py), never every experiment: live workers,
    # in-flight ids, per live node its load and ready counts, and the head of a ready zset that
    # an idle node can be sent: O(batch + nodes), whatever waits. Experiments to place (new, or
    # of a dead node) or to move (rebalancing) are read once, when they are placed or moved.
    def tick(self) -> None:
        if not self._index_checked:  # leadership is new: indexes are rebuilt, not trusted
            log.info("rebuilt experiment indexes", experiments=self.index.rebuild(), scheduler=self.id)
            self._index_checked = True
            self._watch.clear()
        if time.monotonic() >= self._recheck_at:
            self._recheck_cursor = self.index.recheck(self._recheck_cursor, self.INDEX_CHECK_COUNT)
            self._recheck_at = time.monotonic() + self.INDEX_CHECK_S
        workers, now = self._snapshot()
        due = [w.e for w in self._watch.values() if w.check_at <= now or w.e.node not in workers]
        suspect = self._reap(due, workers, now)  # nodes whose leases lapsed: dead or stuck
        for node in suspect:
            workers.pop(node, None)
        if workers:
            # reaped, ready again, and on a node avoided this tick: placed elsewhere
            moved_off = [e for e in due if not e.inflight and e.node in suspect and e.not_before < 1 << 62]
            self.batches.publish(self.epoch, [w.e for w in self._watch.values()], workers, moved_off)
        self.clients.tick(self.id, self.epoch, workers, now)

    def _snapshot(self) -> tuple[dict[str, dict], int]:
        """(live workers' heartbeats, Redis clock in ms) in two round trips (three when
        experiments were submitted): every tick sits between a commit and the next batch, so it
        is kept short. Queued experiments are activated, due backoffs made ready, and the
        in-flight experiments the reaper watches brought up to date: a new one, or one whose
        check is due, is read again; one no longer in flight is dropped."""
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(Keys.workers)
        pipe.smembers(Keys.idx_queued)
        self.index.promote_due(client=pipe)
        pipe.smembers(Keys.idx_inflight)
        pipe.time()
        nodes, queued, _, ids, (sec, usec) = pipe.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        if queued:  # ready at once, in this tick (they wait unplaced until BatchFormer.publish places them)
            # an API key's experiments over its max_experiments stay queued (owner_limits.py)
            self.protocol.activate_many(self.id, activatable(self.r, queued,
                                                             self.config.api_default_max_experiments))
        for gone in set(self._watch) - ids:
            del self._watch[gone]
        fresh = sorted(i for i in ids if i not in self._watch or self._watch[i].check_at <= now)
        nodes = sorted(nodes)
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.get(Keys.worker(node))
        for exp_id in fresh:
            pipe.hmget(Keys.experiment(exp_id), SCHEDULING_FIELDS)
        out = pipe.execute() if nodes or fresh else []
        workers = {n: json.loads(b) for n, b in zip(nodes, out[:len(nodes)], strict=True) if b}
        for exp_id, values in zip(fresh, out[len(nodes):], strict=True):
            e = ExperimentRecord.from_values(exp_id, SCHEDULING_FIELDS, values)
            if e.status == "running" and e.inflight:
                self._watch[exp_id] = _Watched(e, check_at=0)  # its task is read this tick
            else:
                self._watch.pop(exp_id, None)
                if e.status != "running":  # stale (a running one was most likely just committed)
                    self.index.repair(exp_id, Keys.idx_inflight, exp_id)
        return workers, now

    # ---- reaper --------------------------------------------------------------------------------
    def _reap(self, due: list[ExperimentRecord], workers: dict[str, dict], now: int) -> set[str]:
        """Re-publish tasks whose worker went away. Returns the nodes to avoid this tick.

        Only the tasks whose check is due are read (new in flight, a lease or the unclaimed
        timeout ran out, the node is gone): about two reads per task and lease, where reading
        every in-flight task on every tick cost O(batch) per tick."""
        suspect: set[str] = set()
        pipe = self.r.pipeline(transaction=False)
        for e in due:
            pipe.hgetall(Keys.task(e.id, e.step, e.phase))
        for e, task in zip(due, pipe.execute() if due else [], strict=True):
            status, watched = task.get("status"), self._watch[e.id]
            lease_until = int(task.get("lease_until", 0))
            if status == "claimed" and lease_until >= now:
                # a live worker holds it, claimed from this message or an older one: the heartbeat
                # renews the lease, so look again once it would have run out
                watched.check_at = lease_until + 1
            elif status == "claimed" and task.get("batch") == e.inflight:  # a live worker renews leases
                suspect.add(task.get("owner", "").split(":")[0])
                self._retry(e, f"step {e.step} {e.phase}: lease of worker {task.get('owner')} expired "
                               "(worker died, hung, or lost Redis)")
            elif status not in ("committed", "failed"):  # an expired claim of an older message counts
                # as no claim: the current message is still waiting for a worker
                timeout_ms = int(self.config.unclaimed_timeout_s * 1000)
                if e.node not in workers:
                    self._retry(e, f"node {e.node!r} has no live worker", count=False)
                elif now - e.inflight_at > timeout_ms:
                    self._retry(e, f"step {e.step} {e.phase}: not claimed within "
                                   f"{self.config.unclaimed_timeout_s:g} s")
                else:  # a claim may come any moment: look again within a lease at the latest
                    watched.check_at = min(e.inflight_at + timeout_ms + 1, now + self.config.lease_ms)
            # committed (or cleared below): the record moved on; it is read again next tick
        return suspect

    def _retry(self, e: ExperimentRecord, reason: str, count: bool = True) -> None:
        attempts = self.protocol.clear_inflight(self.id, e.id, e.inflight, reason, count, self.backoff) - 1
        self._watch[e.id].check_at = 0  # moved on (or will): read again next tick
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

    def _watch_sent(self, e: ExperimentRecord) -> None:
        """An experiment of a batch just published (`BatchFormer`): the reaper reads it next tick."""
        self._watch[e.id] = _Watched(e, check_at=0)

def run_scheduler(settings: Settings) -> None:
    from lorafleet.common.messaging.celery_config import make_sender
    from lorafleet.common.redis.connection import connect

    url = settings.require_redis_url()
    r = connect(url, settings.redis_socket_timeout_s, settings.redis_connect_timeout_s)
    Scheduler(r, make_sender(url), settings).run()

