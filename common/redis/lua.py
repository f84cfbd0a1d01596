"""How lorafleet writes its Redis Lua scripts: templates with `$name` placeholders, rendered once
at import.

A script spells the hash fields, key prefixes, phase names and limits it uses as `$name`
(`'$status'`, `'$idx_queued' .. id`, `'$phase_train'`, `$stream_maxlen`), never literally. A
`LuaNames` table maps each name to its text, taken from the name's owner (`FIELD_NAMES` of
`ExperimentRecord`, `Keys`, the phase machine), and `render` substitutes them and raises KeyError
on any name the table lacks: a renamed field or key breaks the import, not a script in Redis.
Fields of hashes that one script family owns alone (a task's `status`, `token`) stay literal.

Each family builds one table: the indexes (`common/state/index_lua.py`), the step protocol
(`common/state/protocol_lua.py`, the index table plus its limits) and the client-op protocol
(`common/tinker/op_lua_lib.py`). Lua functions shared by several scripts are plain template
snippets put before the script body (`NOW` here, `INDEX_LUA`, the op protocol's `LIB`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from string import Template

# The server clock in ms as the local `now`: lease times never come from a client's clock.
NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"


@dataclass(frozen=True)
class LuaNames:
    """The `$names` a family of scripts may use, and their text."""

    names: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, fields: Iterable[str] = (), **values: object) -> LuaNames:
        """`fields` render as themselves (hash field names), `values` as given."""
        return cls({}).with_names(fields, **values)

    def with_names(self, fields: Iterable[str] = (), **values: object) -> LuaNames:
        """This table and more names; a name defined twice raises (two owners for one name)."""
        more: dict[str, object] = {name: name for name in fields}
        more.update(values)
        clash = set(more) & set(self.names)
        if clash:
            raise ValueError(f"Lua names defined twice: {sorted(clash)}")
        return LuaNames({**self.names, **more})

    def render(self, *parts: str) -> str:
        """The script `parts` (snippets, then the body) with every `$name` replaced."""
        return Template("".join(parts)).substitute(self.names)


def key_affixes(key_of: Callable[[str], str]) -> tuple[str, str]:
    """The text before and after the id in the keys `key_of(id)` builds: Lua writes
    `'$head' .. id .. '$tail'` for a key whose name it only learns while it runs."""
    head, tail = key_of("\x00").split("\x00")
    return head, tail
