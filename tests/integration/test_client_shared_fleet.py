"""On a live fleet (real Redis, a `lorafleet worker` process, the scheduler): a client sample
request is served inside a running RL experiment's rollout batch (workers/tinker/generation.py),
long before the leader's own sample batch would go out (its linger is set to 20 s here)."""

from __future__ import annotations

import time

import pytest

from lorafleet.common.keys import Keys
from lorafleet.common.tinker.op_store import OpStore
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow

LINGER_MS = 20_000


def test_a_client_sample_rides_in_a_running_rl_rollout_batch(make_fleet, redis_url: str, fleet_env: dict,
                                                             r) -> None:
    make_fleet(workers=1, env={"LORAFLEET_OPS_LINGER_MS": str(LINGER_MS)})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit({"name": "rl", "env": "char_class", "env_args": {"cls": "vowels"}, "steps": 40,
                         "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "temperature": 1.0,
                         "train": {"seed": 1, "lora": {"rank": 4, "alpha": 8}}})
    deadline = time.monotonic() + 300
    while int(r.hget(Keys.experiment(exp), "step") or 0) < 1:  # the worker is up and stepping
        assert time.monotonic() < deadline, "the RL experiment never committed a step"
        time.sleep(0.2)
    ops = OpStore(r)
    rid = ops.enqueue_sample("ss-shared", 1, {
        "exp_id": None, "version": 0, "prompt": [1, 5, 6], "num_samples": 2, "max_tokens": 4,
        "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 7, "stop": [], "stop_token_ids": [],
        "prompt_logprobs": False}, "")
    f = ops.wait(rid, LINGER_MS / 1000 * 0.75)
    assert f is not None and f.status == "done", f
    assert f.done - f.created < LINGER_MS * 0.75  # not the leader's sample batch: a rollout batch's
    assert len((f.result or {})["sequences"]) == 2
    assert r.hget(Keys.experiment(exp), "status") == "running"  # the RL run was not disturbed
    client.cancel(exp)
