"""A co-tenant's slow rewards on a real fleet (Redis, a `lorafleet worker` process, the scheduler):
one experiment's scoring must not stall the others (issue 21 item 4).

The hostile spec is the issue's: `regex_match` with the pattern and `format_regex`
`(?s)^(.|.){0,20}(?=[\\x00])`, each call ~0.3 s (well under the per-call regex timeout, so it never
times out on its own), 4 x 4 samples of 48 tokens: ~10 s of scoring per step. Beside it, a fast
experiment must run exactly as alone (float64: the same rewards, losses and weights), and the slow
one must fail with the score-budget cause, naming the `score_s` it reached.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow

HOSTILE = r"(?s)^(.|.){0,20}(?=[\x00])"
# under the 1 s timeout of one regex call: the budget, not a call's timeout, ends the scoring
BUDGET_S = 0.8
ENV = {"LORAFLEET_SCORE_BUDGET_S": str(BUDGET_S), "LORAFLEET_MAX_ATTEMPTS": "2"}


def fast_spec(steps: int = 6) -> dict:
    return {"name": "fast", "env": "char_class", "env_args": {"cls": "digits"}, "steps": steps,
            "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 8, "temperature": 0.3,
            "train": {"seed": 7, "lora": {"rank": 8, "alpha": 16},
                      "optimizer": {"lr": 3e-3, "max_grad_norm": 1.0}}}


def hostile_spec(dataset: Path) -> dict:
    return {"name": "hostile", "dataset": {"path": str(dataset)},
            "reward": {"fn": "regex_match", "args": {"pattern": HOSTILE},
                       "format_regex": HOSTILE, "format_weight": 0.5},
            "steps": 6, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 48,
            "temperature": 1.0, "train": {"seed": 3}}


def test_a_slow_reward_fails_alone_and_its_cotenant_runs_as_alone(make_fleet, redis_url: str,
                                                                  fleet_env: dict, tmp_path: Path) -> None:
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"say something long {i}"}) + "\n" for i in range(8)))
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    make_fleet(workers=1, env=ENV)

    alone_id = client.submit(fast_spec())
    [alone_state] = client.wait([alone_id], timeout_s=300)
    assert alone_state.status == "completed", alone_state.error
    alone = client.metrics(alone_id)

    fast_id, slow_id = client.submit_many([fast_spec(), hostile_spec(dataset)])
    fast_state, slow_state = client.wait([fast_id, slow_id], timeout_s=600)

    # the slow one fails alone, with the cause and the scoring time it reached
    assert slow_state.status == "failed"
    cause = f"scoring took longer than LORAFLEET_SCORE_BUDGET_S={BUDGET_S:g} s (reward 'regex_match')"
    assert cause in (slow_state.error or ""), slow_state.error
    score_s = float(re.search(r"score_s=([0-9.]+)", slow_state.error).group(1))
    assert score_s >= BUDGET_S

    # the fast one completed every step, shared rollout batches with the slow one, and its
    # results are its solo run's
    assert fast_state.status == "completed", fast_state.error
    shared = client.metrics(fast_id)
    assert [m["step"] for m in shared] == list(range(fast_spec()["steps"]))
    assert max(m["rollout_batch"] for m in shared) == 2, "the two never shared a rollout batch"
    assert all(0.0 <= m["score_s"] <= BUDGET_S for m in shared + alone), "score_s is in every step's metrics"
    assert [m["reward_mean"] for m in shared] == [m["reward_mean"] for m in alone]
    assert [m["loss"] for m in shared] == pytest.approx([m["loss"] for m in alone], abs=1e-9)
    w_shared, w_alone = store.load(fast_id).weights, store.load(alone_id).weights
    assert max((w_shared[k] - w_alone[k]).abs().max().item() for k in w_alone) < 1e-9


GATE_PLUGIN = textwrap.dedent("""
    import os
    import time

    def gate(prompt, completion, row):
        # blocks until the test opens the gate: scoring as slow as the test wants, with no clock
        while not os.path.exists(os.environ["LF_TEST_GATE"]):
            time.sleep(0.05)
        return float(len(completion) % 2)
""")


def install_gate_plugin(where: Path) -> None:
    """A real installed distribution (a dist-info directory) registering the reward `gate`."""
    where.mkdir()
    (where / "lf_gate_reward.py").write_text(GATE_PLUGIN)
    dist = where / "lf_gate_reward-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-gate-reward\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lorafleet.rewards]\ngate = lf_gate_reward:gate\n")


def test_a_cotenant_finishes_while_a_plugin_reward_still_scores_its_first_step(
        make_fleet, redis_url: str, fleet_env: dict, tmp_path: Path, monkeypatch) -> None:
    """No clock: the plugin reward blocks until the test opens a gate, so the fast experiment can
    only complete every step if nothing of its step waits for the other's scoring."""
    plugins, gate = tmp_path / "plugins", tmp_path / "gate-open"
    install_gate_plugin(plugins)
    monkeypatch.syspath_prepend(str(plugins))  # submit validates the reward fn here too
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(8)))
    pythonpath = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    make_fleet(workers=1, env={"PYTHONPATH": pythonpath, "LF_TEST_GATE": str(gate),
                               "LORAFLEET_SCORE_BUDGET_S": "600"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    gated = {"name": "gated", "dataset": {"path": str(dataset)}, "reward": {"fn": "gate"}, "steps": 2,
             "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "train": {"seed": 5}}
    fast_id, gated_id = client.submit_many([fast_spec(), gated])

    [fast_state] = client.wait([fast_id], timeout_s=300)
    assert fast_state.status == "completed", fast_state.error
    shared = client.metrics(fast_id)
    assert [m["step"] for m in shared] == list(range(fast_spec()["steps"]))
    assert max(m["rollout_batch"] for m in shared) == 2, "the two never shared a rollout batch"
    held = client.get(gated_id)
    assert (held.status, held.step, client.metrics(gated_id)) == ("running", 0, [])  # still scoring

    gate.touch()
    [gated_state] = client.wait([gated_id], timeout_s=300)
    assert gated_state.status == "completed", gated_state.error
    m = client.metrics(gated_id)
    assert [x["step"] for x in m] == [0, 1]
    assert m[0]["score_deferred"] and m[0]["score_s"] > max(x["score_s"] for x in shared)
