"""`ClientSampler`: client sample requests (`lf.sample_batch`) through the worker's rollout engine
(torch, or vLLM on vLLM workers), all of a message's jobs in ONE `generate` call; and the
base-model facts the torch-free API publishes for Tinker's `get_info` (`publish_fleet_model`).

A job samples version K of a client model (`exp@vK`) or the base model (exp_id null). The adapter
the trainer holds is used when it is at K (pending gradients do not change weights); otherwise
`exp@vK` is loaded read-only from the store as an extra adapter of the shared `MultiLoRAModel`
(weights only, never registered with the trainer), kept in a small LRU of its own.

On a vLLM worker every client version is sampled under its own versioned route `exp@vK`
(`VLLMRolloutEngine.sync(name, K, peft_dir)`, canary-checked against the same weights loaded in
the trainer's model, which also answers `prompt_logprobs`), never under the experiment's route:
a client model's trained adapter is not synced to vLLM, and a route per version lets requests for
several versions of one model share a generate call. An evicted sampler version is forgotten by
vLLM once no request uses it.

Samples are a pure function of (weights, request, seed): a re-run after a lost worker gives the
same answer, so a sample commit needs no more than its claim token.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import torch

from lorafleet.common.keys import Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.messages import SampleMessage
from lorafleet.common.models import packaged_model
from lorafleet.common.settings import Settings
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tinker.op_store import OpResult, OpStore, SampleJob
from lorafleet.workers.leases import renewing
from lorafleet.workers.multilora.layout import BatchLayout
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.residency import ResidentAdapters
from lorafleet.workers.rollout import ContextLengthError, RolloutRequest, Sample
from lorafleet.workers.tiny_model import BUILTIN_PREFIX
from lorafleet.workers.vllm_engine import trainer_scorer

log = get_logger("lorafleet.worker.client_sampling")


def sampler_name(exp_id: str, version: int) -> str:
    return f"{exp_id}@v{version}"


def rollout_request(payload: dict[str, Any], adapter: str | None, default_max_tokens: int) -> RolloutRequest:
    """A sample payload (common/tinker/op_store.py) -> the engine's request. ValueError: bad input."""
    try:
        top_k = int(payload.get("top_k", -1))
        max_tokens = payload.get("max_tokens")
        return RolloutRequest(
            adapter=adapter, prompt_ids=tuple(int(t) for t in payload["prompt"]),
            num_samples=int(payload.get("num_samples", 1)),
            max_new_tokens=default_max_tokens if max_tokens is None else int(max_tokens),
            temperature=float(payload.get("temperature", 1.0)), seed=int(payload.get("seed") or 0),
            top_p=float(payload.get("top_p", 1.0)), top_k=0 if top_k == -1 else top_k,  # Tinker: -1 = off
            stop=tuple(str(s) for s in payload.get("stop") or ()),
            stop_token_ids=tuple(int(t) for t in payload.get("stop_token_ids") or ()))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed sample request: {exc!r}") from exc


class ClientSampler:
    def __init__(self, model: MultiLoRAModel, engine: Any, store: AdapterStore,
                 adapters: ResidentAdapters, ops: OpStore, *, worker: str, lease_ms: int,
                 default_max_tokens: int, max_sampler_adapters: int = 8, fallback: Any = None) -> None:
        self.model = model
        self.engine = engine  # TorchRolloutEngine (on `model`) or VLLMRolloutEngine
        self.vllm = engine if hasattr(engine, "sync") else None  # the vLLM engine: versions synced to it
        self.store = store
        self.adapters = adapters
        self.ops = ops
        self.worker = worker
        self.lease_ms = lease_ms
        self.default_max_tokens = default_max_tokens
        self.max_sampler_adapters = max_sampler_adapters
        self.loaded: OrderedDict[str, None] = OrderedDict()  # read-only sampler residents, LRU
        # vLLM workers: a TorchRolloutEngine on `model` for versions vLLM cannot hold (a rank over
        # its max_lora_rank), and those versions' names
        self.fallback = fallback
        self.torch_only: set[str] = set()

    def run(self, msg: SampleMessage) -> dict[str, bool]:
        """Claim, generate (one engine call) and commit -> request id -> committed."""
        jobs = self.ops.claim_samples(msg.request_ids, self.worker, self.lease_ms)
        if not jobs:
            return {}
        with renewing(lambda: self.ops.renew_samples(jobs, self.lease_ms), self.lease_ms,
                      "lorafleet-sample-lease"):
            return self._run(jobs)

    def _run(self, jobs: list[SampleJob]) -> dict[str, bool]:
        results, runnable = self.prepare(jobs)
        _, samples = self.generate([req for _, req in runnable])  # ONE engine call
        return self.finish(jobs, results, runnable, samples)

    def generate(self, reqs: Sequence[RolloutRequest], lead: Sequence[RolloutRequest] = (),
                 engine: Any = None) -> tuple[list[list[Sample]], list[list[Sample]]]:
        """ONE call of `engine` (default: the sampler's) for `lead` (a rollout batch's rows) and
        the client rows it serves; rows of versions vLLM cannot hold go to the torch fallback
        -> (lead's samples, reqs' samples)."""
        engine = engine or self.engine
        on_torch = [i for i, r in enumerate(reqs) if r.adapter in self.torch_only]
        main = [i for i in range(len(reqs)) if i not in set(on_torch)]
        out = engine.generate([*lead, *(reqs[i] for i in main)]) if lead or main else []
        samples: list[list[Sample]] = [[] for _ in reqs]
        for k, i in enumerate(main):
            samples[i] = out[len(lead) + k]
        if on_torch:
            for i, got in zip(on_torch, self.fallback.generate([reqs[i] for i in on_torch]), strict=True):
                samples[i] = got
        return out[:len(lead)], samples

    def prepare(self, jobs: Sequence[SampleJob]
                ) -> tuple[dict[str, OpResult], list[tuple[SampleJob, RolloutRequest]]]:
        """Each job -> its engine request (its adapter loaded), or at once its failure (user)."""
        results: dict[str, OpResult] = {}
        runnable: list[tuple[SampleJob, RolloutRequest]] = []
        in_use: set[str] = set()
        for job in jobs:
            try:
                adapter = self._adapter(job.payload, in_use)
                req = rollout_request(job.payload, adapter, self.default_max_tokens)
                if self.engine.max_model_len is not None and len(req.prompt_ids) >= self.engine.max_model_len:
                    raise ContextLengthError(f"a prompt of {len(req.prompt_ids)} tokens leaves no room in "
                                             f"the model's context of {self.engine.max_model_len} tokens")
                if any(t < 0 or t >= self._vocab() for t in req.prompt_ids):
                    raise ValueError(f"prompt token ids must be in [0, {self._vocab()})")
                runnable.append((job, req))
            except (ValueError, LookupError) as exc:
                results[job.request_id] = OpResult(job.request_id, False, None, str(exc), "user")
        return results, runnable

    def finish(self, jobs: Sequence[SampleJob], results: dict[str, OpResult],
               runnable: Sequence[tuple[SampleJob, RolloutRequest]], samples: Sequence[Sequence[Any]]
               ) -> dict[str, bool]:
        """The generated samples (one list per runnable request) -> results, committed (fenced)."""
        for (job, req), outs in zip(runnable, samples, strict=True):
            body: dict[str, Any] = {
                "sequences": [{"tokens": list(s.completion_ids), "logprobs": list(s.logprobs),
                               "stop_reason": "length" if s.truncated else "stop"} for s in outs],
                "prompt_logprobs": self._prompt_logprobs(req) if job.payload.get("prompt_logprobs") else None}
            results[job.request_id] = OpResult(job.request_id, True, body)
        return {job.request_id: self.ops.commit_sample(job, results[job.request_id]) for job in jobs}

    def _vocab(self) -> int:
        return int(self.model.model.get_input_embeddings().weight.shape[0])

    def _adapter(self, payload: dict[str, Any], in_use: set[str]) -> str | None:
        """The adapter name to sample with (loading `exp@vK` if needed); None: the base model."""
        exp_id = payload.get("exp_id")
        if exp_id is None:
            return None
        version = int(payload.get("version", 0))
        if self.vllm is None and self.adapters.versions.get(exp_id) == version and exp_id in self.model.specs:
            in_use.add(exp_id)
            return exp_id
        name = sampler_name(str(exp_id), version)
        if name in self.loaded:
            self.loaded.move_to_end(name)
        else:
            if not self.store.exists(str(exp_id), version):
                raise LookupError(f"no published version {exp_id}@v{version} to sample from")
            ckpt = self.store.load(str(exp_id), version)
            self.model.load_peft(name, dict(ckpt.weights), dict(ckpt.adapter_config))
            if self.vllm is not None:
                try:  # a rank over the engine's max_lora_rank is a ValueError
                    self.vllm.sync(name, version, self.store.local_dir(str(exp_id), version),
                                   trainer_scorer(self.model, name))
                except ValueError:
                    if self.fallback is None:
                        self.model.remove_adapter(name)
                        raise
                    self.torch_only.add(name)  # sampled on the torch engine, from the same weights
                except BaseException:
                    self.model.remove_adapter(name)
                    raise
            self.loaded[name] = None
            for victim in [n for n in self.loaded if n not in in_use and n != name][
                    : max(0, len(self.loaded) - self.max_sampler_adapters)]:
                self.model.remove_adapter(victim)
                if self.vllm is not None:
                    self.vllm.forget(victim)
                self.torch_only.discard(victim)
                del self.loaded[victim]
        in_use.add(name)
        return name

    def _prompt_logprobs(self, req: RolloutRequest) -> list[float | None]:
        """logprob of each prompt token given the ones before it (None for the first)."""
        hf = self.model.model
        device = next(hf.parameters()).device
        ids = torch.tensor([req.prompt_ids], device=device)
        layout = BatchLayout.from_row_adapters([req.adapter]) if req.adapter is not None else None
        with torch.no_grad():
            logits = self.model.logits(ids, torch.ones_like(ids), layout)[0, :-1].double()  # (T-1, V)
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()
        return [None, *(v if math.isfinite(v) else None for v in lp)]

    def close(self) -> None:
        for name in list(self.loaded):
            self.model.remove_adapter(name)
            if self.vllm is not None:
                self.vllm.forget(name)
        self.loaded.clear()
        self.torch_only.clear()


def tokenizer_dir(settings: Settings, tokenizer: Any, model_path: Path) -> Path:
    """A directory `AutoTokenizer.from_pretrained` reads: the model's own, or for a built-in model
    the tokenizer saved under the cache dir (a client on the same machine can load it). A
    packaged built-in (`builtin:smollm2-135m-instruct`) is a full model directory: its own."""
    if not settings.base_model.startswith(BUILTIN_PREFIX) or packaged_model(settings.base_model):
        return Path(model_path)
    dest = Path(settings.cache_dir) / "tokenizers" / settings.base_model[len(BUILTIN_PREFIX):]
    if not (dest / "tokenizer_config.json").is_file():  # written aside, then renamed: workers race
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(dest)
        except OSError:  # another worker's copy landed first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def publish_fleet_model(r: redis.Redis, settings: Settings, tokenizer: Any, model_path: Path,
                        hf: Any) -> None:
    """Write `Keys.tk_base_model` (what the API answers `get_info` with, without torch)."""
    cfg = hf.config
    r.hset(Keys.tk_base_model, mapping={
        "name": settings.tinker_base_model or settings.base_model,  # what clients pass as base_model
        "base_model": settings.base_model,
        "tokenizer_dir": str(tokenizer_dir(settings, tokenizer, model_path)),
        "arch": str(getattr(cfg, "model_type", "") or ""),
        "max_context": int(getattr(cfg, "max_position_embeddings", 0) or 0),
    })
