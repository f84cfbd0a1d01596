"""How a fused step runs forward, backward and the optimizer: plain torch, or a DeepSpeed engine.

Both hold one torch AdamW with one param group per adapter. Per-adapter clipping and skipping
happen in `FusedTrainStep` between `backward` and `step`, so DeepSpeed runs with
`gradient_clipping: 0` (its global clip would couple adapters).

A step is several micro-batches: `hidden_states` and `backward` once per micro-batch (gradients
accumulate, unscaled: each adapter's loss is already divided by its full-batch token count),
then one `step`.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal, Protocol

import torch
from torch import nn

BackendName = Literal["torch", "deepspeed"]


class StepBackend(Protocol):
    optimizer: torch.optim.Optimizer

    def forward(self, **inputs: torch.Tensor) -> Any: ...
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...


def _first_group_params(model: nn.Module) -> list[nn.Parameter]:
    # torch optimizers refuse an empty parameter list; the placeholder group holds a frozen
    # scalar that never has a gradient, so it is never stepped.
    return [nn.Parameter(torch.zeros((), device=next(model.parameters()).device), requires_grad=False)]


def decoder_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) -> (B, T, H): the decoder's final normed hidden states of a Llama/Qwen2-style HF
    causal LM, whose logits are `model.get_output_embeddings()(hidden)`. No KV cache."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def new_optimizer(model: nn.Module) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([{"params": _first_group_params(model), "adapter": None}], foreach=False)
    return opt


class TorchBackend:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = new_optimizer(model)

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return decoder_hidden_states(self.model, input_ids, attention_mask)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()


def _ensure_dist_env() -> None:
    """DeepSpeed on one process still initialises torch.distributed (gloo on CPU)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    # JIT ops are built once, then reused: the worker sets TORCH_EXTENSIONS_DIR from its
    # settings (settings.resolved_torch_extensions_dir) before it builds a step backend


class DeepSpeedBackend:
    """ZeRO stage 0 engine over the LoRA parameters with a client AdamW."""

    def __init__(self, model: nn.Module, zero_stage: int = 0) -> None:
        _ensure_dist_env()
        import deepspeed

        # > 0: gradients live partitioned in the engine, not in p.grad, so pending client
        # gradients cannot be stashed across a step (FusedTrainStep refuses client ops then)
        self.zero_stage = zero_stage

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # the caller owns the accumulation boundary: every `backward` only accumulates
            # (no 1/GAS scaling, no reduction), each `step` is one boundary and one update
            "managed_gradient_accumulation": False,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        optimizer = new_optimizer(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        # One process per device, each training its own adapters: there is no data-parallel
        # peer, and an all-reduce over one rank is the identity (it also rejects float64 grads
        # and would materialise zero grads for absent adapters).
        if self.engine.world_size == 1:
            self.engine.enable_backward_allreduce = False
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.engine(**inputs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # the decoder itself, not `engine(...)`, which would compute full-vocabulary logits; at
        # ZeRO stage 0 the engine's forward adds nothing (no parameter gathering, no hooks that
        # `engine.backward` needs), and ZeRO-3 gathers through hooks on the submodules
        return decoder_hidden_states(self.model, input_ids, attention_mask)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def make_backend(name: BackendName, model: nn.Module) -> StepBackend:
    if name == "torch":
        return TorchBackend(model)
    if name == "deepspeed":
        return DeepSpeedBackend(model)
    raise ValueError(f"unknown step backend {name!r}; use torch or deepspeed")
