"""The shared part of the client-op Lua scripts (`common/tinker/op_lua.py`): their `$names`
(`OP_NAMES`, `common/redis/lua.py`: record fields and key names) and the Lua functions every
script embeds (`LIB`): the ready entry, admission under the key's quota and the release of held
work, finishing a future, and giving a claim back. The protocol's state is described in
`common/tinker/op_lua.py`."""

from __future__ import annotations

from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.redis.lua import NOW, LuaNames, key_affixes
from lorafleet.common.state.experiment import FIELD_NAMES

_OWNER_QUEUED, _HELD = key_affixes(Keys.tk_owner_queued), key_affixes(Keys.tk_held)
OP_NAMES = LuaNames.of(
    FIELD_NAMES,
    maxlen=STREAM_MAXLEN, fut=Keys.tk_future(""), payload=Keys.tk_payload(""), result=Keys.tk_result(""),
    ops=Keys.tk_ops(""), model=Keys.tk_model(""), exp=Keys.experiment(""), apikey=Keys.api_key(""),
    owner_queued=_OWNER_QUEUED[0], owner_queued_tail=_OWNER_QUEUED[1], held=_HELD[0], held_tail=_HELD[1],
    held_owners=Keys.tk_held_owners, ready=Keys.tk_ready, inflight_set=Keys.tk_inflight,
    samples=Keys.tk_samples, samples_running=Keys.tk_samples_running, done_stream=Keys.tk_done,
    events=Keys.events, closed_ttl_ms=3_600_000,
)
render = OP_NAMES.render

LIB = "\n" + NOW + """\
local BARRIER = {optim_step = true, save_weights = true, save_weights_for_sampler = true, load_weights = true}
local function fut(rid) return '$fut' .. rid end
local function queued_key(owner) return '$owner_queued' .. owner .. '$owner_queued_tail' end
local function held_key(owner) return '$held' .. owner .. '$held_tail' end
local function limit_of(owner, default)
  if owner == '' then return -1 end  -- Redis clients: no API key, no quota
  local v = tonumber(redis.call('HGET', '$apikey' .. owner, 'max_queued_ops'))
  if v == nil then return tonumber(default) end
  return v
end
local function next_rid(exp_id, op_seq)
  return redis.call('ZRANGEBYSCORE', '$ops' .. exp_id, op_seq + 1, op_seq + 1)[1]
end
-- recompute the model's ready entry from its state; a model that becomes ready wakes the leader
local function mark_ready(exp_id)
  local m = '$model' .. exp_id
  local h = redis.call('HMGET', m, 'op_seq', 'inflight', 'token')
  local running = redis.call('HGET', '$exp' .. exp_id, '$status') == 'running'
  local rid = next_rid(exp_id, tonumber(h[1] or 0))
  if not running or (h[2] or '') ~= '' or (h[3] or '') ~= '' or not rid then
    redis.call('SREM', '$ready', exp_id)
    return 0
  end
  if redis.call('SADD', '$ready', exp_id) == 1 then
    -- the linger counts from the op's arrival: an op that waited behind a batch goes out at once
    redis.call('HSET', m, 'ready_at', redis.call('HGET', fut(rid), 'created') or now)
    redis.call('XADD', '$events', 'MAXLEN', '~', $maxlen, '*', 'type', 'op_ready', 'exp', exp_id)
  end
  return 1
end
-- a held or new future enters its queue: a model op its model's zset, a sample the sample queue
local finish_future
local function enter(rid)
  local f = redis.call('HMGET', fut(rid), 'kind', 'exp', 'seq', 'owner')
  if f[1] ~= 'sample' and redis.call('HGET', '$exp' .. f[2], '$status') ~= 'running' then
    redis.call('DEL', '$payload' .. rid)  -- its model was closed while it was held
    finish_future(rid, false, '', 'model ' .. f[2] .. ' is closed', 'user', $closed_ttl_ms)
    return
  end
  redis.call('HSET', fut(rid), 'status', 'queued', 'queue_state', 'active', 'queue_reason', '')
  redis.call('SADD', queued_key(f[4]), rid)
  if f[1] == 'sample' then
    redis.call('ZADD', '$samples', now, rid)
  else
    redis.call('ZADD', '$ops' .. f[2], tonumber(f[3]), rid)
    mark_ready(f[2])
  end
end
local function admit(rid, owner, default, exempt)
  local lim = limit_of(owner, default)
  if lim >= 0 and not exempt and (redis.call('LLEN', held_key(owner)) > 0
                                  or redis.call('SCARD', queued_key(owner)) >= lim) then
    redis.call('RPUSH', held_key(owner), rid)
    redis.call('SADD', '$held_owners', owner)
    redis.call('HSET', fut(rid), 'status', 'held', 'queue_state', 'paused_rate_limit', 'queue_reason',
               'the API key has ' .. lim .. ' queued operations (its max_queued_ops): this one waits')
    return 'held'
  end
  enter(rid)
  return 'queued'
end
local function release_held(owner, default)
  local lim, n = limit_of(owner, default), 0
  while true do
    local rid = redis.call('LINDEX', held_key(owner), 0)
    if not rid then break end
    if lim >= 0 and redis.call('SCARD', queued_key(owner)) >= lim then break end
    redis.call('LPOP', held_key(owner))
    if redis.call('HGET', fut(rid), 'status') == 'held' then enter(rid); n = n + 1 end
  end
  -- an op that later queued ops of its model wait on goes in over the quota: a quota full of ops
  -- waiting on a held one would never free up
  for _, rid in ipairs(redis.call('LRANGE', held_key(owner), 0, 999)) do
    local f = redis.call('HMGET', fut(rid), 'kind', 'exp', 'seq', 'status')
    if f[1] ~= 'sample' and f[4] == 'held'
       and redis.call('ZCOUNT', '$ops' .. f[2], '(' .. f[3], '+inf') > 0 then
      redis.call('LREM', held_key(owner), 1, rid)
      enter(rid)
      n = n + 1
    end
  end
  if redis.call('LLEN', held_key(owner)) == 0 then redis.call('SREM', '$held_owners', owner) end
  return n
end
-- a future finished: its status, result and TTLs, the owner's quota, the wakeup -> its owner
finish_future = function(rid, ok, body, err, category, ttl_ms)
  local f = fut(rid)
  local status = 'failed'
  if ok then status = 'done' end
  if ok and body ~= '' then redis.call('SET', '$result' .. rid, body, 'PX', ttl_ms) end
  redis.call('HSET', f, 'status', status, 'done', now, 'error', err, 'category', category,
             'queue_state', 'active', 'queue_reason', '', 'lease_until', 0)
  redis.call('PEXPIRE', f, ttl_ms)
  local d = redis.call('HGET', f, 'dedupe')
  if d and d ~= '' then redis.call('PEXPIRE', d, ttl_ms) end
  local owner = redis.call('HGET', f, 'owner') or ''
  redis.call('SREM', queued_key(owner), rid)
  redis.call('XADD', '$done_stream', 'MAXLEN', '~', $maxlen, '*', 'rid', rid, 'status', status)
  return owner
end
-- give a model's claim (or published batch) back; after max_attempts counted failures its head
-- op fails with category "server" and the model goes on with the next -> attempts so far
local function give_back(exp_id, count, max_attempts, reason, ttl_ms, default)
  local m = '$model' .. exp_id
  local attempts = redis.call('HINCRBY', m, 'attempts', count)
  redis.call('HSET', m, 'token', '', 'lease_until', 0, 'claim_owner', '', 'claim_n', 0, 'inflight', '',
             'error', reason)
  redis.call('SREM', '$inflight_set', exp_id)
  local op_seq = tonumber(redis.call('HGET', m, 'op_seq') or 0)
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', '$ops' .. exp_id, op_seq + 1, '+inf')) do
    if redis.call('HGET', fut(rid), 'status') == 'running' then
      redis.call('HSET', fut(rid), 'status', 'queued')
    end
  end
  if count > 0 and attempts >= tonumber(max_attempts) then
    local rid = next_rid(exp_id, op_seq)
    if rid then
      redis.call('ZREM', '$ops' .. exp_id, rid)
      redis.call('DEL', '$payload' .. rid)
      local owner = finish_future(rid, false, '', reason .. ' (gave up after ' .. attempts .. ' attempts)',
                                  'server', ttl_ms)
      redis.call('HSET', m, 'op_seq', op_seq + 1, 'attempts', 0)
      release_held(owner, default)
    end
  end
  mark_ready(exp_id)
  return attempts
end
"""

