"""`TinkerOps`: client (Tinker) ops on a `FusedTrainStep`, gradients that wait for their own
optim_step. The trainer holds one (`FusedTrainStep.tinker`) and keeps the pending gradients'
bookkeeping (`has_grads`, `drop_grads`, `stash_grads`, `restore_grads`), which its own `step`
uses too.

A client model's forward_backward ops only ADD into its adapter's `.grad`; its optim_step
(`apply`) later steps just that adapter with the hyper-parameters the client sent. Between the
two, other adapters' steps (server RL `step()` or other clients' `apply`) run on the same
optimizer, so every step stashes the `.grad` of adapters it does not step and restores it after
`backend.step()` (torch AdamW would step any param with a grad; DeepSpeed's engine.step zeroes
them all).

Objectives are Tinker's sums (`ClientLoss`, `client_elementwise`): no normaliser, so nothing
couples ops or adapters and k accumulate calls equal one call over all their rows.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from lorafleet.workers.batch import ClientRow, FusedBatch, collate_client, micro_batches
from lorafleet.workers.losses import (
    LOW_PRECISION,
    ClientLoss,
    chunked_token_logprobs,
    client_elementwise,
)
from lorafleet.workers.step_types import AccumulateResult, AdamParams, AdapterStepResult, OpOutput

if TYPE_CHECKING:
    from lorafleet.workers.multilora.model import MultiLoRAModel
    from lorafleet.workers.step_backends import StepBackend

CLIENT_PAD_ID = 0  # any valid id: padded positions are masked out of every loss
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


class TinkerTrainer(Protocol):
    """What `TinkerOps` uses of its trainer (`FusedTrainStep`, which owns all the state)."""

    model: MultiLoRAModel
    backend: StepBackend
    specs: dict
    steps: dict[str, int]
    tokens_per_microbatch: int | None
    logprob_chunk_tokens: int

    def param_group(self, name: str) -> dict: ...

    def drop_grads(self, name: str) -> None: ...

    def stash_grads(self, keep: Collection[str]) -> dict[str, list[torch.Tensor | None]]: ...

    def restore_grads(self, stash: Mapping[str, list[torch.Tensor | None]]) -> None: ...


class TinkerOps:
    """Tinker's forward, forward_backward (`accumulate`) and optim_step (`apply`) on one
    trainer's model, backend and optimizer; all state stays in the trainer."""

    def __init__(self, trainer: TinkerTrainer) -> None:
        self.trainer = trainer

    def _check_pending_grads_supported(self) -> None:
        stage = getattr(self.trainer.backend, "zero_stage", 0)
        if stage > 0:
            raise RuntimeError(
                f"client ops need the torch backend or DeepSpeed ZeRO stage 0: ZeRO-{stage} "
                "partitions gradients inside the engine, so one adapter's pending gradients "
                "cannot be kept across another adapter's step")

    # ---- forward / accumulate -------------------------------------------------------------
    def client_op_errors(
        self, rows: Sequence[ClientRow], losses: Mapping[str, ClientLoss]
    ) -> dict[str, str]:
        """op_key -> why its rows cannot run (a user error: fail that op alone). Empty: all ok."""
        hf = self.trainer.model.model
        n_in = hf.get_input_embeddings().weight.shape[0]
        n_out = hf.get_output_embeddings().weight.shape[0]
        errors: dict[str, str] = {}
        adapter_of: dict[str, str] = {}
        for r in rows:
            if r.op_key in errors:
                continue
            loss = losses.get(r.op_key)
            if loss is None:
                errors[r.op_key] = "no loss given for this op"
            elif adapter_of.setdefault(r.op_key, r.adapter) != r.adapter:
                errors[r.op_key] = "an op's datums must all belong to one model"
            elif missing := [f for f in loss.needs if getattr(r, f) is None]:
                errors[r.op_key] = f"loss_fn {loss.fn!r} needs loss_fn_inputs {missing}"
            elif not all(0 <= t < n_in for t in r.tokens):
                errors[r.op_key] = f"a model_input token id is outside [0, {n_in})"
            elif not all(0 <= t < n_out for t in r.targets):
                errors[r.op_key] = f"a target token id is outside [0, {n_out})"
        return errors

    def accumulate(
        self, rows: Sequence[ClientRow], losses: Mapping[str, ClientLoss]
    ) -> AccumulateResult:
        """ONE fused forward+backward over all rows (micro-batched), gradients ADDED into each
        adapter's .grad. An op whose loss is non-finite never enters backward."""
        self._check_pending_grads_supported()
        self.trainer.model.model.train()  # as `step`: activation checkpointing, dropout
        return self._run_client(rows, losses, grad=True)

    def forward(
        self, rows: Sequence[ClientRow], losses: Mapping[str, ClientLoss]
    ) -> dict[str, OpOutput]:
        """Logprobs and losses of client ops without gradients (Tinker `forward`), in eval
        mode (no dropout); the model's previous mode is restored."""
        hf = self.trainer.model.model
        was_training = hf.training
        hf.eval()
        try:
            with torch.no_grad():
                return self._run_client(rows, losses, grad=False).outputs
        finally:
            hf.train(was_training)

    def _run_client(
        self, rows: Sequence[ClientRow], losses: Mapping[str, ClientLoss], grad: bool
    ) -> AccumulateResult:
        if not rows:
            return AccumulateResult({}, set())
        unknown = sorted({r.adapter for r in rows} - set(self.trainer.specs))
        if unknown:
            raise KeyError(f"adapters not loaded on this worker: {unknown}")
        errors = self.client_op_errors(rows, losses)
        if errors:
            raise ValueError(f"invalid client ops (check client_op_errors first): {errors}")
        p0 = next(p for _, p in self.trainer.model.parameters_of(rows[0].adapter))
        dtype = torch.float32 if p0.dtype in LOW_PRECISION else p0.dtype
        batch = collate_client(rows, CLIENT_PAD_ID, dtype).to(p0.device, dtype)
        fns = [losses[k] for k in batch.op_keys]
        adapter_of = {r.op_key: r.adapter for r in rows}
        sums = [0.0] * len(fns)
        failed: set[int] = set()  # ops with a non-finite part: none of their later parts enter
        entered: set[int] = set()  # ops with a part in backward already
        tainted: set[str] = set()
        per_row: dict[int, tuple[list[float], list[float]]] = {}  # row id -> (logp, loss)
        for mb in micro_batches(batch, self.trainer.tokens_per_microbatch):
            with self.trainer.model.slot.use(mb.layout):  # open through backward (checkpointing re-runs)
                parts, lp, el = self._client_micro(mb, fns)
                ops = list(parts)
                values = torch.stack([parts[k].detach() for k in ops]).tolist()  # one sync
                for k, v in zip(ops, values, strict=True):
                    sums[k] += v
                    if not math.isfinite(v):
                        if k in entered:
                            tainted.add(adapter_of[batch.op_keys[k]])
                        failed.add(k)
                kept = [parts[k] for k in ops if k not in failed]
                if grad and kept:
                    entered.update(k for k in ops if k not in failed)
                    self.trainer.backend.backward(torch.stack(kept).sum())
            lengths = mb.attention_mask.sum(dim=1).tolist()
            lp_rows, el_rows = lp.tolist(), el.tolist()
            for i, row_id in enumerate(mb.row_ids.tolist()):
                per_row[row_id] = (lp_rows[i][:lengths[i]], el_rows[i][:lengths[i]])
        outputs = {}
        for k, key in enumerate(batch.op_keys):
            ids = [j for j, r in enumerate(rows) if r.op_key == key]  # the op's datum order
            outputs[key] = OpOutput(
                logprobs=[per_row[j][0] for j in ids],
                elementwise_loss=[per_row[j][1] for j in ids],
                loss_sum=sums[k],
                finite=k not in failed and math.isfinite(sums[k]),
            )
        return AccumulateResult(outputs, tainted)

    def _client_micro(
        self, mb: FusedBatch, fns: Sequence[ClientLoss]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """op index -> its loss sum in this micro-batch; (b, w) logprobs and elementwise loss
        (both detached, zero in padding)."""
        assert mb.targets is not None and mb.row_op is not None and mb.token_weights is not None
        assert mb.token_advantages is not None and mb.sampling_logprobs is not None
        head = self.trainer.model.model.get_output_embeddings()
        hidden = self.trainer.backend.hidden_states(mb.input_ids, mb.attention_mask)  # (b, w, H)
        lp = chunked_token_logprobs(hidden, head, mb.input_ids, self.trainer.logprob_chunk_tokens,
                                    targets=mb.targets)  # (b, w)
        mask = mb.attention_mask.bool()  # (b, w)
        el = torch.zeros_like(lp, requires_grad=False)
        parts = {}
        for k in mb.row_op.unique().tolist():
            idx = (mb.row_op == k).nonzero().squeeze(1)  # this op's rows in the micro-batch
            e = client_elementwise(fns[k], lp[idx], mb.token_weights[idx],
                                   mb.token_advantages[idx], mb.sampling_logprobs[idx])
            e = torch.where(mask[idx], e, torch.zeros_like(e))  # (n, w): padding adds nothing
            el[idx] = e.detach()
            parts[k] = e.sum()
        return parts, lp.detach(), el

    # ---- optim_step -----------------------------------------------------------------------
    def apply(self, params: Mapping[str, AdamParams]) -> dict[str, AdapterStepResult]:
        """Step ONLY the named adapters, each with its own AdamW hyper-parameters, on the
        gradients accumulated so far; every other adapter's .grad is kept. The stepped
        adapters' grads are then cleared. An adapter without gradients, or with a non-finite
        gradient norm, is not stepped (its grads are dropped)."""
        self._check_pending_grads_supported()
        unknown = sorted(set(params) - set(self.trainer.specs))
        if unknown:
            raise KeyError(f"adapters not loaded on this worker: {unknown}")
        results: dict[str, AdapterStepResult] = {}
        saved: dict[str, dict] = {}
        for name, hp in params.items():
            weights = [p for _, p in self.trainer.model.parameters_of(name)]
            grads = [p.grad for p in weights if p.grad is not None]
            if not grads:
                results[name] = AdapterStepResult(math.nan, math.nan, 0, False, "no_grads",
                                                  self.trainer.steps[name])
                continue
            if hp.grad_clip_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(weights, hp.grad_clip_norm).item()
            else:
                norm = torch.nn.utils.get_total_norm(grads).item()
            if not math.isfinite(norm):
                self.trainer.drop_grads(name)
                results[name] = AdapterStepResult(math.nan, norm, 0, False, "nonfinite_grad",
                                                  self.trainer.steps[name])
                continue
            group = self.trainer.param_group(name)
            saved[name] = {k: group[k] for k in HYPER_KEYS}  # the spec's values, restored below
            group.update(lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                         weight_decay=hp.weight_decay)
            results[name] = AdapterStepResult(math.nan, norm, 0, True, None, self.trainer.steps[name] + 1)
        if saved:
            stash = self.trainer.stash_grads(keep=saved)
            try:
                self.trainer.backend.step()
            finally:
                self.trainer.restore_grads(stash)
                for name, hyper in saved.items():
                    self.trainer.param_group(name).update(hyper)
                    self.trainer.drop_grads(name)
            for name in saved:
                self.trainer.steps[name] += 1
        return results
