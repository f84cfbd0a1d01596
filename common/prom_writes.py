"""Prometheus counters and histograms kept in Redis, written where the events happen (the
commit paths of `common/state/protocol.py`), read by the `/metrics` collector of every API replica
(`scheduler/api/metrics.py`), so each replica exports the same fleet-wide series.

Formats (`common/keys.py`): `Keys.prom_counters` hash "<name>|<k>=<v>,..." -> count;
`Keys.prom_histogram(name)` hash "<labels>|<le>" -> observations in that bucket (not cumulative),
"<labels>|sum" and "<labels>|count"; `Keys.prom_last` hash experiment id -> JSON
{step, reward, at}. They are written after the commit's own round trip: a lost reply that is
retried may count a step twice (metrics, not the record of truth), and a failed write is dropped
rather than failing a commit that succeeded.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from lorafleet.common.keys import Keys

log = logging.getLogger(__name__)

BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# histogram name -> the train commit metric it observes (each item of a batch carries the
# batch's time: these are per experiment-step observations of how long its batch took)
TIMINGS = {"lorafleet_train_seconds": "train_s", "lorafleet_publish_seconds": "publish_s",
           "lorafleet_score_seconds": "score_s"}  # score_s: one experiment's reward scoring
# adapters (client models) per fused client-op step (`OpStore.record_fused_step`)
FUSED_ADAPTERS = "lorafleet_fused_batch_adapters"
ADAPTER_BUCKETS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TINKER_OPS = "lorafleet_tinker_ops_total"  # labels op (the op kind, or "sample"), outcome


def counter_field(name: str, **labels: str) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def bucket_of(value: float, buckets: tuple[float, ...] = BUCKETS) -> str:
    for le in buckets:
        if value <= le:
            return repr(le)
    return "+Inf"


def observe(pipe: Any, name: str, value: float, labels: str = "",
            buckets: tuple[float, ...] = BUCKETS) -> None:
    if not math.isfinite(value) or value < 0:
        return
    key = Keys.prom_histogram(name)
    pipe.hincrby(key, f"{labels}|{bucket_of(value, buckets)}", 1)
    pipe.hincrby(key, f"{labels}|count", 1)
    pipe.hincrbyfloat(key, f"{labels}|sum", value)


def _number(m: Mapping[str, Any], key: str) -> float | None:
    v = m.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def record(r: redis.Redis, *, rollouts: Iterable[Mapping[str, Any]] = (),
           trains: Iterable[tuple[str, int, Mapping[str, Any]]] = (),
           refused: Iterable[str] = (), now_ms: int = 0) -> None:
    """Count committed rollouts (their summaries), committed train steps ((exp id, step,
    metrics)), and refused claims/commits (their "claim:reason" / "commit:reason")."""
    pipe = r.pipeline(transaction=False)
    n = 0
    for summary in rollouts:
        n += 1
        pipe.hincrby(Keys.prom_counters, counter_field("lorafleet_steps_committed_total", phase="rollout"), 1)
        tokens = _number(summary, "rollout_tokens")
        if tokens:
            pipe.hincrby(Keys.prom_counters, counter_field("lorafleet_tokens_total", phase="rollout"),
                         int(tokens))
        seconds = _number(summary, "rollout_s")
        if seconds is not None:
            observe(pipe, "lorafleet_rollout_seconds", seconds)
    for exp_id, step, metrics in trains:
        n += 1
        pipe.hincrby(Keys.prom_counters, counter_field("lorafleet_steps_committed_total", phase="train"), 1)
        tokens = _number(metrics, "train_tokens")
        if tokens:
            pipe.hincrby(Keys.prom_counters, counter_field("lorafleet_tokens_total", phase="train"),
                         int(tokens))
        for hist, field in TIMINGS.items():
            seconds = _number(metrics, field)
            if seconds is not None:
                observe(pipe, hist, seconds)
        reward = _number(metrics, "reward_mean")
        pipe.hset(Keys.prom_last, exp_id, json.dumps({"step": step + 1, "reward": reward, "at": now_ms}))
    for reason in refused:
        n += 1
        pipe.hincrby(Keys.prom_counters, counter_field("lorafleet_refused_total", reason=reason), 1)
    if not n:
        return
    try:
        pipe.execute()
    except redis.RedisError as exc:  # the commit itself succeeded: never fail it for a metric
        log.warning("prometheus counters not written: %r", exc)


def record_client_ops(r: redis.Redis, outcomes: Iterable[tuple[str, str]] = (),
                      fused_adapters: int | None = None) -> None:
    """Count finished Tinker ops ((op kind, outcome "ok" | "user_error" | "server_error")) and
    observe one fused client-op step's adapter count. Written after the commit, like `record`."""
    pipe = r.pipeline(transaction=False)
    n = 0
    for op, outcome in outcomes:
        n += 1
        pipe.hincrby(Keys.prom_counters, counter_field(TINKER_OPS, op=op, outcome=outcome), 1)
    if fused_adapters is not None:
        n += 1
        observe(pipe, FUSED_ADAPTERS, float(fused_adapters), buckets=ADAPTER_BUCKETS)
    if not n:
        return
    try:
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("prometheus counters not written: %r", exc)


def outcome(ok: bool, category: str) -> str:
    return "ok" if ok else ("user_error" if category == "user" else "server_error")
