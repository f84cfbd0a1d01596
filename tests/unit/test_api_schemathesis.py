"""Schemathesis fuzzes every operation of the OpenAPI schema of the in-process app against a
real Redis with an admin key: no input may produce a 5xx. The SSE streams (they never end on
their own) are covered by test_api_native.py instead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from lorafleet.common.redis.connection import connect
from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore

SPEC = {"name": "fz", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2,
        "prompts_per_step": 2, "group_size": 2}


@pytest.fixture(scope="module")
def fuzz_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[tuple[object, dict[str, str]]]:
    r: redis.Redis = connect(redis_url)
    r.flushdb()
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(redis_url=redis_url, store_url=str(tmp / "store"), cache_dir=str(tmp / "cache"),
                              api_max_body_bytes=256 * 1024), r)
    _, plaintext = ApiKeyStore(r).create("fuzzer", admin=True)
    # one real experiment, so that fuzzed ids sometimes hit something (schemathesis also reuses
    # the ids it sees in responses)
    from lorafleet.scheduler.registry import ExperimentRegistry

    ExperimentRegistry(r).submit(SPEC)
    yield app, {"X-API-Key": plaintext}
    r.flushdb()


def test_no_server_errors(fuzz_env) -> None:
    """Every operation, ~20 derandomized examples each (the pytest plugin of schemathesis does
    not run under this pytest, so the operations are driven through hypothesis directly)."""
    app, headers = fuzz_env
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # SSE streams never end on their own; forward_backward takes protobuf bodies (fuzzed apart)
    schema.exclude(path_regex=r"/events$|/api/v1/forward_backward$")
    failures: dict[str, str] = {}
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=20, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # collect them all: one report names every failing operation
            failures[op.label] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        ran += 1
    assert ran >= 12
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())


def test_schema_lists_the_native_routes(fuzz_env) -> None:
    app, _ = fuzz_env
    paths = set(app.openapi()["paths"])
    assert {"/v1/experiments", "/v1/experiments/{exp_id}", "/v1/experiments/{exp_id}/cancel",
            "/v1/experiments/{exp_id}/extend", "/v1/experiments/{exp_id}/metrics",
            "/v1/experiments/{exp_id}/events", "/v1/events", "/v1/experiments/{exp_id}/versions",
            "/v1/experiments/{exp_id}/versions/{version}/archive", "/v1/experiments/{exp_id}/retention",
            "/v1/experiments/{exp_id}/versions/{version}", "/v1/fleet", "/v1/validate", "/healthz",
            "/v1/datasets", "/v1/datasets/{ds_id}",
            "/readyz"} <= paths

