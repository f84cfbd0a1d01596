"""The Lua core of the experiment indexes (`common/state/ready_index.py`): which entries an experiment's
hash implies, and how a script moves them when it changes the hash. Kept apart so that both
`protocol_lua.py` (the step protocol's scripts) and `ready_index.py` (the index's own scripts)
embed it; both render their scripts with `INDEX_NAMES` (`common/redis/lua.py`: record fields,
phase names, these key prefixes).

Every script that changes status, node, phase, inflight or not_before takes `local was =
entries(exp, id, true)` before its writes and calls `reindex(exp, id, was)` after them, in the
same atomic step, so the indexes always equal a full scan of the hashes. `reindex` writes only
what changed (a step's four transitions cost about five index commands each). Ready or backing
off depends on the clock at the time of writing, so `was` names both, and a zset entry is always
written again (ZADD is idempotent). A ready member is "<created_at, 15 digits>:<id>": with the
score (rows served / weight) the zset's own order is the scheduler's fair order (fair key, then
age, then id)."""

from __future__ import annotations

from lorafleet.common.keys import Keys
from lorafleet.common.redis.lua import LuaNames
from lorafleet.common.state import phases
from lorafleet.common.state.experiment import FIELD_NAMES

INDEX_NAMES = LuaNames.of(
    FIELD_NAMES, **phases.LUA_NAMES,
    exp_prefix=Keys.experiment_prefix, idx_queued=Keys.idx_queued, idx_waiting=Keys.idx_waiting,
    idx_inflight=Keys.idx_inflight, idx_backoff=Keys.idx_backoff, idx_nodes=Keys.idx_nodes,
    idx_ready=Keys.idx_ready_prefix, idx_node=Keys.idx_node_prefix,
)

# Entries are a table "<key>\n<member>" -> 's' (a set member) or the score (a zset member).
INDEX_LUA = """
local function str(v) if v then return v end return '' end
local function ready_member(created_at, id)
  return string.format('%015d', tonumber(created_at) or 0) .. ':' .. id
end
local function entries(exp, id, both)
  local e = redis.call('HMGET', exp, '$status', '$node', '$phase', '$inflight', '$not_before', '$served',
                       '$weight', '$created_at', '$kind')
  local out = {}
  if e[9] == 'client' then return out end  -- a client-driven model: dispatched by its ops (tk:ready)
  if e[1] == 'queued' then
    out['$idx_queued\\n' .. id] = 's'
    out['$idx_waiting\\n' .. id] = 's'
  end
  if e[1] ~= 'running' then return out end
  local node = str(e[2])
  if node ~= '' then out['$idx_node' .. node .. '\\n' .. id] = 's' end
  if str(e[4]) ~= '' then
    out['$idx_inflight\\n' .. id] = 's'
    return out
  end
  out['$idx_waiting\\n' .. id] = 's'
  local not_before = tonumber(e[5]) or 0
  if both or not_before > now then out['$idx_backoff\\n' .. id] = not_before end
  if both or not_before <= now then
    local ready = '$idx_ready' .. str(e[3]) .. ':' .. node .. '\\n' .. ready_member(e[8], id)
    out[ready] = (tonumber(e[6]) or 0) / (tonumber(e[7]) or 1)
  end
  return out
end
local function split(k)
  local i = string.find(k, '\\n', 1, true)
  return string.sub(k, 1, i - 1), string.sub(k, i + 1)
end
local function reindex(exp, id, was)
  local new = entries(exp, id, false)
  for k, v in pairs(was) do
    if new[k] == nil then
      local key, member = split(k)
      if v == 's' then redis.call('SREM', key, member) else redis.call('ZREM', key, member) end
    end
  end
  for k, v in pairs(new) do
    local key, member = split(k)
    if v ~= 's' then
      redis.call('ZADD', key, v, member)
    elseif was[k] == nil then
      redis.call('SADD', key, member)
      if string.sub(key, 1, #'$idx_node') == '$idx_node' then
        redis.call('SADD', '$idx_nodes', string.sub(key, #'$idx_node' + 1))
      end
    end
  end
end
local function purge(exp, id)
  local e = redis.call('HMGET', exp, '$node', '$phase', '$created_at')
  redis.call('SREM', '$idx_queued', id)
  redis.call('SREM', '$idx_waiting', id)
  redis.call('SREM', '$idx_inflight', id)
  redis.call('ZREM', '$idx_backoff', id)
  redis.call('ZREM', '$idx_ready' .. str(e[2]) .. ':' .. str(e[1]), ready_member(e[3], id))
  if str(e[1]) ~= '' then redis.call('SREM', '$idx_node' .. e[1], id) end
end
"""
