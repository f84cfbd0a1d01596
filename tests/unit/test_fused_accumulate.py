"""Client ops on the fused trainer (float64, CPU, builtin tiny-llama): pending gradients per
adapter, one fused forward+backward for many ops, AdamW per adapter with the client's params.

Tolerances: 1e-10 where the two sides run the same math in a different batch composition,
micro-batching or padding width (float64 summation order differs at ~1e-16 relative; Adam with
eps=1e-8 keeps that far below 1e-10 after 2 steps); exact (torch.equal) where nothing may touch
a tensor at all (another adapter's pending grads). Any real coupling shows up at >= 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lf_testkit import PAD, SPECS, SoloRun, fused_weights, load_model, make_rows, max_diff

from lorafleet.workers.batch import ClientRow, collate, collate_client, micro_batches
from lorafleet.workers.fused_step import AdamParams, FusedTrainStep
from lorafleet.workers.losses import ClientLoss
from lorafleet.workers.multilora.model import MultiLoRAModel

TOL = 1e-10
CE, IS, PPO = ClientLoss("cross_entropy"), ClientLoss("importance_sampling"), ClientLoss("ppo")
HP = {"a": AdamParams(lr=1e-2, eps=1e-8, weight_decay=0.01),
      "b": AdamParams(lr=5e-3, beta1=0.8, beta2=0.99, eps=1e-8, grad_clip_norm=0.5),
      "c": AdamParams(lr=2e-2, eps=1e-8, weight_decay=0.1, grad_clip_norm=100.0),
      "d": AdamParams(lr=1e-3, eps=1e-8)}


def trainer(cache: Path, names=("a", "b", "c", "d"), budget: int | None = None,
            backend: str = "torch", checkpointing: bool = False) -> FusedTrainStep:
    """A trainer holding `names`, each initialised as in `lf_testkit.build_fused` (A from the
    spec's seed, a non-zero B from seed+1000), so every trainer starts each adapter equally."""
    model, _ = load_model(cache)
    f = FusedTrainStep(MultiLoRAModel(model), backend,  # type: ignore[arg-type]
                       tokens_per_microbatch=budget, activation_checkpointing=checkpointing)
    for name in names:
        f.add_adapter(name, SPECS[name])
        g = torch.Generator().manual_seed(SPECS[name].seed + 1000)
        with torch.no_grad():
            for key, p in f.model.parameters_of(name):
                if "lora_B" in key:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return f


def op_rows(adapter: str, op: str, n: int, seed: int) -> list[ClientRow]:
    """n datums of 3..10 positions with arbitrary targets (not the shifted input), weights of
    both signs, advantages and sampler logprobs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        m = int(torch.randint(3, 11, (1,), generator=g))
        tokens, targets = (torch.randint(4, 100, (m,), generator=g).tolist() for _ in range(2))
        w, adv, q = torch.randn(3, m, generator=g, dtype=torch.float64)
        rows.append(ClientRow(adapter, op, tokens, targets, w.tolist(), adv.tolist(),
                              (-4.0 + 0.5 * q).tolist()))
    return rows


def grads(f: FusedTrainStep, name: str) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in f.model.parameters_of(name) if p.grad is not None}
    assert out, f"{name} has no gradients"
    return out


def same_outputs(x, y) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].finite == y[k].finite
        assert x[k].loss_sum == pytest.approx(y[k].loss_sum, abs=TOL, rel=0)
        for a, b in ((x[k].logprobs, y[k].logprobs), (x[k].elementwise_loss, y[k].elementwise_loss)):
            assert [len(r) for r in a] == [len(r) for r in b]
            for ra, rb in zip(a, b, strict=True):
                assert ra == pytest.approx(rb, abs=TOL, rel=0)


def spanning_ops(rows: list[ClientRow], budget: int | None) -> set[str]:
    """Ops whose datums land in more than one micro-batch under `budget`."""
    seen: dict[str, set[int]] = {}
    batch = collate_client(rows, PAD, torch.float64)
    for i, mb in enumerate(micro_batches(batch, budget)):
        for k in mb.row_op.tolist():
            seen.setdefault(batch.op_keys[k], set()).add(i)
    return {op for op, mbs in seen.items() if len(mbs) > 1}


# ---- (a) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, 24])
def test_k_accumulate_calls_then_apply_equal_one_call(model_cache: Path, budget) -> None:
    calls = [op_rows("a", "op1", 3, 1) + op_rows("b", "op2", 2, 2),
             op_rows("a", "op3", 2, 3),
             op_rows("c", "op4", 3, 4) + op_rows("b", "op5", 1, 5)]
    losses = {"op1": CE, "op2": PPO, "op3": IS, "op4": CE, "op5": IS}
    if budget:
        assert spanning_ops([r for rows in calls for r in rows], budget)  # exercised
    split, whole = trainer(model_cache, budget=budget), trainer(model_cache, budget=budget)
    out_split: dict = {}
    for rows in calls:
        res = split.tinker.accumulate(rows, losses)
        assert not res.tainted
        out_split.update(res.outputs)
    res = whole.tinker.accumulate([r for rows in calls for r in rows], losses)
    same_outputs(out_split, res.outputs)
    for name in ("a", "b", "c"):
        assert max_diff(grads(split, name), grads(whole, name)) < TOL
    assert not split.has_grads("d") and not whole.has_grads("d")
    hp = {n: HP[n] for n in ("a", "b", "c")}
    r1, r2 = split.tinker.apply(hp), whole.tinker.apply(hp)
    for name in hp:
        assert r1[name].stepped and r2[name].stepped and split.steps[name] == 1
        assert r1[name].grad_norm == pytest.approx(r2[name].grad_norm, abs=TOL)
        assert not split.has_grads(name)
        assert max_diff(fused_weights(split.model, name), fused_weights(whole.model, name)) < TOL
    assert r1["b"].grad_norm > HP["b"].grad_clip_norm  # b's clip was exercised


# ---- (b) ----------------------------------------------------------------------------------
A1, A2, B1, C1 = (op_rows("a", "a1", 3, 11), op_rows("a", "a2", 2, 12),
                  op_rows("b", "b1", 2, 13), op_rows("c", "c1", 4, 14))
LOSSES = {"a1": CE, "a2": PPO, "b1": IS, "c1": CE, "a3": IS, "b2": CE}
A3, B2 = op_rows("a", "a3", 2, 15), op_rows("b", "b2", 2, 16)


def scenario(f: FusedTrainStep, only: str | None = None) -> tuple[dict, dict]:
    """Round 1: fb(c1 + a1). Round 2: fb(a2 + b1), then apply a (fb+apply) and c (apply on its
    round-1 grads) while b's grads stay pending. Round 3: fb(a3 + b2), apply a and b.
    `only`: run just that adapter's part of every call (its solo run)."""
    keep = lambda rows: [r for r in rows if only in (None, r.adapter)]  # noqa: E731
    sel = lambda names: {n: HP[n] for n in names if only in (None, n)}  # noqa: E731
    out: dict = {}
    pending_b: dict = {}
    for rows, hp in ((C1 + A1, {}), (A2 + B1, sel("ac")), (A3 + B2, sel("ab"))):
        if keep(rows):
            out.update(f.tinker.accumulate(keep(rows), LOSSES).outputs)
        if hp:
            if only is None and "b" not in hp:
                pending_b = grads(f, "b")
            f.tinker.apply(hp)
            if pending_b and "b" not in hp:
                after = grads(f, "b")
                assert all(torch.equal(pending_b[k], after[k]) for k in pending_b)  # untouched
    return out, pending_b


@pytest.mark.parametrize("budget,backend", [(None, "torch"), (20, "torch"), (None, "deepspeed")])
def test_fused_pending_and_applied_adapters_equal_solo_runs(model_cache: Path, budget,
                                                           backend) -> None:
    """DeepSpeed: its engine.step zeroes every grad, so b's survive only through the stash."""
    if budget:
        assert spanning_ops(C1 + A1, budget) and spanning_ops(A2 + B1, budget)  # exercised
    fused = trainer(model_cache, ("a", "b", "c"), budget=budget, backend=backend)
    init = {n: fused_weights(fused.model, n) for n in "abc"}
    out, pending_b = scenario(fused)
    assert pending_b, "b's pending grads were not checked across a's and c's apply"
    assert fused.steps == {"a": 2, "b": 1, "c": 1}
    for name in "abc":
        solo = trainer(model_cache, (name,), budget=budget, backend=backend)
        assert max_diff(fused_weights(solo.model, name), init[name]) == 0.0  # same start
        solo_out, _ = scenario(solo, only=name)
        same_outputs({k: v for k, v in out.items() if k in solo_out}, solo_out)
        diff = max_diff(fused_weights(fused.model, name), fused_weights(solo.model, name))
        assert diff < TOL, f"{name}: fused differs from solo by {diff:.3e}"
        moved = max_diff(fused_weights(fused.model, name), init[name])
        assert moved > 1e-4, f"{name} barely moved ({moved:.2e}): the test would prove nothing"
        assert solo.steps[name] == fused.steps[name]


# ---- (c) ----------------------------------------------------------------------------------
def test_forward_equals_accumulate_and_a_direct_peft_computation(model_cache: Path) -> None:
    f = trainer(model_cache, ("a", "b"), budget=30)
    rows = op_rows("a", "x", 3, 21) + op_rows("b", "y", 2, 22) + op_rows("a", "z", 1, 23)
    losses = {"x": CE, "y": PPO, "z": IS}
    f.model.model.train()
    fwd = f.tinker.forward(rows, losses)
    assert not f.has_grads("a") and not f.has_grads("b")  # forward leaves no gradients
    assert f.model.model.training  # its eval mode was undone
    assert f.tinker.forward([], losses) == {} and f.tinker.accumulate([], losses).outputs == {}
    acc = f.tinker.accumulate(rows, losses).outputs
    same_outputs(fwd, acc)
    base, _ = load_model(model_cache)
    for name in ("a", "b"):
        solo = SoloRun(SPECS[name], base, fused_weights(f.model, name))  # plain PEFT copy
        total = torch.zeros((), dtype=torch.float64)
        for op, loss in losses.items():
            mine = [r for r in rows if r.op_key == op and r.adapter == name]
            for j, r in enumerate(mine):
                ids = torch.tensor([list(r.tokens)])
                logits = solo.peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                lp = torch.log_softmax(logits[0], -1).gather(
                    -1, torch.tensor(list(r.targets))[:, None]).squeeze(-1)  # (m,)
                assert lp.tolist() == pytest.approx(acc[op].logprobs[j], abs=TOL, rel=0)
                f64 = lambda x: torch.tensor(list(x), dtype=torch.float64)  # noqa: E731
                w, adv = f64(r.weights), f64(r.advantages)
                ratio = torch.exp(lp - f64(r.sampling_logprobs))
                if loss.fn == "cross_entropy":
                    el = -w * lp
                elif loss.fn == "importance_sampling":
                    el = -ratio * adv
                else:
                    el = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
                assert el.tolist() == pytest.approx(acc[op].elementwise_loss[j], abs=TOL, rel=0)
                total = total + el.sum()
            if mine:
                ref_sum = sum(sum(e) for e in acc[op].elementwise_loss)
                assert acc[op].loss_sum == pytest.approx(ref_sum, abs=TOL, rel=0)
        total.backward()  # Tinker's objective: the plain sum over the adapter's ops
        ref = {k.replace(".default.weight", ".weight"): p.grad
               for k, p in solo.peft.named_parameters() if p.requires_grad}
        assert max_diff(grads(f, name), ref) < TOL


# ---- (d) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, 12])
def test_a_nonfinite_op_fails_alone(model_cache: Path, budget) -> None:
    bad = op_rows("a", "bad", 1, 31)
    bad = [ClientRow("a", "bad", r.tokens, r.targets, [math.inf] + list(r.weights[1:]))
           for r in bad]  # -inf * logp = +inf
    good_a, good_b = op_rows("a", "ok_a", 2, 32), op_rows("b", "ok_b", 2, 33)
    losses = {"bad": CE, "ok_a": PPO, "ok_b": CE}
    f = trainer(model_cache, ("a", "b"), budget=budget)
    res = f.tinker.accumulate(good_a + bad + good_b, losses)
    assert not res["bad"].finite and res["ok_a"].finite and res["ok_b"].finite
    assert res.tainted == set()  # the bad op is one datum: it never spans micro-batches
    ref = trainer(model_cache, ("a", "b"), budget=budget)
    ref_res = ref.tinker.accumulate(good_a + good_b, {"ok_a": PPO, "ok_b": CE})
    same_outputs({k: v for k, v in res.outputs.items() if k != "bad"}, ref_res.outputs)
    for name in ("a", "b"):
        assert max_diff(grads(f, name), grads(ref, name)) < TOL
    f.tinker.apply({"a": HP["a"], "b": HP["b"]})
    ref.tinker.apply({"a": HP["a"], "b": HP["b"]})
    for name in ("a", "b"):
        assert max_diff(fused_weights(f.model, name), fused_weights(ref.model, name)) < TOL
        assert torch.isfinite(torch.cat([w.flatten() for w in
                                         fused_weights(f.model, name).values()])).all()


def test_a_nonfinite_op_spanning_micro_batches_taints_only_its_adapter(model_cache: Path) -> None:
    """Longest rows run first: the op's long finite datum enters backward before its short
    inf datum is seen, so the adapter's grads hold part of a failed op: reported as tainted."""
    long = ClientRow("a", "bad", list(range(4, 14)), list(range(5, 15)), [1.0] * 10)
    short = ClientRow("a", "bad", [4, 5, 6], [5, 6, 7], [math.inf, 1.0, 1.0])
    good_b = op_rows("b", "ok_b", 1, 41)
    f = trainer(model_cache, ("a", "b"), budget=10)
    res = f.tinker.accumulate([long, short] + good_b, {"bad": CE, "ok_b": CE})
    assert not res["bad"].finite and res["ok_b"].finite
    assert res.tainted == {"a"}
    ref = trainer(model_cache, ("b",), budget=10)
    ref.tinker.accumulate(good_b, {"ok_b": CE})
    assert max_diff(grads(f, "b"), grads(ref, "b")) < TOL


# ---- (e) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_server_step_keeps_a_client_adapters_pending_grads(model_cache: Path, backend) -> None:
    server_rows = make_rows("a", 3, seed=51) + make_rows("b", 2, seed=52)
    client = op_rows("c", "fb", 3, 53)
    f = trainer(model_cache, backend=backend)
    f.tinker.accumulate(client, {"fb": CE})
    pending = grads(f, "c")
    reports = f.step(collate(server_rows, PAD, torch.float64))
    assert set(reports) == {"a", "b"} and all(r.stepped for r in reports.values())
    after = grads(f, "c")
    assert all(torch.equal(pending[k], after[k]) for k in pending)  # not zeroed, not stepped
    assert not f.has_grads("a") and not f.has_grads("b") and not f.has_grads("d")
    assert f.steps["c"] == 0
    # the server step is bit-identical to one taken with no client grads pending
    plain = trainer(model_cache, backend=backend)
    plain_reports = plain.step(collate(server_rows, PAD, torch.float64))
    for name in ("a", "b"):
        assert max_diff(fused_weights(f.model, name), fused_weights(plain.model, name)) == 0.0
        assert reports[name] == plain_reports[name]
    # and the client's later optim_step is as if no server step had happened in between
    f.tinker.apply({"c": HP["c"]})
    alone = trainer(model_cache, ("c",), backend=backend)
    alone.tinker.accumulate(client, {"fb": CE})
    alone.tinker.apply({"c": HP["c"]})
    assert max_diff(fused_weights(f.model, "c"), fused_weights(alone.model, "c")) < TOL
    assert max_diff(fused_weights(f.model, "c"), fused_weights(trainer(model_cache, ("c",)).model,
                                                               "c")) > 1e-4


def test_client_ops_are_refused_when_gradients_are_partitioned(model_cache: Path) -> None:
    """ZeRO-1/2 keep gradients inside the engine, where no stash can reach them. (This
    project's DeepSpeed backend builds ZeRO-0 only; a ZeRO-1 engine over its placeholder param
    group does not even initialise. The guard reads the backend's zero_stage.)"""
    f = trainer(model_cache, ("a",), backend="deepspeed")
    f.backend.zero_stage = 1  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="ZeRO-1 partitions gradients"):
        f.tinker.accumulate(op_rows("a", "x", 1, 61), {"x": CE})
    with pytest.raises(RuntimeError, match="ZeRO stage 0"):
        f.tinker.apply({"a": HP["a"]})
    assert not f.has_grads("a") and f.steps["a"] == 0


# ---- (f) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", [
    AdamParams(lr=1e-2, beta1=0.85, beta2=0.97, eps=1e-12, weight_decay=0.05, grad_clip_norm=0.1),
    AdamParams(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip_norm=0.0),
])
def test_apply_equals_torch_adamw_on_the_same_grads(model_cache: Path, hp: AdamParams) -> None:
    f = trainer(model_cache, ("a", "b"))
    params = [p for _, p in f.model.parameters_of("a")]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(copies, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                            weight_decay=hp.weight_decay, foreach=False)
    for step in range(3):  # moments and bias correction past step 1
        f.tinker.accumulate(op_rows("a", "x", 2, 70 + step) + op_rows("b", "y", 1, 80 + step),
                     {"x": CE, "y": IS})
        for c, p in zip(copies, params, strict=True):
            c.grad = p.grad.clone()
        norm = torch.nn.utils.get_total_norm([c.grad for c in copies]).item()
        if hp.grad_clip_norm > 0:
            assert norm > hp.grad_clip_norm  # the clip is exercised
            torch.nn.utils.clip_grad_norm_(copies, hp.grad_clip_norm)
        opt.step()
        opt.zero_grad()
        res = f.tinker.apply({"a": hp})["a"]
        assert res.stepped and res.step == step + 1 and res.grad_norm == pytest.approx(norm, rel=1e-12)
        diff = max(
            (c.detach() - p.detach()).abs().max().item() for c, p in zip(copies, params, strict=True))
        assert diff < 1e-12, f"step {step}: {diff:.3e}"
        assert f.has_grads("b")  # b accumulates across all three a-steps, never applied
    # the group keeps the spec's own hyper-parameters for server steps
    group = f.param_group("a")
    o = SPECS["a"].optimizer
    assert (group["betas"], group["eps"], group["weight_decay"]) == (o.betas, o.eps, o.weight_decay)


def test_apply_without_or_with_nonfinite_grads_steps_nothing(model_cache: Path) -> None:
    f = trainer(model_cache, ("a", "b"))
    before = fused_weights(f.model, "a")
    assert f.tinker.apply({"a": HP["a"]})["a"].skipped_reason == "no_grads"
    f.tinker.accumulate(op_rows("a", "x", 1, 90) + op_rows("b", "y", 1, 91), {"x": CE, "y": CE})
    for _, p in f.model.parameters_of("a"):
        p.grad[...] = math.nan
        break
    res = f.tinker.apply({"a": HP["a"], "b": HP["b"]})
    assert res["a"].skipped_reason == "nonfinite_grad" and not res["a"].stepped
    assert res["b"].stepped and f.steps == {"a": 0, "b": 1}
    assert max_diff(fused_weights(f.model, "a"), before) == 0.0 and not f.has_grads("a")
    f.tinker.accumulate(op_rows("a", "x", 1, 92), {"x": CE})
    f.drop_grads("a")
    assert not f.has_grads("a")


def test_invalid_ops_are_named_before_anything_runs(model_cache: Path) -> None:
    f = trainer(model_cache, ("a", "b"))
    ok = op_rows("a", "ok", 1, 100)
    no_inputs = [ClientRow("a", "is", [5, 6], [6, 7])]  # importance_sampling without A, q
    vocab = f.model.model.get_output_embeddings().weight.shape[0]
    bad_target = [ClientRow("b", "tgt", [5, 6], [6, vocab])]
    mixed = [ClientRow("a", "mix", [5], [6]), ClientRow("b", "mix", [5], [6])]
    rows = ok + no_inputs + bad_target + mixed
    losses = {"ok": CE, "is": IS, "tgt": CE, "mix": CE}
    errors = f.tinker.client_op_errors(rows + [ClientRow("a", "nol", [5], [6])], losses)
    assert set(errors) == {"is", "tgt", "mix", "nol"}
    assert "needs loss_fn_inputs ['advantages', 'sampling_logprobs']" in errors["is"]
    assert f"outside [0, {vocab})" in errors["tgt"] and "one model" in errors["mix"]
    with pytest.raises(ValueError, match="client_op_errors"):
        f.tinker.accumulate(rows, losses)
    with pytest.raises(KeyError, match="zzz"):
        f.tinker.accumulate([ClientRow("zzz", "ok", [5], [6])], losses)
    assert not f.has_grads("a") and not f.has_grads("b")
    assert f.tinker.accumulate(ok, losses)["ok"].finite  # the valid op alone runs


def test_activation_checkpointing_gives_the_same_client_grads(model_cache: Path) -> None:
    """Backward re-runs each checkpointed layer: the adapter layout must still be in place."""
    rows = op_rows("a", "x", 2, 110) + op_rows("b", "y", 2, 111)
    losses = {"x": PPO, "y": CE}
    plain, ckpt = trainer(model_cache, ("a", "b"), budget=16), trainer(
        model_cache, ("a", "b"), budget=16, checkpointing=True)
    assert ckpt.model.model.is_gradient_checkpointing
    same_outputs(plain.tinker.accumulate(rows, losses).outputs, ckpt.tinker.accumulate(rows, losses).outputs)
    for name in ("a", "b"):
        assert max_diff(grads(plain, name), grads(ckpt, name)) < 1e-12
