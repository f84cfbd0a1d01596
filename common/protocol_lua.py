"""The Lua scripts of the step protocol (`common/protocol.py` binds them to a Redis client).

Each runs atomically in Redis. Lease times come from the server clock (TIME), never a worker's.
Scripts are written with `$name` placeholders for the fields of the experiment hash (owned by
`ExperimentRecord`: `$status`, `$step`, ...) and for the shared limits (`$task_ttl_ms`,
`$stream_maxlen`); `render` substitutes them and raises on any unknown name. Fields of a step's
task hash (status, token, owner, lease_until, batch, claims) belong to this module alone and are
written literally.
"""

from __future__ import annotations

from string import Template

from lorafleet.common.experiment import FIELD_NAMES
from lorafleet.common.keys import STREAM_MAXLEN, TASK_TTL_MS

_NAMES: dict[str, object] = {name: name for name in FIELD_NAMES}
_NAMES.update(task_ttl_ms=TASK_TTL_MS, stream_maxlen=STREAM_MAXLEN)


def render(script: str) -> str:
    """`script` with every `$name` replaced; a name that is not a record field or limit raises."""
    return Template(script).substitute(_NAMES)


_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# A fresh claim of a task hash for ARGV owner, lease, batch. Used inside scripts below.
_CLAIM_TASK = """
local function claim_task(task, fence, owner, lease_ms, batch)
  local token = redis.call('INCR', fence)
  redis.call('HSET', task, 'status', 'claimed', 'token', token, 'owner', owner,
             'lease_until', now + tonumber(lease_ms), 'batch', batch)
  redis.call('HINCRBY', task, 'claims', 1)
  redis.call('PEXPIRE', task, $task_ttl_ms)
  return token
end
"""

# KEYS: task, exp, fence   ARGV: owner, lease_ms, step, phase, batch_id -> {token, reason}
CLAIM = render(_NOW + _CLAIM_TASK + """
local e = redis.call('HMGET', KEYS[2], '$status', '$step', '$phase')
if e[1] ~= 'running' then return {0, 'experiment_' .. tostring(e[1])} end
if tonumber(e[2]) ~= tonumber(ARGV[3]) or e[3] ~= ARGV[4] then return {0, 'stale'} end
local s = redis.call('HMGET', KEYS[1], 'status', 'lease_until')
if s[1] == 'committed' then return {0, 'committed'} end
if s[1] == 'claimed' and tonumber(s[2]) > now then return {0, 'claimed'} end
return {claim_task(KEYS[1], KEYS[3], ARGV[1], ARGV[2], ARGV[5]), 'ok'}
""")

RENEW = _NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
"""

RELEASE = """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', 0)
return 1
"""

# The checks and writes every rollout commit makes. KEYS: task, exp, trajectory, events
# ARGV: token, step, traj_json, summary_json, ttl_ms, exp_id
_COMMIT_ROLLOUT = """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
local e = redis.call('HMGET', KEYS[2], '$status', '$step', '$phase')
if e[1] ~= 'running' or tonumber(e[2]) ~= tonumber(ARGV[2]) or e[3] ~= 'rollout' then return 0 end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'committed')
redis.call('HSET', KEYS[2], '$phase', 'train', '$attempts', 0, '$rollout_summary', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'rollout_committed',
           'exp', ARGV[6], 'step', ARGV[2])
"""

COMMIT_ROLLOUT = render(_NOW + _COMMIT_ROLLOUT + """
redis.call('HSET', KEYS[2], '$inflight', '')
return 1
""")

# The same commit, and the step's train task claimed at once by the committing worker (its batch
# runs there next, without a round trip through the scheduler and the queue). The experiment is
# never without an in-flight task in between, so the scheduler cannot publish the train step too.
# KEYS: as COMMIT_ROLLOUT, then train task, fence   ARGV: as COMMIT_ROLLOUT, then owner,
# lease_ms, batch_id, node -> the train claim's token (0: commit refused)
COMMIT_ROLLOUT_CLAIM_TRAIN = render(_NOW + _CLAIM_TASK + _COMMIT_ROLLOUT + """
local token = claim_task(KEYS[5], KEYS[6], ARGV[7], ARGV[8], ARGV[9])
redis.call('HSET', KEYS[2], '$inflight', ARGV[9], '$inflight_at', now, '$node', ARGV[10])
redis.call('HINCRBY', KEYS[2], '$served', redis.call('HGET', KEYS[2], '$rows'))
return token
""")

# KEYS: task, exp, metrics, events, trajectory, active   ARGV: token, step, metrics_json, exp_id
COMMIT_TRAIN = render(_NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
local e = redis.call('HMGET', KEYS[2], '$status', '$step', '$phase', '$steps_total')
local step = tonumber(ARGV[2])
if e[1] ~= 'running' or tonumber(e[2]) ~= step or e[3] ~= 'train' then return 0 end
local nxt = step + 1
redis.call('HSET', KEYS[1], 'status', 'committed')
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[5])
redis.call('HSET', KEYS[2], '$step', nxt, '$phase', 'rollout', '$inflight', '', '$attempts', 0)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'train_committed',
           'exp', ARGV[4], 'step', step, 'version', nxt)
if nxt >= tonumber(e[4]) then
  redis.call('HSET', KEYS[2], '$status', 'completed', '$finished_at', now)
  redis.call('SREM', KEYS[6], ARGV[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'completed', 'exp', ARGV[4])
end
return 1
""")

# After a train commit the same worker claims the batch's next rollouts, but only when the
# scheduler would publish exactly that batch to it anyway: no other experiment is waiting
# (queued, or running with nothing in flight; O(active experiments)) and the scheduler has not
# asked to rebalance nodes. Items that finished or moved on are skipped.
# KEYS: active, fence, rebalance flag, then exp, rollout task per item
# ARGV: experiment key prefix, owner, lease_ms, batch_id, node, then exp_id, step per item
# -> a fencing token per item (0: not claimed); {} when something else is waiting
CLAIM_NEXT_ROLLOUTS = render(_NOW + _CLAIM_TASK + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local n = (#KEYS - 3) / 2
local mine = {}
for i = 0, n - 1 do mine[ARGV[6 + 2 * i]] = true end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not mine[id] then
    local e = redis.call('HMGET', ARGV[1] .. id, '$status', '$inflight')
    if e[1] == 'queued' or (e[1] == 'running' and e[2] == '') then return {} end
  end
end
local out = {}
for i = 0, n - 1 do
  local exp, task, step = KEYS[4 + 2 * i], KEYS[5 + 2 * i], ARGV[7 + 2 * i]
  local e = redis.call('HMGET', exp, '$status', '$step', '$phase', '$inflight', '$rows')
  local s = redis.call('HMGET', task, 'status', 'lease_until')
  local token = 0
  if e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == 'rollout' and e[4] == ''
     and s[1] ~= 'committed' and not (s[1] == 'claimed' and tonumber(s[2]) > now) then
    token = claim_task(task, KEYS[2], ARGV[2], ARGV[3], ARGV[4])
    redis.call('HSET', exp, '$inflight', ARGV[4], '$inflight_at', now, '$node', ARGV[5])
    redis.call('HINCRBY', exp, '$served', e[5])
  end
  out[#out + 1] = token
end
return out
""")

# A worker fails one experiment of its batch (non-finite loss, reward env raised); fenced.
# KEYS: task, exp, events, active   ARGV: token, reason, exp_id
FAIL_TASK = render(_NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed')
redis.call('HSET', KEYS[2], '$status', 'failed', '$error', ARGV[2], '$inflight', '', '$finished_at', now)
redis.call('SREM', KEYS[4], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'failed', 'exp', ARGV[3],
           'reason', ARGV[2])
return 1
""")

# Scheduler or client ends an experiment (poison cap, cancel). KEYS: exp, events, active
# ARGV: status, reason, exp_id
FINISH = render(_NOW + """
local st = redis.call('HGET', KEYS[1], '$status')
if st ~= 'queued' and st ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], '$status', ARGV[1], '$error', ARGV[2], '$inflight', '', '$finished_at', now)
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', $stream_maxlen, '*', 'type', ARGV[1], 'exp', ARGV[3],
           'reason', ARGV[2])
return 1
""")

# The leader marks the experiments of one batch as published (and counts the rows it serves
# them, for fair share), each only if it is still running at that step and phase with nothing in
# flight. KEYS: leader, exp... ARGV: leader_id, batch_id, phase, node, then step per exp
# -> 1/0 per exp (all 0 if the caller is not the leader)
MARK_INFLIGHT = render(_NOW + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
for i = 2, #KEYS do
  local step = ARGV[3 + i]
  local e = redis.call('HMGET', KEYS[i], '$status', '$step', '$phase', '$inflight', '$rows')
  if leader and e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == ARGV[3]
     and e[4] == '' then
    redis.call('HSET', KEYS[i], '$inflight', ARGV[2], '$inflight_at', now, '$node', ARGV[4])
    redis.call('HINCRBY', KEYS[i], '$served', e[5])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""")

# KEYS: leader, exp   ARGV: leader_id
ACTIVATE = render(_NOW + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[2], '$status', 'running', '$started_at', now)
return 1
""")

# The leader gives up on a published task so that it is published again. KEYS: leader, exp
# ARGV: leader_id, batch_id, attempts to add (0: the task never ran, e.g. its node vanished)
CLEAR_INFLIGHT = render("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$inflight') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], '$inflight', '')
return redis.call('HINCRBY', KEYS[2], '$attempts', ARGV[3]) + 1
""")

# KEYS: leader, epoch   ARGV: candidate id, ttl_ms  -> epoch if this call made it leader, else 0
ACQUIRE_LEADER = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

RENEW_LEADER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
