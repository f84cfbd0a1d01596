"""Registered code found by name: the built-ins first, then the entry points of one group.

The one lookup behind reward environments (`envs.py`, group `lorafleet.envs`) and reward
functions (`rewards.py`, group `lorafleet.rewards`). Pure Python and torch-free: the scheduler
validates names at submit time.

- A built-in wins over an entry point of its name: a third-party plugin cannot shadow it, and the
  built-ins work before the package metadata is refreshed (an editable install whose entry points
  predate them).
- Listing the names imports no plugin's code.
- An unknown name is an error (of the registry's `ValueError` subclass) that lists every known
  name; a plugin that fails to load, or loads into something its registry refuses, is an error
  that names the plugin and its `module:object`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any


class EntryPointRegistry:
    """Names of built-ins and of the entry points of `group`, and their objects.

    `kind` names a registered thing in errors ("env", "reward fn"), `known` introduces the list
    of names in the unknown-name error, `refuse` says what is wrong with a loaded plugin object
    (None: nothing).
    """

    def __init__(
        self,
        group: str,
        builtins: Mapping[str, Any],
        *,
        kind: str,
        known: str,
        error: type[ValueError],
        refuse: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.group = group
        self.builtins = builtins
        self.kind = kind
        self.known = known
        self.error = error
        self.refuse = refuse

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        """The group's installed entry points by name (read fresh: plugins may come and go)."""
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every registered name, without importing any plugin's code."""
        return sorted(set(self.builtins) | set(self.entry_points()))

    def get(self, name: str) -> Any:
        """The built-in or the loaded plugin object named `name`."""
        if name in self.builtins:
            return self.builtins[name]
        ep = self.entry_points().get(name)
        if ep is None:
            raise self.error(f"unknown {self.kind} {name!r}; {self.known}: {', '.join(self.names())}")
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin is that name's problem, reported by name
            raise self.error(f"{self.kind} {name!r} ({ep.value}) failed to load: {e!r}") from e
        problem = self.refuse(obj) if self.refuse is not None else None
        if problem is not None:
            raise self.error(f"{self.kind} {name!r} ({ep.value}) {problem}")
        return obj
