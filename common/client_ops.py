"""Client-driven models: the ops a client (the Tinker endpoint) submits one at a time, their
futures, and the fenced claim/commit that workers run them under. Torch-free; Redis is the record
of truth (key names in `common/keys.py`, `Keys.tk_*`).

A client model is an experiment (`ExperimentRecord.kind == "client"`, status running while its
session lives) whose loop runs on the client. Its adapter versions are published like any other
(`step` = committed version). Ops of one model run strictly in `seq` order (1-based, per model);
the API stores each op's decoded request as JSON (`Keys.tk_payload`) and answers a request id; a
worker claims a model's contiguous pending ops (up to and including the first barrier), runs them,
writes each result (`Keys.tk_result`) and commits them all at once, fenced by the claim's token.

Payload (`ClientOp.payload`) and result (`OpResult.body`) formats, by kind (all plain JSON):

forward_backward / forward
    payload {"loss_fn": "cross_entropy" | "importance_sampling" | "ppo",
             "loss_fn_config": {str: float},           # ppo: clip_low_threshold, clip_high_threshold
             "data": [{"tokens": [int],                # model_input, T tokens
                       "loss_fn_inputs": {"target_tokens": [int],  # T: position i predicts target i
                                          "weights": [float],      # T (cross_entropy; optional elsewhere)
                                          "logprobs": [float],     # T sampling logprobs (is, ppo)
                                          "advantages": [float]}}]}  # T (is, ppo)
    result  {"loss_fn_output_type": str, "metrics": {"loss:sum": float},
             "outputs": [{"logprobs": [float], "elementwise_loss": [float]}]}  # one per datum, T each
optim_step
    payload {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}  # floats
    result  {"metrics": {str: float}, "version": int}
save_weights / save_weights_for_sampler
    payload {"name": str | null}
    result  {"version": int}     # the committed version the name now points at (pinned)
load_weights
    payload {"source_exp": str, "version": int, "optimizer": bool}
    result  {"version": int}     # loading writes a new version of this model
sample (not a model op: `SampleJob`, any worker)
    payload {"exp_id": str | null, "version": int, "prompt": [int], "num_samples": int,
             "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
             "stop": [str], "stop_token_ids": [int], "prompt_logprobs": bool}
    result  {"sequences": [{"tokens": [int], "logprobs": [float], "stop_reason": "stop" | "length"}],
             "prompt_logprobs": [float | null] | null}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OpKind = Literal["forward_backward", "forward", "optim_step", "save_weights", "save_weights_for_sampler",
                 "load_weights"]
# a claim stops after the first of these: what follows depends on the version it commits
BARRIERS: frozenset[str] = frozenset({"optim_step", "save_weights", "save_weights_for_sampler",
                                      "load_weights"})
Category = Literal["user", "server"]


@dataclass(frozen=True)
class ClientOp:
    request_id: str
    exp_id: str
    seq: int  # 1-based, per model
    kind: OpKind
    payload: dict[str, Any]


@dataclass(frozen=True)
class ClaimedModel:
    """One model's claimed ops: run them from `version`, then `OpStore.commit` with `token`."""

    exp_id: str
    token: int  # fencing token of the claim
    version: int  # the committed adapter version (record.step) the ops start from
    spec_json: str  # the model's ExperimentSpec (train.lora: rank, alpha, targets; seed)
    ops: tuple[ClientOp, ...]  # op_seq+1 .. up to and including the first barrier
    gradlog: tuple[ClientOp, ...]  # forward_backward ops committed since the last optim_step


@dataclass(frozen=True)
class OpResult:
    request_id: str
    ok: bool
    body: dict[str, Any] | None = None
    error: str = ""
    category: Category = "user"


@dataclass(frozen=True)
class SampleJob:
    request_id: str
    token: int
    payload: dict[str, Any]  # see the module docstring ("sample")
