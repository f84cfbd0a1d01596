"""Batch forming: the leader's placement of ready experiments on live nodes and the one batch it
gives each idle node (`scheduler/loop.py` calls `publish` on every tick, after the reaper).

Every experiment is placed on one node, the node that then holds its adapter hot: rollouts and
train steps of it go to that node's queue. Unplaced experiments (new, or of a dead node) go to
the least-loaded live node, a node 2+ experiments above another gives its lowest-priority ready
ones away, and every idle node gets one batch from the head of a ready zset
(`common/state/ready_index.py`): O(batch + nodes) per tick, whatever waits. Torch-free.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Callable

import redis

from lorafleet.common.keys import Keys, node_queue
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.celery_config import TASK_ROLLOUT, TASK_TRAIN
from lorafleet.common.messaging.messages import BatchItem, BatchMessage
from lorafleet.common.messaging.sender import TaskSender, send_message
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import SCHEDULING_FIELDS, ExperimentRecord
from lorafleet.common.state.phases import PHASES
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.common.state.ready_index import ReadyIndex, member_id, ready_member

log = get_logger("lorafleet.scheduler")


class BatchFormer:
    """The leader's batch forming. `leader_id` marks what it writes (in-flight marks, moves, the
    rebalance flag); `on_sent` is called with each experiment of a published batch (the reaper
    watches it from then on)."""

    def __init__(self, r: redis.Redis, sender: TaskSender, settings: Settings, protocol: StepProtocol,
                 index: ReadyIndex, leader_id: str, on_sent: Callable[[ExperimentRecord], None]) -> None:
        self.r = r
        self.sender = sender
        self.config = settings
        self.protocol = protocol
        self.index = index
        self.leader_id = leader_id
        self.on_sent = on_sent
        self._rebalancing = False  # this scheduler set the rebalance flag

    def publish(self, epoch: int, inflight: list[ExperimentRecord], workers: dict[str, dict],
                moved_off: list[ExperimentRecord]) -> None:
        """Place unplaced experiments on the least-loaded live node, rebalance, then give every
        idle node one batch: its largest ready group (train before rollout on ties), fair order
        inside.

        One batch per node at a time keeps queues empty, decides fairness late, and lets the
        experiments of a node fall into step with each other, so batches stay mixed. A placement
        or move is written at once (MOVE), so an experiment is placed once, not on every tick."""
        busy = {e.node for e in inflight if e.inflight}
        live = sorted(workers)
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(Keys.idx_nodes)
        for node in live:
            pipe.scard(Keys.node_experiments(node))
            for phase in PHASES:
                pipe.zcard(Keys.ready(phase, node))
        known, *counts = pipe.execute()
        load = {n: int(counts[3 * i]) for i, n in enumerate(live)}  # placed running experiments
        ready = {n: {p: int(counts[3 * i + 1 + j]) for j, p in enumerate(PHASES)} for i, n in enumerate(live)}
        avoided = {e.node for e in moved_off}  # live, but avoided this tick: only the reaped move
        dead = sorted(set(known) - set(live) - avoided)
        self._place(["", *dead], moved_off, load, ready)
        self._rebalance(load, ready)
        for node in live:
            phases = [p for p in PHASES if ready[node][p] > 0]
            if node in busy or not phases:
                continue
            phase = max(phases, key=lambda p: (ready[node][p], p == "train"))
            items = self._take(node, phase)
            if items:
                self._send(epoch, phase, items, node)

    def _place(self, sources: list[str], extra: list[ExperimentRecord], load: dict[str, int],
               ready: dict[str, dict[str, int]]) -> None:
        """Ready experiments of `sources` (unplaced, dead nodes) and `extra`, in fair order, each to
        the least-loaded live node (lower name on ties)."""
        pipe = self.r.pipeline(transaction=False)
        for node in sources:
            for phase in PHASES:
                pipe.zrange(Keys.ready(phase, node), 0, -1, withscores=True)
        got = iter(pipe.execute())
        found: dict[str, tuple[float, str, str, str]] = {}  # id -> (score, member, node, phase)
        for node in sources:
            for phase in PHASES:
                for member, score in next(got):
                    found[member_id(member)] = (float(score), member, node, phase)
        for e in extra:
            found.setdefault(e.id, (e.fair_key, ready_member(e.created_at, e.id), e.node, e.phase))
        heap = [(n_load, node) for node, n_load in load.items()]
        heapq.heapify(heap)
        moves = []
        for exp_id, (_, _, src, phase) in sorted(found.items(), key=lambda kv: kv[1][:2]):
            n_load, dst = heapq.heappop(heap)
            heapq.heappush(heap, (n_load + 1, dst))
            load[dst] += 1
            moves.append((exp_id, src, dst, phase))
        self._move(moves, ready)

    def _rebalance(self, load: dict[str, int], ready: dict[str, dict[str, int]]) -> None:
        """Move ready experiments off a node that holds 2+ more than another live node (a worker
        joined, or one node's experiments finished first) to the least-loaded one, lowest fair
        priority first; the receiving worker loads the committed version from the store. While
        an imbalance remains, a flag stops workers from chaining their next rollouts, so their
        experiments come back to the scheduler at the next commit and can be moved.

        A node d above the lightest gives at most d - 1 experiments, the last of its fair order:
        only those are read."""
        low = min(load.values(), default=0)
        heavy = [(n, load[n] - low) for n in sorted(load) if load[n] - low >= 2]
        if heavy:
            pipe = self.r.pipeline(transaction=False)
            for node, d in heavy:
                for phase in PHASES:
                    pipe.zrevrange(Keys.ready(phase, node), 0, d - 1, withscores=True)
            got = iter(pipe.execute())
            found = [(float(score), member, node, phase) for node, _ in heavy for phase in PHASES
                     for member, score in next(got)]
            moves = []
            for _, member, src, phase in sorted(found, reverse=True):
                light = min(load, key=lambda n: (load[n], n))
                if load[src] - load[light] >= 2:
                    load[src], load[light] = load[src] - 1, load[light] + 1
                    moves.append((member_id(member), src, light, phase))
            self._move(moves, ready)
        if load and max(load.values()) - min(load.values()) >= 2:
            self.r.set(Keys.rebalance, self.leader_id, px=int(self.config.tick_s * 4000))
            self._rebalancing = True
        elif self._rebalancing:
            self.r.delete(Keys.rebalance)
            self._rebalancing = False

    def _move(self, moves: list[tuple[str, str, str, str]], ready: dict[str, dict[str, int]]) -> None:
        """Write (exp_id, from, to, phase) moves and count them in the live nodes' ready groups."""
        done = self.index.move(self.leader_id, [m[:3] for m in moves]) if moves else []
        for (_, src, dst, phase), ok in zip(moves, done, strict=True):
            if ok:
                ready[dst][phase] += 1
                if src in ready:
                    ready[src][phase] -= 1

    def _take(self, node: str, phase: str) -> list[ExperimentRecord]:
        """The head of the node's ready zset in fair order, each checked against its hash, until
        the row budget is used (always at least one): O(batch), whatever waits behind it."""
        key, budget = Keys.ready(phase, node), self.config.max_batch_rows
        out: list[ExperimentRecord] = []
        rows, start, size = 0, 0, 32
        while True:
            members = self.r.zrange(key, start, start + size - 1)
            pipe = self.r.pipeline(transaction=False)
            for member in members:
                pipe.hmget(Keys.experiment(member_id(member)), SCHEDULING_FIELDS)
            stale = 0
            for member, values in zip(members, pipe.execute() if members else [], strict=True):
                e = ExperimentRecord.from_values(member_id(member), SCHEDULING_FIELDS, values)
                if not (e.status == "running" and not e.inflight and e.node == node and e.phase == phase):
                    self.index.repair(e.id, key, member)  # stale: skipped, and rewritten from the hash
                    stale += 1
                    continue
                if out and rows + e.rows > budget:
                    return out
                out.append(e)
                rows += e.rows
            if len(members) < size:
                return out
            start += size - stale
            size = max(32, (budget - rows) // max(1, min(e.rows for e in out)) + 1) if out else 2 * size
    def _send(self, epoch: int, phase: str, items: list[ExperimentRecord], node: str) -> None:
        """Rollouts and train steps of an adapter go to the node that holds it hot."""
        batch_id = uuid.uuid4().hex[:16]
        steps = [(e.id, e.step) for e in items]
        marks = self.protocol.mark_inflight(self.leader_id, steps, batch_id, phase, node)
        marked = [e for e, ok in zip(items, marks, strict=True) if ok]
        if not marked:
            return
        msg = BatchMessage(batch_id=batch_id, phase=phase, node=node, epoch=epoch,  # type: ignore[arg-type]
                           items=tuple(BatchItem(exp_id=e.id, step=e.step) for e in marked))
        queue = node_queue(node)
        try:
            send_message(self.sender, TASK_TRAIN if phase == "train" else TASK_ROLLOUT, msg, queue)
        except Exception:
            # never published: free the marks uncounted (if Redis answers), else the reaper does
            for e in marked:
                self.protocol.clear_inflight(self.leader_id, e.id, batch_id, "publish failed", count=False)
            raise
        for e in marked:  # watched from now on, read afresh at the next tick
            e.inflight, e.node = batch_id, node
            self.on_sent(e)
        log.debug("published", phase=phase, batch=batch_id, queue=queue, n=len(marked),
                  experiments=[e.id for e in marked])

