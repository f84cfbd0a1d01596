"""MultiLoRALinear against a per-adapter reference: outputs and all gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.workers.multilora.layer import MultiLoRALinear, grouped_mm_supported
from lorafleet.workers.multilora.layout import BatchLayout, LayoutSlot, Segment

# (adapter, rows): unequal sizes, a base-only block, an empty adapter block, different ranks
SIZES = [("a", 3), (None, 2), ("b", 1), ("empty", 0), ("c", 4)]
RANKS = {"a": 4, "b": 2, "c": 8, "empty": 3}
ALPHAS = {"a": 8.0, "b": 1.0, "c": 24.0, "empty": 6.0}


def _layer(dtype: torch.dtype, backend: str = "segment") -> MultiLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=True, dtype=dtype)
    layer = MultiLoRALinear(base, LayoutSlot(), backend)  # type: ignore[arg-type]
    for name, r in RANKS.items():
        layer.add_adapter(name, r, ALPHAS[name])
        with torch.no_grad():  # B starts at zero; make it non-zero so dA is non-trivial
            layer.lora_B[name].normal_()
    return layer


def _reference(layer: MultiLoRALinear, x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Each row computed on its own: base(x_i) + x_i A^T B^T * s for its adapter."""
    rows = []
    for seg in layout.segments:
        for i in range(seg.start, seg.end):
            y = layer.base(x[i])
            if seg.adapter is not None:
                a, b = layer.lora_A[seg.adapter], layer.lora_B[seg.adapter]
                y = y + (x[i] @ a.T) @ b.T * layer.scaling[seg.adapter]
            rows.append(y)
    return torch.stack(rows)


def _grads(layer: MultiLoRALinear, x: torch.Tensor, out: torch.Tensor, w: torch.Tensor):
    params = [x, *layer.lora_A.values(), *layer.lora_B.values()]
    grads = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("shape", [(10, 5, 16), (10, 16)], ids=["prefill", "decode"])
def test_fused_layer_matches_per_adapter_reference_float64(shape: tuple[int, ...]) -> None:
    layer = _layer(torch.float64)
    layout = BatchLayout.from_sizes(SIZES)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*shape[:-1], 24, dtype=torch.float64)  # a random cotangent
    with layer.slot.use(layout):
        fused = layer(x)
    ref = _reference(layer, x, layout)
    # float64, identical op order per row: only summation-order rounding (~1e-16) may differ
    assert torch.allclose(fused, ref, rtol=0, atol=1e-12)
    for g_fused, g_ref in zip(_grads(layer, x, fused, w), _grads(layer, x, ref, w), strict=True):
        assert torch.allclose(g_fused, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 5, 16), (9, 16)], ids=["prefill", "decode"])
def test_uniform_layout_batched_path_matches_reference_float64(shape: tuple[int, ...]) -> None:
    """Equal blocks of one rank (the usual RL batch) take the two-bmm path; same numbers."""
    torch.manual_seed(1)
    layer = MultiLoRALinear(nn.Linear(16, 24, dtype=torch.float64), LayoutSlot())
    for name, alpha in [("a", 8.0), ("b", 2.0), ("c", 16.0)]:
        layer.add_adapter(name, 4, alpha)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    layout = BatchLayout.from_sizes([("a", 3), ("b", 3), ("c", 3)])
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert layer._uniform_delta(x.split(3), layout) is not None  # the batched path is taken
    w = torch.randn(*shape[:-1], 24, dtype=torch.float64)
    with layer.slot.use(layout):
        fused = layer(x)
    ref = _reference(layer, x, layout)
    assert torch.allclose(fused, ref, rtol=0, atol=1e-12)  # float64 summation-order rounding only
    for g_fused, g_ref in zip(_grads(layer, x, fused, w), _grads(layer, x, ref, w), strict=True):
        assert torch.allclose(g_fused, g_ref, rtol=0, atol=1e-12)


def test_adapter_grads_come_only_from_its_rows() -> None:
    layer = _layer(torch.float64)
    layout = BatchLayout.from_sizes(SIZES)
    x = torch.randn(10, 5, 16, dtype=torch.float64)
    with layer.slot.use(layout):
        out = layer(x)
    # a cotangent that touches only the rows of "b": every other adapter gets exactly zero
    w = torch.zeros(10, 5, 24, dtype=torch.float64)
    w[5] = 1.0
    (out * w).sum().backward()
    for name in ("a", "c"):
        assert torch.count_nonzero(layer.lora_A[name].grad) == 0
        assert torch.count_nonzero(layer.lora_B[name].grad) == 0
    assert torch.count_nonzero(layer.lora_B["b"].grad) > 0
    assert layer.lora_A["empty"].grad is None  # not in the graph at all


def test_no_layout_or_base_only_layout_is_the_base_model() -> None:
    layer = _layer(torch.float64)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))
    with layer.slot.use(BatchLayout.from_sizes([(None, 4)])):
        assert torch.equal(layer(x), layer.base(x))
    # an adapter that does not target this layer counts as base-only here
    with layer.slot.use(BatchLayout.from_sizes([("other", 4)])):
        assert torch.equal(layer(x), layer.base(x))


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match="two blocks"):
        BatchLayout.from_row_adapters(["a", "b", "a"])
    with pytest.raises(ValueError, match="tile"):
        BatchLayout((Segment("a", 0, 2), Segment("b", 3, 4)))
    layer = _layer(torch.float64)
    with layer.slot.use(BatchLayout.from_sizes([("a", 3)])), pytest.raises(ValueError, match="rows"):
        layer(torch.randn(4, 16, dtype=torch.float64))
    assert BatchLayout.from_row_adapters(["a", "a", None, "b"]).rows_of("b") == slice(3, 4)


def test_grouped_mm_backend_matches_segment_loop() -> None:
    """The grouped kernel path, here through torch's CPU fallback in float32 (the kernel only
    exists for float32/bf16/fp16). Tolerance 1e-5: float32 with rank padding and a different
    summation order (the scaling is folded into B) gives ~1e-6 relative differences."""
    assert grouped_mm_supported("cpu", torch.float32), "torch._grouped_mm missing on CPU"
    seg, grp = _layer(torch.float32, "segment"), _layer(torch.float32, "grouped")
    layout = BatchLayout.from_sizes(SIZES)
    x = torch.randn(10, 5, 16, requires_grad=True)
    w = torch.randn(10, 5, 24)
    with seg.slot.use(layout):
        y_seg = seg(x)
    with grp.slot.use(layout):
        y_grp = grp(x)
    assert torch.allclose(y_seg, y_grp, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(_grads(seg, x, y_seg, w), _grads(grp, x, y_grp, w), strict=True):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-5)


def test_capability_probe_first_called_inside_a_checkpointed_forward_keeps_backward_working() -> None:
    """On a GPU the first fused step (checkpointed layers) used to run the grouped-GEMM probe in the
    original forward but not in the recomputation (cached): torch.utils.checkpoint then refused the
    backward (58 tensors saved vs 55). The probe's own saved tensors are now hidden from it."""
    from torch.utils.checkpoint import checkpoint

    from lorafleet.workers.multilora.layer import grouped_mm_supported

    grouped_mm_supported.cache_clear()
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def forward(v: torch.Tensor) -> torch.Tensor:
        grouped_mm_supported("cpu", torch.float64)  # runs only the first time (cache)
        return (v * v.sin()).sum()

    checkpoint(forward, x, use_reentrant=False).backward()
    torch.testing.assert_close(x.grad, x.sin() + x * x.cos(), rtol=0, atol=1e-12)
