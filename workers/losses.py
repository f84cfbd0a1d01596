"""Per-adapter token losses. Every statistic is computed over one adapter's rows only, and each
adapter's loss is divided by its own token count: nothing couples adapters in a fused batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafleet.common.schemas import LossSpec
from lorafleet.common.tinker.losses import LOSS_CONFIG, LOSS_FNS, PPO_CLIP_HIGH, PPO_CLIP_LOW, LossFn

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
    targets: torch.Tensor | None = None,  # (B, T): explicit target of every position
) -> torch.Tensor:
    """(B, T-1): `token_logprobs(head(hidden), input_ids)` without ever holding more than
    `chunk_tokens` rows of logits. The B*T positions are flattened and scored `chunk_tokens` at
    a time; under autograd each chunk is checkpointed, so backward recomputes that chunk's
    logits instead of keeping every chunk's (n, V) softmax alive until backward.

    With explicit `targets` (client datums, pre-shifted): (B, T), position t scored at
    targets[:, t], nothing dropped."""
    b, t, h = hidden.shape
    explicit = targets is not None
    if explicit:
        targets = targets.reshape(b * t)  # (B*T,)
    else:
        # target of position t is token t+1; the last position of a row gets a dummy target
        # and is dropped below (B wasted positions, no copy of the hidden states)
        targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(b * t)
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
    scored = torch.cat(out).view(b, t)
    return scored if explicit else scored[:, :-1]


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



# ---- client (Tinker) objectives: SUMS over an op's tokens, no normalisation ----------------
# the loss names and their config keys: `common/tinker/losses.py`, the one closed set


@dataclass(frozen=True)
class ClientLoss:
    """One client op's objective (Tinker semantics: the loss is a plain sum over tokens)."""

    fn: LossFn
    clip_low: float = PPO_CLIP_LOW  # ppo: clip(r, clip_low, clip_high), Tinker's clip_low_threshold
    clip_high: float = PPO_CLIP_HIGH

    def __post_init__(self) -> None:
        if self.fn not in LOSS_FNS:
            raise ValueError(f"unsupported loss_fn {self.fn!r}; supported: {LOSS_FNS}")
        if not (0.0 <= self.clip_low <= self.clip_high):
            raise ValueError(f"ppo needs 0 <= clip_low_threshold <= clip_high_threshold, got "
                             f"{self.clip_low}, {self.clip_high}")

    @classmethod
    def from_config(cls, fn: str, config: Mapping[str, float] | None = None) -> ClientLoss:
        """From a request's `loss_fn` and `loss_fn_config`; unknown keys are an error."""
        config = dict(config or {})
        unknown = set(config) - set(LOSS_CONFIG.get(fn, {}))
        if fn not in LOSS_FNS:
            raise ValueError(f"unsupported loss_fn {fn!r}; supported: {LOSS_FNS}")
        if unknown:
            raise ValueError(f"loss_fn_config keys {sorted(unknown)} are not understood by {fn!r}")
        return cls(fn, float(config.get("clip_low_threshold", PPO_CLIP_LOW)),  # type: ignore[arg-type]
                   float(config.get("clip_high_threshold", PPO_CLIP_HIGH)))

    @property
    def needs(self) -> tuple[str, ...]:
        """The ClientRow fields this objective reads (cross_entropy's weights default to 1)."""
        return () if self.fn == "cross_entropy" else ("advantages", "sampling_logprobs")


def _cross_entropy(loss: ClientLoss, logprobs: torch.Tensor, weights: torch.Tensor,
                   advantages: torch.Tensor, sampling_logprobs: torch.Tensor) -> torch.Tensor:
    return -weights * logprobs


def _importance_sampling(loss: ClientLoss, logprobs: torch.Tensor, weights: torch.Tensor,
                         advantages: torch.Tensor, sampling_logprobs: torch.Tensor) -> torch.Tensor:
    ratio = torch.exp(logprobs - sampling_logprobs)
    return -ratio * advantages


def _ppo(loss: ClientLoss, logprobs: torch.Tensor, weights: torch.Tensor,
         advantages: torch.Tensor, sampling_logprobs: torch.Tensor) -> torch.Tensor:
    ratio = torch.exp(logprobs - sampling_logprobs)
    clipped = torch.clamp(ratio, loss.clip_low, loss.clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


# loss name -> its per-token math: exactly `LOSS_FNS` (tests/unit/test_tinker_closed_sets.py)
CLIENT_OBJECTIVES: Mapping[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
}


def client_elementwise(
    loss: ClientLoss,
    logprobs: torch.Tensor,  # (n, T) logp of targets[i] at position i
    weights: torch.Tensor,  # (n, T)
    advantages: torch.Tensor,  # (n, T)
    sampling_logprobs: torch.Tensor,  # (n, T)
) -> torch.Tensor:
    """(n, T) per-token loss, before masking padding:
    cross_entropy = -w * logp; importance_sampling = -exp(logp - q) * A;
    ppo = -min(r * A, clip(r, low, high) * A) with r = exp(logp - q)."""
    return CLIENT_OBJECTIVES[loss.fn](loss, logprobs, weights, advantages, sampling_logprobs)
