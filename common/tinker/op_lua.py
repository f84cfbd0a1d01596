"""The Lua scripts of the client-op protocol (`common/tinker/op_store.py` binds them to a client).

Every script runs atomically in Redis; times come from the server clock (TIME). Key names are
built inside the scripts from the prefixes of `common/keys.py` (like the index scripts do): a
commit touches the futures, payloads and results of every op it finishes, and the held work of the
model's owner, whose names are only known once the script has read them.

State of one client model (`Keys.tk_model(exp)` hash): op_seq (ops committed), token/lease_until/
claim_owner/claim_n (the live claim, "" when none), committed_token (the last committed claim: a
retried commit after a lost reply answers 1), inflight/inflight_at/node (the published batch),
attempts (failed attempts at the head op: poison cap), ready_at (when it last became ready: the
scheduler's linger). The model is in `Keys.tk_ready` iff it is running, its next op (op_seq + 1)
is present, and nothing is published or claimed; in `Keys.tk_inflight` iff published or claimed.

Quota: every queued or running future of an API key is in `Keys.tk_owner_queued(owner)`; over the
key's `max_queued_ops` (its `Keys.api_key` hash, else the fleet default) a new future is `held`
in `Keys.tk_held(owner)` and released in order as the key's futures finish. An op that fills a
gap (a later op of its model is already queued) is never held: the queued ops wait on it.
"""

from __future__ import annotations

from lorafleet.common.tinker.op_lua_lib import LIB as _LIB
from lorafleet.common.tinker.op_lua_lib import render

# KEYS: dedupe, model (ops) | unused, exp (ops) | unused
# ARGV: rid, seq, kind ("sample" for samples), payload, owner, exp_id ("" for samples), default limit
# -> {rid, "queued" | "held" | "dup"} or {"", error}
ENQUEUE = render(_LIB + """
local old = redis.call('GET', KEYS[1])
if old then return {old, 'dup'} end
local rid, seq, kind, exp_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[6]
local exempt = false
if kind ~= 'sample' then
  local e = redis.call('HMGET', KEYS[3], '$status', '$kind')
  if e[2] ~= 'client' then return {'', 'unknown model ' .. exp_id} end
  if e[1] ~= 'running' then return {'', 'model ' .. exp_id .. ' is ' .. tostring(e[1])} end
  if seq <= tonumber(redis.call('HGET', KEYS[2], 'op_seq') or 0) then
    return {'', 'operation seq ' .. seq .. ' of model ' .. exp_id .. ' was already committed'}
  end
  if redis.call('ZCOUNT', '$ops' .. exp_id, '(' .. seq, '+inf') > 0 then exempt = true end
end
redis.call('SET', KEYS[1], rid)
redis.call('SET', '$payload' .. rid, ARGV[4])
redis.call('HSET', fut(rid), 'kind', kind, 'exp', exp_id, 'seq', seq, 'owner', ARGV[5], 'created', now,
           'status', 'queued', 'done', 0, 'error', '', 'category', '', 'queue_state', 'active',
           'queue_reason', '', 'dedupe', KEYS[1], 'attempts', 0, 'token', '', 'lease_until', 0)
return {rid, admit(rid, ARGV[5], ARGV[7], exempt)}
""")

# A future done at once. KEYS: dedupe   ARGV: rid, kind, body, owner, exp_id, ttl_ms -> the rid
COMPLETE = render(_LIB + """
local old = redis.call('GET', KEYS[1])
if old then return old end
local rid = ARGV[1]
redis.call('SET', KEYS[1], rid)
redis.call('HSET', fut(rid), 'kind', ARGV[2], 'exp', ARGV[5], 'seq', 0, 'owner', ARGV[4], 'created', now,
           'dedupe', KEYS[1], 'attempts', 0)
finish_future(rid, true, ARGV[3], '', '', ARGV[6])
return rid
""")

# KEYS: exp, model, model_id, experiments, active, owner_experiments | unused
# ARGV: exp_id, owner, now_ms, model_id, then the record hash as field, value pairs
# -> the model's experiment id (the first registration's on a retry)
REGISTER_MODEL = render("""
local old = redis.call('GET', KEYS[3])
if old then return old end
redis.call('SET', KEYS[3], ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'op_seq', 0, 'node', '', 'token', '', 'lease_until', 0, 'claim_owner', '',
           'claim_n', 0, 'committed_token', '', 'inflight', '', 'inflight_at', 0, 'attempts', 0,
           'ready_at', 0, 'model_id', ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1]) end
redis.call('XADD', '$events', 'MAXLEN', '~', $maxlen, '*', 'type', 'submitted', 'exp', ARGV[1])
return ARGV[1]
""")

# KEYS: model, exp, fence, gradlog   ARGV: owner, lease_ms, op_seq, exp_id
# -> {token, "ok", version, spec_json, {{rid, seq, kind, payload}...}, {gradlog ops}} or {0, reason}
# Claiming again what this owner holds returns the same token and ops (a retry after a lost reply).
CLAIM_OPS = render(_LIB + """
local exp_id = ARGV[4]
local e = redis.call('HMGET', KEYS[2], '$status', '$step', '$spec_json')
if e[1] ~= 'running' then return {0, e[1] and ('experiment_' .. e[1]) or 'unknown_experiment'} end
local m = redis.call('HMGET', KEYS[1], 'op_seq', 'token', 'lease_until', 'claim_owner', 'claim_n')
local op_seq = tonumber(m[1] or 0)
if op_seq ~= tonumber(ARGV[3]) then return {0, 'stale'} end
local held = (m[2] or '') ~= '' and tonumber(m[3] or 0) > now
if held and m[4] ~= ARGV[1] then return {0, 'claimed'} end
local limit = 1e9
if held then limit = tonumber(m[5]) end
local ops = {}
while #ops < limit do
  local s = op_seq + #ops + 1
  local rid = redis.call('ZRANGEBYSCORE', '$ops' .. exp_id, s, s)[1]
  if not rid then break end
  local kind = redis.call('HGET', fut(rid), 'kind')
  ops[#ops + 1] = {rid, s, kind, redis.call('GET', '$payload' .. rid) or 'null'}
  if BARRIER[kind] then break end
end
if #ops == 0 then return {0, 'empty'} end
local token = m[2]
if not held then
  token = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[1], 'token', token, 'claim_owner', ARGV[1], 'claim_n', #ops)
  if (redis.call('HGET', KEYS[1], 'inflight') or '') == '' then
    redis.call('HSET', KEYS[1], 'inflight', 'claim:' .. token, 'inflight_at', now)
  end
end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
redis.call('SREM', '$ready', exp_id)
redis.call('SADD', '$inflight_set', exp_id)
for _, op in ipairs(ops) do redis.call('HSET', fut(op[1]), 'status', 'running') end
local log = {}
for _, rid in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
  log[#log + 1] = {rid, tonumber(redis.call('HGET', fut(rid), 'seq') or 0), 'forward_backward',
                   redis.call('GET', '$payload' .. rid) or 'null'}
end
return {tonumber(token), 'ok', tonumber(e[2] or 0), e[3], ops, log}
""")

# KEYS: model per claim   ARGV: lease_ms, then token per claim -> 1/0 per claim
RENEW_OPS = render(_LIB + """
local out = {}
for i, m in ipairs(KEYS) do
  if redis.call('HGET', m, 'token') == ARGV[i + 1] then
    redis.call('HSET', m, 'lease_until', now + tonumber(ARGV[1]))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""")

# KEYS: model, exp, gradlog, checkpoints
# ARGV: token, exp_id, new_version, ttl_ms, default limit, n, then per op: rid, ok, category, error, body
# -> 1 committed (or this token already did), 0 fenced out (nothing written)
COMMIT_OPS = render(_LIB + """
local exp_id, ttl = ARGV[2], ARGV[4]
local m = redis.call('HMGET', KEYS[1], 'token', 'claim_n', 'committed_token', 'op_seq')
if m[3] == ARGV[1] then return 1 end
if m[1] ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], '$status') ~= 'running' then return 0 end
local n, op_seq = tonumber(ARGV[6]), tonumber(m[4] or 0)
if n ~= tonumber(m[2]) then return redis.error_reply('commit of ' .. n .. ' results, claimed ' .. m[2]) end
local owners = {}
for i = 1, n do
  local b = 6 + (i - 1) * 5
  local rid, ok, cat, err, body = ARGV[b + 1], ARGV[b + 2] == '1', ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  if next_rid(exp_id, op_seq + i - 1) ~= rid then
    return redis.error_reply('result ' .. i .. ' is not for op ' .. (op_seq + i))
  end
  local kind = redis.call('HGET', fut(rid), 'kind')
  if ok and (kind == 'save_weights' or kind == 'save_weights_for_sampler') then
    local p = cjson.decode(redis.call('GET', '$payload' .. rid) or '{}')
    local r = cjson.decode(body)
    if type(p) ~= 'table' then p = {} end
    if type(r) ~= 'table' then r = {} end
    local name = rid
    if type(r['name']) == 'string' then name = r['name']
    elseif type(p['name']) == 'string' then name = p['name'] end
    local version = tonumber(ARGV[3])
    if type(r['version']) == 'number' then version = r['version'] end
    local prefix = 'sampler_weights/'
    if kind == 'save_weights' then prefix = 'weights/' end
    redis.call('HSET', KEYS[4], prefix .. name, string.format('{"version": %d, "created": %d}', version, now))
  end
  if ok and kind == 'forward_backward' then
    redis.call('RPUSH', KEYS[3], rid)  -- its payload stays: another worker may rebuild the grads
  else
    if ok and (kind == 'optim_step' or kind == 'load_weights') then
      for _, g in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do redis.call('DEL', '$payload' .. g) end
      redis.call('DEL', KEYS[3])
    end
    redis.call('DEL', '$payload' .. rid)
  end
  redis.call('ZREM', '$ops' .. exp_id, rid)
  if not ok then body = '' end
  owners[finish_future(rid, ok, body, err, cat, ttl)] = true
end
redis.call('HSET', KEYS[1], 'op_seq', op_seq + n, 'token', '', 'lease_until', 0, 'claim_owner', '',
           'claim_n', 0, 'committed_token', ARGV[1], 'inflight', '', 'attempts', 0, 'error', '')
redis.call('SREM', '$inflight_set', exp_id)
redis.call('HSET', KEYS[2], '$step', tonumber(ARGV[3]))
redis.call('XADD', '$events', 'MAXLEN', '~', $maxlen, '*', 'type', 'commit', 'exp', exp_id, 'ops', n,
           'version', ARGV[3])
for owner, _ in pairs(owners) do release_held(owner, ARGV[5]) end
mark_ready(exp_id)
return 1
""")

# A worker gives its claim back (fenced). KEYS: model
# ARGV: token, exp_id, reason, count, max_attempts, ttl_ms, default limit -> attempts, or -1 not held
RELEASE_OPS = render(_LIB + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or ARGV[1] == '' then return -1 end
return give_back(ARGV[2], tonumber(ARGV[4]), ARGV[5], ARGV[3], ARGV[6], ARGV[7])
""")

# The leader reaps a model whose batch lapsed (still the same batch and claim it read).
# KEYS: leader, model   ARGV: leader_id, exp_id, inflight, token, reason, count, max_attempts,
# ttl_ms, default limit -> attempts, or -1 (not the leader, or the model moved on)
REAP_OPS = render(_LIB + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local m = redis.call('HMGET', KEYS[2], 'inflight', 'token')
if (m[1] or '') ~= ARGV[3] or (m[2] or '') ~= ARGV[4] then return -1 end
return give_back(ARGV[2], tonumber(ARGV[6]), ARGV[7], ARGV[5], ARGV[8], ARGV[9])
""")

# The leader publishes ready models on a node. KEYS: leader   ARGV: leader_id, batch_id, node,
# exp_id... -> per model its op_seq (the batch item), or -1 (not ready any more)
MARK_OPS = render(_LIB + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
for i = 4, #ARGV do
  local exp_id = ARGV[i]
  local m = '$model' .. exp_id
  if leader and mark_ready(exp_id) == 1 then
    redis.call('HSET', m, 'inflight', ARGV[2], 'inflight_at', now, 'node', ARGV[3])
    redis.call('SREM', '$ready', exp_id)
    redis.call('SADD', '$inflight_set', exp_id)
    out[#out + 1] = tonumber(redis.call('HGET', m, 'op_seq') or 0)
  else
    out[#out + 1] = -1
  end
end
return out
""")

# Held work of every owner with some, released as far as each quota allows. ARGV: default limit
RELEASE_HELD = render(_LIB + """
local n = 0
for _, owner in ipairs(redis.call('SMEMBERS', '$held_owners')) do n = n + release_held(owner, ARGV[1]) end
return n
""")

# The leader publishes sample requests. KEYS: leader   ARGV: leader_id, batch_id, unclaimed_ms,
# rid... -> 1/0 per rid (0: not queued any more)
MARK_SAMPLES = render(_LIB + """
local out = {}
local leader = redis.call('GET', KEYS[1]) == ARGV[1]
for i = 4, #ARGV do
  local rid = ARGV[i]
  local ok = 0
  if leader and redis.call('ZSCORE', '$samples', rid) then
    redis.call('ZREM', '$samples', rid)
    if redis.call('HGET', fut(rid), 'status') == 'queued' then
      redis.call('ZADD', '$samples_running', now + tonumber(ARGV[3]), rid)
      redis.call('HSET', fut(rid), 'batch', ARGV[2])
      ok = 1
    end
  end
  out[#out + 1] = ok
end
return out
""")

# KEYS: fence   ARGV: owner, lease_ms, rid... -> per rid {token, payload} ({0, ''}: not claimed)
CLAIM_SAMPLES = render(_LIB + """
local out = {}
for i = 3, #ARGV do
  local rid = ARGV[i]
  local f = redis.call('HMGET', fut(rid), 'status', 'token', 'lease_until', 'claim_owner', 'kind')
  local token = 0
  if f[5] == 'sample' and f[1] == 'queued' then
    token = redis.call('INCR', KEYS[1])
    redis.call('HSET', fut(rid), 'status', 'running', 'token', token, 'claim_owner', ARGV[1])
  elseif f[1] == 'running' and f[4] == ARGV[1] and tonumber(f[3] or 0) > now then
    token = tonumber(f[2])
  end
  if token ~= 0 then
    redis.call('HSET', fut(rid), 'lease_until', now + tonumber(ARGV[2]))
    redis.call('ZREM', '$samples', rid)
    redis.call('ZADD', '$samples_running', now + tonumber(ARGV[2]), rid)
    out[#out + 1] = {token, redis.call('GET', '$payload' .. rid) or 'null'}
  else
    out[#out + 1] = {0, ''}
  end
end
return out
""")

# KEYS: future   ARGV: token, rid, ok, category, error, body, ttl_ms, default limit -> 1/0
COMMIT_SAMPLE = render(_LIB + """
local f = redis.call('HMGET', KEYS[1], 'status', 'token')
if (f[1] == 'done' or f[1] == 'failed') and f[2] == ARGV[1] then return 1 end
if f[1] ~= 'running' or f[2] ~= ARGV[1] then return 0 end
local ok = ARGV[3] == '1'
local body = ARGV[6]
if not ok then body = '' end
redis.call('ZREM', '$samples_running', ARGV[2])
redis.call('DEL', '$payload' .. ARGV[2])
release_held(finish_future(ARGV[2], ok, body, ARGV[5], ARGV[4], ARGV[7]), ARGV[8])
return 1
""")

# The leader puts lapsed sample requests (published and unclaimed past the timeout, or claimed
# past their lease) back in the queue; a claimed one counts an attempt, and fails with category
# "server" at max_attempts. KEYS: leader   ARGV: leader_id, max_attempts, ttl_ms, default limit
# -> the number put back or failed
REAP_SAMPLES = render(_LIB + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', '$samples_running', '-inf', now)) do
  redis.call('ZREM', '$samples_running', rid)
  local st = redis.call('HGET', fut(rid), 'status')
  if st == 'queued' or st == 'running' then
    local attempts = 0
    if st == 'running' then attempts = redis.call('HINCRBY', fut(rid), 'attempts', 1) end
    if attempts >= tonumber(ARGV[2]) then
      redis.call('DEL', '$payload' .. rid)
      local reason = 'sampling lease lapsed (gave up after ' .. attempts .. ' attempts)'
      release_held(finish_future(rid, false, '', reason, 'server', ARGV[3]), ARGV[4])
    else
      redis.call('HSET', fut(rid), 'status', 'queued', 'token', '', 'lease_until', 0)
      redis.call('ZADD', '$samples', now, rid)
    end
    n = n + 1
  end
end
return n
""")

# A client model ends (its session expired, or it was cancelled): every pending op fails with
# category "user", its pending gradients are dropped. KEYS: exp, model, active, gradlog
# ARGV: exp_id, status, reason, ttl_ms, default limit -> pending ops failed
CLOSE_MODEL = render(_LIB + """
if redis.call('HGET', KEYS[1], '$kind') ~= 'client' then return 0 end
local exp_id = ARGV[1]
if redis.call('HGET', KEYS[1], '$status') == 'running' then
  redis.call('HSET', KEYS[1], '$status', ARGV[2], '$error', ARGV[3], '$finished_at', now)
  redis.call('XADD', '$events', 'MAXLEN', '~', $maxlen, '*', 'type', ARGV[2], 'exp', exp_id,
             'reason', ARGV[3])
end
redis.call('SREM', KEYS[3], exp_id)
redis.call('SREM', '$ready', exp_id)
redis.call('SREM', '$inflight_set', exp_id)
redis.call('HSET', KEYS[2], 'token', '', 'lease_until', 0, 'claim_owner', '', 'claim_n', 0, 'inflight', '')
local owners, n = {}, 0
for _, rid in ipairs(redis.call('ZRANGE', '$ops' .. exp_id, 0, -1)) do
  redis.call('DEL', '$payload' .. rid)
  owners[finish_future(rid, false, '', 'model ' .. exp_id .. ' is ' .. ARGV[2] .. ': ' .. ARGV[3], 'user',
                       ARGV[4])] = true
  n = n + 1
end
redis.call('DEL', '$ops' .. exp_id)
for _, g in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do redis.call('DEL', '$payload' .. g) end
redis.call('DEL', KEYS[4])
for owner, _ in pairs(owners) do release_held(owner, ARGV[5]) end
return n
""")

# KEYS: future per job   ARGV: lease_ms, then token per job -> 1/0 per job (0: not held any more)
RENEW_SAMPLES = render(_LIB + """
local out = {}
for i, f in ipairs(KEYS) do
  local s = redis.call('HMGET', f, 'status', 'token')
  if s[1] == 'running' and s[2] == ARGV[i + 1] then
    redis.call('HSET', f, 'lease_until', now + tonumber(ARGV[1]))
    redis.call('ZADD', '$samples_running', now + tonumber(ARGV[1]), string.sub(f, #'$fut' + 1))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""")
