"""Per-adapter token losses. Every statistic is computed over one adapter's rows only, and each
adapter's loss is divided by its own token count: nothing couples adapters in a fused batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.common.schemas import LossSpec


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T-1): logprob of token t+1 given tokens <= t."""
    logp = F.log_softmax(logits[:, :-1].float() if logits.dtype in (torch.bfloat16, torch.float16)
                         else logits[:, :-1], dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


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


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the adapter's token losses over its own number of trained tokens."""
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)
