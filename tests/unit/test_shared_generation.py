"""Client sample requests in the RL rollout batch's generate call (workers/tinker/generation.py):
one `engine.generate` holds the server-driven experiment's rows and the clients' rows, and each
answer equals the one it gets alone (float64, seeded); a request the leader also published is
run once (the fenced claim refuses the second)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.messages import SampleMessage
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.tinker.leader import LeaderOps
from lorafleet.workers.pipeline import RLStepPipeline
from lorafleet.workers.tinker.generation import SharedGeneration
from tests.unit.test_client_op_runner import OPTIM, CountingEngine, Host, done, fb, register, submit

TOL = 1e-9
SAMPLE = {"exp_id": None, "version": 0, "prompt": [1, 5, 6, 7], "num_samples": 2, "max_tokens": 6,
          "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 3, "stop": [], "stop_token_ids": [],
          "prompt_logprobs": False}
RL_SPEC = ExperimentSpec(name="rl", env="char_class", env_args={"cls": "vowels"}, steps=2, prompts_per_step=2,
                         group_size=3, max_new_tokens=5, temperature=1.0,
                         train={"seed": 10, "optimizer": {"lr": 0.02}})


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(f"file://{tmp_path}/store")


def shared_pipeline(host: Host) -> tuple[RLStepPipeline, SharedGeneration, CountingEngine]:
    tok = host.tok
    inner = CountingEngine(host.trainer.model, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
    engine = SharedGeneration(inner, host.sampler, host.r, host.ops, max_rows=64)
    return RLStepPipeline(host.trainer, host.tok, engine, host.adapters), engine, inner


def client_requests(host: Host, exp: str, scope: str) -> list[str]:
    return [host.ops.enqueue_sample(scope, 1, SAMPLE, ""),
            host.ops.enqueue_sample(scope, 2, {**SAMPLE, "exp_id": exp, "version": 1, "seed": 4,
                                               "prompt_logprobs": True}, ""),
            host.ops.enqueue_sample(scope, 3, {**SAMPLE, "exp_id": exp, "version": 0, "seed": 5}, "")]


def assert_same(a: dict, b: dict) -> None:
    for x, y in zip(a["sequences"], b["sequences"], strict=True):
        assert x["tokens"] == y["tokens"] and x["stop_reason"] == y["stop_reason"]
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=TOL)
    assert (a["prompt_logprobs"] is None) == (b["prompt_logprobs"] is None)


def test_one_generate_holds_rl_and_client_rows_and_each_equals_its_solo_run(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    exp = register(host.ops, "client", seed=21)
    submit(host.ops, exp, 1, "forward_backward", fb(91))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    assert host.run(exp) == {exp: True}  # exp@v1 published: samples of v0 and v1 both

    rids = client_requests(host, exp, "shared")
    r.set(Keys.leader, "leader-1")  # the leader published one of them already (unclaimed so far)
    assert LeaderOps(r).mark_samples("leader-1", "leader-samples", 60_000, rids[:1]) == [True]
    pipe, engine, inner = shared_pipeline(host)
    item = StepItem("rl-exp", 0, 0, RL_SPEC)
    shared = pipe.rollout([item])
    assert not shared.failed and inner.calls == 1 and engine.shared == 1  # ONE generate, both kinds
    outs = [done(host.ops, rid) for rid in rids]
    assert r.zcard(Keys.tk_samples) == 0 and r.zcard(Keys.tk_samples_running) == 0
    # the leader's message reaches a worker: the request is done, the claim refused, no re-run
    msg = SampleMessage(batch_id="leader-samples", epoch=0, request_ids=tuple(rids[:1]))
    assert host.sampler.run(msg) == {}

    # the RL rollout alone (nothing waiting: the engine passes through)
    alone_pipe, alone_engine, alone_inner = shared_pipeline(host)
    alone = alone_pipe.rollout([item])
    assert alone_engine.shared == 0 and alone_inner.calls == 1
    got, want = shared.trajectories["rl-exp"], alone.trajectories["rl-exp"]
    assert len(got.samples) == len(want.samples) == 6
    for x, y in zip(got.samples, want.samples, strict=True):
        assert x.completion_ids == y.completion_ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=TOL)
    assert got.reward_mean == want.reward_mean

    # the client requests alone, through the sampler's own generate call
    solo = client_requests(host, exp, "solo")
    assert host.sampler.run(SampleMessage(batch_id="solo", epoch=0, request_ids=tuple(solo))) == {
        rid: True for rid in solo}
    for a, rid in zip(outs, solo, strict=True):
        b = done(host.ops, rid)
        assert_same(a, b)
    assert outs[1]["prompt_logprobs"][1:] == pytest.approx(done(host.ops, solo[1])["prompt_logprobs"][1:],
                                                           abs=TOL)


def test_a_bad_client_request_fails_alone_and_the_rollout_goes_on(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    bad = host.ops.enqueue_sample("bad", 1, {**SAMPLE, "exp_id": "nope", "version": 3}, "")
    big = host.ops.enqueue_sample("bad", 2, {**SAMPLE, "prompt": [10**9]}, "")
    pipe, engine, inner = shared_pipeline(host)
    out = pipe.rollout([StepItem("rl-exp", 0, 0, RL_SPEC)])
    assert not out.failed and len(out.trajectories["rl-exp"].samples) == 6 and inner.calls == 1
    for rid in (bad, big):
        f = host.ops.future(rid)
        assert f is not None and f.status == "failed" and f.category == "user", f
