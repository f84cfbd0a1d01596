"""Per-adapter token losses. Every statistic is computed over one adapter's rows only, and each
adapter's loss is divided by its own token count: nothing couples adapters in a fused batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafleet.common.schemas import LossSpec

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V), (...) -> (...): log_softmax in float32 (or float64) at the target ids."""
    logp = F.log_softmax(logits.float() if logits.dtype in LOW_PRECISION else logits, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T-1): logprob of token t+1 given tokens <= t."""
    return _gather_logprobs(logits[:, :-1], input_ids[:, 1:])


def chunked_token_logprobs(
    hidden: torch.Tensor,  # (B, T, H) the decoder's final (normed) hidden states
    head: Callable[[torch.Tensor], torch.Tensor],  # (n, H) -> (n, V), the lm_head
    input_ids: torch.Tensor,  # (B, T)
    chunk_tokens: int,
) -> torch.Tensor:
    """(B, T-1): `token_logprobs(head(hidden), input_ids)` without ever holding more than
    `chunk_tokens` rows of logits. The B*T positions are flattened and scored `chunk_tokens` at
    a time; under autograd each chunk is checkpointed, so backward recomputes that chunk's
    logits instead of keeping every chunk's (n, V) softmax alive until backward."""
    b, t, h = hidden.shape
    # target of position t is token t+1; the last position of a row gets a dummy target and is
    # dropped below (B wasted positions, no copy of the hidden states)
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(b * t)  # (B*T,)
    flat = hidden.reshape(b * t, h)  # (B*T, H), a view
    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for s in range(0, b * t, chunk_tokens):
        hc, tc = flat[s:s + chunk_tokens], targets[s:s + chunk_tokens]  # (n, H), (n,)
        if grad:
            out.append(checkpoint(_chunk_logprobs, hc, tc, head, use_reentrant=False,
                                  preserve_rng_state=False))  # no randomness in a chunk
        else:
            out.append(_chunk_logprobs(hc, tc, head))
    return torch.cat(out).view(b, t)[:, :-1]


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    return _gather_logprobs(head(hidden), targets)  # (n, H) -> (n, V) -> (n,)


def token_loss(
    spec: LossSpec,
    logprobs: torch.Tensor,  # (n, T-1)
    advantages: torch.Tensor,  # (n,)
    old_logprobs: torch.Tensor | None,  # (n, T-1) or None: on-policy
    ref_logprobs: torch.Tensor | None,  # (n, T-1) base model (adapter off), for the KL term
) -> torch.Tensor:
    """(n, T-1) loss per token, before masking."""
    adv = advantages[:, None]
    if spec.kind == "nll":
        loss = -logprobs
    elif spec.kind == "pg":
        loss = -adv * logprobs
    else:  # ppo_clip
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        ratio = torch.exp(logprobs - old)
        clipped = torch.clamp(ratio, 1.0 - spec.clip_eps, 1.0 + spec.clip_eps)
        loss = -torch.minimum(ratio * adv, clipped * adv)
    if spec.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs the base model's logprobs")
        log_ratio = ref_logprobs - logprobs
        loss = loss + spec.kl_coef * (torch.exp(log_ratio) - log_ratio - 1.0)  # k3 estimator
    return loss

