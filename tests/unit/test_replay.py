"""Snapshots every few versions + replay of the committed trajectories == the uninterrupted run.

Two experiments train 8 fused steps in float64 through the worker's own `ResidentAdapters` and
`RLStepPipeline`, with a snapshot (AdamW state written) every 3 versions. A fresh trainer (a
restarted worker) then loads versions that are not snapshots: the newest snapshot below them and
a replay of the logged trajectories, each step in the shapes the fused step ran it in (recorded
with the version), rebuild weights and AdamW moments bit for bit equal to what the uninterrupted
run held. Equal, not close: AdamW can blow a 1e-16 difference up to anything where second
moments are tiny (tests/unit/test_replay_exact.py shows it, and that the replay is still exact).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.workers.checkpoints import init_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.pipeline import RLStepPipeline
from lorafleet.workers.replay import ReplayError
from lorafleet.workers.residency import ResidentAdapters, SnapshotPolicy
from lorafleet.workers.rl import Trajectory
from lorafleet.workers.rollout import TorchRolloutEngine
from lorafleet.workers.tiny_model import load_base_model

MODEL = "builtin:tiny-llama"
STEPS, EVERY = 8, 3


def _spec(i: int) -> ExperimentSpec:
    env, args = [("char_class", {"cls": "vowels"}), ("near_char", {"char": "m"})][i]
    return ExperimentSpec(name=f"e{i}", env=env, env_args=args, steps=STEPS, prompts_per_step=2, group_size=3,
                          max_new_tokens=5, temperature=1.0,
                          train={"seed": 10 + i, "optimizer": {"lr": 0.02}})


def _host(store: AdapterStore, log: dict, model_cache: Path) -> tuple[ResidentAdapters, RLStepPipeline]:
    hf, tok, _ = load_base_model(MODEL, torch.float64, cache_dir=model_cache)
    trainer = FusedTrainStep(MultiLoRAModel(hf), "torch")
    policy = SnapshotPolicy(EVERY, float("inf"), lambda e, steps: [log.get((e, s)) for s in steps],
                            tok.pad_token_id)
    host = ResidentAdapters(store, trainer, MODEL, max_resident=8, snapshots=policy)
    engine = TorchRolloutEngine(trainer.model, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
    return host, RLStepPipeline(trainer, tok, engine, host)


def _state(trainer: FusedTrainStep, exp_id: str) -> dict[str, torch.Tensor]:
    tensors, meta = trainer.trainer_state(exp_id)
    weights = {k: p.detach().clone() for k, p in trainer.model.parameters_of(exp_id)}
    return {**tensors, **weights, "meta.step": torch.tensor(meta["step"])}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """The uninterrupted run: per (exp, version) the trainer state it held; the log; the store."""
    store = AdapterStore(f"file://{tmp_path_factory.mktemp('replay')}/store")
    log: dict[tuple[str, int], str] = {}
    host, pipe = _host(store, log, model_cache)
    specs = {f"e{i}": _spec(i) for i in range(2)}
    held: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for step in range(STEPS):
        items = [StepItem(e, step, 0, s) for e, s in specs.items()]
        ro = pipe.rollout(items)
        assert not ro.failed
        for e, traj in ro.trajectories.items():
            log[(e, step)] = json.dumps(traj.to_json())  # what COMMIT_ROLLOUT stores
        tr = pipe.train(items, ro.trajectories)
        assert not tr.failed
        for e in specs:
            host.committed(e, step + 1, tr.in_memory[e])
            held[(e, step + 1)] = _state(host.trainer, e)
    return store, log, specs, held


def test_snapshots_are_written_every_k_versions_and_at_the_last_step(run) -> None:
    store, _, specs, _ = run
    for e in specs:
        assert store.versions(e) == list(range(STEPS + 1))
        assert store.versions(e, snapshots_only=True) == [0, 3, 6, 8]
        assert not store.load(e, 4).snapshot and store.load(e, 4).trainer_tensors == {}
        assert store.load(e, 4).trainer_meta["snapshot"] is False


@pytest.mark.parametrize("version", [1, 2, 4, 5, 7])
def test_a_restarted_worker_rebuilds_a_version_from_snapshot_and_replay(run, model_cache, version) -> None:
    store, log, specs, held = run
    host, _ = _host(store, log, model_cache)  # a fresh process: nothing resident
    for e, spec in specs.items():
        host.ensure(StepItem(e, version, 0, spec), frozenset())
        assert host.last_snapshot[e][0] == (version // EVERY) * EVERY
        got, want = _state(host.trainer, e), held[(e, version)]
        assert got.keys() == want.keys()
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, f"{e}@v{version} differs in {unequal[:3]} ({len(unequal)} tensors)"


def test_training_on_from_a_replayed_version_equals_the_uninterrupted_run(run, model_cache, tmp_path) -> None:
    """Resume at v5 (snapshot v3 + 2 replayed steps), train steps 5..7 from the logged
    trajectories: the result is bit for bit what the uninterrupted run held at v8, and the versions it
    publishes (v6 and v8 snapshots, v7 not) are those of the uninterrupted run."""
    store, log, specs, held = run
    shutil.copytree(store.root, tmp_path / "store")  # it publishes v6..v8 again: its own copy
    store = AdapterStore(f"file://{tmp_path}/store")
    host, pipe = _host(store, log, model_cache)
    for step in range(5, STEPS):
        items = [StepItem(e, step, 0, s) for e, s in specs.items()]
        for item in items:
            host.ensure(item, frozenset(specs))
        trajs = {e: Trajectory.from_json(json.loads(log[(e, step)])) for e in specs}
        tr = pipe.train(items, trajs)  # the rows the run trained at this step
        assert not tr.failed
        for e in specs:
            host.committed(e, step + 1, True)
    for e in specs:
        got, want = _state(host.trainer, e), held[(e, STEPS)]
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, f"{e}: v{STEPS} differs in {unequal[:3]} ({len(unequal)} tensors)"
        assert store.versions(e, snapshots_only=True) == [0, 3, 6, 8]


def test_a_deleted_intermediate_version_is_replayed_in_a_solo_layout(run, model_cache, tmp_path) -> None:
    """Retention keeps the versions after the recovery snapshot while an experiment runs; one
    deleted by hand anyway (a finished experiment's versions, `lorafleet gc`) costs exactness, not
    the rebuild: v4 gone, v5 is still rebuilt from snapshot v3, its weights the committed v5's
    bit for bit, its AdamW moments the uninterrupted run's to rounding (float64)."""
    store, log, specs, held = run
    shutil.copytree(store.root, tmp_path / "store")
    store = AdapterStore(f"file://{tmp_path}/store")
    assert store.delete("e0", [4]) == [4]
    host, _ = _host(store, log, model_cache)
    host.ensure(StepItem("e0", 5, 0, specs["e0"]), frozenset())
    got, want = _state(host.trainer, "e0"), held[("e0", 5)]
    weights = dict(host.trainer.model.parameters_of("e0"))
    committed = store.load("e0", 5).weights
    assert all(torch.equal(weights[k].detach(), committed[k].to(weights[k].dtype)) for k in weights)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-9
    with pytest.raises(RuntimeError, match="e0@v4 is missing"):  # the version asked for must exist
        host.ensure(StepItem("e0", 4, 0, specs["e0"]), frozenset())


def test_a_gap_in_the_replay_log_is_an_error_naming_the_steps(run, model_cache) -> None:
    store, log, specs, _ = run
    holed = {k: v for k, v in log.items() if k != ("e0", 4)}
    host, _ = _host(store, holed, model_cache)
    with pytest.raises(ReplayError, match=r"steps \[4\]"):
        host.ensure(StepItem("e0", 5, 0, specs["e0"]), frozenset())
    assert "e0" not in host.trainer.specs  # nothing half-loaded stays


def test_forking_a_version_without_optimizer_state_says_which_versions_have_it(run, model_cache) -> None:
    store, log, _, _ = run
    host, _ = _host(store, log, model_cache)
    fork = _spec(0).model_copy(update={"train": _spec(0).train.model_copy(update={"init_from": "e0@v4"})})
    with pytest.raises(ValueError, match=r"v4 has no optimizer state .*\[0, 3, 6, 8\]"):
        init_adapter(store, host.trainer, "f", fork.train)
    weights_only = fork.train.model_copy(update={"init_optimizer": False})
    init_adapter(store, host.trainer, "f", weights_only)  # the weights alone: fine


def test_gc_drops_the_replay_log_of_failed_and_cancelled_experiments_only(r, redis_url, tmp_path) -> None:
    """A running experiment's replay log is what recovery needs; a cancelled one's can never be
    used (it cannot be resumed), so `lorafleet gc` deletes it."""
    from lorafleet.common.keys import Keys
    from lorafleet.scheduler.client import FleetClient

    client = FleetClient(redis_url, f"file://{tmp_path}/store")
    running, cancelled = client.submit(_spec(0).model_dump()), client.submit(_spec(1).model_dump())
    for exp_id in (running, cancelled):
        for step in range(3):
            r.set(Keys.trajectory(exp_id, step), "{}")
    assert client.cancel(cancelled)
    client.gc()
    kept = sorted(r.keys(Keys.trajectory_prefix(running) + "*"))
    assert kept == [Keys.trajectory(running, s) for s in range(3)]
    assert r.keys(Keys.trajectory_prefix(cancelled) + "*") == []
