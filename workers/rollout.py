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

Decoding options (`RolloutRequest`), the same in both engines (`workers/vllm_engine.py`):
- temperature 0 is greedy; otherwise the logits are divided by the temperature, then top-k
  (keep the logits >= the k-th largest; 0 = off), then top-p (keep the smallest set of most
  likely tokens whose probability, after top-k, reaches p; the most likely token always stays)
  are applied, as vLLM does, and the token is drawn from what is left;
- a completion ends with (and keeps) the first token that is an eos id of the model (the
  tokenizer's and the generation config's) or one of the request's `stop_token_ids`;
- a stop string ends the completion with the token whose decoding completes it: the text is
  decoded incrementally as vLLM does (`tokenizers.decoders.DecodeStream` primed with the prompt,
  special tokens skipped, a stop token never decoded), and the first token after which the text
  contains a stop string is the last one kept. The token ids keep that token; the text without
  the stop string is what vLLM returns with `include_stop_str_in_output=False`;
- a completion is cut after `max_new_tokens` tokens or when prompt + completion fill the model's
  context (`max_model_len`), whichever comes first: `Sample.truncated` is True exactly then (no
  eos, stop token or stop string ended it). A prompt that leaves no room for one new token is an
  error (`ContextLengthError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token (bos)")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if not self.temperature >= 0:  # also rejects nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")


class ContextLengthError(ValueError):
    """A prompt leaves no room for one new token in the model's context."""


def check_context(request: RolloutRequest, max_model_len: int | None) -> None:
    """Raise `ContextLengthError` when `request`'s prompt fills `max_model_len` (None: no limit)."""
    if max_model_len is not None and len(request.prompt_ids) >= max_model_len:
        raise ContextLengthError(
            f"a prompt of {len(request.prompt_ids)} tokens leaves no room for a completion in the "
            f"model's context of {max_model_len} tokens")


def new_token_budget(request: RolloutRequest, max_model_len: int | None) -> int:
    """max_new_tokens, clamped so that prompt + completion fit the context."""
    check_context(request, max_model_len)
    if max_model_len is None:
        return request.max_new_tokens
    return min(request.max_new_tokens, max_model_len - len(request.prompt_ids))


@dataclass(frozen=True)
class Sample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # ends with the stop token (eos, ...) if one ended it
    logprobs: tuple[float, ...]  # temperature-1 logprob of each completion token (the trainer's)
    truncated: bool = False  # cut by max_new_tokens or the context, not by eos/stop token/string
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


class RolloutEngine(Protocol):
    max_model_len: int | None  # the model's context: prompt + completion tokens

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        """One list of `num_samples` samples per request, in request order."""
        ...


class TorchRolloutEngine:
    """`eos_id`: one id or several; the ids of the model's `generation_config.eos_token_id` are
    added (vLLM stops at those too). `tokenizer` decodes for stop strings (needed only by requests
    that have some)."""

    def __init__(self, model: MultiLoRAModel, eos_id: int | Iterable[int], pad_id: int,
                 tokenizer: Any = None) -> None:
        self.model = model
        self.eos_ids = model_eos_ids(model.model, eos_id)
        self.eos_id = self.eos_ids[0]
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.max_model_len: int | None = getattr(model.model.config, "max_position_embeddings", None)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        if not requests:
            return []
        unknown = sorted({r.adapter for r in requests if r.adapter is not None} - set(self.model.specs))
        if unknown:  # MultiLoRALinear would silently run the base model for them
            raise KeyError(f"adapters not loaded: {unknown}")
        for r in requests:
            check_context(r, self.max_model_len)
            if r.stop and self.tokenizer is None:
                raise ValueError("stop strings need the tokenizer: TorchRolloutEngine(..., tokenizer=)")
        rows = self._rows(requests)
        hf = self.model.model
        was_training = hf.training
        hf.eval()
        try:
            with torch.no_grad():
                tokens, logps, lengths, reasons = self._decode(requests, rows)
        finally:
            hf.train(was_training)
        out: list[list[Sample | None]] = [[None] * r.num_samples for r in requests]
        for i, (ri, si) in enumerate(rows):
            n = int(lengths[i])
            out[ri][si] = Sample(requests[ri].prompt_ids, tuple(tokens[i, :n].tolist()),
                                 tuple(logps[i, :n].tolist()), truncated=reasons[i] is None,
                                 stop_reason=reasons[i])
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int | str | None]]:
        """-> tokens (B, S) long, logprobs (B, S), lengths (B,), stop reasons (B): row i's
        completion is the first lengths[i] entries; its stop reason is the stop token id or stop
        string that ended it, None if it was cut by its budget."""
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

        budget = torch.tensor([new_token_budget(requests[ri], self.max_model_len) for ri, _ in rows],
                              device=device)  # (B,)
        stop_ids = [sorted({*self.eos_ids, *requests[ri].stop_token_ids}) for ri, _ in rows]
        width_k = max(len(x) for x in stop_ids)
        stop_table = torch.tensor([x + [-1] * (width_k - len(x)) for x in stop_ids], device=device)  # (B, K)
        texts = {i: _StopStrings(requests[ri], self.tokenizer) for i, (ri, _) in enumerate(rows)
                 if requests[ri].stop}
        reasons: list[int | str | None] = [None] * b
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
                by_token = active & (stop_table == nxt[:, None]).any(-1)  # (B,)
                picked = nxt.tolist()  # one device sync per step for the bookkeeping below
                for i in by_token.nonzero().flatten().tolist():
                    reasons[i] = picked[i]
                if texts:  # rows with stop strings: decode their new token (a stop token is no text)
                    decode = (active & ~by_token).tolist()
                    for i, watch in texts.items():
                        hit = watch.step(picked[i]) if decode[i] else None
                        if hit is not None:
                            reasons[i] = hit
                    by_text = torch.tensor([isinstance(r, str) for r in reasons], device=device)
                    by_token |= by_text
                done |= by_token | (lengths >= budget)
                if bool(done.all()):
                    break
                # finished rows are fed pad, masked: their outputs are ignored, and rows never mix
                feed = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)[:, None]  # (B, 1)
                attention = torch.cat([attention, (~done).long()[:, None]], dim=1)  # (B, P+t+1)
                pos = (attention.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
                out = hf(input_ids=feed, attention_mask=attention, position_ids=pos,
                         past_key_values=out.past_key_values, use_cache=True)
        return tokens.cpu(), logps.cpu(), lengths.cpu(), reasons


def model_eos_ids(hf: Any, eos_id: int | Iterable[int] | None) -> tuple[int, ...]:
    """`eos_id` (first) and the ids of the model's `generation_config.eos_token_id`: the ids vLLM
    stops at (its tokenizer's eos and the generation config's)."""
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id or ())
    gen = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    ids += [gen] if isinstance(gen, int) else list(gen or ())
    out = tuple(dict.fromkeys(int(i) for i in ids))
    if not out:
        raise ValueError("the model has no eos token id")
    return out


class _StopStrings:
    """The incremental text of one completion and the stop strings it watches for, with vLLM's
    rules (`vllm.v1.engine.detokenizer`): text from a `DecodeStream` primed with the prompt,
    special tokens skipped; a stop string counts when it ends in the text a new token added; of
    several, the one that ends first wins (then list order)."""

    def __init__(self, request: RolloutRequest, tokenizer: Any) -> None:
        self.stop = request.stop
        self.text = ""
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's `tokenizers.Tokenizer`
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(ids=list(request.prompt_ids), skip_special_tokens=True)
            self._next = lambda tok: stream.step(backend, tok) or ""
        else:  # a slow tokenizer: decode the whole completion each step
            ids: list[int] = []

            def step(tok: int) -> str:
                ids.append(tok)
                full = tokenizer.decode(ids, skip_special_tokens=True)
                new, self._decoded = full[len(self._decoded):], full
                return new

            self._decoded = ""
            self._next = step

    def step(self, token: int) -> str | None:
        """Append `token`'s text -> the stop string it completed, or None."""
        new = self._next(token)
        if not new:
            return None
        self.text += new
        best, best_end = None, None
        for s in self.stop:
            i = self.text.find(s, max(0, len(self.text) + 1 - len(new) - len(s)))
            if i != -1 and (best_end is None or i + len(s) < best_end):
                best, best_end = s, i + len(s)
        return best


class _Sampler:
    """Greedy or temperature sampling with top-k / top-p, with one generator per request.

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
        self.top_k = torch.tensor([requests[ri].top_k for ri, _ in rows], dtype=torch.long, device=device)
        self.top_p = torch.tensor([requests[ri].top_p for ri, _ in rows], dtype=torch.float64, device=device)

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
        scaled = filter_top_k_top_p(scaled, self.top_k[sampling], self.top_p[sampling])
        cdf = torch.softmax(scaled, dim=-1).cumsum(-1)  # (n, V)
        x = (u.to(self.device)[sampling] * cdf[:, -1])[:, None]  # (n, 1)
        picked = torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        nxt[sampling] = picked
        return nxt


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(n, V) temperature-scaled logits, (n,) top_k (0: off), (n,) top_p (1: off) -> the logits
    with the tokens outside the top-k set and then outside the top-p nucleus set to -inf (vLLM's
    `apply_top_k_top_p`: ties at the k-th value stay; the most likely token always stays)."""
    use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1).any())
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1)  # ascending
    if use_k:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (n,)
        kth = ordered.gather(-1, (vocab - k)[:, None])  # (n, 1): the k-th largest
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if use_p:
        cum = torch.softmax(ordered, dim=-1).cumsum(-1)  # (n, V)
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)
