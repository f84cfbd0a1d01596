"""Per-key limits on running experiments: over the limit an experiment is accepted and stays
queued; the leader activates it when one of the owner's experiments finishes."""

from __future__ import annotations

from collections.abc import Iterable

import redis

from lorafleet.common.keys import Keys


def activatable(r: redis.Redis, queued: Iterable[str], default_max: int) -> list[str]:
    """The queued experiments the leader may activate now, oldest first per owner: all of those
    without an owner (Redis clients), and for each API key as many as keep its running count
    within its `max_experiments` (the key's, else `default_max`).

    Costs one round trip when no queued experiment has an owner; else O(the owners' active
    experiments) reads, only on ticks where something is queued."""
    ids = sorted(queued)
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for exp_id in ids:
        pipe.hmget(Keys.experiment(exp_id), ["owner", "created_at"])
    rows = pipe.execute()
    out: list[str] = []
    by_owner: dict[str, list[tuple[int, str]]] = {}
    for exp_id, (owner, created) in zip(ids, rows, strict=True):
        if owner:
            by_owner.setdefault(owner, []).append((int(created or 0), exp_id))
        else:
            out.append(exp_id)
    if not by_owner:
        return out
    owners = sorted(by_owner)
    pipe = r.pipeline(transaction=False)
    for owner in owners:
        pipe.hget(Keys.api_key(owner), "max_experiments")
        pipe.zrange(Keys.owner_experiments(owner), 0, -1)
    res = pipe.execute()
    queued_set = set(ids)
    for i, owner in enumerate(owners):
        limit_raw, exps = res[2 * i], res[2 * i + 1]
        limit = int(limit_raw) if limit_raw else default_max
        others = [e for e in exps if e not in queued_set]
        running = 0
        if others:  # active and not queued = running (queued ones are all in `queued_set`),
            # except client models waiting for a slot themselves (client_capacity.py)
            active = r.smismember(Keys.active, others)
            waiting = r.zmscore(Keys.tk_waiting, others)
            running = sum(1 for hit, w in zip(active, waiting, strict=True) if hit and w is None)
        free = max(0, limit - running)
        out += [exp_id for _, exp_id in sorted(by_owner[owner])[:free]]
    return sorted(out)
