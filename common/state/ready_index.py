"""Indexes of the experiment hashes, so that the control plane's cost per step does not grow with
the number of experiments (issue 12 item 7: thousands of tenants).

Without them the scheduler read every active experiment's hash on every tick and a worker's
train commit scanned every active experiment to see whether another one waited: O(N) work per
step, O(N^2) per sweep. The indexes (key names in `common/keys.py`) say where each experiment
stands:

- `idx:queued`: queued (the leader activates them);
- `idx:waiting`: queued, or running with nothing in flight (what a worker's chain asks);
- `idx:inflight`: running with a published or claimed task (what the reaper looks at);
- `idx:backoff`: running, nothing in flight, waiting out `not_before` (score: not_before);
- `idx:ready:<phase>:<node>`: running, nothing in flight, not backing off, at that phase on that
  node ("": not placed); score rows served / weight, member "<created_at>:<id>", so the zset's
  own order is the scheduler's fair order and the scheduler reads only the head it can send;
- `idx:node:<node>`: running experiments placed on the node (its load); `idx:nodes` names them.

Every entry is a pure function of the experiment's hash (and of the Redis clock for backoff vs
ready), written by the same Lua script (or the submit transaction) that changes the fields it
derives from (`common/state/index_lua.py`: `entries` before the writes, `reindex` after), so
a scheduler or Redis restart (AOF replays whole scripts) leaves them consistent. They are still
not trusted blindly: the leader rebuilds them all from `lf:active` when it takes over
(`REBUILD`, O(N) once per leadership), due backoff entries are moved by `PROMOTE_DUE`, and every
entry the scheduler reads is checked against its hash first; a stale one is skipped and
rewritten from the hash (`REPAIR`); and the leader rewrites a slice of the active experiments'
entries every second (`RECHECK`), so an entry lost by hand or by a bug comes back by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis

from lorafleet.common.keys import PREFIX, Keys
from lorafleet.common.redis.lua import NOW
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.state.index_lua import INDEX_LUA, INDEX_NAMES
from lorafleet.common.state.phases import PHASES

render = INDEX_NAMES.render


def ready_member(created_at: int, exp_id: str) -> str:
    """The member of a ready zset: equal fair keys order by age, then id (as Lua's `ready_member`)."""
    return f"{created_at:015d}:{exp_id}"


def member_id(member: str) -> str:
    return member.split(":", 1)[1]


# Moves experiments that wait for a batch to another node (placement of new ones and of those of
# a dead node, rebalancing), each only if it is still running on `from` with nothing in flight.
# KEYS: leader, exp...  ARGV: leader_id, then exp_id, from node, to node per exp -> 1/0 per exp
MOVE = render(NOW + INDEX_LUA + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
for i = 2, #KEYS do
  local id, from, to = ARGV[3 * i - 4], ARGV[3 * i - 3], ARGV[3 * i - 2]
  local e = redis.call('HMGET', KEYS[i], '$status', '$inflight', '$node')
  if leader and e[1] == 'running' and str(e[2]) == '' and str(e[3]) == from then
    local was = entries(KEYS[i], id, true)
    redis.call('HSET', KEYS[i], '$node', to)
    reindex(KEYS[i], id, was)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""")

# Backoff entries whose time has come become ready (or, if stale, are rewritten from the hash).
# KEYS: backoff   ARGV: at most this many -> how many were moved
PROMOTE_DUE = render(NOW + INDEX_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  reindex('$exp_prefix' .. id, id, entries('$exp_prefix' .. id, id, true))
end
return #due
""")

# One entry found not to match its hash: drop it and rewrite the experiment's entries from the
# hash. KEYS: exp, the index key holding the entry   ARGV: exp_id, member
REPAIR = render(NOW + INDEX_LUA + """
if redis.call('TYPE', KEYS[2]).ok == 'zset' then redis.call('ZREM', KEYS[2], ARGV[2])
else redis.call('SREM', KEYS[2], ARGV[2]) end
purge(KEYS[1], ARGV[1])
reindex(KEYS[1], ARGV[1], {})
return 1
""")

_READY_OF_NODE = ", ".join(f"'$idx_ready' .. '${p}:' .. node" for p in PHASES)  # one zset per phase

# Every index dropped and rebuilt from the hashes of `lf:active` (queued and running
# experiments), in one atomic step: O(active experiments), once per leadership.
# KEYS: active, workers -> how many experiments were indexed
REBUILD = render(NOW + INDEX_LUA + """
local nodes = redis.call('SMEMBERS', '$idx_nodes')
for _, node in ipairs(redis.call('SMEMBERS', KEYS[2])) do nodes[#nodes + 1] = node end
nodes[#nodes + 1] = ''
for _, node in ipairs(nodes) do
  redis.call('DEL', """ + _READY_OF_NODE + """, '$idx_node' .. node)
end
redis.call('DEL', '$idx_queued', '$idx_waiting', '$idx_inflight', '$idx_backoff', '$idx_nodes')
local ids = redis.call('SMEMBERS', KEYS[1])
for _, id in ipairs(ids) do reindex('$exp_prefix' .. id, id, {}) end
return #ids
""")


# A slice of `lf:active` rewritten from the hashes (a rolling check: an entry lost by hand or by
# a bug comes back within one pass over the active experiments, without waiting for a new leader).
# KEYS: active   ARGV: SSCAN cursor, count -> the next cursor ("0": the pass is complete)
RECHECK = render(NOW + INDEX_LUA + """
local res = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
for _, id in ipairs(res[2]) do
  purge('$exp_prefix' .. id, id)
  reindex('$exp_prefix' .. id, id, {})
end
return res[1]
""")


class ReadyIndex:
    """The index scripts bound to one Redis client, and the reads the scheduler makes."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._move = r.register_script(MOVE)
        self._promote = r.register_script(PROMOTE_DUE)
        self._repair = r.register_script(REPAIR)
        self._rebuild = r.register_script(REBUILD)
        self._recheck = r.register_script(RECHECK)

    def add_queued(self, pipe: Any, exp_id: str) -> None:
        """Queue on `pipe` (the submit transaction, `scheduler/registry.py`) the entries of a new,
        queued experiment (`entries_of` a queued record), so that they are written with its hash."""
        pipe.sadd(Keys.idx_queued, exp_id)
        pipe.sadd(Keys.idx_waiting, exp_id)

    def rebuild(self) -> int:
        return int(self._rebuild(keys=[Keys.active, Keys.workers]))

    def recheck(self, cursor: str, count: int) -> str:
        """Rewrite about `count` active experiments' entries from their hashes -> the next cursor."""
        return str(self._recheck(keys=[Keys.active], args=[cursor, count]))

    def promote_due(self, limit: int = 10_000, client: Any = None) -> Any:
        """Queue (on a pipeline `client`) or run PROMOTE_DUE."""
        return self._promote(keys=[Keys.idx_backoff], args=[limit], client=client or self.r)

    def repair(self, exp_id: str, key: str, member: str) -> None:
        self._repair(keys=[Keys.experiment(exp_id), key], args=[exp_id, member])

    def move(self, leader_id: str, moves: list[tuple[str, str, str]], chunk: int = 500) -> list[bool]:
        """Move (exp_id, from node, to node) each -> moved per item (0: it moved on meanwhile)."""
        out: list[bool] = []
        for i in range(0, len(moves), chunk):
            part = moves[i:i + chunk]
            args: list[Any] = [leader_id]
            for exp_id, src, dst in part:
                args += [exp_id, src, dst]
            keys = [Keys.leader, *(Keys.experiment(m[0]) for m in part)]
            out += [bool(x) for x in self._move(keys=keys, args=args)]
        return out


# ---- the same function in Python, from a full scan (tests, and `check`) ---------------------------
def entries_of(rec: ExperimentRecord, now_ms: int) -> set[tuple[str, str, float | None]]:
    """The index entries (key, member, score; None for sets) an experiment's hash implies."""
    out: set[tuple[str, str, float | None]] = set()
    if rec.kind == "client":  # dispatched by its ops (`common/tinker/op_store.py`), not by phase
        return out
    if rec.status == "queued":
        return {(Keys.idx_queued, rec.id, None), (Keys.idx_waiting, rec.id, None)}
    if rec.status != "running":
        return out
    if rec.node:
        out.add((Keys.node_experiments(rec.node), rec.id, None))
    if rec.inflight:
        return out | {(Keys.idx_inflight, rec.id, None)}
    out.add((Keys.idx_waiting, rec.id, None))
    if rec.not_before > now_ms:
        return out | {(Keys.idx_backoff, rec.id, float(rec.not_before))}
    return out | {(Keys.ready(rec.phase, rec.node), ready_member(rec.created_at, rec.id), rec.fair_key)}


def scan_entries(r: redis.Redis, now_ms: int | None = None) -> set[tuple[str, str, float | None]]:
    """Every index entry the hashes of all experiments imply (a full scan)."""
    if now_ms is None:
        sec, usec = r.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
    ids = r.zrange(Keys.experiments, 0, -1)
    pipe = r.pipeline(transaction=False)
    for exp_id in ids:
        pipe.hgetall(Keys.experiment(exp_id))
    out: set[tuple[str, str, float | None]] = set()
    for exp_id, h in zip(ids, pipe.execute() if ids else [], strict=True):
        if h:
            out |= entries_of(ExperimentRecord.from_hash(exp_id, h), now_ms)
    return out


def stored_entries(r: redis.Redis) -> set[tuple[str, str, float | None]]:
    """Every index entry stored in Redis (scans the key space for lf:idx:*; tests and checks only)."""
    out: set[tuple[str, str, float | None]] = set()
    for key in r.scan_iter(match=f"{PREFIX}idx:*"):
        if key == Keys.idx_nodes:
            continue
        if r.type(key) == "zset":
            out |= {(key, m, float(s)) for m, s in r.zrange(key, 0, -1, withscores=True)}
        else:
            out |= {(key, m, None) for m in r.smembers(key)}
    return out


def diff(expected: Iterable[tuple[str, str, float | None]], stored: Iterable[tuple[str, str, float | None]]
         ) -> Mapping[str, set[tuple[str, str, float | None]]]:
    e, s = set(expected), set(stored)
    return {"missing": e - s, "stale": s - e}
