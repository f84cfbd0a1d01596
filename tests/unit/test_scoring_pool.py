"""The scoring pool (workers/scoring.py) and the pipeline's scoring budget (issue 21 item 4): real
child processes, the real regex engine, the real tiny model."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

from lorafleet.common.data.datasets import clear_cache
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.spec_input import AdmissionLimits, parse_spec
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rl import RewardError
from lorafleet.workers.scoring import ScoreFailed, ScoreJob, ScoreTimeout, ScoringPool, needs_pool
from tests.lf_testkit import load_model

# the pattern with {0,18}: ~0.1 s a call on 40 characters (C code, not interruptible by a
# thread), a tenth of the 1 s per-call timeout even on a loaded machine; 60 calls pass any deadline here
HOSTILE = r"(?s)^(.|.){0,18}(?=[\x00])"
HOSTILE_REWARD = {"fn": "regex_match", "args": {"pattern": HOSTILE}}
TEXT = "a" * 40


@pytest.fixture
def pool():
    p = ScoringPool(processes=1)  # one process: a queued job waits for the one before it
    yield p
    p.close()


def test_a_job_past_its_deadline_is_killed_and_the_pool_keeps_serving(pool: ScoringPool) -> None:
    slow = pool.submit(ScoreJob(HOSTILE_REWARD, None, {}, [("p", {}, TEXT)] * 60), deadline_s=2.0)
    # queued behind it on the only process, longer than its own deadline: that counts from its
    # own start, so the other job's slowness does not fail it
    queued = pool.submit(ScoreJob({"fn": "regex_match", "args": {"pattern": "a{3}"}}, None, {},
                                  [("p", {}, TEXT), ("p", {}, "ab")]), deadline_s=1.0)
    with pytest.raises(ScoreTimeout, match="deadline of 2 s"):
        slow.result(timeout=120)
    assert queued.result(timeout=120)[0] == [1.0, 0.0]
    assert pool.killed == 1
    after = pool.submit(ScoreJob({"fn": "contains"}, None, {}, [("p", {"answer": "a"}, TEXT)]), deadline_s=30)
    assert after.result(timeout=120)[0] == [1.0]
    assert pool.killed == 1


def test_a_raising_reward_names_its_sample(pool: ScoringPool) -> None:
    rows = [{"answer": "a"}, {"answer": "b"}, {}]  # the third has no answer: exact_match raises
    job = ScoreJob({"fn": "exact_match"}, None, {}, [("p", row, "a") for row in rows])
    with pytest.raises(ScoreFailed) as err:
        pool.submit(job, deadline_s=30).result(timeout=120)
    assert err.value.index == 2 and "no answer" in err.value.error


def install_reward_plugin(where: Path, name: str, source: str, monkeypatch) -> None:
    """A real installed distribution (a dist-info directory) registering reward `name` as
    `lf_<name>_reward:<name>`, on the path of this process and of the pool's children."""
    module = f"lf_{name}_reward"
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    dist = where / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[lorafleet.rewards]\n{name} = {module}:{name}\n")
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv("PYTHONPATH", f"{where}:{os.environ.get('PYTHONPATH', '')}")


def test_a_plugin_that_prints_cannot_corrupt_the_answers(tmp_path: Path, monkeypatch) -> None:
    install_reward_plugin(tmp_path, "noisy", """
        import sys

        def noisy(prompt, completion, row):
            print("x" * 100000)  # more than a pipe holds, on the child's stdout
            sys.stdout.flush()
            return 0.25
    """, monkeypatch)
    p = ScoringPool(processes=1)
    try:
        job = ScoreJob({"fn": "noisy"}, None, {}, [("p", {}, "a")] * 3)
        rewards, _ = p.submit(job, 60).result(timeout=120)
    finally:
        p.close()
    assert rewards == [0.25] * 3


def spec(**kw) -> ExperimentSpec:
    return parse_spec({"name": "x", "steps": 1, **kw}, AdmissionLimits())


def test_only_rewards_that_may_be_slow_go_to_the_pool(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "answer": "1"}\n')
    ds = {"dataset": {"path": str(data)}}
    assert not needs_pool(spec(env="char_class", env_args={"cls": "digits"}))
    for fn in ("exact_match", "numeric_match", "contains"):
        assert not needs_pool(spec(**ds, reward={"fn": fn}))
    assert not needs_pool(spec(**ds, reward={"fn": "numeric_match", "format_weight": 0.1}))  # our regex
    assert needs_pool(spec(**ds, reward={"fn": "regex_match", "args": {"pattern": "a"}}))
    assert needs_pool(spec(**ds, reward={"fn": "exact_match", "format_weight": 0.1, "format_regex": "x"}))


def test_the_pipeline_leaves_slow_scoring_pending_and_fails_it_at_the_budget(
        model_cache: Path, tmp_path: Path, monkeypatch) -> None:
    install_reward_plugin(tmp_path, "stuck", """
        import time

        def stuck(prompt, completion, row):  # never returns: only the budget ends it
            while True:
                time.sleep(0.05)
    """, monkeypatch)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"prompt": "say something {i}"}}\n' for i in range(4)))
    clear_cache()
    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    fast = spec(env="char_class", env_args={"cls": "digits"}, prompts_per_step=2, group_size=2)
    hostile = spec(dataset={"path": str(data)}, reward={"fn": "stuck"}, prompts_per_step=2, group_size=2)
    runner.add("fast", fast)
    runner.add("hostile", hostile)
    pipe = runner.pipeline
    pipe.scorer, pipe.score_budget_s = ScoringPool(processes=1), 1.0
    try:
        out = pipe.rollout([runner._item("fast"), runner._item("hostile")])
        assert "fast" in out.trajectories and 0 <= out.summaries["fast"]["score_s"] <= 1.0
        assert "hostile" in out.pending  # the batch did not wait for it
        with pytest.raises(RewardError, match=r"scoring took longer than LORAFLEET_SCORE_BUDGET_S=1 s "
                                              r"\(reward 'stuck'\) on step 0: score_s=1\.000; its scoring "
                                              r"process was killed"):
            out.pending["hostile"].resolve()
        assert pipe.scorer.killed == 1
        # a budget that even in-process scoring exceeds fails it too, with the same cause
        pipe.score_budget_s = 1e-9
        out = pipe.rollout([runner._item("fast")])
        cause = "scoring took longer than LORAFLEET_SCORE_BUDGET_S=1e-09 s (env 'char_class')"
        assert cause in out.failed["fast"]
    finally:
        pipe.scorer.close()


def test_score_s_reaches_the_prometheus_histograms(r) -> None:
    """A committed train step's metrics carry its rollout's score_s (the summary is merged into
    them): /metrics serves it as lorafleet_score_seconds."""
    from lorafleet.common.keys import Keys
    from lorafleet.common.prom_writes import TIMINGS, record
    from lorafleet.scheduler.api.metrics import HISTOGRAMS

    assert TIMINGS["lorafleet_score_seconds"] == "score_s" and "lorafleet_score_seconds" in HISTOGRAMS
    record(r, trains=[("e1", 0, {"score_s": 0.2, "train_s": 1.0})])
    hist = r.hgetall(Keys.prom_histogram("lorafleet_score_seconds"))
    assert hist["|count"] == "1" and float(hist["|sum"]) == 0.2
