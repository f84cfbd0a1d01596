"""Checkpoint retention: which published versions of an experiment may be deleted.

Every train step publishes a version; nothing has to keep them all. A version is kept if it is
one of the `keep_last` newest committed versions, a multiple of `keep_every` (milestones), v0
(the starting point), newer than the committed version (an attempt in flight may be writing
or about to commit it), or the newest snapshot at or below the committed version and, while
the experiment is not finished, every version after it (recovery replays from that snapshot,
and a replayed step reads the committed version it made: its weights and its recorded step
layout, `workers/replay.py`; once finished, `lorafleet gc` removes them). A sampler only ever
loads the committed version of its step, which is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def doomed_versions(published: Iterable[int], committed: int, keep_last: int | None,
                    keep_every: int | None, snapshots: Iterable[int] = (),
                    pinned: Iterable[int] = (), replays: bool = True) -> list[int]:
    """The versions of `published` that retention deletes, ascending (none if keep_last is None);
    `snapshots`: the versions that hold the AdamW state (the newest <= committed is kept, and
    every version after it: what recovery replays through);
    `pinned`: versions a client model saved under a name (`OpStore.pinned_versions`), kept.
    `replays`: the experiment may still be rebuilt by a replay (it is not finished), so the
    versions after the recovery snapshot are kept too; a finished one keeps the snapshot only."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    newest_kept = committed - keep_last  # versions above this (up to committed) are kept
    recovery = max((s for s in snapshots if s <= committed), default=None)
    keep = set(pinned)
    return sorted(v for v in published
                  if 0 < v <= newest_kept and not (keep_every and v % keep_every == 0)
                  and v != recovery and not (replays and recovery is not None and v > recovery)
                  and v not in keep)


def retention_of(spec: Any, settings: Any) -> tuple[int | None, int]:
    """(keep_last, keep_every) of an experiment: its spec's `retention` over the fleet's."""
    own = getattr(spec, "retention", None)
    keep_last = own.keep_last if own is not None and own.keep_last is not None else settings.keep_last
    keep_every = own.keep_every if own is not None and own.keep_every is not None else settings.keep_every
    return keep_last, keep_every
