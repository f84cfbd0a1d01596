"""The Lua scripts of the step protocol (`common/state/protocol.py` binds them to a Redis client).

Each runs atomically in Redis. Lease times come from the server clock (TIME), never a worker's.
Scripts are `$name` templates (`common/redis/lua.py`) rendered with `PROTOCOL_NAMES`: the index
names (`common/state/index_lua.py`: the fields of the experiment hash, owned by `ExperimentRecord`,
`$status`, `$step`, ...; the phase names of `common/state/phases.py`, `$train`; the index
keys) and the shared limits (`$task_ttl_ms`, `$stream_maxlen`); an unknown name raises at import.
Fields of a step's task hash (status, token, owner, lease_until, batch, claims) belong to this
module alone and are written literally.
"""

from __future__ import annotations

from lorafleet.common.keys import STREAM_MAXLEN, TASK_TTL_MS
from lorafleet.common.redis.lua import NOW
from lorafleet.common.state import index_lua

PROTOCOL_NAMES = index_lua.INDEX_NAMES.with_names(task_ttl_ms=TASK_TTL_MS, stream_maxlen=STREAM_MAXLEN)
render = PROTOCOL_NAMES.render

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

# Every refusal is counted per experiment and reason (`lf:refusals:<id>`): a stale or duplicate
# message, a zombie's late commit. The reasons are stable names (REFUSAL_REASONS, documented in
# the README): an experiment that is not running is `experiment_<its status>`, one that does not
# exist (HMGET answers false) `unknown_experiment`. Used inside scripts below.
_REFUSE = """
local function refuse(refusals, kind, reason)
  redis.call('HINCRBY', refusals, kind .. ':' .. reason, 1)
  redis.call('PEXPIRE', refusals, $task_ttl_ms)
  return reason
end
local function not_running(status)
  if not status then return 'unknown_experiment' end
  return 'experiment_' .. status
end
"""

# What `lf:refusals:<id>` and `lorafleet_refused_total{reason}` count, as "<claim|commit>:<reason>".
REFUSAL_REASONS = {
    "unknown_experiment": "the experiment does not exist (deleted, or a message naming no experiment)",
    "experiment_queued": "the experiment is not running yet",
    "experiment_completed": "the experiment had already finished",
    "experiment_failed": "the experiment had failed",
    "experiment_cancelled": "the experiment had been cancelled",
    "stale": "the experiment had moved past this step (a duplicate or late message)",
    "future": "the message is for a step the experiment has not reached",
    "committed": "the step was committed already (a duplicate delivery)",
    "claimed": "another worker holds a live claim on the step (claims only)",
    "lease_lost": "the worker's claim expired or was taken over before it committed (commits only)",
}

# Where a message's (step, phase) stands against the experiment's: 'ok', 'stale' (the
# experiment moved past it) or 'future' (a message for a step that has not been reached).
_POSITION = """
local function position(exp_step, exp_phase, step, phase)
  exp_step, step = tonumber(exp_step), tonumber(step)
  if exp_step == step and exp_phase == phase then return 'ok' end
  if exp_step > step or (exp_step == step and exp_phase == '$train') then return 'stale' end
  return 'future'
end
"""

# KEYS: task, exp, fence, refusals   ARGV: owner, lease_ms, step, phase, batch_id -> {token, reason}
# Claiming again what this owner already holds for the same batch returns the same token (a
# retry after a lost reply must not orphan the claim).
CLAIM = render(NOW + _CLAIM_TASK + _REFUSE + _POSITION + """
local e = redis.call('HMGET', KEYS[2], '$status', '$step', '$phase')
if e[1] ~= 'running' then return {0, refuse(KEYS[4], 'claim', not_running(e[1]))} end
local pos = position(e[2], e[3], ARGV[3], ARGV[4])
if pos ~= 'ok' then return {0, refuse(KEYS[4], 'claim', pos)} end
local s = redis.call('HMGET', KEYS[1], 'status', 'lease_until', 'owner', 'batch', 'token')
if s[1] == 'committed' then return {0, refuse(KEYS[4], 'claim', 'committed')} end
if s[1] == 'claimed' and tonumber(s[2]) > now then
  if s[3] == ARGV[1] and s[4] == ARGV[5] then return {tonumber(s[5]), 'ok'} end
  return {0, refuse(KEYS[4], 'claim', 'claimed')}
end
return {claim_task(KEYS[1], KEYS[3], ARGV[1], ARGV[2], ARGV[5]), 'ok'}
""")

RENEW = NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
"""

# Every claim a worker holds, renewed in one script. KEYS: task per claim   ARGV: lease_ms, then
# token per claim -> 1/0 per claim (0: not held any more)
RENEW_MANY = NOW + """
local out = {}
for i, task in ipairs(KEYS) do
  local s = redis.call('HMGET', task, 'status', 'token')
  if s[1] == 'claimed' and s[2] == ARGV[i + 1] then
    redis.call('HSET', task, 'lease_until', now + tonumber(ARGV[1]))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# The fencing check of every commit -> 'ok', 'done' (this token already committed it: a retry
# after a lost reply), or the refusal reason (counted).
_FENCE = """
local function fence(task, exp, refusals, token, step, phase)
  local s = redis.call('HMGET', task, 'status', 'token')
  if s[1] == 'committed' and s[2] == token then return 'done' end
  if s[1] ~= 'claimed' or s[2] ~= token then
    return refuse(refusals, 'commit', (s[1] == 'committed' and 'committed' or 'lease_lost'))
  end
  local e = redis.call('HMGET', exp, '$status', '$step', '$phase')
  if e[1] ~= 'running' then return refuse(refusals, 'commit', not_running(e[1])) end
  local pos = position(e[2], e[3], step, phase)
  if pos ~= 'ok' then return refuse(refusals, 'commit', pos) end
  return 'ok'
end
"""

# The checks and writes every rollout commit makes. KEYS: task, exp, trajectory, events, refusals
# ARGV: token, step, traj_json, summary_json, ttl_ms, exp_id
_COMMIT_ROLLOUT = _REFUSE + _POSITION + _FENCE + """
local verdict = fence(KEYS[1], KEYS[2], KEYS[5], ARGV[1], ARGV[2], '$rollout')
local was = {}
local function commit_rollout()
  was = entries(KEYS[2], ARGV[6], true)
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
  redis.call('HSET', KEYS[1], 'status', 'committed')
  redis.call('HSET', KEYS[2], '$phase', '$train', '$attempts', 0, '$error', '', '$rollout_summary', ARGV[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'rollout_committed',
             'exp', ARGV[6], 'step', ARGV[2])
end
"""

# -> {1, 'ok'} or {0, reason}
COMMIT_ROLLOUT = render(NOW + index_lua.INDEX_LUA + _COMMIT_ROLLOUT + """
if verdict == 'done' then return {1, 'ok'} end
if verdict ~= 'ok' then return {0, verdict} end
commit_rollout()
redis.call('HSET', KEYS[2], '$inflight', '')
reindex(KEYS[2], ARGV[6], was)
return {1, 'ok'}
""")

# The same commit, and the step's train task claimed at once by the committing worker (its batch
# runs there next, without a round trip through the scheduler and the queue). The experiment is
# never without an in-flight task in between, so the scheduler cannot publish the train step too.
# KEYS: as COMMIT_ROLLOUT, then train task, fence   ARGV: as COMMIT_ROLLOUT, then owner,
# lease_ms, batch_id, node -> {the train claim's token, 'ok'} or {0, reason}
COMMIT_ROLLOUT_CLAIM_TRAIN = render(NOW + index_lua.INDEX_LUA + _CLAIM_TASK + _COMMIT_ROLLOUT + """
if verdict == 'done' then
  local t = redis.call('HMGET', KEYS[6], 'status', 'token', 'batch')
  if t[1] == 'claimed' and t[3] == ARGV[9] then return {tonumber(t[2]), 'ok'} end
  return {0, 'committed'}
end
if verdict ~= 'ok' then return {0, verdict} end
commit_rollout()
local token = claim_task(KEYS[6], KEYS[7], ARGV[7], ARGV[8], ARGV[9])
redis.call('HSET', KEYS[2], '$inflight', ARGV[9], '$inflight_at', now, '$node', ARGV[10])
redis.call('HINCRBY', KEYS[2], '$served', redis.call('HGET', KEYS[2], '$rows'))
reindex(KEYS[2], ARGV[6], was)
return {token, 'ok'}
""")

# A committed step's trajectory stays (without a TTL) as the replay log until a snapshot version
# (ARGV snapshot = 1: the version holds the AdamW state) is committed; then the log of steps
# log_from..step is dropped and log_from = step + 1.
# KEYS: task, exp, metrics, events, trajectory, active, refusals   ARGV: token, step, metrics_json,
# exp_id, snapshot, trajectory key prefix -> {1, 'ok'} or {0, reason}
COMMIT_TRAIN = render(NOW + index_lua.INDEX_LUA + _REFUSE + _POSITION + _FENCE + """
local verdict = fence(KEYS[1], KEYS[2], KEYS[7], ARGV[1], ARGV[2], '$train')
if verdict == 'done' then return {1, 'ok'} end
if verdict ~= 'ok' then return {0, verdict} end
local step = tonumber(ARGV[2])
local total = redis.call('HGET', KEYS[2], '$steps_total')
local nxt = step + 1
local was = entries(KEYS[2], ARGV[4], true)
redis.call('HSET', KEYS[1], 'status', 'committed')
redis.call('RPUSH', KEYS[3], ARGV[3])
if ARGV[5] == '1' then
  for k = tonumber(redis.call('HGET', KEYS[2], '$log_from') or 0), step do redis.call('DEL', ARGV[6] .. k) end
  redis.call('HSET', KEYS[2], '$log_from', nxt)
else
  redis.call('PERSIST', KEYS[5])
end
redis.call('HSET', KEYS[2], '$step', nxt, '$phase', '$rollout', '$inflight', '', '$attempts', 0, '$error', '')
redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'train_committed',
           'exp', ARGV[4], 'step', step, 'version', nxt)
if nxt >= tonumber(total) then
  redis.call('HSET', KEYS[2], '$status', 'completed', '$finished_at', now)
  redis.call('SREM', KEYS[6], ARGV[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'completed', 'exp', ARGV[4])
end
reindex(KEYS[2], ARGV[4], was)
return {1, 'ok'}
""")

# After a train commit the same worker claims the batch's next rollouts, but only when the
# scheduler would publish exactly that batch to it anyway: no other experiment is waiting
# (queued, or running with nothing in flight: the `waiting` index less the batch's own items, so
# O(batch), not O(experiments)) and the scheduler has not asked to rebalance nodes. Items that
# finished or moved on are skipped.
# KEYS: waiting index, fence, rebalance flag, then exp, rollout task per item
# ARGV: owner, lease_ms, batch_id, node, then exp_id, step per item
# -> a fencing token per item (0: not claimed); {} when something else is waiting
CLAIM_NEXT_ROLLOUTS = render(NOW + index_lua.INDEX_LUA + _CLAIM_TASK + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local n = (#KEYS - 3) / 2
local others, mine = redis.call('SCARD', KEYS[1]), {}
for i = 0, n - 1 do
  local id = ARGV[5 + 2 * i]
  if not mine[id] and redis.call('SISMEMBER', KEYS[1], id) == 1 then others = others - 1 end
  mine[id] = true
end
if others > 0 then return {} end
local out = {}
for i = 0, n - 1 do
  local exp, task, id, step = KEYS[4 + 2 * i], KEYS[5 + 2 * i], ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local e = redis.call('HMGET', exp, '$status', '$step', '$phase', '$inflight', '$rows')
  local s = redis.call('HMGET', task, 'status', 'lease_until')
  local token = 0
  if e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == '$rollout' and e[4] == ''
     and s[1] ~= 'committed' and not (s[1] == 'claimed' and tonumber(s[2]) > now) then
    token = claim_task(task, KEYS[2], ARGV[1], ARGV[2], ARGV[3])
    local was = entries(exp, id, true)
    redis.call('HSET', exp, '$inflight', ARGV[3], '$inflight_at', now, '$node', ARGV[4])
    redis.call('HINCRBY', exp, '$served', e[5])
    reindex(exp, id, was)
  end
  out[#out + 1] = token
end
return out
""")

# When a given-up task may be published again: at once after its first counted failure (a worker
# died: retry now), then after base x 2^(attempts-2) ms, capped; an uncounted one at once.
_NOT_BEFORE = """
local function not_before(counted, attempts, base_ms, cap_ms)
  local wait = 0
  if counted and attempts > 1 then
    wait = math.min(tonumber(cap_ms), tonumber(base_ms) * 2 ^ (attempts - 2))
  end
  return math.floor(now + wait)
end
"""

# A worker gives up its attempt at a task (fenced): the experiment may be published again, at
# once after its first failed attempt, then after a doubling backoff. `count` 1: the experiment's
# own fault (its reward function raised, a NaN, a bad checkpoint, the batch crashed), counted
# against `max_attempts`, which fails it with `reason` when reached; 0: not its fault (a store or
# Redis outage outlasted the worker's retries, the worker is shutting down).
# KEYS: task, exp, events, active
# ARGV: token, reason, count, max_attempts, exp_id, backoff_base_ms, backoff_cap_ms
# -> 0 not the holder (or not running), 1 released for another attempt, 2 experiment failed
GIVE_UP_ATTEMPT = render(NOW + index_lua.INDEX_LUA + _NOT_BEFORE + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$status') ~= 'running' then return 0 end
local was = entries(KEYS[2], ARGV[5], true)
redis.call('HSET', KEYS[1], 'status', 'released', 'lease_until', 0, 'error', ARGV[2])
local attempts = redis.call('HINCRBY', KEYS[2], '$attempts', tonumber(ARGV[3]))
if tonumber(ARGV[3]) > 0 and attempts >= tonumber(ARGV[4]) then
  local reason = ARGV[2] .. ' (gave up after ' .. attempts .. ' attempts)'
  redis.call('HSET', KEYS[2], '$status', 'failed', '$error', reason, '$inflight', '',
             '$finished_at', now)
  redis.call('SREM', KEYS[4], ARGV[5])
  reindex(KEYS[2], ARGV[5], was)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'failed', 'exp', ARGV[5],
             'reason', reason)
  return 2
end
redis.call('HSET', KEYS[2], '$inflight', '', '$error', ARGV[2],
           '$not_before', not_before(tonumber(ARGV[3]) > 0, attempts, ARGV[6], ARGV[7]))
reindex(KEYS[2], ARGV[5], was)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'attempt_released',
           'exp', ARGV[5], 'reason', ARGV[2], 'counted', ARGV[3])
return 1
""")

# Scheduler or client ends an experiment (poison cap, cancel). KEYS: exp, events, active
# ARGV: status, reason, exp_id
FINISH = render(NOW + index_lua.INDEX_LUA + """
local st = redis.call('HGET', KEYS[1], '$status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local was = entries(KEYS[1], ARGV[3], true)
redis.call('HSET', KEYS[1], '$status', ARGV[1], '$error', ARGV[2], '$inflight', '', '$finished_at', now)
redis.call('SREM', KEYS[3], ARGV[3])
reindex(KEYS[1], ARGV[3], was)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', $stream_maxlen, '*', 'type', ARGV[1], 'exp', ARGV[3],
           'reason', ARGV[2])
return 1
""")

# A client adds steps to an experiment (continual learning): a completed one runs again from its
# last committed version, keeping its history. KEYS: exp, events, active
# ARGV: steps to add, the new spec JSON, exp_id -> the new steps_total, or 0 if not extendable
EXTEND = render(NOW + index_lua.INDEX_LUA + """
local st = redis.call('HGET', KEYS[1], '$status')
if st ~= 'queued' and st ~= 'running' and st ~= 'completed' then return 0 end
local was = entries(KEYS[1], ARGV[3], true)
local total = redis.call('HINCRBY', KEYS[1], '$steps_total', ARGV[1])
redis.call('HSET', KEYS[1], '$spec_json', ARGV[2])
if st == 'completed' then
  redis.call('HSET', KEYS[1], '$status', 'running', '$inflight', '', '$attempts', 0, '$error', '',
             '$finished_at', 0, '$not_before', 0)
  redis.call('SADD', KEYS[3], ARGV[3])
end
reindex(KEYS[1], ARGV[3], was)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', $stream_maxlen, '*', 'type', 'extended', 'exp', ARGV[3],
           'steps_total', total)
return total
""")

# The leader marks the experiments of one batch as published (and counts the rows it serves
# them, for fair share), each only if it is still running at that step and phase with nothing in
# flight. KEYS: leader, exp... ARGV: leader_id, batch_id, phase, node, then step per exp, then
# exp_id per exp -> 1/0 per exp (all 0 if the caller is not the leader)
MARK_INFLIGHT = render(NOW + index_lua.INDEX_LUA + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
local n = #KEYS - 1
for i = 2, #KEYS do
  local step, id = ARGV[3 + i], ARGV[3 + n + i]
  local e = redis.call('HMGET', KEYS[i], '$status', '$step', '$phase', '$inflight', '$rows')
  if leader and e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == ARGV[3]
     and e[4] == '' then
    local was = entries(KEYS[i], id, true)
    redis.call('HSET', KEYS[i], '$inflight', ARGV[2], '$inflight_at', now, '$node', ARGV[4])
    redis.call('HINCRBY', KEYS[i], '$served', e[5])
    reindex(KEYS[i], id, was)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""")

# KEYS: leader, exp   ARGV: leader_id, exp_id. An experiment that is not queued (any more) has
# its index entries rewritten from its hash: a stale `queued` entry heals itself here.
ACTIVATE = render(NOW + index_lua.INDEX_LUA + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local was = entries(KEYS[2], ARGV[2], true)
local ok = 0
if redis.call('HGET', KEYS[2], '$status') == 'queued' then
  redis.call('HSET', KEYS[2], '$status', 'running', '$started_at', now)
  ok = 1
end
reindex(KEYS[2], ARGV[2], was)
return ok
""")

# The leader gives up on a published task so that it is published again (after a backoff when
# a counted attempt fails again: base x 2^(attempts-2), capped). KEYS: leader, exp
# ARGV: leader_id, batch_id, attempts to add (0: the task never ran, e.g. its node vanished),
# reason, backoff_base_ms, backoff_cap_ms, exp_id -> 1 + failed attempts so far; 0: not cleared
CLEAR_INFLIGHT = render(NOW + index_lua.INDEX_LUA + _NOT_BEFORE + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$inflight') ~= ARGV[2] then return 0 end
local was = entries(KEYS[2], ARGV[7], true)
local attempts = redis.call('HINCRBY', KEYS[2], '$attempts', ARGV[3])
redis.call('HSET', KEYS[2], '$inflight', '', '$error', ARGV[4],
           '$not_before', not_before(tonumber(ARGV[3]) > 0, attempts, ARGV[5], ARGV[6]))
reindex(KEYS[2], ARGV[7], was)
return attempts + 1
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
