"""Continual learning: extending an experiment continues it exactly where it stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_fleet import spec

from lorafleet.common.adapter_store import AdapterStore
from lorafleet.common.keys import Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.scheduler.client import FleetClient
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.tiny_model import load_base_model


def test_extend_validates_and_reopens_a_completed_experiment(redis_url, r):
    client = FleetClient(redis_url)
    exp = client.submit(spec("ext", "char_class", {"cls": "digits"}, steps=2))
    r.hset(Keys.experiment(exp), mapping={"status": "completed", "step": 2, "finished_at": 5})
    r.srem(Keys.active, exp)
    rec = client.extend(exp, 3)
    assert (rec.status, rec.step, rec.steps_total, rec.spec.steps, rec.finished_at) == ("running", 2, 5, 5, 0)
    assert r.sismember(Keys.active, exp)
    cli = [sys.executable, "-m", "lorafleet.scheduler.cli", "extend", "--redis-url", redis_url]
    for args, needle in (([exp, "--steps", "0"], "positive"), ([exp, "--steps", "200000"], "less than or equal to 100000"),
                         (["nope-1", "--steps", "1"], "unknown experiment")):
        out = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    client.cancel(exp)
    out = subprocess.run([*cli, exp, "--steps", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cancelled" in out.stderr
    assert client.get(exp).steps_total == 5


@pytest.mark.slow
def test_k_steps_then_m_more_equal_k_plus_m_uninterrupted(make_fleet, redis_url, fleet_env, model_cache):
    make_fleet(workers=1)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    sp = spec("cont", "near_char", {"char": "q"}, steps=3, seed=9)
    exp = client.submit(sp)
    assert client.wait([exp], timeout_s=120)[0].status == "completed"
    client.extend(exp, 2)
    state = client.wait([exp], timeout_s=120)[0]
    assert (state.status, state.step) == ("completed", 5), state.error
    m = client.metrics(exp)
    assert [x["step"] for x in m] == list(range(5))
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    assert store.versions(exp) == list(range(6))

    model, tok, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
    runner = LocalRunner(MultiLoRAModel(model), tok)
    runner.add(exp, ExperimentSpec.model_validate({**sp, "steps": 5}))
    reference = runner.run()[exp]
    assert [x["reward_mean"] for x in m] == [x["reward_mean"] for x in reference]
    want = dict(runner.model.parameters_of(exp))
    got = store.load(exp).weights
    assert max((got[k] - want[k].detach()).abs().max().item() for k in want) < 1e-9
