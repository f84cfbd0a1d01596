"""Prometheus `/metrics`: fleet series read from Redis on every scrape (identical on every
replica: dashboards take `max without(instance)`), plus this replica's HTTP requests.

A scrape needs a credential (`scrape_credential`): the bearer token LORAFLEET_METRICS_TOKEN, or
an admin API key. Nothing presented or an unknown credential: 401; an ordinary (tenant) key: 403,
since the series describe every tenant's work. With neither configured /metrics is closed, never
open. Per-experiment series (experiment ids and names as labels) are exported only with
`metrics_per_experiment` (on by default: the Grafana dashboard plots them, and whoever scrapes is
an operator; turn it off where the Prometheus readers are a wider audience).

Fleet gauges come from the indexes and heartbeats (`scheduler/fleet_status.py`); counters and
histograms from what the commit paths write (`common/prom_writes.py`). Per-experiment series are
bounded: queued and running experiments, plus those finished within METRICS_FINISHED_TTL_S,
at most METRICS_MAX_EXPERIMENTS (the most recently committed)."""

from __future__ import annotations

import hmac
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.common.keys import Keys
from lorafleet.common.prom_writes import ADAPTER_BUCKETS, BUCKETS, FUSED_ADAPTERS, TIMINGS, TINKER_OPS
from lorafleet.common.settings import Settings
from lorafleet.common.state.phases import PHASES, STATUSES, TERMINAL
from lorafleet.scheduler.api.auth import presented_credential
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.fleet_status import read_fleet_status

router = APIRouter()
HISTOGRAMS: dict[str, tuple[tuple[float, ...], str]] = {
    **{name: (BUCKETS, f"{name.removeprefix('lorafleet_').replace('_', ' ')} per step")
       for name in ("lorafleet_rollout_seconds", *TIMINGS)},
    FUSED_ADAPTERS: (ADAPTER_BUCKETS, "Adapters (Tinker models) fused into one client-op step"),
}


def _labels(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.split(",") if "=" in p)


class FleetCollector(Collector):
    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r, self.settings = r, settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lorafleet_redis_up", "1 when this replica reached Redis for this scrape")
        try:
            out = list(self._fleet())
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from out

    def _fleet(self) -> Iterator[Metric]:
        r = self.r
        status = read_fleet_status(r, 0)
        # experiments by state and kind (one HMGET each: O(experiments) per scrape)
        ids = r.zrange(Keys.experiments, 0, -1)
        pipe = r.pipeline(transaction=False)
        for exp_id in ids:
            pipe.hmget(Keys.experiment(exp_id), ["status", "kind", "finished_at", "name"])
        rows = dict(zip(ids, pipe.execute() if ids else [], strict=True))
        counts = Counter((st or "queued", kind or "rl") for st, kind, _, _ in rows.values())
        g = GaugeMetricFamily("lorafleet_experiments", "Experiments by state and kind",
                              labels=["state", "kind"])
        for state in STATUSES:
            for kind in ("rl", "client"):
                g.add_metric([state, kind], counts.get((state, kind), 0))
        yield g
        yield from self._backlog(status.backing_off)
        g = GaugeMetricFamily("lorafleet_queue_messages", "Messages waiting in each Celery queue",
                              labels=["queue"])
        for q, n in status.queues.items():
            g.add_metric([q], n)
        yield g
        yield GaugeMetricFamily("lorafleet_workers_live", "Workers with a live heartbeat",
                                value=len(status.workers))
        busy = GaugeMetricFamily("lorafleet_worker_busy", "1 while the worker runs a batch", labels=["node"])
        resident = GaugeMetricFamily("lorafleet_worker_resident_adapters", "Adapters held hot on the worker",
                                     labels=["node"])
        for node, beat in status.workers.items():
            busy.add_metric([node], 1 if beat.get("busy") else 0)
            resident.add_metric([node], float(beat.get("resident") or 0))
        yield busy
        yield resident
        yield CounterMetricFamily("lorafleet_dead_letters", "Poison messages taken off the queues",
                                  value=status.dead_letters)
        yield from self._counters()
        yield from self._histograms()
        yield from self._tinker()
        if self.settings.metrics_per_experiment:
            yield from self._last(rows)

    def _backlog(self, backing_off: int) -> Iterator[Metric]:
        r = self.r
        nodes = ["", *sorted(r.smembers(Keys.idx_nodes))]
        pipe = r.pipeline(transaction=False)
        for phase in PHASES:
            for n in nodes:
                pipe.zcard(Keys.ready(phase, n))
        pipe.scard(Keys.tk_ready)
        res = pipe.execute()
        g = GaugeMetricFamily("lorafleet_backlog_experiments",
                              "Experiments ready for a batch and not in one (the real backlog; Celery "
                              "queues stay nearly empty by design)", labels=["phase"])
        for i, phase in enumerate(PHASES):
            g.add_metric([phase], sum(int(x) for x in res[i * len(nodes):(i + 1) * len(nodes)]))
        g.add_metric(["ops"], int(res[-1]))
        yield g
        yield GaugeMetricFamily("lorafleet_backing_off_experiments",
                                "Waiting out a backoff after a failed attempt", value=backing_off)

    def _counters(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        label_names: dict[str, list[str]] = {}
        for field, value in sorted(self.r.hgetall(Keys.prom_counters).items()):
            name, _, text = field.partition("|")
            labels = _labels(text)
            if name not in families:
                label_names[name] = sorted(labels)
                families[name] = CounterMetricFamily(name, f"{name} (written at commit)",
                                                     labels=label_names[name])
            if sorted(labels) == label_names[name]:
                families[name].add_metric([labels[k] for k in label_names[name]], float(value))
        defaults = {"lorafleet_steps_committed_total": ["phase"], "lorafleet_tokens_total": ["phase"],
                    "lorafleet_refused_total": ["reason"], TINKER_OPS: ["op", "outcome"]}
        for name, names in defaults.items():
            if name not in families:  # exported (empty) before the first event
                families[name] = CounterMetricFamily(name, f"{name} (written at commit)", labels=names)
        yield from families.values()

    def _histograms(self) -> Iterator[Metric]:
        pipe = self.r.pipeline(transaction=False)
        for name in HISTOGRAMS:
            pipe.hgetall(Keys.prom_histogram(name))
        for (name, (bounds, doc)), h in zip(HISTOGRAMS.items(), pipe.execute(), strict=True):
            fam = HistogramMetricFamily(name, doc)
            counts = {k.partition("|")[2]: float(v) for k, v in h.items() if k.startswith("|")}
            cumulative, buckets = 0.0, []
            for le in [*(repr(b) for b in bounds), "+Inf"]:
                cumulative += counts.get(le, 0.0)
                buckets.append((le, cumulative))
            fam.add_metric([], buckets, counts.get("sum", 0.0))
            yield fam

    def _tinker(self) -> Iterator[Metric]:
        """Live Tinker futures by status and active sessions, from the OpStore's own indexes:
        O(API keys + client models in flight + models waiting for capacity) per scrape.
        Finished futures are counted by `lorafleet_tinker_ops_total` instead."""
        r = self.r
        owners = ["", *r.zrange(Keys.api_keys, 0, -1)]
        inflight = sorted(r.smembers(Keys.tk_inflight))
        waiting = r.zrange(Keys.tk_waiting, 0, -1)
        pipe = r.pipeline(transaction=False)
        for owner in owners:
            pipe.scard(Keys.tk_owner_queued(owner))
            pipe.llen(Keys.tk_held(owner))
        for exp_id in inflight:
            pipe.hmget(Keys.tk_model(exp_id), ["token", "claim_n"])
        for exp_id in waiting:
            pipe.zcard(Keys.tk_ops(exp_id))
        pipe.zcard(Keys.tk_samples_running)
        pipe.zcard(Keys.tk_sessions)
        res = pipe.execute()
        n = 2 * len(owners)
        pending, held = sum(res[0:n:2]), sum(res[1:n:2])
        claimed = sum(int(c or 0) for token, c in res[n:n + len(inflight)] if token)
        paused = sum(res[n + len(inflight):n + len(inflight) + len(waiting)])
        running = claimed + int(res[-2])
        g = GaugeMetricFamily("lorafleet_tinker_futures", "Tinker futures not finished yet, by status "
                              "(paused_capacity: ops of models over their key's max_experiments)",
                              labels=["status"])
        for status, value in (("queued", max(0, pending - running - paused)), ("running", running),
                              ("held", held), ("paused_capacity", paused)):
            g.add_metric([status], value)
        yield g
        yield GaugeMetricFamily("lorafleet_tinker_sessions_active",
                                "Tinker sessions alive (heartbeating, not finished)", value=int(res[-1]))

    def _last(self, rows: dict[str, list[Any]]) -> Iterator[Metric]:
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.settings.metrics_finished_ttl_s * 1000)
        keep: list[tuple[int, str, str, dict[str, Any]]] = []
        gone = []
        for exp_id, raw in self.r.hgetall(Keys.prom_last).items():
            row = rows.get(exp_id)
            if row is None:
                gone.append(exp_id)
                continue
            st, _, finished_at, name = row
            if st in TERMINAL and now_ms - int(finished_at or 0) > ttl_ms:
                gone.append(exp_id)  # finished a while ago: its series ends (bounded cardinality)
                continue
            try:
                last = json.loads(raw)
            except ValueError:
                continue
            keep.append((int(last.get("at") or 0), exp_id, name or "", last))
        if gone:
            self.r.hdel(Keys.prom_last, *gone)
        keep = sorted(keep, reverse=True)[:self.settings.metrics_max_experiments]
        reward = GaugeMetricFamily("lorafleet_experiment_last_reward",
                                   "Mean reward of the last committed step", labels=["experiment", "name"])
        step = GaugeMetricFamily("lorafleet_experiment_step", "Committed train steps", labels=["experiment"])
        for _, exp_id, name, last in keep:
            if isinstance(last.get("reward"), int | float):
                reward.add_metric([exp_id, name], float(last["reward"]))
            step.add_metric([exp_id], float(last.get("step") or 0))
        yield reward
        yield step


class HttpMetrics:
    """This replica's requests by route template (bounded), method and status code."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = PromCounter("lorafleet_api_requests", "HTTP requests served by this replica",
                                    ["route", "method", "code"], registry=registry)
        self.seconds = PromHistogram("lorafleet_api_request_seconds", "HTTP request time (to the response "
                                     "start)", ["route"], registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, code = time.perf_counter(), 500

        async def sent(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
                route = getattr(scope.get("route"), "path", "unmatched")
                self.seconds.labels(route).observe(time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(route, scope.get("method", ""), str(code)).inc()


def metrics_registry(r: redis.Redis, settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(r, settings))
    return registry


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="lorafleet metrics"'}


def scrape_credential(request: Request) -> None:
    """Admit a scrape: the metrics token (compared in constant time) or an admin API key."""
    presented = presented_credential(request)
    if presented is None:
        raise ApiError(401, "unauthenticated", "a scrape credential is required: Authorization: Bearer "
                       "<LORAFLEET_METRICS_TOKEN> or an admin API key", headers=_CHALLENGE)
    token = request.app.state.settings.metrics_token
    if token and hmac.compare_digest(presented.encode(), token.encode()):
        return
    key = ApiKeyStore(request.app.state.redis).verify(presented)
    if key is None:
        raise ApiError(401, "unauthenticated", "unknown scrape credential", headers=_CHALLENGE)
    if not key.admin:
        raise ApiError(403, "forbidden", "/metrics needs LORAFLEET_METRICS_TOKEN or an admin key")


@router.get("/metrics", summary="Prometheus exposition (fleet series from Redis, this replica's HTTP); "
            "Authorization: Bearer <LORAFLEET_METRICS_TOKEN> or an admin API key",
            responses={200: {"content": {"text/plain": {}}}}, response_class=Response,
            dependencies=[Depends(scrape_credential)])
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
