"""The leader's part in running client-driven models (the Tinker endpoint; `common/tinker/op_store.py`).

Called from every leader tick (`scheduler/loop.py`), after the RL experiments' batches. Torch-free.

- Reaper: a model whose published batch was never claimed (its node died: uncounted; the
  unclaimed timeout passed: counted) or whose claim's lease lapsed (counted) is given back; it is
  ready again and goes out in a later batch, and its head op fails (category "server") after
  `max_attempts` counted attempts. Lapsed sample requests go back to the sample queue likewise.
- Sessions without a heartbeat for `tinker_session_ttl_s` expire: their models close.
- Models waiting over their key's `max_experiments` start as the key's limit allows, oldest
  first (`client_capacity.py`); until then their ops are skipped here.
- Held work (over an API key's `max_queued_ops`) is released as the key's quota allows.
- Ops: each ready model is placed on a live node (it stays there while the node lives: its
  pending gradients are hot there), and every live node with ready models and no ops batch in
  flight gets ONE `BatchMessage(phase="ops")` of all of them, `ops_linger_ms` after the first of
  them became ready, so that the ops of concurrent clients fuse into one step.
- Samples: pending requests go out as `SampleMessage`s of at most `max_sample_rows` sequences
  each, on the shared rollout queue (any worker), also after `ops_linger_ms`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import redis

from lorafleet.common.keys import ROLLOUT_QUEUE, Keys, node_queue
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.celery_config import TASK_OPS, TASK_SAMPLE
from lorafleet.common.messaging.messages import BatchItem, BatchMessage, SampleMessage
from lorafleet.common.messaging.sender import TaskSender, send_message
from lorafleet.common.settings import Settings
from lorafleet.common.tinker.op_store import OpStore
from lorafleet.scheduler.tinker.capacity import ClientCapacity
from lorafleet.scheduler.tinker.leader import LeaderOps

log = get_logger("lorafleet.scheduler.clients")

MAX_ITEMS = 4096  # of one message (BatchMessage / SampleMessage)
_MARK_SESSION = ("if redis.call('EXISTS', KEYS[1]) == 1 then "
                 "redis.call('HSET', KEYS[1], 'status', ARGV[1]) end")
_MODEL_FIELDS = ("inflight", "inflight_at", "token", "lease_until", "node", "ready_at")


class ClientDispatch:
    def __init__(self, r: redis.Redis, sender: TaskSender, settings: Settings) -> None:
        self.r = r
        self.sender = sender
        self.config = settings
        self.ops = LeaderOps(r, settings)
        self.capacity = ClientCapacity(r, settings.api_default_max_experiments)
        self._due: float | None = None  # monotonic time a lingering batch is due (None: none)

    def wait_s(self, tick_s: float) -> float:
        """How long the leader may wait for events before its next tick: a lingering batch is
        sent when its linger ends, not a whole tick later."""
        if self._due is None:
            return tick_s
        return max(0.001, min(tick_s, self._due - time.monotonic()))

    def tick(self, leader_id: str, epoch: int, workers: dict[str, Any], now: int) -> None:
        """One round: reap, release held work, send ops and samples. `workers`: live nodes'
        heartbeats (nodes suspected dead this tick left out); `now`: the Redis clock (ms)."""
        self._due = None
        self._expire_sessions(now)
        self.capacity.activate()  # before the ops go out: an activated model's ops go this tick
        busy, load = self._reap(leader_id, workers, now)
        if self.r.scard(Keys.tk_held_owners):
            self.ops.release_held()
        if workers:
            self._send_ops(leader_id, epoch, sorted(workers), busy, load, now)
        self.ops.reap_samples(leader_id)
        if workers:
            self._send_samples(leader_id, epoch, now)

    # ---- sessions ------------------------------------------------------------------------------
    def _expire_sessions(self, now: int) -> None:
        """Sessions without a heartbeat for `tinker_session_ttl_s` end like a finished one: their
        models close (pending ops fail as user errors, pending gradients dropped; status
        completed, published versions kept). One ZRANGEBYSCORE when none is due."""
        ttl_ms = int(self.config.tinker_session_ttl_s * 1000)
        due = self.r.zrangebyscore(Keys.tk_sessions, "-inf", now - ttl_ms, start=0, num=100)
        for sid in due:
            beat = self.r.hget(Keys.tk_session(sid), "last_beat")
            if beat is not None and int(beat) > now - ttl_ms:  # beat meanwhile (or clock skew)
                self.r.zadd(Keys.tk_sessions, {sid: int(beat)})
                continue
            expire_session(self.r, self.ops, sid, "expired", "session expired: no heartbeat for "
                           f"{self.config.tinker_session_ttl_s:g} s")
            log.info("tinker session expired", session=sid)

    # ---- reaper --------------------------------------------------------------------------------
    def _reap(self, leader_id: str, workers: dict[str, Any], now: int) -> tuple[set[str], Counter[str]]:
        """Give back lapsed batches and claims -> (nodes with an ops batch in flight, client models
        in flight per node)."""
        ids = sorted(self.r.smembers(Keys.tk_inflight))
        busy: set[str] = set()
        load: Counter[str] = Counter()
        if not ids:
            return busy, load
        pipe = self.r.pipeline(transaction=False)
        for exp_id in ids:
            pipe.hmget(Keys.tk_model(exp_id), _MODEL_FIELDS)
        unclaimed_ms = int(self.config.unclaimed_timeout_s * 1000)
        for exp_id, values in zip(ids, pipe.execute(), strict=True):
            inflight, inflight_at, token, lease_until, node, _ = (v or "" for v in values)
            why, count = "", True
            if token and int(lease_until or 0) >= now:  # a live worker holds it (and renews it)
                pass
            elif token:
                why = f"ops of {exp_id}: the claim's lease expired (worker died, hung, or lost Redis)"
            elif not inflight:  # committed meanwhile
                continue
            elif node not in workers:
                why, count = f"ops of {exp_id}: node {node!r} has no live worker", False
            elif now - int(inflight_at or 0) > unclaimed_ms:
                why = f"ops of {exp_id}: not claimed within {self.config.unclaimed_timeout_s:g} s"
            if not why:
                busy.add(node)
                load[node] += 1
                continue
            attempts = self.ops.reap_ops(leader_id, exp_id, inflight, token, why, count)
            if attempts >= 0:
                log.warning("re-publishing client ops", experiment_id=exp_id, reason=why, attempts=attempts)
        return busy, load

    # ---- ops -----------------------------------------------------------------------------------
    def _send_ops(self, leader_id: str, epoch: int, live: list[str], busy: set[str], load: Counter[str],
                  now: int) -> None:
        ready = sorted(self.r.smembers(Keys.tk_ready))
        if not ready:
            return
        pipe = self.r.pipeline(transaction=False)
        for exp_id in ready:
            pipe.hmget(Keys.tk_model(exp_id), ("node", "ready_at", "capacity"))
            pipe.hget(Keys.experiment(exp_id), "status")
        got = pipe.execute()
        models = []
        for exp_id, (node, ready_at, capacity), status in zip(ready, got[0::2], got[1::2], strict=True):
            if status == "running" and capacity == "waiting":  # over its key's max_experiments
                continue
            if status == "running":
                models.append((int(ready_at or 0), exp_id, node or ""))
            else:  # cancelled (`lorafleet cancel`): its pending ops fail instead of waiting forever
                self.ops.close_model(exp_id, "cancelled", f"model is {status}")
        for _, _, node in models:  # placed models count where they are, ready or in flight
            if node in live:
                load[node] += 1
        by_node: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for ready_at, exp_id, node in sorted(models):  # oldest ready first
            if node not in live:  # not placed yet, or its node died
                node = self._place(live, load)
                load[node] += 1
            by_node[node].append((ready_at, exp_id))
        linger = self.config.ops_linger_ms
        for node, group in sorted(by_node.items()):
            if node in busy:  # its ops batch runs: these go out with the next, at its commit
                continue
            first = group[0][0]
            if now - first < linger:  # wait for co-tenants' ops, to fuse them into one step
                self._linger_until(first + linger - now)
                continue
            self._publish_ops(leader_id, epoch, node, [e for _, e in group[:MAX_ITEMS]])

    def _place(self, live: list[str], load: Counter[str]) -> str:
        """Pack: the live node with the most client models that still has room, so that models
        share fused steps (one fused step of N adapters costs far less than N solo steps); once
        every node is full, the least loaded."""
        room = [n for n in live if load[n] < self.config.client_models_per_node]
        if room:
            return min(room, key=lambda n: (-load[n], n))
        return min(live, key=lambda n: (load[n], n))

    def _publish_ops(self, leader_id: str, epoch: int, node: str, exp_ids: list[str]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        marks = self.ops.mark_ops(leader_id, batch_id, node, exp_ids)
        items = [(e, seq) for e, seq in zip(exp_ids, marks, strict=True) if seq >= 0]
        if not items:
            return
        msg = BatchMessage(batch_id=batch_id, phase="ops", node=node, epoch=epoch,
                           items=tuple(BatchItem(exp_id=e, step=seq) for e, seq in items))
        try:
            send_message(self.sender, TASK_OPS, msg, node_queue(node))
        except Exception:
            for e, _ in items:  # never published: give the marks back uncounted (the reaper would)
                self.ops.reap_ops(leader_id, e, batch_id, "", "publish failed", count=False)
            raise
        log.debug("published client ops", batch=batch_id, node=node, models=[e for e, _ in items])

    # ---- samples -------------------------------------------------------------------------------
    def _send_samples(self, leader_id: str, epoch: int, now: int) -> None:
        pending = self.r.zrange(Keys.tk_samples, 0, MAX_ITEMS - 1, withscores=True)
        if not pending:
            return
        first = int(pending[0][1])
        if now - first < self.config.ops_linger_ms:
            self._linger_until(first + self.config.ops_linger_ms - now)
            return
        rids = [rid for rid, _ in pending]
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.get(Keys.tk_payload(rid))
        batches: list[list[str]] = [[]]
        rows = 0
        for rid, payload in zip(rids, pipe.execute(), strict=True):
            n = max(1, int(json.loads(payload or "{}").get("num_samples") or 1))
            if batches[-1] and rows + n > self.config.max_sample_rows:
                batches.append([])
                rows = 0
            batches[-1].append(rid)
            rows += n
        unclaimed_ms = int(self.config.unclaimed_timeout_s * 1000)
        for group in batches:
            batch_id = uuid.uuid4().hex[:16]
            marks = self.ops.mark_samples(leader_id, batch_id, unclaimed_ms, group)
            marked = tuple(rid for rid, ok in zip(group, marks, strict=True) if ok)
            if marked:  # a failed publish is put back by the sample reaper after the unclaimed timeout
                msg = SampleMessage(batch_id=batch_id, epoch=epoch, request_ids=marked)
                send_message(self.sender, TASK_SAMPLE, msg, ROLLOUT_QUEUE)

    def _linger_until(self, in_ms: int) -> None:
        due = time.monotonic() + max(1, in_ms) / 1000
        self._due = due if self._due is None else min(self._due, due)


def expire_session(r: redis.Redis, ops: OpStore, session_id: str, status: str, reason: str) -> None:
    """End a session (finished by its client, or expired): mark it (its heartbeat answers 410
    from now on), close its models and forget it in `Keys.tk_sessions`."""
    # only if the hash is still there (its TTL may just have run out): never one without a TTL
    r.eval(_MARK_SESSION, 1, Keys.tk_session(session_id), status)
    for exp in r.smembers(Keys.tk_session_models(session_id)):
        ops.close_model(exp, "completed", reason)
    r.zrem(Keys.tk_sessions, session_id)
