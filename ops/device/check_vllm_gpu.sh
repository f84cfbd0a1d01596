#!/usr/bin/env bash
# GPU check of the vLLM rollout engine (workers/vllm_engine.py), run from the repository root on
# a GPU node:  bash ops/device/check_vllm_gpu.sh
#  1. installs torch==2.13.0 (PyPI's CUDA build) and the project with its `vllm` extra into
#     $VENV, unless $PY already imports vllm (needs a package registry; ~3-5 min, ~10 GB);
#  2. runs tests/integration/test_vllm.py there (float32, vLLM on the GPU, torch engine on CPU);
#  3. on a bf16 model ($MODEL, default builtin:small-llama): greedy mixed-adapter batch vs the
#     torch engine on the GPU (token agreement and logprob gap printed), the canary, and
#     generation tokens/s for 1, 4 and 8 adapters.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
VENV=${VENV:-.venv-gpu}
export LORAFLEET_CACHE_DIR=${LORAFLEET_CACHE_DIR:-$PWD/.cache/vllm-gpu-check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if ! "$PY" -c "import vllm" 2>/dev/null; then
  t0=$SECONDS
  test -x "$VENV/bin/python" || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0   # first: vllm 0.32 pins exactly this torch
  "$PY" -m pip install -q -e ".[dev,vllm]"
  echo "install: $((SECONDS - t0)) s, $(du -sh "$VENV" | cut -f1)"
fi
"$PY" -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, 'cuda', torch.cuda.is_available())"

t0=$SECONDS
"$PY" -m pytest tests/integration/test_vllm.py -q -p no:cacheprovider -o addopts="" -rs
echo "float32 tests: $((SECONDS - t0)) s"

MODEL=${MODEL:-builtin:small-llama} "$PY" - <<'EOF'
import os, time
import torch
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.common.schemas import AdapterTrainSpec, LoRASpec
from lorafleet.workers.tiny_model import load_base_model, resolve_model_dir
from lorafleet.workers.checkpoints import publish_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.rollout import RolloutRequest, TorchRolloutEngine
from lorafleet.workers.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine, trainer_scorer

def main() -> None:
    name, cache = os.environ["MODEL"], os.environ["LORAFLEET_CACHE_DIR"]
    hf, tok, model_dir = load_base_model(name, torch.bfloat16, "cuda:0", cache_dir=cache)
    fused = FusedTrainStep(MultiLoRAModel(hf))
    store = AdapterStore(f"file://{cache}/store-{time.time_ns()}")
    names = [f"ad{i}" for i in range(8)]
    for i, n in enumerate(names):
        fused.add_adapter(n, AdapterTrainSpec(lora=LoRASpec(rank=8 * (1 + i % 2), alpha=16), seed=i))
        with torch.no_grad():
            for key, p in fused.model.parameters_of(n):
                if "lora_B" in key:
                    p.copy_(0.05 * torch.randn(p.shape, device=p.device, dtype=p.dtype))
        publish_adapter(store, fused, n, 1, str(model_dir))
    t0 = time.perf_counter()
    engine = VLLMRolloutEngine(VLLMEngineConfig(str(resolve_model_dir(name, cache)), eos_id=tok.eos_token_id,
                                                dtype="bfloat16", device="cuda", max_loras=8,
                                                max_lora_rank=16, gpu_memory_utilization=0.5))
    print(f"engine start {time.perf_counter() - t0:.1f} s")
    for n in names:
        engine.sync(n, 1, store.local_dir(n, 1), trainer_scorer(fused.model, n))
        print("canary", engine.last_canary)
    ids = lambda s: (tok.bos_token_id, *tok(s, add_special_tokens=False).input_ids)
    reqs = [RolloutRequest(n, ids(f"prompt {i}:"), 1, 32, 0.0, 0) for i, n in enumerate(names[:3] * 2)]
    got = engine.generate(reqs)
    want = TorchRolloutEngine(fused.model, tok.eos_token_id, tok.pad_token_id).generate(reqs)
    same = sum(g[0].completion_ids == w[0].completion_ids for g, w in zip(got, want))
    prefix = [next((k for k, (a, b) in enumerate(zip(g[0].completion_ids, w[0].completion_ids)) if a != b),
                   len(g[0].completion_ids)) for g, w in zip(got, want)]
    gap = max(abs(a - b) for g, w, k in zip(got, want, prefix)
              for a, b in zip(g[0].logprobs[:k], w[0].logprobs[:k]))
    print(f"bf16 greedy vs torch: {same}/{len(reqs)} identical, agreeing prefixes {prefix}, "
          f"max logprob gap on them {gap:.3g}")
    for k in (1, 4, 8):
        batch = [RolloutRequest(names[i % k], ids(f"bench {i}:"), 8, 128, 1.0, seed=i) for i in range(64)]
        engine.generate(batch[:k])  # warm
        t0 = time.perf_counter()
        out = engine.generate(batch)
        dt = time.perf_counter() - t0
        toks = sum(len(s.completion_ids) for r in out for s in r)
        print(f"adapters={k}: {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tokens/s")

main()
EOF
