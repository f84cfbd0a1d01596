"""`FusedTrainStep`: one forward/backward for many adapters, each updated exactly as if alone.

Per step:  loss = sum_a  sum(token_loss[rows_a] * mask) / count(mask[rows_a])
then, per adapter: skip if its loss or gradient is non-finite, clip to its own max norm, set its
own learning rate, and step its own AdamW state. An adapter with no rows is not stepped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafleet.common.schemas import AdapterTrainSpec
from lorafleet.workers.batch import FusedBatch
from lorafleet.workers.losses import masked_mean, token_logprobs, token_loss
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.step_backends import BackendName, make_backend

OPT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True)
class AdapterStepResult:
    loss: float
    grad_norm: float  # before clipping; nan when skipped before backward
    num_tokens: int
    stepped: bool
    skipped_reason: str | None  # "nonfinite_loss" | "nonfinite_grad" | None
    step: int  # optimizer steps this adapter has taken, after this one


class FusedTrainStep:
    def __init__(self, model: MultiLoRAModel, backend: BackendName = "torch") -> None:
        self.model = model
        self.backend = make_backend(backend, model.model)
        self.specs: dict[str, AdapterTrainSpec] = {}
        self.steps: dict[str, int] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: AdapterTrainSpec) -> None:
        """A fresh adapter, initialised from its seed."""
        self.model.add_adapter(name, spec.lora, seed=spec.seed)
        self._register(name, spec, step=0)

    def load_adapter(
        self,
        name: str,
        spec: AdapterTrainSpec,
        weights: dict[str, torch.Tensor],
        adapter_config: dict,
        trainer_tensors: dict[str, torch.Tensor] | None = None,
        trainer_meta: dict | None = None,
    ) -> None:
        """Resume an adapter from a checkpoint: weights, AdamW moments and step count."""
        self.model.load_peft(name, weights, adapter_config)
        self._register(name, spec, step=int((trainer_meta or {}).get("step", 0)))
        if trainer_tensors:
            params = dict(self.model.parameters_of(name))
            for key, p in params.items():
                if f"{key}.exp_avg" in trainer_tensors:
                    self.optimizer.state[p] = {
                        k: trainer_tensors[f"{key}.{k}"].to(p.device, p.dtype).clone()
                        if k != "step" else trainer_tensors[f"{key}.{k}"].clone()
                        for k in OPT_STATE_KEYS
                    }

    def _register(self, name: str, spec: AdapterTrainSpec, step: int) -> None:
        params = [p for _, p in self.model.parameters_of(name)]
        o = spec.optimizer
        self.optimizer.add_param_group(
            {"params": params, "adapter": name, "lr": o.lr_at(step), "betas": o.betas,
             "eps": o.eps, "weight_decay": o.weight_decay}
        )
        self.specs[name], self.steps[name] = spec, step

    def remove_adapter(self, name: str) -> None:
        group = self._group(name)
        for p in group["params"]:
            self.optimizer.state.pop(p, None)
        groups = self.optimizer.param_groups
        del groups[next(i for i, g in enumerate(groups) if g is group)]  # not list.remove: == on tensors
        self.model.remove_adapter(name)
        del self.specs[name], self.steps[name]

    def _group(self, name: str) -> dict:
        return next(g for g in self.optimizer.param_groups if g.get("adapter") == name)

    def trainer_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) that `load_adapter` restores: AdamW moments per parameter, step."""
        tensors = {}
        for key, p in self.model.parameters_of(name):
            for k, v in self.optimizer.state.get(p, {}).items():
                tensors[f"{key}.{k}"] = v.detach().to("cpu", copy=True)
        meta = {"step": self.steps[name], "spec": self.specs[name].model_dump(mode="json")}
        return tensors, meta

    # ---- the step -------------------------------------------------------------------------
    def step(self, batch: FusedBatch) -> dict[str, AdapterStepResult]:
        present = batch.layout.adapters
        unknown = [a for a in present if a not in self.specs]
        if unknown:
            raise KeyError(f"adapters not loaded on this worker: {unknown}")
        self.optimizer.zero_grad(set_to_none=True)
        self.model.model.train()  # enables activation checkpointing, if configured, and dropout
        with self.model.slot.use(batch.layout):  # open through backward (checkpointing re-runs)
            losses, counts = self._adapter_losses(batch)
            finite = [a for a in present if torch.isfinite(losses[a]).item()]
            if finite:
                self.backend.backward(torch.stack([losses[a] for a in finite]).sum())
        results = {}
        for name in self.specs:
            if name not in present:
                self._drop_grads(name)
                continue
            results[name] = self._clip_and_schedule(name, losses[name], counts[name], name in finite)
        self.backend.step()
        for name, r in results.items():
            if r.stepped:
                self.steps[name] += 1
                results[name] = AdapterStepResult(**{**r.__dict__, "step": self.steps[name]})
        return results

    def _adapter_losses(self, batch: FusedBatch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        logits = self.backend.forward(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits  # (B, T, V)
        logprobs = token_logprobs(logits, batch.input_ids)  # (B, T-1)
        ref = None
        if any(self.specs[a].loss.kl_coef > 0 for a in batch.layout.adapters):
            with torch.no_grad(), self.model.slot.use(None):  # the base model is the adapter-off forward
                ref_logits = self.model.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).logits
            ref = token_logprobs(ref_logits, batch.input_ids)
        losses, counts = {}, {}
        for name in batch.layout.adapters:
            rows = batch.layout.rows_of(name)
            old = None if batch.old_logprobs is None else batch.old_logprobs[rows]
            per_token = token_loss(
                self.specs[name].loss, logprobs[rows], batch.advantages[rows], old,
                None if ref is None else ref[rows],
            )
            losses[name] = masked_mean(per_token, batch.loss_mask[rows])
            counts[name] = int(batch.loss_mask[rows].sum().item())
        return losses, counts

    def _clip_and_schedule(
        self, name: str, loss: torch.Tensor, count: int, loss_finite: bool
    ) -> AdapterStepResult:
        spec = self.specs[name].optimizer
        if not loss_finite:
            self._drop_grads(name)
            return AdapterStepResult(loss.item(), math.nan, count, False, "nonfinite_loss",
                                     self.steps[name])
        params = [p for _, p in self.model.parameters_of(name)]
        if spec.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm).item()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        if not math.isfinite(norm):
            self._drop_grads(name)
            return AdapterStepResult(loss.item(), norm, count, False, "nonfinite_grad",
                                     self.steps[name])
        self._group(name)["lr"] = spec.lr_at(self.steps[name])
        return AdapterStepResult(loss.item(), norm, count, True, None, self.steps[name])

    def _drop_grads(self, name: str) -> None:
        # A parameter whose .grad is None is not stepped by AdamW: no decay, no moment update.
        for _, p in self.model.parameters_of(name):
            p.grad = None
