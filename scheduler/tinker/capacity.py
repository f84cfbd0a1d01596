"""Per-key limits on running client models (the Tinker endpoint): over its owner's
`max_experiments` a new model is accepted and WAITS (its ops stay queued, never dispatched, and
retrieve_future answers `paused_capacity`) until one of the owner's earlier experiments ends;
then the leader lets it run, oldest first.

The limit counts the owner's running client models and running RL experiments together (one
`max_experiments` per key, as `owner_limits.py` applies it to RL experiments): a model waiting
here or an RL experiment still queued does not count. Admission and activation are one Lua script
each, so concurrent create_model calls (several API replicas) never admit past the limit; the RL
side activates from Python in the leader tick, so a create racing an RL activation may briefly
admit one over (it is never refused, and the next ones wait).

State: `Keys.tk_waiting` (zset: waiting model -> created ms) and the `Keys.tk_model` hash's
`capacity` ("running" | "waiting") and `capacity_reason` fields, read by the dispatcher (a waiting
model is skipped) and by retrieve_future."""

from __future__ import annotations

import time

import redis

from lorafleet.common.keys import Keys

# KEYS: owner's experiments (zset), the owner's api key hash, tk_model(exp), experiment(exp)
# ARGV: exp, default max, mode ("admit" | "activate"), created ms, experiment key prefix,
#       active set, waiting zset, tk_model key prefix
# -> "running" | "waiting" | "closed" (activate: the model ended while it waited; dropped)
_DECIDE = """
local exp = ARGV[1]
local state = redis.call('HGET', KEYS[3], 'capacity')
if ARGV[3] == 'admit' and state then return state end
if ARGV[3] == 'activate' and state ~= 'waiting' then
  redis.call('ZREM', ARGV[7], exp)
  return state or 'closed'
end
if redis.call('HGET', KEYS[4], 'status') ~= 'running' then
  redis.call('ZREM', ARGV[7], exp)
  redis.call('HSET', KEYS[3], 'capacity', 'running', 'capacity_reason', '')
  return 'closed'
end
local limit = tonumber(ARGV[2])
local raw = redis.call('HGET', KEYS[2], 'max_experiments')
if raw and raw ~= '' then limit = tonumber(raw) end
local running = 0
for _, e in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if e ~= exp and redis.call('SISMEMBER', ARGV[6], e) == 1 then
    local st = redis.call('HMGET', ARGV[5] .. e, 'status', 'kind')
    -- a client model counts once admitted (not while waiting, nor before its own admission)
    if st[1] == 'running'
       and (st[2] ~= 'client' or redis.call('HGET', ARGV[8] .. e, 'capacity') == 'running') then
      running = running + 1
    end
  end
end
if running < limit then
  redis.call('ZREM', ARGV[7], exp)
  redis.call('HSET', KEYS[3], 'capacity', 'running', 'capacity_reason', '')
  return 'running'
end
redis.call('ZADD', ARGV[7], 'NX', tonumber(ARGV[4]), exp)
redis.call('HSET', KEYS[3], 'capacity', 'waiting', 'capacity_reason',
           'the API key runs ' .. running .. ' of its max_experiments=' .. limit ..
           ' experiments; this model waits until one of them ends')
return 'waiting'
"""


class ClientCapacity:
    def __init__(self, r: redis.Redis, default_max: int) -> None:
        self.r = r
        self.default_max = default_max
        self._decide = r.register_script(_DECIDE)

    def _run(self, exp_id: str, owner: str, mode: str, created_ms: int) -> str:
        return str(self._decide(
            keys=[Keys.owner_experiments(owner), Keys.api_key(owner), Keys.tk_model(exp_id),
                  Keys.experiment(exp_id)],
            args=[exp_id, self.default_max, mode, created_ms, Keys.experiment(""), Keys.active,
                  Keys.tk_waiting, Keys.tk_model("")]))

    def admit(self, exp_id: str, owner: str) -> str:
        """At create_model -> "running" or "waiting" (idempotent: a retry answers the first
        decision). A model without an owner (a Redis client) has no limit."""
        if not owner:
            self.r.hset(Keys.tk_model(exp_id), "capacity", "running")
            return "running"
        return self._run(exp_id, owner, "admit", int(time.time() * 1000))

    def waiting_reason(self, exp_id: str) -> str | None:
        """Why the model's ops wait (None: they do not wait for capacity)."""
        state, reason = self.r.hmget(Keys.tk_model(exp_id), ["capacity", "capacity_reason"])
        return (reason or "waiting for a free slot of the API key's max_experiments") \
            if state == "waiting" else None

    def activate(self) -> list[str]:
        """Leader tick: let waiting models run as their owners' limits allow, oldest first per
        owner (a younger model never overtakes an older one of the same owner) -> activated ids.
        One ZCARD when nothing waits."""
        if not self.r.zcard(Keys.tk_waiting):
            return []
        waiting = self.r.zrange(Keys.tk_waiting, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for exp_id, _ in waiting:
            pipe.hget(Keys.experiment(exp_id), "owner")
        blocked: set[str] = set()
        out = []
        for (exp_id, created), owner in zip(waiting, pipe.execute(), strict=True):
            owner = owner or ""
            if owner in blocked:
                continue
            got = self._run(exp_id, owner, "activate", int(created))
            if got == "running":
                out.append(exp_id)
            elif got == "waiting":
                blocked.add(owner)
        return out
