"""`OpChain`: after an ops batch commits, the worker claims the next ops of the models it just ran
(and of any other ready client model placed on its node) and runs them in the same task, instead
of waiting for the leader's next dispatch (op arrival -> leader wakes -> `ops_linger_ms` ->
publish -> Celery delivery). A Tinker client's loop submits its next step right after the last
one's result, so the worker waits up to `client_chain_wait_ms` for it (and then `ops_linger_ms`
for the other models' next ops, so that co-tenants still fuse).

Exactly once: every chained claim is `OpStore.claim` with the model's committed op_seq, fenced
like any other. If the leader published the same model meanwhile (it was ready for a moment), the
worker's claim still wins or loses atomically: the loser's claim is refused ("claimed" or "stale")
and its message is a no-op. The leader counts a node busy while any of its models is claimed, so
the chain never runs beside a leader batch for the same node.

Fairness: the chain stops when anything waits on a Celery queue this worker serves (its node's:
an RL batch, an ops batch of other models; the shared rollout and train queues: client samples,
RL batches), after `chain_rollouts_s` (like the RL chain), or when the worker stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
from lorafleet.common.tinker.op_store import BARRIERS, ClaimedModel, OpStore

POLL_S = 0.002
MAX_LOOK = 64  # queued ops read per model to find the next barrier


class OpChain:
    def __init__(self, r: redis.Redis, ops: OpStore, *, worker: str, node: str, lease_ms: int,
                 wait_ms: int, linger_ms: int, chain_s: float,
                 stop: Callable[[], bool] = lambda: False) -> None:
        self.r = r
        self.ops = ops
        self.worker = worker
        self.node = node
        self.lease_ms = lease_ms
        self.wait_ms = wait_ms
        self.linger_ms = linger_ms
        self.chain_s = chain_s
        self.stop = stop
        self.queues = (node_queue(node), ROLLOUT_QUEUE, TRAIN_QUEUE)

    def enabled(self, started: float) -> bool:
        return (self.wait_ms > 0 and self.chain_s > 0 and time.monotonic() - started < self.chain_s
                and not self.stop())

    def next(self, committed: Sequence[ClaimedModel], started: float) -> list[ClaimedModel]:
        """Claim the next ops of `committed` models (or other ready models of this node) as soon
        as some are present, waiting at most `wait_ms` -> the claims ([] : chain over)."""
        if not committed or not self.enabled(started):
            return []
        mine = {m.exp_id: m.ops[-1].seq for m in committed}  # op_seq after their commit
        deadline = time.monotonic() + self.wait_ms / 1000
        first: float | None = None  # when the first next op showed up
        while True:
            if self._queued() or self.stop():
                return []  # something else waits for this worker: the leader's order goes first
            present, complete = self._present(mine)
            others = self._ready_here(set(mine))
            now = time.monotonic()
            if present or others:
                # linger like the leader does: the SDK sends forward_backward and optim_step a
                # moment apart, and co-tenants' steps come a moment apart; claiming at first sight
                # would run them as separate batches (slower) instead of one fused claim
                first = now if first is None else first
                if complete == set(mine) or now - first >= self.linger_ms / 1000:
                    items = {e: mine[e] for e in present} | others
                    return self.ops.claim(sorted(items.items()), self.worker, self.lease_ms)
            elif now >= deadline:
                return []
            time.sleep(POLL_S)

    def _queued(self) -> bool:
        """A message waits on a queue this worker serves (its node's, or the shared rollout and
        train queues: client samples and RL batches a single worker would otherwise leave
        waiting behind the chain)."""
        pipe = self.r.pipeline(transaction=False)
        for q in self.queues:
            pipe.llen(q)
        return any(pipe.execute())

    def _present(self, mine: dict[str, int]) -> tuple[set[str], set[str]]:
        """-> (models whose next op is queued, those whose queued ops reach a barrier: a claim
        would take no more if it waited)."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, seq in mine.items():
            pipe.zrangebyscore(Keys.tk_ops(exp_id), seq + 1, seq + MAX_LOOK, withscores=True)
        runs: dict[str, list[str]] = {}
        for (exp_id, seq), got in zip(mine.items(), pipe.execute(), strict=True):
            run = []
            for rid, score in got:  # the contiguous run from seq + 1 (a gap waits)
                if int(score) != seq + 1 + len(run):
                    break
                run.append(rid)
            if run:
                runs[exp_id] = run
        if not runs:
            return set(), set()
        pipe = self.r.pipeline(transaction=False)
        for run in runs.values():
            for rid in run:
                pipe.hget(Keys.tk_future(rid), "kind")
        kinds = iter(pipe.execute())
        complete = {e for e, run in runs.items() if any([next(kinds) in BARRIERS for _ in run])}
        return set(runs), complete

    def _ready_here(self, skip: set[str]) -> dict[str, int]:
        """Ready client models placed on this node (the leader would send them here next) ->
        exp id -> op_seq."""
        ready = [e for e in sorted(self.r.smembers(Keys.tk_ready)) if e not in skip]
        if not ready:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for exp_id in ready:
            pipe.hmget(Keys.tk_model(exp_id), ("node", "op_seq"))
        return {e: int(seq or 0) for e, (node, seq) in zip(ready, pipe.execute(), strict=True)
                if node == self.node}
