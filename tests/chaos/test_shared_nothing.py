"""Nodes that share nothing but Redis and the store (issue 14): every worker and the scheduler
has its own cache dir, HOME, TMPDIR and working directory, and each builds its own copy of the
base model; the store is a real S3-compatible server (moto_server), so every checkpoint crosses
through S3. Where namespaces are allowed (root), each node also runs in its own mount + network
namespaces: read-only file system but for its own directory, and only Redis and S3 reachable
(nodekit.py, netns_relay.py). The kill -9 storm and the scale-out rebalance pass unchanged."""

from __future__ import annotations

import socket
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from chaoskit import ChaosRedis, assert_exact, wait_until
from integration.test_fleet import SCALE_OUT_ENV, scale_out
from nodekit import (
    HostRelay,
    SharedNothingFleet,
    assert_shared_nothing,
    namespaces_available,
    probe_from_inside,
    processes_per_experiment,
)
from s3_server import S3Server
from test_infra_faults import FAST_FAULTS, STORM_ENV, _submit, chaos_redis, kill_storm  # noqa: F401 - fixture

from lorafleet.common.redis.connection import connect
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow


@pytest.fixture
def nothing_fleet(chaos_redis: ChaosRedis, fleet_env: dict[str, str], s3_server: S3Server,  # noqa: F811
                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """start(workers, env) -> a started SharedNothingFleet on its own S3 prefix (fleet_env's
    LORAFLEET_STORE_URL is set to it: the test process reads the store there too)."""
    for name, value in s3_server.env().items():  # this process: the client and assert_exact
        monkeypatch.setenv(name, value)
    fleet_env["LORAFLEET_STORE_URL"] = s3_server.url(f"nothing-{uuid.uuid4().hex[:8]}")
    ports = {"redis": chaos_redis.port, "s3": urlsplit(s3_server.endpoint_url).port or 80}
    relay = HostRelay(ports) if namespaces_available() else None
    fleets: list[SharedNothingFleet] = []

    def start(workers: int, env: dict[str, str]) -> SharedNothingFleet:
        fleet = SharedNothingFleet(tmp_path / "nodes", relay, workers=workers, redis_url=chaos_redis.url,
                                   log_dir=tmp_path / "logs",
                                   env={**fleet_env, **FAST_FAULTS, **s3_server.env(), **env})
        fleets.append(fleet)
        return fleet.start(wait_s=180)

    yield start
    for fleet in fleets:
        fleet.stop()
    if relay is not None:
        relay.stop()


def test_kill_storm_shared_nothing(nothing_fleet, chaos_redis, fleet_env, model_cache) -> None:  # noqa: F811
    """Workers killed -9 at random moments and restarted (each on its own node directory, in
    fresh namespaces) while 3 experiments run: every experiment exact (assert_exact); adapters
    moved between worker processes, which here only S3 connects."""
    fleet = nothing_fleet(workers=2, env=STORM_ENV)
    client, sp, ids = _submit(chaos_redis, fleet_env, 3, steps=16)
    # every experiment trained by its first process before the storm, so a kill of a node that
    # holds one hands it to another process (seed 6 kills both nodes; seed 7 killed w0 five times
    # within 6.6 s of the submit, before it had trained anything: nothing was handed over)
    wait_until(lambda: min(client.get(i).step for i in ids) >= 1, timeout_s=180, what="a step of each")
    kills = kill_storm(fleet, client, ids, kills=5, seed=6)
    client.wait(ids, timeout_s=600)
    assert kills == 5, f"the run ended after {kills} kills: make it longer"
    store_url = fleet_env["LORAFLEET_STORE_URL"]
    assert_exact(client, store_url, ids, sp, model_cache, connect(chaos_redis.url))
    assert_shared_nothing(fleet, model_cache)
    handed_over = processes_per_experiment(client, ids)
    assert max(handed_over.values()) >= 2, handed_over  # (kills need not hit every experiment)


def test_scale_out_rebalance_shared_nothing(nothing_fleet, chaos_redis, fleet_env,  # noqa: F811
                                            model_cache) -> None:
    """w1 joins mid-run on a node of its own (its own cache, its own base model build) and takes
    over 2 of w0's 4 experiments from their S3 checkpoints; every step runs exactly once. Then,
    from inside w1's namespaces: only `lo`, Redis and S3 answer, another port listening on the
    host does not, and a write outside its own directory fails."""
    fleet = nothing_fleet(workers=1, env=SCALE_OUT_ENV)
    client = FleetClient(chaos_redis.url, fleet_env["LORAFLEET_STORE_URL"])
    by_node = scale_out(fleet, client, connect(chaos_redis.url), steps=30)
    assert set(by_node) == {"w0", "w1"}
    assert_shared_nothing(fleet, model_cache)
    if fleet.relay is None:
        warnings.warn("no mount/network namespaces here (not root): directories isolated only", stacklevel=1)
        return
    with socket.create_server(("127.0.0.1", 0)) as other:  # a host service a node must not reach
        for name in ("w1", "scheduler"):
            seen = probe_from_inside(fleet, name, fleet.relay.ports, other.getsockname()[1], model_cache)
            assert seen["interfaces"] == ["lo"], (name, seen)
            assert str(seen["redis"]).startswith("+PONG"), (name, seen)
            assert str(seen["s3"]).startswith("HTTP/1."), (name, seen)
            assert seen["other"] == "ConnectionRefusedError:111", (name, seen)
            assert seen["own"] == "written", (name, seen)
            assert seen["shared"] == "OSError:30", (name, seen)  # EROFS: the shared cache is not writable
