"""`FusedTrainStep`: one fused step for many adapters, each updated exactly as if alone.

Per step:  loss = sum_a  sum(token_loss[rows_a] * mask) / count(mask[rows_a])
then, per adapter: skip if its loss or gradient is non-finite, clip to its own max norm, set its
own learning rate, and step its own AdamW state. An adapter with no rows is not stepped.

Memory is bounded by `tokens_per_microbatch`, not by the batch: the batch is split into
micro-batches (`micro_batches`), each one forward + backward, gradients accumulated. Every
adapter's partial loss is divided by its FULL-batch token count, so the sum over micro-batches
is exactly the single-pass loss and the accumulated gradient exactly its gradient. Logprobs
come from the decoder's hidden states through the lm_head `logprob_chunk_tokens` positions at a
time: the (B, T, V) logits never exist.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

from lorafleet.common.schemas import AdapterTrainSpec
from lorafleet.workers.batch import FusedBatch, planned_micro_batches
from lorafleet.workers.losses import chunked_token_logprobs, token_loss
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.step_backends import BackendName, decoder_hidden_states, make_backend
from lorafleet.workers.step_types import AccumulateResult, AdamParams, AdapterStepResult, OpOutput
from lorafleet.workers.tinker.step import TinkerOps

__all__ = ["AccumulateResult", "AdamParams", "AdapterStepResult", "FusedTrainStep", "OpOutput"]

OPT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
# config fields of HF models whose logits are not lm_head(decoder(x)) (Gemma 2, Cohere, Granite)
UNSUPPORTED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class FusedTrainStep:
    """Server RL steps (`step`) and client ops (`tinker.accumulate`/`forward`/`apply`, a
    `TinkerOps` it holds) on one optimizer. Neither ever touches another adapter's pending grads."""

    def __init__(
        self,
        model: MultiLoRAModel,
        backend: BackendName = "torch",
        tokens_per_microbatch: int | None = 16384,  # None: the whole batch in one micro-batch
        logprob_chunk_tokens: int = 1024,
        activation_checkpointing: bool | None = None,  # None: on for cuda, else as the model is
    ) -> None:
        self.model = model
        self.tokens_per_microbatch = tokens_per_microbatch
        self.logprob_chunk_tokens = logprob_chunk_tokens
        hf = model.model
        if any(getattr(hf.config, k, None) not in (None, 1.0) for k in UNSUPPORTED_LOGITS):
            raise ValueError(f"logits must be lm_head(decoder(x)); the model sets {UNSUPPORTED_LOGITS}")
        if activation_checkpointing is None and next(hf.parameters()).device.type == "cuda":
            activation_checkpointing = True
        if activation_checkpointing:  # re-runs each layer's forward in backward (slot still open)
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif activation_checkpointing is False and hf.is_gradient_checkpointing:
            hf.gradient_checkpointing_disable()
        self.backend = make_backend(backend, hf)
        self.specs: dict[str, AdapterTrainSpec] = {}
        self.steps: dict[str, int] = {}
        # adapter -> (its step count after its last `step`, the shapes its rows ran in): published
        # with the version, so that a replay can redo the step bit for bit (workers/replay.py)
        self.step_layouts: dict[str, tuple[int, dict]] = {}
        self.tinker = TinkerOps(self)  # client (Tinker) ops on the same model and optimizer

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
        group = self.param_group(name)
        for p in group["params"]:
            self.optimizer.state.pop(p, None)
        groups = self.optimizer.param_groups
        del groups[next(i for i, g in enumerate(groups) if g is group)]  # not list.remove: == on tensors
        self.model.remove_adapter(name)
        del self.specs[name], self.steps[name]
        self.step_layouts.pop(name, None)

    def param_group(self, name: str) -> dict:
        return next(g for g in self.optimizer.param_groups if g.get("adapter") == name)

    # ---- pending gradients (a client model's wait for its own optim_step) -----------------
    def has_grads(self, name: str) -> bool:
        return any(p.grad is not None for _, p in self.model.parameters_of(name))

    def drop_grads(self, name: str) -> None:
        # A parameter whose .grad is None is not stepped by AdamW: no decay, no moment update.
        for _, p in self.model.parameters_of(name):
            p.grad = None

    def stash_grads(self, keep: Collection[str]) -> dict[str, list[torch.Tensor | None]]:
        """Detach the .grad of every adapter not in `keep` (restored by `restore_grads`)."""
        stash = {}
        for name in self.specs:
            if name in keep or not self.has_grads(name):
                continue
            params = [p for _, p in self.model.parameters_of(name)]
            stash[name] = [p.grad for p in params]
            for p in params:
                p.grad = None
        return stash

    def restore_grads(self, stash: Mapping[str, list[torch.Tensor | None]]) -> None:
        for name, grads in stash.items():
            for (_, p), g in zip(self.model.parameters_of(name), grads, strict=True):
                p.grad = g

    def trainer_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) that `load_adapter` restores: AdamW moments per parameter, step."""
        tensors = {}
        for key, p in self.model.parameters_of(name):
            for k, v in self.optimizer.state.get(p, {}).items():
                tensors[f"{key}.{k}"] = v.detach().to("cpu", copy=True)
        return tensors, self.trainer_meta(name)

    def trainer_meta(self, name: str) -> dict:
        return {"step": self.steps[name], "spec": self.specs[name].model_dump(mode="json")}

    # ---- the step -------------------------------------------------------------------------
    def step(self, batch: FusedBatch, micro: list[FusedBatch] | None = None) -> dict[str, AdapterStepResult]:
        """One optimizer step of every adapter in `batch`, in micro-batches of at most
        `tokens_per_microbatch` tokens, or in the given `micro` ones (a replay: the shapes the
        original step ran in; `batch` then only gives each adapter's token count)."""
        present = batch.layout.adapters
        unknown = [a for a in present if a not in self.specs]
        if unknown:
            raise KeyError(f"adapters not loaded on this worker: {unknown}")
        # only the batch's adapters start from zero: a co-resident client model's pending
        # gradients (waiting for its own optim_step) are set aside and come back after the step
        stash = self.stash_grads(keep=present)
        for name in present:
            self.drop_grads(name)
        try:
            results = self._step(batch, present, micro)
        finally:
            self.restore_grads(stash)
        for name in present:  # stepped: nothing of this batch stays pending
            self.drop_grads(name)
        return results

    def _step(self, batch: FusedBatch, present: list[str],
              micro: list[FusedBatch] | None) -> dict[str, AdapterStepResult]:
        self.model.model.train()  # enables activation checkpointing, if configured, and dropout
        # each adapter's denominator: its trained tokens over the WHOLE batch
        counts = {a: int(batch.loss_mask[batch.layout.rows_of(a)].sum().item()) for a in present}
        totals = {a: 0.0 for a in present}  # reported loss: sum of the micro-batch parts
        skipped: set[str] = set()  # a non-finite part anywhere skips the adapter's whole step
        layouts: dict[str, dict] = {}
        if micro is None:
            micro, layouts = planned_micro_batches(batch, self.tokens_per_microbatch,
                                                   self.logprob_chunk_tokens)
        for mb in micro:
            with self.model.slot.use(mb.layout):  # open through backward (checkpointing re-runs)
                parts = self._micro_losses(mb, counts)
                values = torch.stack([p.detach() for p in parts.values()]).tolist()  # one sync
                for name, value in zip(parts, values, strict=True):
                    totals[name] += value
                    if not math.isfinite(value):
                        skipped.add(name)
                # a skipped adapter's part never enters backward; the grads of its earlier
                # micro-batches reached only its own parameters and are dropped below
                kept = [p for name, p in parts.items() if name not in skipped]
                if kept:
                    self.backend.backward(torch.stack(kept).sum())
        results = {}
        for name in self.specs:
            if name not in present:
                continue
            finite_loss = name not in skipped and math.isfinite(totals[name])
            results[name] = self._clip_and_schedule(name, totals[name], counts[name], finite_loss)
        self.backend.step()
        for name, r in results.items():
            if r.stepped:
                self.steps[name] += 1
                if name in layouts:
                    self.step_layouts[name] = (self.steps[name], layouts[name])
                results[name] = AdapterStepResult(**{**r.__dict__, "step": self.steps[name]})
        return results

    def _micro_losses(self, mb: FusedBatch, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """adapter -> sum of its per-token losses in this micro-batch / its full-batch count."""
        hf = self.model.model
        head = hf.get_output_embeddings()
        ref = None
        if any(self.specs[a].loss.kl_coef > 0 for a in mb.layout.adapters):
            with torch.no_grad(), self.model.slot.use(None):  # the base model is the adapter-off forward
                ref_hidden = decoder_hidden_states(hf, mb.input_ids, mb.attention_mask)
                ref = chunked_token_logprobs(ref_hidden, head, mb.input_ids,
                                             self.logprob_chunk_tokens)  # (b, t-1)
                del ref_hidden
        hidden = self.backend.hidden_states(mb.input_ids, mb.attention_mask)  # (b, t, H)
        logprobs = chunked_token_logprobs(hidden, head, mb.input_ids,
                                          self.logprob_chunk_tokens)  # (b, t-1)
        parts = {}
        for name in mb.layout.adapters:
            rows = mb.layout.rows_of(name)
            old = None if mb.old_logprobs is None else mb.old_logprobs[rows]
            per_token = token_loss(
                self.specs[name].loss, logprobs[rows], mb.advantages[rows], old,
                None if ref is None else ref[rows],
            )  # (n, t-1)
            parts[name] = (per_token * mb.loss_mask[rows]).sum() / max(counts[name], 1)
        return parts

    def _clip_and_schedule(
        self, name: str, loss: float, count: int, loss_finite: bool
    ) -> AdapterStepResult:
        spec = self.specs[name].optimizer
        if not loss_finite:
            self.drop_grads(name)
            return AdapterStepResult(loss, math.nan, count, False, "nonfinite_loss",
                                     self.steps[name])
        params = [p for _, p in self.model.parameters_of(name)]
        if spec.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm).item()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        if not math.isfinite(norm):
            self.drop_grads(name)
            return AdapterStepResult(loss, norm, count, False, "nonfinite_grad",
                                     self.steps[name])
        self.param_group(name)["lr"] = spec.lr_at(self.steps[name])
        return AdapterStepResult(loss, norm, count, True, None, self.steps[name])
