"""The structured records the throughput benchmark reads from a fleet's Redis (never log text).

- `lf:events` (Keys.events): `submitted`, `rollout_committed`, `train_committed`, `completed`,
  `failed`, `cancelled`, each with `exp`. An entry id's first part is the Redis server clock in
  ms: the embedded Redis runs on this machine, so it is the same wall clock as `time.time()`.
- `lf:worker_tasks` (Keys.worker_tasks): one entry per Celery task a worker ran, written at the
  end of the task: node, worker ("w0:<pid>"), task_id, kind (rollout | train), started and ended
  (epoch seconds, `time.time()` of the worker), outcome (ok | error | invalid).
- `lf:worker:<node>` (Keys.worker(node)): the worker's heartbeat JSON, with `busy` (it holds
  claims) and `at` (when it was written), renewed every `heartbeat_s`.
- per-step metrics (FleetClient.metrics): `worker` and `time` (just before the train commit).
"""

from __future__ import annotations

import json
import time
from typing import Any

from throughput_config import TERMINAL_EVENTS


def stream_time(entry_id: str) -> float:
    """Wall-clock seconds of a Redis stream entry id ("<ms>-<seq>")."""
    return int(str(entry_id).split("-", 1)[0]) / 1000.0


class Completions:
    """Follows `lf:events` from now on; `wait` returns when every id reached a terminal event."""

    def __init__(self, r: Any) -> None:
        from lorafleet.common.keys import Keys

        self.r, self.key = r, Keys.events
        last = r.xrevrange(self.key, count=1)
        self.last = last[0][0] if last else "0"
        self.wall: dict[str, float] = {}  # exp id -> wall time of its terminal event (stream clock)

    def wait(self, ids: set[str], timeout_s: float, fleet: Any) -> dict[str, float]:
        """-> exp id -> monotonic time at which this client saw its terminal event."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while ids - done.keys():
            got = self.r.xread({self.key: self.last}, block=250, count=1000)
            now = time.monotonic()
            for _, entries in got or []:
                for event_id, fields in entries:
                    self.last = event_id
                    exp = fields.get("exp")
                    if fields.get("type") in TERMINAL_EVENTS and exp in ids and exp not in done:
                        done[exp] = now
                        self.wall[exp] = stream_time(event_id)
            if now > deadline:
                raise TimeoutError(f"{len(ids - done.keys())} experiment(s) not done after {timeout_s}s")
            dead = [k for k, p in fleet.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"fleet process(es) exited: {dead}; see {fleet.log_dir}/")
        return done


def task_entries(r: Any) -> list[dict[str, Any]]:
    """Every `lf:worker_tasks` entry as {node, worker, task_id, kind, outcome, start, end,
    duration, id}, in end order; malformed entries are skipped."""
    from lorafleet.common.keys import Keys

    out = []
    for entry_id, f in r.xrange(Keys.worker_tasks, "-", "+"):
        try:
            start, end = float(f["started"]), float(f["ended"])
            out.append({"node": f["node"], "worker": f.get("worker", ""), "task_id": f.get("task_id", ""),
                        "kind": f.get("kind", ""), "outcome": f.get("outcome", ""), "start": start,
                        "end": end, "duration": end - start, "id": entry_id})
        except (KeyError, ValueError):
            continue
    return sorted(out, key=lambda t: t["end"])


def pending_intervals(r: Any, ids: list[str]) -> list[tuple[float, float]]:
    """[submitted, terminal] wall-clock interval of each of `ids` that has both events."""
    from lorafleet.common.keys import Keys

    wanted = set(ids)
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for entry_id, f in r.xrange(Keys.events, "-", "+"):
        exp = f.get("exp")
        if exp not in wanted:
            continue
        if f.get("type") == "submitted":
            start.setdefault(exp, stream_time(entry_id))
        elif f.get("type") in TERMINAL_EVENTS:
            end.setdefault(exp, stream_time(entry_id))
    return [(start[e], end[e]) for e in ids if e in start and e in end]


def last_commits(experiments: list[dict[str, Any]]) -> dict[str, float]:
    """Node -> wall time of the last train commit a worker of that node made (metrics `time`)."""
    out: dict[str, float] = {}
    for e in experiments:
        for m in e["metrics"]:
            if "time" in m and m.get("worker"):
                node = str(m["worker"]).split(":")[0]
                out[node] = max(out.get(node, 0.0), float(m["time"]))
    return out


def heartbeat(r: Any, node: str) -> dict[str, Any] | None:
    from lorafleet.common.keys import Keys

    raw = r.get(Keys.worker(node))
    try:
        return json.loads(raw) if raw else None
    except (TypeError, ValueError):
        return None


def node_settled(r: Any, node: str, entries: list[dict[str, Any]], last_commit: float | None,
                 done_wall: float) -> bool:
    """Has `node` recorded every task that matters for the run ending at `done_wall`?

    The task that made the node's last commit must be in the stream (every commit happens inside
    a task, so that task ends after it); and either a task of the node ended at or after the
    run's end (the task running when the last experiment completed has recorded), or the
    heartbeat, written after the run's end, says the worker holds no claims (or it is gone)."""
    ends = [t["end"] for t in entries if t["node"] == node]
    if last_commit is not None and not any(end >= last_commit for end in ends):
        return False
    if ends and max(ends) >= done_wall:
        return True
    beat = heartbeat(r, node)
    return beat is None or (not beat.get("busy") and float(beat.get("at", 0.0)) >= done_wall)


def wait_for_task_records(r: Any, nodes: list[str], last_commit: dict[str, float], done_wall: float,
                          timeout_s: float = 20.0) -> bool:
    """Wait until every node has settled (see `node_settled`): a worker records its task at the
    task's end, a moment after the last commit the client saw, and stopping the fleet before
    that would lose the entry. -> False when `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = task_entries(r)
        if all(node_settled(r, n, entries, last_commit.get(n), done_wall) for n in nodes):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
