"""Dataset tasks in the RL step: chat prompts rendered with the tokenizer's template, requests and
trajectories (row indices, not rows), co-tenancy invariance in float64, a bad row or a missing
chat template failing its experiment alone, and a dataset task with a dense verifiable reward
that the tiny model learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lf_testkit import load_model

from lorafleet.common.data import datasets
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.spec_input import AdmissionLimits, parse_spec
from lorafleet.common.tasks.task import TaskPrompt, make_task
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rl import Trajectory, make_requests, request_seed, score
from lorafleet.workers.rollout import Sample
from lorafleet.workers.tiny_model import CHAT_TEMPLATE, build_tokenizer

LIMITS = AdmissionLimits()
SYSTEM = "Solve it. End with '#### <number>'."


@pytest.fixture(autouse=True)
def _fresh_cache():
    datasets.clear_cache()
    yield
    datasets.clear_cache()


def math_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"{a}+{b}?", "answer": f"#### {a + b}", "i": i})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset_spec(path: Path, name: str = "ds", seed: int = 0, reward: dict | None = None, **kw
                 ) -> ExperimentSpec:
    data = {"name": name, "dataset": {"path": str(path)},
            "reward": reward or {"fn": "numeric_match", "args": {"partial_scale": 10.0}},
            "steps": 3, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "temperature": 0.5,
            "train": {"seed": seed, "lora": {"rank": 4, "alpha": 8}, "optimizer": {"lr": 3e-3}}, **kw}
    return parse_spec(data, LIMITS)


# ---- chat rendering -------------------------------------------------------------------------
def test_the_tiny_tokenizer_renders_chat_with_system_prompt_first(tmp_path: Path, model_cache: Path) -> None:
    tok = build_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    _, loaded = load_model(model_cache, torch.float32)  # the saved built-in model has it too
    assert loaded.chat_template == CHAT_TEMPLATE
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"},
            {"messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}],
             "answer": "3"}]
    spec = dataset_spec(write_jsonl(tmp_path / "chat.jsonl", rows), prompt_format="chat",
                        system_prompt=SYSTEM, prompts_per_step=2)
    prompts, requests = make_requests(spec, make_task(spec), 0, "ds", tok)
    rendered = {p.row_index: tok.decode(r.prompt_ids) for p, r in zip(prompts, requests, strict=True)}
    assert rendered[0] == f"<s>system\n{SYSTEM}</s>\n<s>user\nWhat is 1 + 1?</s>\n<s>assistant\n"
    assert rendered[1] == "<s>system\nOwn system.</s>\n<s>user\nHi</s>\n<s>assistant\n"  # the row's own
    assert {str(p) for p in prompts} == {"What is 1 + 1?", "Hi"}  # the text a reward function sees
    raw = dataset_spec(write_jsonl(tmp_path / "raw.jsonl", rows[:1]), prompts_per_step=1)
    [p], [r] = make_requests(raw, make_task(raw), 0, "ds", tok)
    assert r.prompt_ids == (tok.bos_token_id, *tok(str(p), add_special_tokens=False).input_ids)


def test_an_env_can_be_chat_formatted_too() -> None:
    tok = build_tokenizer()
    spec = ExperimentSpec(name="e", env="char_class", prompt_format="chat", system_prompt="Digits only.",
                          prompts_per_step=2)
    prompts, requests = make_requests(spec, make_task(spec), 3, "e", tok)
    for p, r in zip(prompts, requests, strict=True):
        assert tok.decode(r.prompt_ids) == f"<s>system\nDigits only.</s>\n<s>user\n{p}</s>\n<s>assistant\n"


# ---- requests, scores, trajectories ---------------------------------------------------------
def test_requests_and_trajectories_of_a_dataset_task(tmp_path: Path) -> None:
    tok = build_tokenizer()
    spec = dataset_spec(write_jsonl(tmp_path / "m.jsonl", math_rows(10)), reward={"fn": "numeric_match"},
                        prompts_per_step=3, group_size=2)
    task = make_task(spec)
    prompts, requests = make_requests(spec, task, 4, "ds", tok)
    assert (prompts, requests) == make_requests(spec, make_task(spec), 4, "ds", tok)
    assert all(isinstance(p, TaskPrompt) and p.row_index is not None for p in prompts)
    assert [r.seed for r in requests] == [request_seed(spec.train.seed, 4, i) for i in range(3)]

    def sample(completion: str) -> Sample:
        ids = tuple(tok(completion, add_special_tokens=False).input_ids) + (tok.eos_token_id,)
        return Sample(requests[0].prompt_ids, ids, tuple(-0.5 for _ in ids))

    answers = [p.row["answer"].split()[-1] for p in prompts]
    groups = [[sample(f"#### {a}"), sample("#### 0.5")] for a in answers]
    traj = score(spec, task, prompts, groups, tok, 4)
    assert [s.reward for s in traj.samples] == [1.0, 0.0] * 3
    assert traj.row_indices == [p.row_index for p in prompts]
    assert Trajectory.from_json(json.loads(json.dumps(traj.to_json()))) == traj
    assert "row" not in json.dumps(traj.to_json()).replace("row_indices", "")  # indices, never rows


# ---- co-tenancy -----------------------------------------------------------------------------
def _weights(runner: LocalRunner, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in runner.model.parameters_of(name)}


def test_dataset_experiments_are_cotenancy_invariant(tmp_path: Path, model_cache: Path) -> None:
    """float64: `chat` (a chat-formatted dataset task) gets the same prompts, rewards, losses and
    weights alone and fused with a raw dataset task on another file and an env task."""
    dense = {"fn": "numeric_match", "args": {"extract": "last_number", "partial_scale": 1000.0}}
    chat = dataset_spec(write_jsonl(tmp_path / "a.jsonl", math_rows(7, seed=1)), "chat", seed=1,
                        prompt_format="chat", system_prompt=SYSTEM, reward={**dense, "format_weight": 0.2},
                        temperature=1.0, max_new_tokens=8, group_size=3)
    raw = dataset_spec(write_jsonl(tmp_path / "b.jsonl", math_rows(5, seed=2)), "raw", seed=2,
                       reward=dense, max_new_tokens=4)
    env = ExperimentSpec(name="env", env="near_char", env_args={"char": "7"}, steps=3, prompts_per_step=2,
                         group_size=2, max_new_tokens=5, train=chat.train.model_copy(update={"seed": 3}))

    def runner() -> LocalRunner:
        hf, tok = load_model(model_cache, torch.float64)
        return LocalRunner(MultiLoRAModel(hf), tok)

    solo = runner()
    solo.add("chat", chat)
    solo_hist = solo.run()
    fused = runner()
    fused.add("raw", raw)
    fused.add("chat", chat)
    fused.add("env", env)
    hist = fused.run()
    assert all(len(h) == 3 and all("failed" not in m for m in h) for h in hist.values()), hist
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 0 for m in hist["chat"])  # a real signal
    for a, b in zip(hist["chat"], solo_hist["chat"], strict=True):
        assert a["rollout_batch"] == 3 and b["rollout_batch"] == 1
        for key in ("reward_mean", "reward_std", "reward_max", "loss", "grad_norm", "train_tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-10), key
    w_fused, w_solo = _weights(fused, "chat"), _weights(solo, "chat")
    assert max((w_fused[k] - w_solo[k]).abs().max().item() for k in w_solo) < 1e-9


# ---- failures at run time -------------------------------------------------------------------
def test_a_bad_row_fails_its_experiment_alone_naming_file_and_row(tmp_path: Path, model_cache: Path) -> None:
    rows = math_rows(12)
    rows[10] = {"question": "no prompt here", "answer": "#### 1"}  # past the rows checked at submit
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    bad = dataset_spec(path, "bad", prompts_per_step=12, group_size=1)  # step 0 draws every row
    good = ExperimentSpec(name="good", env="char_class", steps=3, prompts_per_step=2, group_size=2)
    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    runner.add("bad", bad)
    runner.add("good", good)
    hist = runner.run()
    [only] = hist["bad"]
    assert only["failed"].startswith("rollout setup: DatasetRowError(")
    assert f"{path} row 10 (line 11): missing field 'prompt'" in only["failed"]
    assert len(hist["good"]) == 3 and all("failed" not in m for m in hist["good"])


def test_chat_on_a_tokenizer_without_a_template_fails_clearly(tmp_path: Path, model_cache: Path) -> None:
    spec = dataset_spec(write_jsonl(tmp_path / "m.jsonl", math_rows(4)), prompt_format="chat")
    hf, tok = load_model(model_cache, torch.float32)
    tok.chat_template = None
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    runner.add("ds", spec)
    [only] = runner.run()["ds"]
    assert "prompt_format: chat needs a chat template, and the base model's tokenizer has none" in (
        only["failed"])


# ---- learning -------------------------------------------------------------------------------
def test_a_dataset_task_with_a_dense_verifiable_reward_is_learned(tmp_path: Path, model_cache: Path) -> None:
    """Rows `<word>:` -> answer 5000, numeric_match of the completion's last number with partial
    credit 0.9 * max(0, 1 - |got - 5000| / 5000): 4 new tokens, so a number of four digits near
    5000 earns most. Seen over six seeds (20 fused steps, temperature 0.3, lr 3e-3): the first
    three steps average 0.04..0.23 and the last five 0.58..0.80. MARGIN 0.3 is below every gain."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(4, 8))) for _ in range(64)]
    path = write_jsonl(tmp_path / "const.jsonl", [{"prompt": f"{w}:", "answer": "5000"} for w in words])
    reward = {"fn": "numeric_match",
              "args": {"extract": "last_number", "partial_scale": 5000.0, "partial_max": 0.9}}
    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    for seed in range(3):
        train = {"seed": seed, "lora": {"rank": 8, "alpha": 16}, "optimizer": {"lr": 3e-3}}
        runner.add(f"l{seed}", dataset_spec(path, f"l{seed}", reward=reward, steps=20, prompts_per_step=4,
                                            group_size=4, max_new_tokens=4, temperature=0.3, train=train))
    for name, steps in runner.run().items():
        assert len(steps) == 20 and all("failed" not in m for m in steps), steps[-1]
        rewards = [m["reward_mean"] for m in steps]
        first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
        assert last - first > 0.3, (name, [round(r, 2) for r in rewards])
