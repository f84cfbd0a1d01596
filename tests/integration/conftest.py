"""Integration fixtures: real worker and scheduler processes started with `lorafleet worker` /
`lorafleet scheduler`, on the real Redis server of the `redis_url` and `r` fixtures (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from lorafleet.scheduler.embedded import LocalFleet


@pytest.fixture
def fleet_env(tmp_path: Path, model_cache: Path) -> dict[str, str]:
    """Fast failure detection and exact (float64) numerics for the fleet under test."""
    return {
        "LORAFLEET_STORE_URL": f"file://{tmp_path}/store",
        "LORAFLEET_CACHE_DIR": str(model_cache),
        "LORAFLEET_DTYPE": "float64",
        "LORAFLEET_HEARTBEAT_S": "0.5",
        "LORAFLEET_LEASE_MS": "3000",
        "LORAFLEET_UNCLAIMED_TIMEOUT_S": "20",
        "LORAFLEET_LOG_FORMAT": "json",
    }


@pytest.fixture
def make_fleet(r: redis.Redis, redis_url: str, fleet_env: dict[str, str], tmp_path: Path):
    fleets: list[LocalFleet] = []

    def start(workers: int = 1, schedulers: int = 1, env: dict[str, str] | None = None,
              start: bool = True) -> LocalFleet:
        fleet = LocalFleet(workers=workers, redis_url=redis_url, log_dir=tmp_path / "logs",
                           env={**fleet_env, **(env or {})})
        fleets.append(fleet)
        if start:
            fleet.start(schedulers=schedulers)
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()
