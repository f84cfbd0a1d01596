"""The Lua scripts of the step protocol (`common/protocol.py` binds them to a Redis client).

Each runs atomically in Redis. Lease times come from the server clock (TIME), never a worker's.
"""

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

CLAIM = _NOW + """
local e = redis.call('HMGET', KEYS[2], 'status', 'step', 'phase')
if e[1] ~= 'running' then return {0, 'experiment_' .. tostring(e[1])} end
if tonumber(e[2]) ~= tonumber(ARGV[3]) or e[3] ~= ARGV[4] then return {0, 'stale'} end
local s = redis.call('HMGET', KEYS[1], 'status', 'lease_until')
if s[1] == 'committed' then return {0, 'committed'} end
if s[1] == 'claimed' and tonumber(s[2]) > now then return {0, 'claimed'} end
local token = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'status', 'claimed', 'token', token, 'owner', ARGV[1],
           'lease_until', now + tonumber(ARGV[2]), 'batch', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('PEXPIRE', KEYS[1], 604800000)
return {token, 'ok'}
"""

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

# KEYS: task, exp, trajectory, events   ARGV: token, step, traj_json, summary_json, ttl_ms, exp_id
COMMIT_ROLLOUT = _NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
local e = redis.call('HMGET', KEYS[2], 'status', 'step', 'phase')
if e[1] ~= 'running' or tonumber(e[2]) ~= tonumber(ARGV[2]) or e[3] ~= 'rollout' then return 0 end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'committed')
redis.call('HSET', KEYS[2], 'phase', 'train', 'inflight', '', 'attempts', 0,
           'rollout_summary', ARGV[4], 'updated_at', now)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'type', 'rollout_committed',
           'exp', ARGV[6], 'step', ARGV[2])
return 1
"""

# The same commit, and the step's train task claimed at once by the committing worker (its batch
# runs there next, without a round trip through the scheduler and the queue). The experiment is
# never without an in-flight task in between, so the scheduler cannot publish the train step too.
# KEYS: task, exp, trajectory, events, train task, fence
# ARGV: token, step, traj_json, summary_json, ttl_ms, exp_id, owner, lease_ms, batch_id, node, rows
COMMIT_ROLLOUT_CLAIM_TRAIN = _NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
local e = redis.call('HMGET', KEYS[2], 'status', 'step', 'phase')
if e[1] ~= 'running' or tonumber(e[2]) ~= tonumber(ARGV[2]) or e[3] ~= 'rollout' then return 0 end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'committed')
local token = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[5], 'status', 'claimed', 'token', token, 'owner', ARGV[7],
           'lease_until', now + tonumber(ARGV[8]), 'batch', ARGV[9])
redis.call('HINCRBY', KEYS[5], 'claims', 1)
redis.call('PEXPIRE', KEYS[5], 604800000)
redis.call('HSET', KEYS[2], 'phase', 'train', 'inflight', ARGV[9], 'inflight_at', now,
           'node', ARGV[10], 'attempts', 0, 'rollout_summary', ARGV[4], 'updated_at', now)
redis.call('HINCRBY', KEYS[2], 'served', ARGV[11])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'type', 'rollout_committed',
           'exp', ARGV[6], 'step', ARGV[2])
return token
"""

# KEYS: task, exp, metrics, events, trajectory, active   ARGV: token, step, metrics_json, exp_id
COMMIT_TRAIN = _NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
local e = redis.call('HMGET', KEYS[2], 'status', 'step', 'phase', 'version', 'steps_total')
local step = tonumber(ARGV[2])
if e[1] ~= 'running' or tonumber(e[2]) ~= step or e[3] ~= 'train' or tonumber(e[4]) ~= step then
  return 0
end
local nxt = step + 1
redis.call('HSET', KEYS[1], 'status', 'committed')
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[5])
redis.call('HSET', KEYS[2], 'step', nxt, 'version', nxt, 'phase', 'rollout', 'inflight', '',
           'attempts', 0, 'updated_at', now)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'type', 'train_committed',
           'exp', ARGV[4], 'step', step, 'version', nxt)
if nxt >= tonumber(e[5]) then
  redis.call('HSET', KEYS[2], 'status', 'completed', 'finished_at', now)
  redis.call('SREM', KEYS[6], ARGV[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'type', 'completed', 'exp', ARGV[4])
end
return 1
"""

# After a train commit the same worker claims the batch's next rollouts, but only when the
# scheduler would publish exactly that batch to it anyway: no other experiment is waiting
# (queued, or running with nothing in flight; O(active experiments)) and the scheduler has not
# asked to rebalance nodes. Items that finished or moved on are skipped.
# KEYS: active, fence, rebalance flag, then exp, rollout task per item
# ARGV: experiment key prefix, owner, lease_ms, batch_id, node, then exp_id, step, rows per item
# -> a fencing token per item (0: not claimed); {} when something else is waiting
CLAIM_NEXT_ROLLOUTS = _NOW + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local n = (#KEYS - 3) / 2
local mine = {}
for i = 0, n - 1 do mine[ARGV[6 + 3 * i]] = true end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not mine[id] then
    local e = redis.call('HMGET', ARGV[1] .. id, 'status', 'inflight')
    if e[1] == 'queued' or (e[1] == 'running' and e[2] == '') then return {} end
  end
end
local out = {}
for i = 0, n - 1 do
  local exp, task, step, rows = KEYS[4 + 2 * i], KEYS[5 + 2 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]
  local e = redis.call('HMGET', exp, 'status', 'step', 'phase', 'inflight')
  local s = redis.call('HMGET', task, 'status', 'lease_until')
  local token = 0
  if e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == 'rollout' and e[4] == ''
     and s[1] ~= 'committed' and not (s[1] == 'claimed' and tonumber(s[2]) > now) then
    token = redis.call('INCR', KEYS[2])
    redis.call('HSET', task, 'status', 'claimed', 'token', token, 'owner', ARGV[2],
               'lease_until', now + tonumber(ARGV[3]), 'batch', ARGV[4])
    redis.call('HINCRBY', task, 'claims', 1)
    redis.call('PEXPIRE', task, 604800000)
    redis.call('HSET', exp, 'inflight', ARGV[4], 'inflight_at', now, 'node', ARGV[5])
    redis.call('HINCRBY', exp, 'served', rows)
  end
  out[#out + 1] = token
end
return out
"""

# A worker fails one experiment of its batch (non-finite loss, reward env raised); fenced.
# KEYS: task, exp, events, active   ARGV: token, reason, exp_id
FAIL_TASK = _NOW + """
local s = redis.call('HMGET', KEYS[1], 'status', 'token')
if s[1] ~= 'claimed' or s[2] ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed')
redis.call('HSET', KEYS[2], 'status', 'failed', 'error', ARGV[2], 'inflight', '', 'finished_at', now)
redis.call('SREM', KEYS[4], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'type', 'failed', 'exp', ARGV[3],
           'reason', ARGV[2])
return 1
"""

# Scheduler or client ends an experiment (poison cap, cancel). KEYS: exp, events, active
# ARGV: status, reason, exp_id
FINISH = _NOW + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'error', ARGV[2], 'inflight', '', 'finished_at', now)
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', ARGV[1], 'exp', ARGV[3],
           'reason', ARGV[2])
return 1
"""

# The leader marks the experiments of one batch as published (and counts the rows it serves
# them, for fair share), each only if it is still running at that step and phase with nothing in
# flight. KEYS: leader, exp... ARGV: leader_id, batch_id, phase, node, then step, rows per exp
# -> 1/0 per exp (all 0 if the caller is not the leader)
MARK_INFLIGHT = _NOW + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
for i = 2, #KEYS do
  local step, rows = ARGV[3 + 2 * (i - 1)], ARGV[4 + 2 * (i - 1)]
  local e = redis.call('HMGET', KEYS[i], 'status', 'step', 'phase', 'inflight')
  if leader and e[1] == 'running' and tonumber(e[2]) == tonumber(step) and e[3] == ARGV[3]
     and e[4] == '' then
    redis.call('HSET', KEYS[i], 'inflight', ARGV[2], 'inflight_at', now, 'node', ARGV[4])
    redis.call('HINCRBY', KEYS[i], 'served', rows)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: leader, exp   ARGV: leader_id
ACTIVATE = _NOW + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[2], 'status', 'running', 'started_at', now)
return 1
"""

# The leader gives up on a published task so that it is published again. KEYS: leader, exp
# ARGV: leader_id, batch_id, attempts to add (0: the task never ran, e.g. its node vanished)
CLEAR_INFLIGHT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'inflight') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'inflight', '')
return redis.call('HINCRBY', KEYS[2], 'attempts', ARGV[3]) + 1
"""

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
