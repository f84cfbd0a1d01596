"""`MultiLoRALinear`: a frozen base linear shared by many LoRA adapters in one batch.

    y = base(x)                                  once, for every row of the batch
    y[rows_a] += (x[rows_a] @ A_a.T) @ B_a.T * s_a  for each adapter a in the layout

Adapters never see each other's rows, so an adapter's output and gradients are exactly what
they would be alone. Two backends compute the deltas:
- "segment": a loop over the layout's row blocks (exact; the default, and the reference);
- "grouped": two `torch._grouped_mm` calls over all blocks at once (GPU bf16 path), ranks
  zero-padded to a common multiple of 8, which changes nothing numerically.
Weights are never gathered per token.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.workers.multilora.layout import BatchLayout, LayoutSlot

Backend = Literal["segment", "grouped", "auto"]


@cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Capability check: does `torch._grouped_mm` run forward and backward here?"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # identity hooks: inside a checkpointed forward (the first call can come from one) the probe's
    # saved tensors must not be recorded, or the recomputation (cache hit, no probe) mismatches
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
            x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 16, 8, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([4, 8], device=device_type, dtype=torch.int32)
            out = torch._grouped_mm(x, w, offs=offs)
            out.register_hook(torch.Tensor.contiguous)
            out.sum().backward()  # an expanded (stride-0) cotangent, as .sum() produces
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "segment":
        return "segment"
    ok = grouped_mm_supported(device.type, dtype)
    if backend == "grouped":
        if not ok:
            raise RuntimeError(f"torch._grouped_mm is not supported on {device.type}/{dtype}")
        return "grouped"
    # auto: the grouped kernel pays off on GPUs; the CPU fallback is a loop anyway
    return "grouped" if ok and device.type == "cuda" else "segment"


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, slot: LayoutSlot, backend: Backend = "segment") -> None:
        super().__init__()
        self.base = base
        self.slot = slot
        self.backend: Backend = backend
        if backend != "segment":  # probe now, not in the first (possibly checkpointed) forward
            grouped_mm_supported(base.weight.device.type, base.weight.dtype)
        self.lora_A = nn.ParameterDict()  # adapter -> (r, in)
        self.lora_B = nn.ParameterDict()  # adapter -> (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (the adapter starts as a no-op)."""
        w = self.base.weight
        # drawn on the CPU (the seed's generator is a CPU one), so an adapter's initial weights are
        # the same on every device
        a = torch.empty(rank, self.in_features, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A[name] = nn.Parameter(a.to(w.device))
        b = torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout[name] = dropout

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, ..., out)
        layout = self.slot.layout
        if layout is None:
            return y
        active = [s for s in layout.segments if s.adapter in self.lora_A and s.size > 0]
        if not active:
            return y
        if layout.num_rows != x.shape[0]:
            raise ValueError(f"layout covers {layout.num_rows} rows, batch has {x.shape[0]}")
        backend = resolve_backend(self.backend, x.device, x.dtype)
        needs_dropout = self.training and any(self.dropout[s.adapter] > 0 for s in active)
        if backend == "grouped" and not needs_dropout:
            return self._grouped(x, y, layout)
        return self._segment_loop(x, y, layout)

    def _segment_loop(self, x: torch.Tensor, y: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        # split/cat rather than slicing: the backward of a slice materialises a zero tensor the
        # size of the whole batch per segment (quadratic in the number of adapters); split's is
        # one cat
        xs = x.split([seg.size for seg in layout.segments])
        uniform = self._uniform_delta(xs, layout)
        if uniform is not None:
            return y + uniform
        deltas = []
        for seg, xi in zip(layout.segments, xs, strict=True):
            if seg.adapter in self.lora_A and seg.size > 0:
                p = self.dropout[seg.adapter]
                if p > 0 and self.training:
                    xi = F.dropout(xi, p)
                a, b = self.lora_A[seg.adapter], self.lora_B[seg.adapter]
                # same operation order as peft's Linear: base + B(A(x)) * scaling, as one slice
                # of `_uniform_delta`'s bmm: a (rows, in) @ (in, r) mm and a bmm slice round
                # their backward differently (MKL), and replay (workers/replay.py) is only
                # bit-exact if an adapter's numbers do not depend on which path its batch took
                x3 = xi.reshape(1, -1, self.in_features)  # (1, S*T, in)
                h = torch.bmm(x3, a.T.unsqueeze(0))  # (1, S*T, r)
                delta = torch.bmm(h, b.T.unsqueeze(0)) * self.scaling[seg.adapter]  # (1, S*T, out)
                deltas.append(delta.view(*xi.shape[:-1], self.out_features))
            else:
                deltas.append(y.new_zeros((seg.size, *y.shape[1:])))
        return y + torch.cat(deltas, dim=0)

    def _uniform_delta(self, xs: tuple[torch.Tensor, ...], layout: BatchLayout) -> torch.Tensor | None:
        """All segments adapted, equally sized, of one rank, no dropout (the common RL batch:
        P prompts x G samples per experiment): every delta in two batched matmuls. -> the
        deltas of all rows, or None where the layout is not uniform."""
        segs = layout.segments
        if len(segs) < 2 or any(s.adapter not in self.lora_A for s in segs):
            return None
        names = [s.adapter for s in segs]
        a = [self.lora_A[n] for n in names]
        if len({s.size for s in segs}) != 1 or len({t.shape[0] for t in a}) != 1:
            return None
        if self.training and any(self.dropout[n] > 0 for n in names):
            return None
        n, rows = len(segs), xs[0].numel() // self.in_features  # rows of tokens per segment
        x3 = torch.stack(xs).view(n, rows, self.in_features)  # (N, S*T, in)
        a3 = torch.stack(a).transpose(1, 2)  # (N, in, r)
        b3 = torch.stack([self.lora_B[m] for m in names]).transpose(1, 2)  # (N, r, out)
        scale = x3.new_tensor([self.scaling[m] for m in names]).view(n, 1, 1)
        delta = torch.bmm(torch.bmm(x3, a3), b3) * scale  # (N, S*T, out)
        return delta.view(n * xs[0].shape[0], *xs[0].shape[1:-1], self.out_features)

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        rows_per_token = x[0].numel() // self.in_features  # tokens per row (T, or 1 in decode)
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        ranks = [self.lora_A[s.adapter].shape[0] for s in layout.segments if s.adapter in self.lora_A]
        r_pad = max(8, -(-max(ranks) // 8) * 8)  # strides must be 16-byte multiples
        a_blocks, b_blocks, offs, pos = [], [], [], 0
        for seg in layout.segments:
            if seg.adapter in self.lora_A:
                a, b = self.lora_A[seg.adapter], self.lora_B[seg.adapter]
                r = a.shape[0]
                a_blocks.append(F.pad(a.T, (0, r_pad - r)))  # (in, r_pad)
                b_blocks.append(F.pad(b.T * self.scaling[seg.adapter], (0, 0, 0, r_pad - r)))
            else:  # base-only rows: a zero group keeps the offsets contiguous
                a_blocks.append(x2.new_zeros(self.in_features, r_pad))
                b_blocks.append(x2.new_zeros(r_pad, self.out_features))
            pos += seg.size * rows_per_token
            offs.append(pos)
        offsets = torch.tensor(offs, device=x.device, dtype=torch.int32)
        h = torch._grouped_mm(x2, torch.stack(a_blocks), offs=offsets)  # (B*T, r_pad)
        delta = torch._grouped_mm(h, torch.stack(b_blocks), offs=offsets)  # (B*T, out)
        if delta.requires_grad:  # the kernels' backward rejects stride-0 (expanded) cotangents
            h.register_hook(torch.Tensor.contiguous)
            delta.register_hook(torch.Tensor.contiguous)
        return y + delta.view_as(y)
