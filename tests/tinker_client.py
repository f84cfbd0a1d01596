"""A user's own training loop written against the official `tinker` SDK, unchanged but for the
server it points at (TINKER_BASE_URL / TINKER_API_KEY). Run as a process by
tests/integration/test_tinker_sdk.py:

    python tests/tinker_client.py sft|rl --seed S --rank R --steps N --out result.json

sft: cross-entropy on fixed texts (arbitrary float weights), optim_step, save_state, and a
     load_state_with_optimizer round trip.
rl:  sample -> reward on the client -> forward_backward("importance_sampling") -> optim_step ->
     save_weights_for_sampler -> sample with the new weights.
The result JSON holds what the test compares between a co-tenant run and a solo run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import tinker
from tinker import types

BASE_MODEL = os.environ.get("LORAFLEET_TINKER_BASE_MODEL", "builtin:tiny-llama")
TEXTS = ["lorafleet trains many adapters", "fused steps, exact results"]


def wait_barrier(path: str | None, name: str) -> None:
    """Both clients touch <path>.<name>.<pid> and wait for two such files: their next ops are
    submitted at about the same time (what a busy fleet sees all the time)."""
    if not path:
        return
    open(f"{path}.{name}.{os.getpid()}", "w").close()
    deadline = time.time() + 30
    folder, stem = os.path.split(path)
    while time.time() < deadline:
        if sum(f.startswith(f"{stem}.{name}.") for f in os.listdir(folder or ".")) >= 2:
            return
        time.sleep(0.01)


def sft(tc: tinker.TrainingClient, steps: int, barrier: str | None, sequential: bool = False) -> dict:
    tok = tc.get_tokenizer()
    data = []
    for i, text in enumerate(TEXTS):
        ids = tok.encode(text, add_special_tokens=False)
        weights = [0.5 + 0.25 * ((i + j) % 3) for j in range(len(ids) - 1)]  # arbitrary floats
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}))
    losses = []
    for step in range(steps):
        wait_barrier(barrier, f"step{step}")
        fb = tc.forward_backward(data, "cross_entropy")
        if sequential:  # the gradients wait on the server between two ops
            losses.append(fb.result().metrics["loss:sum"])
        opt = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        if not sequential:
            losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    saved = tc.save_state("final").result().path
    # a fresh client from the saved state (weights + AdamW moments) continues where this one is
    restored = tc.load_state_with_optimizer(saved).result()
    return {"losses": losses, "state_path": saved, "restored": str(restored)}


def reward(text: str) -> float:
    return sum(ch in "aeiou" for ch in text) / max(len(text), 1)  # vowels, as in the demo


def rl(tc: tinker.TrainingClient, steps: int, barrier: str | None) -> dict:
    tok = tc.get_tokenizer()
    prompt = tok.encode("say:", add_special_tokens=False)
    sampler = tc.save_weights_and_get_sampling_client()
    rewards, tokens, losses = [], [], []
    for step in range(steps):
        res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                             sampling_params=types.SamplingParams(max_tokens=6, seed=100 + step,
                                                                  temperature=1.0)).result()
        seqs = [list(s.tokens) for s in res.sequences]
        scores = [reward(tok.decode(s)) for s in seqs]
        mean = sum(scores) / len(scores)
        data = []
        for s, seq, score in zip(res.sequences, seqs, scores, strict=True):
            if not seq:
                continue
            n = len(prompt) - 1  # prompt positions: not trained
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(prompt + seq[:-1]),
                loss_fn_inputs={"target_tokens": prompt[1:] + seq,
                                "logprobs": [0.0] * n + list(s.logprobs),
                                "advantages": [0.0] * n + [score - mean] * len(seq)}))
        wait_barrier(barrier, f"step{step}")
        fb = tc.forward_backward(data, "importance_sampling")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
        sampler = tc.save_weights_and_get_sampling_client()
        rewards.append(mean)
        tokens.append(seqs)
    final = tc.save_weights_for_sampler("final").result().path
    return {"rewards": rewards, "tokens": tokens, "losses": losses, "sampler_path": final}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["sft", "rl"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--barrier", default=None)
    p.add_argument("--sequential", action="store_true", help="sft: wait for each forward_backward "
                   "before submitting its optim_step")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    service = tinker.ServiceClient()  # TINKER_BASE_URL, TINKER_API_KEY
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=a.rank, seed=a.seed)
    out = sft(tc, a.steps, a.barrier, a.sequential) if a.mode == "sft" else rl(tc, a.steps, a.barrier)
    out["model_id"] = tc.model_id
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
