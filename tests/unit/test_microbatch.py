"""Memory-bounded fused steps: micro-batches with gradient accumulation, and logprobs chunked
through the lm_head, give exactly the single-pass step (float64, 1e-9 over 5 AdamW steps).

The single-pass reference is `tokens_per_microbatch=None` (one micro-batch: the whole batch);
test_fused_step.py shows that one equals solo PEFT runs. The scenario (lf_testkit) has a clip
that triggers (adapter a), an absent adapter (d in step 2), KL terms (b, d: the adapter-off
reference forward) and uneven row counts and lengths.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lf_testkit import (
    PAD,
    SPECS,
    STEPS,
    build_fused,
    fused_weights,
    load_model,
    make_rows,
    max_diff,
    run_fused,
    step_rows,
)

from lorafleet.workers.batch import FusedBatch, TrainRow, collate, micro_batches
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.losses import chunked_token_logprobs, token_logprobs
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.step_backends import decoder_hidden_states

TOL = 1e-9
# 1: one row per micro-batch; 40: 3-6 rows each, adapters split across micro-batches;
# 100: about two micro-batches per step
BUDGETS = (1, 40, 100)


def configured(fused: FusedTrainStep, budget: int | None, chunk: int) -> FusedTrainStep:
    fused.tokens_per_microbatch, fused.logprob_chunk_tokens = budget, chunk
    return fused


def assert_same_training(ref: FusedTrainStep, other: FusedTrainStep, ref_reports: list[dict],
                         other_reports: list[dict]) -> None:
    """Equal reports (losses, grad norms, skips, steps), weights and AdamW state."""
    assert len(ref_reports) == len(other_reports)
    for r1, r2 in zip(ref_reports, other_reports, strict=True):
        assert r1.keys() == r2.keys()
        for name in r1:
            a, b = r1[name], r2[name]
            assert (a.stepped, a.skipped_reason, a.step, a.num_tokens) == (
                b.stepped, b.skipped_reason, b.step, b.num_tokens), name
            assert b.loss == pytest.approx(a.loss, abs=TOL, rel=0, nan_ok=True), name
            assert b.grad_norm == pytest.approx(a.grad_norm, abs=TOL, rel=0, nan_ok=True), name
    for name in SPECS:
        diff = max_diff(fused_weights(ref.model, name), fused_weights(other.model, name))
        assert diff < TOL, f"{name}: weights differ by {diff:.3e}"
        s1, s2 = ref.trainer_state(name), other.trainer_state(name)
        assert s1[1] == s2[1]
        assert s1[0].keys() == s2[0].keys()
        state_diff = max(((s1[0][k].double() - s2[0][k].double()).abs().max().item()
                          for k in s1[0]), default=0.0)
        assert state_diff < TOL, f"{name}: AdamW state differs by {state_diff:.3e}"


def spans_micro_batches(budget: int, step: int = 0) -> set[str]:
    """Adapters whose rows of `step` land in more than one micro-batch."""
    batch = collate([r for rs in step_rows(step).values() for r in rs], PAD, torch.float64)
    seen: dict[str, int] = {}
    for mb in micro_batches(batch, budget):
        for a in mb.layout.adapters:
            seen[a] = seen.get(a, 0) + 1
    return {a for a, n in seen.items() if n > 1}


# ---- the splitter ----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 12, 25, 40, 100, None])
def test_micro_batches_cover_every_row_once_within_budget(budget: int | None) -> None:
    rows = [r for a, n in (("a", 3), ("b", 1), ("c", 5), ("d", 2)) for r in make_rows(a, n, ord(a))]
    batch = collate(rows, PAD, torch.float64)
    mbs = micro_batches(batch, budget)
    seen = []
    for mb in mbs:
        b, w = mb.input_ids.shape
        assert budget is None or b * w <= budget or b == 1
        assert mb.attention_mask[:, -1].any(), "padding not trimmed to the longest row"
        assert mb.layout.num_rows == b and mb.loss_mask.shape == (b, w - 1)
        for name in mb.layout.adapters:
            for i in range(mb.layout.rows_of(name).start, mb.layout.rows_of(name).stop):
                n = int(mb.attention_mask[i].sum())
                seen.append((name, tuple(mb.input_ids[i, :n].tolist()),
                             tuple(mb.loss_mask[i, :n - 1].tolist()), mb.advantages[i].item(),
                             tuple(mb.old_logprobs[i, :n - 1].tolist())))
    expected = [(r.adapter, tuple(r.input_ids), tuple(float(m) for m in r.loss_mask[1:]),
                 r.advantage, tuple(r.old_logprobs[1:])) for r in rows]
    assert sorted(seen) == sorted(expected)
    if budget == 1:
        assert len(mbs) == len(rows)
    if budget is None:
        assert len(mbs) == 1


def test_micro_batches_refuse_left_padding() -> None:
    batch = collate(make_rows("a", 3, 0), PAD, torch.float64)
    left = FusedBatch(batch.layout, batch.input_ids, batch.attention_mask.flip(1), batch.loss_mask,
                      batch.advantages, batch.old_logprobs)
    with pytest.raises(ValueError, match="right-padded"):
        micro_batches(left, 16)


def test_budgets_exercise_what_they_claim() -> None:
    assert spans_micro_batches(1) == {"a", "c", "d"}  # every adapter with more than one row
    assert spans_micro_batches(40), "budget 40 splits no adapter across micro-batches"


# ---- chunked logprobs --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, 10**6])
def test_chunked_logprobs_equal_full_logits_float64(model_cache: Path, chunk: int) -> None:
    model, _ = load_model(model_cache)
    batch = collate(make_rows("a", 4, 0) + make_rows("b", 3, 1), PAD, torch.float64)
    with torch.no_grad():
        full = token_logprobs(model(input_ids=batch.input_ids,
                                    attention_mask=batch.attention_mask).logits, batch.input_ids)
        hidden = decoder_hidden_states(model, batch.input_ids, batch.attention_mask)
    head = model.get_output_embeddings()
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    ref = token_logprobs(head(h1), batch.input_ids)  # (B, T-1)
    got = chunked_token_logprobs(h2, head, batch.input_ids, chunk)  # (B, T-1)
    assert got.shape == full.shape
    assert (got - full).abs().max().item() < 1e-12
    w = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(0))
    (ref * w).sum().backward()
    (got * w).sum().backward()
    assert (h1.grad - h2.grad).abs().max().item() < 1e-12  # checkpointed chunks: same gradient


def test_chunked_logprobs_keep_no_logits_for_backward(model_cache: Path) -> None:
    """Autograd keeps no (n, V) tensor of any chunk: backward recomputes each chunk's logits
    (without the per-chunk checkpoint every chunk's softmax would stay alive until backward)."""
    model, _ = load_model(model_cache)
    batch = collate(make_rows("a", 4, 0), PAD, torch.float64)
    with torch.no_grad():
        hidden = decoder_hidden_states(model, batch.input_ids, batch.attention_mask)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]

    def saved_new_tensors(fn) -> list[tuple[int, ...]]:
        """Shapes of the tensors autograd keeps for backward, other than the input's storage."""
        h = hidden.clone().requires_grad_(True)
        shapes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr():
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # forward: what is kept
            out = fn(h).sum()
        out.backward()
        return shapes

    chunked = saved_new_tensors(lambda h: chunked_token_logprobs(h, head, batch.input_ids, 8))
    full = saved_new_tensors(lambda h: token_logprobs(head(h), batch.input_ids))
    assert any(s[-1:] == (vocab,) and len(s) == 3 for s in full), full  # the probe sees logits
    assert all(len(s) <= 1 for s in chunked), chunked  # only each chunk's (n,) target ids


def test_chunked_logprobs_bf16_close_to_full_logits(model_cache: Path) -> None:
    model, _ = load_model(model_cache, dtype=torch.bfloat16)
    batch = collate(make_rows("a", 4, 0) + make_rows("b", 3, 1), PAD, torch.float32)
    with torch.no_grad():
        full = token_logprobs(model(input_ids=batch.input_ids,
                                    attention_mask=batch.attention_mask).logits, batch.input_ids)
        hidden = decoder_hidden_states(model, batch.input_ids, batch.attention_mask)
        got = chunked_token_logprobs(hidden, model.get_output_embeddings(), batch.input_ids, 5)
    assert got.dtype == full.dtype == torch.float32  # log_softmax in float32
    assert (got - full).abs().max().item() < 2e-2


# ---- the micro-batched step equals the single pass ---------------------------------------------
@pytest.fixture(scope="module")
def single_pass(model_cache: Path):
    ref, _, _ = build_fused(model_cache)
    configured(ref, None, 10**6)
    return ref, run_fused(ref)


@pytest.mark.parametrize("budget", BUDGETS)
def test_micro_batched_step_equals_single_pass(model_cache: Path, single_pass, budget: int) -> None:
    ref, ref_reports = single_pass
    fused = configured(build_fused(model_cache)[0], budget, 5)
    reports = run_fused(fused)
    # the scenario exercises what it claims to
    assert any(r["a"].grad_norm > SPECS["a"].optimizer.max_grad_norm for r in reports), "no clip"
    assert "d" not in reports[2] and fused.steps["d"] == STEPS - 1
    assert_same_training(ref, fused, ref_reports, reports)


def test_micro_batched_nan_isolation_equals_single_pass(model_cache: Path) -> None:
    """Step 1: one of a's rows has a NaN advantage (a's other rows sit in other micro-batches,
    which already ran backward); step 3: all of b's; step 4: c's gradient is NaN (a hook)."""

    def poisoner():
        hooks = []

        def poison(step, rows, f):
            for h in hooks:
                h.remove()
            hooks.clear()
            if step in (1, 3):
                victim = "a" if step == 1 else "b"
                last = max(i for i, r in enumerate(rows) if r.adapter == victim)
                rows = [r if (r.adapter != victim or (step == 1 and i != last))
                        else TrainRow(r.adapter, r.input_ids, r.loss_mask, math.nan, r.old_logprobs)
                        for i, r in enumerate(rows)]
            if step == 4:
                p = dict(f.model.parameters_of("c"))
                hooks.append(p[next(k for k in p if "lora_B" in k)].register_hook(
                    lambda g: g * float("nan")))
            return rows
        return poison

    ref = configured(build_fused(model_cache)[0], None, 10**6)
    fused = configured(build_fused(model_cache)[0], 1, 5)  # one row per micro-batch
    ref_reports, reports = run_fused(ref, poison=poisoner()), run_fused(fused, poison=poisoner())
    assert reports[1]["a"].skipped_reason == "nonfinite_loss" and not reports[1]["a"].stepped
    assert reports[3]["b"].skipped_reason == "nonfinite_loss"
    assert reports[4]["c"].skipped_reason == "nonfinite_grad"
    assert all(r.stepped for n, r in reports[1].items() if n != "a")
    assert_same_training(ref, fused, ref_reports, reports)
    for name in SPECS:
        assert all(torch.isfinite(w).all() for w in fused_weights(fused.model, name).values())


def test_micro_batched_deepspeed_equals_single_pass(model_cache: Path, single_pass) -> None:
    """DeepSpeed ZeRO-0 engine: `engine.backward` per micro-batch, one `engine.step`."""
    ref, ref_reports = single_pass
    ds = configured(build_fused(model_cache, "deepspeed")[0], 40, 5)
    import deepspeed

    assert isinstance(ds.backend.engine, deepspeed.DeepSpeedEngine)  # type: ignore[attr-defined]
    assert_same_training(ref, ds, ref_reports, run_fused(ds))


def test_micro_batched_with_activation_checkpointing_equals_single_pass(
    model_cache: Path, single_pass
) -> None:
    ref, ref_reports = single_pass
    fused = configured(build_fused(model_cache, checkpointing=True)[0], 40, 5)
    assert fused.model.model.is_gradient_checkpointing
    assert_same_training(ref, fused, ref_reports, run_fused(fused))


def test_activation_checkpointing_setting(model_cache: Path) -> None:
    def built(**kwargs) -> torch.nn.Module:
        model, _ = load_model(model_cache)
        if kwargs.pop("pre_enabled", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        FusedTrainStep(MultiLoRAModel(model), **kwargs)
        return model

    assert not built().is_gradient_checkpointing  # None on cpu: the model is left as it is
    assert built(pre_enabled=True).is_gradient_checkpointing
    assert built(activation_checkpointing=True).is_gradient_checkpointing
    assert not built(pre_enabled=True, activation_checkpointing=False).is_gradient_checkpointing
