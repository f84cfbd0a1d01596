"""`VLLMRolloutEngine`: the `RolloutEngine` on one hot `vllm.LLM` with `enable_lora`.

One `vllm.LLM` lives as long as the worker. Every committed adapter version is registered under
a NEW name and a NEW integer id, `<adapter>@v<k>`; requests for `<adapter>` are routed to it, and
the older version is unloaded (`llm_engine.remove_lora(id)`) as soon as no in-flight request
uses it. A name is never reloaded in place (vLLM's LoRA and prefix caches key on name/path/id).

How a worker uses it:
    engine.sync(exp_id, version, store.local_dir(exp_id, version), trainer_scorer(model, exp_id))
after it holds `exp_id` at a committed `version` (a no-op when that version is routed already),
`engine.forget(exp_id)` when it drops the adapter, and `engine.generate(requests)` as for the
torch engine. An adapter that vLLM evicted from its own LRU cache (`max_cpu_loras`) is re-read
from its directory by vLLM on the next request that names it: the directory must stay there
while the version is routed (published versions are immutable, so it does).

Canary: after registering a version, `sync` decodes `canary_tokens` greedy tokens of a fixed
prompt with it in vLLM, asks the trainer (`reference`) for its temperature-1 logprobs of those
same tokens, and raises `CanaryMismatchError` (the version is unloaded, routing is unchanged)
when they differ by more than `canary_atol`. The engine's limits and vLLM arguments are
`VLLMEngineConfig` (`workers/vllm_config.py`).

Logprobs are vLLM's `raw_logprobs`: log_softmax of the model's logits before temperature or any
processor, i.e. the temperature-1 logprobs the trainer computes. Each request's `seed` goes to
`SamplingParams.seed` (vLLM gives sample i of a request `seed + i`), so a request's samples do
not depend on its batch (up to batch-dependent kernel rounding on GPUs). Sampled tokens differ
from the torch engine's (another RNG scheme); greedy tokens are the same.

Decoding options map onto `SamplingParams` (top_p, top_k, stop, stop_token_ids = the eos id and
the request's, include_stop_str_in_output=False, detokenize only when there are stop strings)
with the torch engine's semantics (`workers/rollout.py`): the token ids end with the token that
completed a stop string, max_tokens is clamped to the context, `Sample.truncated` is vLLM's
finish_reason "length", and `Sample.stop_reason` is the stop string or stop token id (the eos,
for which vLLM says None, too).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.common.logging import get_logger
from lorafleet.workers.rollout import RolloutRequest, Sample, check_context, new_token_budget
from lorafleet.workers.vllm_config import CANARY_ATOL, VLLMEngineConfig, peft_rank

log = get_logger("lorafleet.vllm")

# (prompt ids, completion ids) -> the trainer's temperature-1 logprob of each completion token
Scorer = Callable[[Sequence[int], Sequence[int]], Sequence[float]]


class CanaryMismatchError(RuntimeError):
    """vLLM's logprobs for an adapter version disagree with the trainer's."""


@dataclass(frozen=True)
class Route:
    adapter: str
    version: int
    lora: Any  # vllm.lora.request.LoRARequest


CANARY_TEXT = "The canary sings: 0123456789"


class VLLMRolloutEngine:
    def __init__(self, config: VLLMEngineConfig, llm: Any = None) -> None:
        self.config = config
        if config.in_process:  # an engine-core child process is impossible in a daemonic process
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no phoning home from the workers
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform

        self._sampling_params, self._lora_request = SamplingParams, LoRARequest
        # vLLM's CPU LoRA ops gather slot -1 ("no LoRA") as the LAST adapter slot, so a base-model
        # row batched with adapter rows gets another adapter's delta (vllm PRs #48421, #49656):
        # on CPU, base-model rows go in a generate call of their own.
        self._split_base_rows = bool(current_platform.is_cpu())
        keep = torch.set_num_threads  # vllm's CPU worker replaces it process-wide with a no-op
        try:
            with _global_rng_kept():  # in-process vLLM seeds random/numpy/torch globally
                self.llm = llm if llm is not None else LLM(**config.engine_args())
        finally:
            torch.set_num_threads = keep
        self.canary_prompt_ids = config.canary_prompt_ids or self._default_canary_prompt()
        self.canary_atol = config.canary_atol if config.canary_atol is not None else CANARY_ATOL[config.dtype]
        self._engine_lock = threading.RLock()  # vllm.LLM is not thread-safe: one call at a time
        self._state = threading.Lock()  # routes, retired versions, in-flight counts
        self._routes: dict[str, Route] = {}
        self._retired: dict[int, Route] = {}  # lora id -> a replaced version still in flight
        self._inflight: Counter[int] = Counter()  # lora id -> requests using it now
        self._next_id = 1
        self.last_canary: dict[str, Any] | None = None
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len: int | None = getattr(model_config, "max_model_len", None)

    # ---- adapters ------------------------------------------------------------------------------
    def route(self, adapter: str) -> Route | None:
        with self._state:
            return self._routes.get(adapter)

    def loaded_lora_ids(self) -> set[int]:
        """Adapter ids vLLM holds now (its LRU cache; evicted ones are re-read on use)."""
        with self._engine_lock:
            return set(self.llm.llm_engine.list_loras())

    def sync(self, adapter: str, version: int, peft_dir: Path | str,
             reference: Scorer | None = None) -> Route:
        """Route `adapter` to `version` (a PEFT dir): registered as `<adapter>@v<version>` under a
        new id, canary-checked against `reference`, then the old version is unloaded once no
        in-flight request uses it. A no-op when `version` is routed already."""
        current = self.route(adapter)
        if current is not None and current.version == version:
            return current
        rank = peft_rank(Path(peft_dir))
        if rank > self.config.max_lora_rank:
            raise ValueError(f"{adapter}@v{version} has rank {rank} > the engine's max_lora_rank "
                             f"{self.config.max_lora_rank} (raise LORAFLEET_VLLM_MAX_LORA_RANK)")
        with self._state:
            lora_id, self._next_id = self._next_id, self._next_id + 1
        new = Route(adapter, version, self._lora_request(f"{adapter}@v{version}", lora_id, str(peft_dir)))
        with self._engine_lock:
            if not self.llm.llm_engine.add_lora(new.lora):
                raise RuntimeError(f"vLLM refused to load {new.lora.lora_name} from {peft_dir}")
            try:
                if reference is not None:
                    self._canary(new, reference)
            except BaseException:
                self.llm.llm_engine.remove_lora(lora_id)
                raise
        with self._state:
            old = self._routes.get(adapter)
            self._routes[adapter] = new
            if old is not None:
                self._retired[old.lora.lora_int_id] = old
        self._collect()
        log.info("vllm adapter synced", adapter=adapter, version=version, lora_id=lora_id)
        return new

    def forget(self, adapter: str) -> None:
        """Stop routing `adapter`; its version is unloaded once no in-flight request uses it."""
        with self._state:
            old = self._routes.pop(adapter, None)
            if old is not None:
                self._retired[old.lora.lora_int_id] = old
        self._collect()

    def _collect(self) -> None:
        with self._state:
            done = [i for i in self._retired if not self._inflight[i]]
            for i in done:
                del self._retired[i]
        if done:
            with self._engine_lock:
                for i in done:
                    self.llm.llm_engine.remove_lora(i)  # False if vLLM had evicted it already

    def _canary(self, route: Route, reference: Scorer) -> None:
        params = self._sampling_params(temperature=0.0, max_tokens=self.config.canary_tokens,
                                       logprobs=0, ignore_eos=True, detokenize=False)
        (out,) = self.llm.generate([{"prompt_token_ids": list(self.canary_prompt_ids)}], params,
                                   lora_request=route.lora, use_tqdm=False)
        tokens, got = _tokens_and_logprobs(out.outputs[0])
        want = [float(x) for x in reference(self.canary_prompt_ids, tokens)]
        if len(want) != len(got):
            raise CanaryMismatchError(f"reference gave {len(want)} logprobs for {len(got)} tokens")
        diff = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
        self.last_canary = {"adapter": route.adapter, "version": route.version, "max_abs_diff": diff}
        if not math.isfinite(diff) or diff > self.canary_atol:
            log.error("vllm canary mismatch", adapter=route.adapter, version=route.version,
                      max_abs_diff=diff, atol=self.canary_atol)
            raise CanaryMismatchError(
                f"{route.lora.lora_name}: vLLM and trainer logprobs differ by {diff:.3g} "
                f"(> {self.canary_atol:g}) on the canary prompt; tokens {tokens}, vLLM {got}, "
                f"trainer {want}")

    def _default_canary_prompt(self) -> tuple[int, ...]:
        try:
            ids = tuple(self.llm.get_tokenizer().encode(CANARY_TEXT))
        except Exception:  # noqa: BLE001 - no tokenizer (skip_tokenizer_init): fixed ids
            ids = ()
        return ids or (1, 5, 6, 7, 8)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        if not requests:
            return []
        leases = self._acquire(requests)
        try:
            return self._run(requests, leases)
        finally:
            self._release(leases)

    def _acquire(self, requests: Sequence[RolloutRequest]) -> list[Any]:
        """The LoRARequest of each request's current version (None: the base model), counted
        as in flight until `_release`."""
        with self._state:
            unknown = sorted({r.adapter for r in requests if r.adapter is not None} - set(self._routes))
            if unknown:
                raise KeyError(f"adapters not synced to vLLM: {unknown}")
            leases = [None if r.adapter is None else self._routes[r.adapter].lora for r in requests]
            self._inflight.update(lr.lora_int_id for lr in leases if lr is not None)
        return leases

    def _release(self, leases: Sequence[Any]) -> None:
        with self._state:
            self._inflight.subtract(lr.lora_int_id for lr in leases if lr is not None)
            self._inflight += Counter()  # drop zero counts
        self._collect()

    def _run(self, requests: Sequence[RolloutRequest], leases: Sequence[Any]) -> list[list[Sample]]:
        params = [self._params(r) for r in requests]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        groups = [list(range(len(requests)))]
        if self._split_base_rows and None in leases and any(lr is not None for lr in leases):
            groups = [[i for i, lr in enumerate(leases) if lr is None],
                      [i for i, lr in enumerate(leases) if lr is not None]]
        outs: list[Any] = [None] * len(requests)
        with self._engine_lock:
            for g in groups:
                done = self.llm.generate([prompts[i] for i in g], [params[i] for i in g],
                                         lora_request=[leases[i] for i in g], use_tqdm=False)
                for i, out in zip(g, done, strict=True):
                    outs[i] = out
        results = []
        for r, out in zip(requests, outs, strict=True):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens, logps = _tokens_and_logprobs(c)
                reason = c.stop_reason
                if c.finish_reason == "stop" and reason is None and tokens:  # vLLM's None: the eos
                    reason = tokens[-1]
                samples.append(Sample(r.prompt_ids, tokens, logps, truncated=c.finish_reason == "length",
                                      stop_reason=reason if c.finish_reason == "stop" else None))
            results.append(samples if r.temperature > 0 else samples * r.num_samples)
        return results

    def _params(self, r: RolloutRequest) -> Any:
        check_context(r, self.max_model_len)
        greedy = r.temperature == 0
        # vLLM refuses n > 1 when greedy: one greedy sample, repeated (they are all the same)
        return self._sampling_params(
            n=1 if greedy else r.num_samples, temperature=r.temperature,
            top_p=1.0 if greedy else r.top_p, top_k=0 if greedy else r.top_k,
            max_tokens=new_token_budget(r, self.max_model_len), seed=None if greedy else r.seed,
            logprobs=0, stop=list(r.stop) or None, include_stop_str_in_output=False,
            detokenize=bool(r.stop),  # stop strings need the text; otherwise skip the work
            stop_token_ids=sorted({self.config.eos_id, *r.stop_token_ids}))

    def close(self) -> None:
        with self._engine_lock:
            core = getattr(self.llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _tokens_and_logprobs(completion: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    tokens = tuple(int(t) for t in completion.token_ids)
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no logprob for some sampled token")
    return tokens, tuple(float(step[t].logprob) for t, step in zip(tokens, completion.logprobs, strict=True))


def trainer_scorer(model: Any, adapter: str | None) -> Scorer:
    """The trainer's temperature-1 logprobs of a completion under `adapter`, from one full
    forward of the `MultiLoRAModel` (the same `token_logprobs` the loss uses)."""
    from lorafleet.workers.losses import token_logprobs
    from lorafleet.workers.multilora.layout import BatchLayout

    def score(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        hf = model.model
        ids = torch.tensor([[*prompt_ids, *completion_ids]], device=next(hf.parameters()).device)
        was_training = hf.training
        hf.eval()
        try:
            with torch.no_grad():
                logits = model.logits(ids, torch.ones_like(ids), BatchLayout.from_row_adapters([adapter]))
        finally:
            hf.train(was_training)
        lp = token_logprobs(logits, ids)[0]  # (T-1,)
        return lp[len(prompt_ids) - 1:].double().tolist()

    return score
