"""Continual learning: extending an experiment continues it exactly where it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from test_fleet import spec

from lorafleet.common.keys import Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.spec_input import SpecError
from lorafleet.common.store.adapter_store import AdapterStore
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
    for args, needle in (([exp, "--steps", "0"], "positive"),
                         ([exp, "--steps", "200000"], "less than or equal to 100000"),
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


def _peft_dir(model_cache, path, r_=4, alpha=8, targets=("q_proj", "v_proj"), seed=3):
    """A LoRA adapter made by PEFT itself (random A and B), saved as a PEFT directory."""
    from peft import LoraConfig, get_peft_model

    base, _, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r_, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(path)
    return path


def test_init_from_is_resolved_and_checked_at_submit(redis_url, r, tmp_path, model_cache, monkeypatch):
    from lorafleet.common.spec_input import SpecError

    store_url = f"file://{tmp_path}/store"
    client = FleetClient(redis_url, store_url)
    peft = _peft_dir(model_cache, tmp_path / "adapters" / "mine")
    base = spec("imp", "char_class", {"cls": "digits"}, steps=2)
    del base["train"]["lora"]  # not given: taken from the adapter's config
    monkeypatch.chdir(tmp_path)
    exp = client.submit({**base, "train": {**base["train"], "init_from": "adapters/mine"}})
    t = client.get(exp).spec.train
    assert (t.lora.rank, t.lora.alpha, t.lora.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert t.init_from == str(peft) and t.step_offset == 0  # made absolute: workers read it
    bad = [
        ({"init_from": str(tmp_path / "nowhere")}, "does not exist"),
        ({"init_from": str(peft), "lora": {"rank": 8, "alpha": 16}},
         "rank 4 of the source adapter does not match train.lora.rank 8"),
        ({"init_from": "ghost-1@v3"}, "no experiment ghost-1 in the adapter store"),
        ({"init_from": "ghost@vx"}, "not EXPERIMENT_ID@vK"),
    ]
    for train, needle in bad:
        with pytest.raises(SpecError, match="train.init_from") as info:
            client.submit({**base, "train": {**base["train"], **train}})
        assert needle in str(info.value), str(info.value)
    # a fork: the version must be published; its step offset defaults to the version
    from lorafleet.common.store.adapter_store import AdapterStore as Store

    store = Store(store_url)
    w = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    store.publish("src-1", 3, weights=w, adapter_config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]},
                  trainer_tensors={})  # a snapshot (its AdamW state: none yet)
    fork = client.submit({**base, "train": {**base["train"], "init_from": "src-1@v3"}})
    assert (client.get(fork).spec.train.step_offset, client.get(fork).spec.train.lora.target_modules) == (
        3, ("q_proj",))


@pytest.mark.slow
def test_a_peft_made_adapter_is_imported_as_v0_and_trained(make_fleet, redis_url, fleet_env, model_cache,
                                                           tmp_path):
    from safetensors.torch import load_file

    peft = _peft_dir(model_cache, tmp_path / "peft", r_=4, alpha=8, targets=("q_proj", "up_proj"))
    sp = spec("imported", "char_class", {"cls": "vowels"}, steps=2, seed=4)
    del sp["train"]["lora"]
    sp["train"]["init_from"] = str(peft)
    make_fleet(workers=1)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(sp)
    assert client.wait([exp], timeout_s=120)[0].status == "completed"
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    v0, given = store.load(exp, 0).weights, load_file(peft / "adapter_model.safetensors")
    assert v0.keys() == given.keys() and all(torch.equal(v0[k], given[k]) for k in given)  # exactly
    # ... and trained exactly as an in-process run that starts from the same adapter
    model, tok, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
    runner = LocalRunner(MultiLoRAModel(model), tok)
    runner.add(exp, client.get(exp).spec)
    reference = runner.run()[exp]
    assert [x["reward_mean"] for x in client.metrics(exp)] == [x["reward_mean"] for x in reference]
    want, got = dict(runner.model.parameters_of(exp)), store.load(exp).weights
    assert max((got[k] - want[k].detach()).abs().max().item() for k in want) < 1e-9


@pytest.mark.slow
def test_retention_under_kill_9_keeps_what_recovery_needs_and_gc_sweeps_the_rest(
        make_fleet, redis_url, fleet_env, r, model_cache):
    """keep_last=2, keep_every=3 over 8 steps, with the worker holding the experiment killed -9
    mid-run: the run still ends exactly as uninterrupted (recovery never lost its version), and
    after `lorafleet gc` the store holds v0, the milestones and the 2 newest versions."""
    fleet = make_fleet(workers=2, env={"LORAFLEET_KEEP_LAST": "2", "LORAFLEET_KEEP_EVERY": "3",
                                       "LORAFLEET_TEST_TRAIN_DELAY_S": "0.3"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    sp = spec("ret", "char_class", {"cls": "upper"}, steps=8, seed=12)
    exp = client.submit(sp)
    deadline = time.monotonic() + 120
    while client.get(exp).step < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = client.get(exp).node
    fleet.kill(victim)
    done = client.wait([exp], timeout_s=180)[0]
    assert done.status == "completed", done.error
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    out = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "gc", "--redis-url", redis_url],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **fleet_env, "LORAFLEET_KEEP_LAST": "2",
                              "LORAFLEET_KEEP_EVERY": "3"})
    assert out.returncode == 0, out.stderr
    assert store.versions(exp) == [0, 3, 6, 7, 8]
    model, tok, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
    runner = LocalRunner(MultiLoRAModel(model), tok)
    runner.add(exp, ExperimentSpec.model_validate(sp))
    runner.run()
    want, got = dict(runner.model.parameters_of(exp)), store.load(exp).weights
    assert max((got[k] - want[k].detach()).abs().max().item() for k in want) < 1e-9


@pytest.mark.slow
def test_a_fork_at_vk_trained_m_steps_equals_the_source_steps_k_to_k_plus_m(make_fleet, redis_url,
                                                                             fleet_env):
    make_fleet(workers=1, env={"LORAFLEET_SNAPSHOT_EVERY_STEPS": "2"})  # v0, v2, v4 hold AdamW state
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    sp = spec("src", "target_string", {"target": "abc"}, steps=4, seed=21)
    src = client.submit(sp)
    assert client.wait([src], timeout_s=120)[0].status == "completed"
    # v1 has weights only: a fork that wants the optimizer state is refused at submit, saying why
    with pytest.raises(SpecError, match=r"v1 of .* is not a snapshot \(snapshots keep the optimizer state: "
                                         r"v0, v2, v4;.*init_optimizer: false"):
        client.submit({**sp, "name": "fork1", "train": {**sp["train"], "init_from": f"{src}@v1"}})
    fork = client.submit({**sp, "name": "fork", "steps": 2,
                          "train": {**sp["train"], "init_from": f"{src}@v2"}})
    assert client.get(fork).spec.train.step_offset == 2
    assert client.wait([fork], timeout_s=120)[0].status == "completed"
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    want, got = store.load(src, 2), store.load(fork, 0)  # v0 of the fork is v2 of its source
    assert all(torch.equal(got.weights[k], want.weights[k]) for k in want.weights)
    assert all(torch.equal(got.trainer_tensors[k], want.trainer_tensors[k]) for k in want.trainer_tensors)
    src_m, fork_m = client.metrics(src), client.metrics(fork)
    assert [x["reward_mean"] for x in fork_m] == [x["reward_mean"] for x in src_m[2:]]  # same samples
    want, got = store.load(src, 4).weights, store.load(fork, 2).weights
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-9


def test_extend_with_a_new_dataset_is_checked_like_a_submit(redis_url, r, tmp_path):
    import json

    rows = [{"prompt": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(8)]
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    for path in (old, new):
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    client = FleetClient(redis_url)
    sp = {"name": "ds", "dataset": {"path": str(old)}, "reward": {"fn": "numeric_match"}, "steps": 2}
    exp = client.submit(sp)
    r.hset(Keys.experiment(exp), mapping={"status": "completed", "step": 2})
    cli = [sys.executable, "-m", "lorafleet.scheduler.cli", "extend", exp, "--steps", "2",
           "--redis-url", redis_url]
    out = subprocess.run([*cli, "--dataset", str(tmp_path / "missing.jsonl")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "missing.jsonl" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert client.get(exp).status == "completed"  # nothing changed
    out = subprocess.run([*cli, "--dataset", "new.jsonl"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rec = client.get(exp)
    assert (rec.status, rec.steps_total, rec.spec.dataset.path) == ("running", 4, str(new))
    env_exp = client.submit(spec("envy", "char_class", {"cls": "digits"}, steps=1))
    cli[4] = env_exp
    out = subprocess.run([*cli, "--dataset", str(new)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a dataset" in out.stderr, out.stderr
