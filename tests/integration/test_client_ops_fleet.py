"""Client-driven models on a real fleet: Redis, `lorafleet worker` processes (Celery prefork) and
the scheduler, driven through `OpStore` directly (what the Tinker facade does, without HTTP)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorafleet.common.keys import Keys
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tinker.op_store import OpStore, client_model_spec

pytestmark = pytest.mark.slow

OPTIM = {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
         "grad_clip_norm": 1.0}
ROUNDS = 3


def sft_datum(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, 100, (9,), generator=g).tolist()
    weights = [0.0] * 3 + [1.0] * 5
    return {"tokens": toks[:-1], "loss_fn_inputs": {"target_tokens": toks[1:], "weights": weights}}


def wait_done(ops: OpStore, rid: str, timeout_s: float = 240) -> dict:
    f = ops.wait(rid, timeout_s)
    assert f is not None and f.status == "done", f
    return f.result or {}


def test_sft_loop_of_two_client_models_and_a_sample_on_the_fleet(make_fleet, r, fleet_env: dict) -> None:
    make_fleet(workers=1, env={"LORAFLEET_OPS_LINGER_MS": "300"})
    ops = OpStore(r)
    exps = [ops.register_model(model_id=f"sft{i}", owner="", session_id="s",
                               spec=client_model_spec(rank=4, seed=i)) for i in (1, 2)]
    losses: dict[str, list[float]] = {e: [] for e in exps}
    seq = 0
    for k in range(ROUNDS):  # each round: both models' fb + optim submitted before waiting (fused)
        rids = {}
        for i, e in enumerate(exps):
            payload = {"loss_fn": "cross_entropy", "loss_fn_config": {},
                       "data": [sft_datum(100 * i + j) for j in range(2)]}
            rids[e] = (ops.enqueue(e, seq + 1, "forward_backward", payload, ""),
                       ops.enqueue(e, seq + 2, "optim_step", OPTIM, ""))
        seq += 2
        for e, (fb_rid, opt_rid) in rids.items():
            out = wait_done(ops, fb_rid)
            losses[e].append(out["metrics"]["loss:sum"])
            assert wait_done(ops, opt_rid)["version"] == k + 1
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    for e in exps:
        assert all(math.isfinite(x) for x in losses[e])
        assert losses[e][-1] < losses[e][0], losses  # same data every round: the loss falls
        assert [v for v in store.versions(e) if v <= ROUNDS] == list(range(ROUNDS + 1))
        assert int(r.hget(Keys.experiment(e), "step") or 0) == ROUNDS
    records = [rec for _, rec in r.xrange(Keys.fused_steps)]
    assert any(all(e in rec["models"] for e in exps) for rec in records), records  # co-tenants fused

    rid = ops.enqueue_sample("ss1", 1, {
        "exp_id": exps[0], "version": ROUNDS, "prompt": [1, 5, 6], "num_samples": 2, "max_tokens": 5,
        "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 7, "stop": [], "stop_token_ids": [],
        "prompt_logprobs": False}, "")
    out = wait_done(ops, rid)
    assert len(out["sequences"]) == 2
    for s in out["sequences"]:
        assert 1 <= len(s["tokens"]) <= 5 and len(s["logprobs"]) == len(s["tokens"])
    facts = r.hgetall(Keys.tk_base_model)
    assert facts["base_model"] and Path(facts["tokenizer_dir"]).is_dir()
