"""Rollout engines: generate completions for many adapters in one batched decode.

`TorchRolloutEngine` is the pure-torch engine: the same `MultiLoRALinear` layers as the trainer,
one prefill and one token-by-token decode with the Hugging Face KV cache for every request of
every adapter at once. It is used where vLLM is absent and as the reference in tests.

Why the result of a request does not depend on what else is in the batch:
- rows are independent in every layer (attention is per row, each LoRA delta touches its own
  adapter's rows only, normalisation is per token);
- prompts are LEFT-padded with explicit position ids, so every real token keeps the position it
  has alone, and padding is masked out of attention;
- sampling draws from one `torch.Generator` per request, seeded from the request, a fixed number
  of uniforms per step (one per sample row), in a fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from lorafleet.workers.multilora.layout import BatchLayout
from lorafleet.workers.multilora.model import MultiLoRAModel


@dataclass(frozen=True)
class RolloutRequest:
    adapter: str | None  # None: the base model alone
    prompt_ids: tuple[int, ...]
    num_samples: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    seed: int

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token (bos)")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if not self.temperature >= 0:  # also rejects nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Sample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # ends with eos if the model stopped by itself
    logprobs: tuple[float, ...]  # temperature-1 logprob of each completion token (the trainer's)


class RolloutEngine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        """One list of `num_samples` samples per request, in request order."""
        ...


class TorchRolloutEngine:
    def __init__(self, model: MultiLoRAModel, eos_id: int, pad_id: int) -> None:
        self.model = model
        self.eos_id = eos_id
        self.pad_id = pad_id

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        if not requests:
            return []
        unknown = sorted({r.adapter for r in requests if r.adapter is not None} - set(self.model.specs))
        if unknown:  # MultiLoRALinear would silently run the base model for them
            raise KeyError(f"adapters not loaded: {unknown}")
        rows = self._rows(requests)
        hf = self.model.model
        was_training = hf.training
        hf.eval()
        try:
            with torch.no_grad():
                tokens, logps, lengths = self._decode(requests, rows)
        finally:
            hf.train(was_training)
        out: list[list[Sample | None]] = [[None] * r.num_samples for r in requests]
        for i, (ri, si) in enumerate(rows):
            n = int(lengths[i])
            out[ri][si] = Sample(requests[ri].prompt_ids, tuple(tokens[i, :n].tolist()),
                                 tuple(logps[i, :n].tolist()))
        return out  # type: ignore[return-value]

    @staticmethod
    def _rows(requests: Sequence[RolloutRequest]) -> list[tuple[int, int]]:
        """(request index, sample index) per batch row, adapter-major (adapters in order of first
        appearance, base-only rows as one block too), requests in order within an adapter."""
        rank: dict[str | None, int] = {}
        for r in requests:
            rank.setdefault(r.adapter, len(rank))
        order = sorted(range(len(requests)), key=lambda i: rank[requests[i].adapter])  # stable
        return [(ri, si) for ri in order for si in range(requests[ri].num_samples)]

    def _decode(
        self, requests: Sequence[RolloutRequest], rows: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens (B, S) long, logprobs (B, S), lengths (B,): row i's completion is the first
        lengths[i] entries."""
        hf = self.model.model
        device = next(hf.parameters()).device
        b = len(rows)
        layout = BatchLayout.from_row_adapters([requests[ri].adapter for ri, _ in rows])
        width = max(len(requests[ri].prompt_ids) for ri, _ in rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        for i, (ri, _) in enumerate(rows):
            p = requests[ri].prompt_ids
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)  # left padding
            attention[i, width - len(p):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P): a real token's solo position

        budget = torch.tensor([requests[ri].max_new_tokens for ri, _ in rows], device=device)  # (B,)
        temps = torch.tensor([requests[ri].temperature for ri, _ in rows], dtype=torch.float64,
                             device=device)  # (B,) float64: T exactly as requested
        sampler = _Sampler(requests, rows, device)
        steps = int(budget.max())
        tokens = torch.full((b, steps), self.pad_id, dtype=torch.long, device=device)  # (B, S)
        logps = torch.zeros((b, steps), dtype=torch.float64, device=device)  # (B, S)
        lengths = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
        done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,)
        cache = DynamicCache(config=hf.config)

        with self.model.slot.use(layout):  # the same per-row layout for prefill and every decode step
            out = hf(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            for t in range(steps):
                logits = out.logits[:, -1]  # (B, V)
                if logits.dtype in (torch.bfloat16, torch.float16):  # as the trainer scores them
                    logits = logits.float()
                logp = torch.log_softmax(logits, dim=-1)  # temperature 1: what the trainer scores
                nxt = sampler.pick(logits, temps, t)  # (B,)
                active = ~done
                tokens[active, t] = nxt[active]
                logps[active, t] = logp[active].gather(-1, nxt[active, None]).squeeze(-1).double()
                lengths += active.long()
                done |= (nxt == self.eos_id) | (lengths >= budget)
                if bool(done.all()):
                    break
                # finished rows are fed pad, masked: their outputs are ignored, and rows never mix
                feed = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)[:, None]  # (B, 1)
                attention = torch.cat([attention, (~done).long()[:, None]], dim=1)  # (B, P+t+1)
                pos = (attention.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
                out = hf(input_ids=feed, attention_mask=attention, position_ids=pos,
                         past_key_values=out.past_key_values, use_cache=True)
        return tokens.cpu(), logps.cpu(), lengths.cpu()


class _Sampler:
    """Greedy or temperature sampling, with one generator per request.

    Each step draws exactly one uniform per sample row of every request that samples (inverse
    CDF), so the stream a request consumes depends on nothing but its own number of steps.
    """

    def __init__(self, requests: Sequence[RolloutRequest], rows: list[tuple[int, int]],
                 device: torch.device) -> None:
        self.requests = requests
        self.generators = {ri: torch.Generator().manual_seed(r.seed)
                           for ri, r in enumerate(requests) if r.temperature > 0}
        # batch rows of each sampling request, in sample order
        self.rows_of: dict[int, list[int]] = {ri: [] for ri in self.generators}
        for i, (ri, _) in enumerate(rows):
            if ri in self.rows_of:
                self.rows_of[ri].append(i)
        self.device = device

    def pick(self, logits: torch.Tensor, temps: torch.Tensor, t: int) -> torch.Tensor:
        """(B, V) logits, (B,) temperatures -> (B,) next tokens."""
        nxt = logits.argmax(-1)  # greedy rows (temperature 0) keep this
        if not self.generators:
            return nxt
        u = torch.zeros(logits.shape[0], dtype=torch.float64)  # (B,)
        for ri, g in self.generators.items():  # fixed order: requests in submission order
            if t < self.requests[ri].max_new_tokens:
                u[self.rows_of[ri]] = torch.rand(len(self.rows_of[ri]), generator=g, dtype=torch.float64)
        sampling = temps > 0  # (B,)
        scaled = logits[sampling].double() / temps[sampling, None].double()  # softmax(logits / T)
        cdf = torch.softmax(scaled, dim=-1).cumsum(-1)  # (n, V)
        x = (u.to(self.device)[sampling] * cdf[:, -1])[:, None]  # (n, 1)
        picked = torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        nxt[sampling] = picked
        return nxt
