"""Shared helpers for the tests: deterministic data and an independent solo reference trainer
built from plain PEFT + torch AdamW (no lorafleet training code besides the loss formula)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lorafleet.common.schemas import AdapterTrainSpec, LoRASpec, LossSpec, OptimizerSpec
from lorafleet.workers.batch import TrainRow, collate
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.losses import token_logprobs, token_loss
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.tiny_model import load_base_model

PAD = 0


def make_rows(adapter: str, n: int, seed: int, with_old: bool = True) -> list[TrainRow]:
    """n rows of random length 6..12: a 3-token prompt, the rest trained."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 13, (1,), generator=g))
        ids = torch.randint(4, 100, (length,), generator=g).tolist()
        mask = [0, 0, 0] + [1] * (length - 3)
        adv = float(torch.randn((), generator=g))
        old = (-4.0 + 0.5 * torch.randn(length, generator=g, dtype=torch.float64)).tolist()
        rows.append(TrainRow(adapter, ids, mask, adv, old if with_old else None))
    return rows


def load_model(cache_dir: Path, dtype: torch.dtype = torch.float64, name: str = "builtin:tiny-llama"):
    model, tok, _ = load_base_model(name, dtype, cache_dir=cache_dir)
    return model, tok


@dataclass
class SoloRun:
    """One adapter trained alone with plain PEFT + torch AdamW, one step per batch of rows."""

    spec: AdapterTrainSpec
    model: torch.nn.Module
    init_weights: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        lora = self.spec.lora
        cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                         lora_dropout=0.0, use_rslora=lora.use_rslora, bias="none",
                         task_type="CAUSAL_LM")
        self.peft = get_peft_model(copy.deepcopy(self.model), cfg)
        named = dict(self.peft.named_parameters())
        with torch.no_grad():
            for key, value in self.init_weights.items():
                named[key.replace(".weight", ".default.weight")].copy_(value)
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        o = self.spec.optimizer
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay, foreach=False)
        self.step_count = 0

    def step(self, rows: list[TrainRow]) -> None:
        batch = collate(rows, PAD, torch.float64)
        self.opt.zero_grad(set_to_none=True)
        logits = self.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lp = token_logprobs(logits, batch.input_ids)
        ref = None
        if self.spec.loss.kl_coef > 0:
            with torch.no_grad(), self.peft.disable_adapter():
                ref = token_logprobs(self.peft(input_ids=batch.input_ids,
                                               attention_mask=batch.attention_mask).logits,
                                     batch.input_ids)
        per_token = token_loss(self.spec.loss, lp, batch.advantages, batch.old_logprobs, ref)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        o = self.spec.optimizer
        if o.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        self.opt.param_groups[0]["lr"] = o.lr_at(self.step_count)
        self.opt.step()
        self.step_count += 1
        self.losses.append(loss.item())
        self.grad_norms.append(norm.item())

    def weights(self) -> dict[str, torch.Tensor]:
        return {k.replace(".default.weight", ".weight"): p.detach().clone()
                for k, p in self.peft.named_parameters() if p.requires_grad}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fused_weights(model: MultiLoRAModel, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.parameters_of(name)}


# ---- the co-tenancy scenario: 4 adapters that differ in everything a spec can set ----------
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {
    "a": AdapterTrainSpec(
        lora=LoRASpec(rank=4, alpha=8),
        optimizer=OptimizerSpec(lr=5e-3, max_grad_norm=0.05),  # small: the clip triggers
        loss=LossSpec(kind="ppo_clip", clip_eps=0.2), seed=1),
    "b": AdapterTrainSpec(
        lora=LoRASpec(rank=2, alpha=2, target_modules=("q_proj", "v_proj", "down_proj")),
        optimizer=OptimizerSpec(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, max_grad_norm=None),
        loss=LossSpec(kind="pg", kl_coef=0.1), seed=2),
    "c": AdapterTrainSpec(
        lora=LoRASpec(rank=8, alpha=16, target_modules=ALL, use_rslora=True),
        optimizer=OptimizerSpec(lr=2e-3, betas=(0.95, 0.99), weight_decay=0.01, max_grad_norm=10.0,
                                schedule="cosine", warmup_steps=1, total_steps=5),
        loss=LossSpec(kind="nll"), seed=3),
    "d": AdapterTrainSpec(
        lora=LoRASpec(rank=3, alpha=5),
        optimizer=OptimizerSpec(lr=3e-3, weight_decay=0.05),
        loss=LossSpec(kind="ppo_clip", clip_eps=0.1, kl_coef=0.05), seed=4),
}
ROWS_PER_STEP = {"a": 3, "b": 1, "c": 5, "d": 2}
STEPS = 5
ABSENT = {("d", 2)}  # (adapter, step): d has no data in step 2 and must not be stepped


def step_rows(step: int) -> dict[str, list]:
    return {a: make_rows(a, n, seed=100 * step + ord(a))
            for a, n in ROWS_PER_STEP.items() if (a, step) not in ABSENT}


def build_fused(cache: Path, backend: str = "torch", checkpointing: bool = False,
                model_name: str = "builtin:tiny-llama"):
    model, _ = load_model(cache, name=model_name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = FusedTrainStep(MultiLoRAModel(model), backend)  # type: ignore[arg-type]
    for name, spec in SPECS.items():
        fused.add_adapter(name, spec)
        g = torch.Generator().manual_seed(spec.seed + 1000)
        with torch.no_grad():  # non-zero B so every gradient is non-trivial from step 0
            for key, p in fused.model.parameters_of(name):
                if "lora_B" in key:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    init = {a: fused_weights(fused.model, a) for a in SPECS}
    # an untouched copy: MultiLoRAModel edits `model` in place
    solo_base, _ = load_model(cache, name=model_name)
    return fused, solo_base, init


def run_fused(fused: FusedTrainStep, order=None, poison=None, steps=range(STEPS)) -> list[dict]:
    reports = []
    for step in steps:
        rows = [r for rs in step_rows(step).values() for r in rs]
        if poison:
            rows = poison(step, rows, fused)
        reports.append(fused.step(collate(rows, PAD, torch.float64, adapter_order=order)))
    return reports




def wait_until(cond, timeout_s: float = 120, what: str = "condition"):
    """`cond()`'s first truthy value, polled every 50 ms; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
