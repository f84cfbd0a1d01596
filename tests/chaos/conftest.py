"""Chaos tests run a real fleet (workers, scheduler, Redis) and break things around it: they use
the fleet fixtures of tests/integration (pytest_plugins is only allowed in the root conftest)."""

from __future__ import annotations

from integration.conftest import fleet_env, make_fleet  # noqa: F401 - fixtures
