"""Checkpoint retention: what is deleted, and what never is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.retention import doomed_versions


@pytest.mark.parametrize(("published", "committed", "keep_last", "keep_every", "doomed"), [
    (range(8), 7, None, 0, []),  # no retention: keep everything
    (range(8), 7, 2, 0, [1, 2, 3, 4, 5]),  # v0 (the start) and the 2 newest stay
    (range(8), 7, 2, 3, [1, 2, 4, 5]),  # milestones 3 and 6 stay
    (range(10), 7, 2, 0, [1, 2, 3, 4, 5]),  # v8, v9 are newer than the committed v7: in flight, kept
    ([0, 5, 6, 7], 7, 1, 0, [5, 6]),
    ([0], 0, 1, 0, []),
])
def test_doomed_versions(published, committed, keep_last, keep_every, doomed):
    assert doomed_versions(published, committed, keep_last, keep_every) == doomed


def test_versions_after_the_recovery_snapshot_are_kept_while_the_experiment_runs():
    """Replay reads the versions after the snapshot it starts from (their weights and step
    layouts): kept while the experiment may be rebuilt; a finished one keeps the snapshot only."""
    assert doomed_versions(range(8), 7, 2, 0, snapshots=[0, 3]) == [1, 2]
    assert doomed_versions(range(8), 7, 2, 0, snapshots=[0, 3], replays=False) == [1, 2, 4, 5]


def test_keep_last_must_be_positive():
    with pytest.raises(ValueError, match="keep_last"):
        doomed_versions(range(3), 2, 0, 0)


def test_store_delete_never_removes_the_latest_and_usage_shrinks(tmp_path: Path):
    store = AdapterStore("file://" + str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    w = {"base_model.model.x.lora_A.weight": torch.zeros(64, 64)}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for v in range(4):
        store.publish("exp-a", v, weights=w, adapter_config=cfg)
    before = store.usage("exp-a")
    assert store.delete("exp-a", [1, 3, 9]) == [1]  # v3 is `latest`, v9 does not exist
    assert store.versions("exp-a") == [0, 2, 3] and store.usage("exp-a") < before
    assert store.usage("nope") == 0


def test_a_spec_overrides_the_fleet_defaults_field_by_field():
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.common.settings import Settings
    from lorafleet.common.store.retention import retention_of

    base = {"name": "a", "env": "char_class", "env_args": {"cls": "digits"}}
    fleet = Settings(keep_last=10, keep_every=5)
    def spec(**retention: int) -> ExperimentSpec:
        return ExperimentSpec.model_validate({**base, **({"retention": retention} if retention else {})})

    assert retention_of(spec(), fleet) == (10, 5)
    assert retention_of(spec(keep_last=2), fleet) == (2, 5)
    assert retention_of(spec(keep_every=0), Settings()) == (None, 0)
