"""`ClientWork`: what a `WorkerRuntime` does for client-driven models (issue 13), kept out of
runtime.py: the ops runner and the sampler on the runtime's trainer, adapters and store, and the
base-model facts written at start for the API's `get_info`. It sees the runtime only through
`TinkerHost`, the few things it uses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import redis

from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.messages import BatchMessage, SampleMessage
from lorafleet.common.settings import Settings
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tinker.op_store import OpStore
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.residency import ResidentAdapters
from lorafleet.workers.rollout import RolloutEngine, TorchRolloutEngine
from lorafleet.workers.tinker.chain import OpChain
from lorafleet.workers.tinker.generation import SharedGeneration
from lorafleet.workers.tinker.op_runner import ClientOpRunner
from lorafleet.workers.tinker.sampling import ClientSampler, publish_fleet_model

log = get_logger("lorafleet.worker")


class TinkerHost(Protocol):
    """What `ClientWork` uses of the worker that hosts it (`WorkerRuntime`), and nothing else."""

    settings: Settings
    r: redis.Redis
    name: str  # this worker's name in claims
    busy: bool  # set while ops or samples run (the heartbeat reports it)
    model: MultiLoRAModel
    tokenizer: Any
    model_path: Path  # the base model's directory (a tokenizer directory for the API)
    vllm: Any  # VLLMRolloutEngine | None
    adapters: ResidentAdapters
    store: AdapterStore

    def stop_requested(self) -> bool: ...

    def wrap_rollout_engine(self, wrap: Callable[[RolloutEngine], RolloutEngine]) -> None:
        """The rollout pipeline's engine becomes `wrap(engine)`."""
        ...


class ClientWork:
    def __init__(self, runtime: TinkerHost, trainer: FusedTrainStep) -> None:
        s = runtime.settings
        self.runtime = runtime
        self.ops = OpStore(runtime.r)
        chain = OpChain(runtime.r, self.ops, worker=runtime.name, node=s.node, lease_ms=s.lease_ms,
                        wait_ms=s.client_chain_wait_ms, linger_ms=s.ops_linger_ms, chain_s=s.chain_rollouts_s,
                        stop=runtime.stop_requested)
        self.runner = ClientOpRunner(trainer, runtime.adapters, runtime.store, self.ops, worker=runtime.name,
                                     node=s.node, base_model=s.base_model, lease_ms=s.lease_ms, chain=chain)
        tok = runtime.tokenizer
        # vLLM workers sample client versions on vLLM too, under versioned routes `exp@vK` (the
        # torch engine only for versions over vLLM's max_lora_rank)
        torch_engine = TorchRolloutEngine(runtime.model, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
        engine = runtime.vllm or torch_engine
        self.sampler = ClientSampler(runtime.model, engine, runtime.store, runtime.adapters, self.ops,
                                     worker=runtime.name, lease_ms=s.lease_ms,
                                     default_max_tokens=s.tinker_max_sample_tokens,
                                     fallback=torch_engine if runtime.vllm is not None else None)

        # client samples join the rollout batches' generate calls (same engine, torch or vLLM)
        def share(inner: RolloutEngine) -> RolloutEngine:
            if isinstance(inner, SharedGeneration):
                return inner
            return SharedGeneration(inner, self.sampler, runtime.r, self.ops, max_rows=s.max_sample_rows)

        runtime.wrap_rollout_engine(share)
        try:
            publish_fleet_model(runtime.r, s, tok, runtime.model_path, runtime.model.model)
        except (redis.RedisError, OSError) as exc:  # the API then lacks get_info until a worker writes it
            log.warning("could not publish the fleet's base model facts", error=repr(exc))

    @contextmanager
    def _busy(self) -> Iterator[None]:
        self.runtime.busy = True
        try:
            yield
        finally:
            self.runtime.busy = False

    def run_ops(self, msg: BatchMessage) -> None:
        with self._busy():
            self.runner.run(msg)

    def run_samples(self, msg: SampleMessage) -> None:
        with self._busy():
            self.sampler.run(msg)

    def close(self) -> None:
        self.sampler.close()
