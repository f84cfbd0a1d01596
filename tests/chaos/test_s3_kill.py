"""kill -9 of the workers while they publish snapshot versions to a real S3-compatible server
(moto_server): each snapshot's objects are written and its manifest waits 1 s; the workers are
killed there. No torn version is ever read, every restart rebuilds from the newest snapshot +
replay log, and the result is exact (chaoskit.assert_exact, float64)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pytest
from chaoskit import assert_exact, wait_until
from s3_server import S3Server
from test_infra_faults import _submit, chaos_fleet, chaos_redis, log_events  # noqa: F401 - fixtures

from lorafleet.common.redis.connection import connect
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import TRAINER_TENSORS_FILE
from lorafleet.common.store.manifest import MANIFEST_FILE

pytestmark = pytest.mark.slow


def _snapshot_without_manifest(store: AdapterStore) -> bool:
    """A snapshot after v0 being published: its AdamW state object is written, its manifest is
    not. (Not v0: a kill there leaves nothing to rebuild, which the test must see done.)"""
    for adapter in store.adapters():
        for version, entries in store._object_tree(store._adapter_root(adapter)).items():
            if version > 0 and MANIFEST_FILE not in entries and any(
                    posixpath.basename(rel) == TRAINER_TENSORS_FILE for rel in entries):
                return True
    return False


def test_kill_9_while_publishing_snapshots_to_s3_is_exact(
    chaos_fleet, chaos_redis, fleet_env, model_cache, s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store_url = s3_server.url("chaos")
    fleet_env["LORAFLEET_STORE_URL"] = store_url
    env = {**s3_server.env(), "LORAFLEET_MAX_ATTEMPTS": "50", "LORAFLEET_SNAPSHOT_EVERY_STEPS": "4",
           "LORAFLEET_TEST_SNAPSHOT_DELAY_S": "1.0", "LORAFLEET_MAX_RESIDENT": "1"}
    fleet = chaos_fleet(workers=2, env=env)
    client, sp, ids = _submit(chaos_redis, fleet_env, 2, steps=10)
    store = AdapterStore(store_url)
    kills = 0
    while kills < 2 and not all(client.get(i).done for i in ids):
        wait_until(lambda: _snapshot_without_manifest(store) or all(client.get(i).done for i in ids),
                   timeout_s=120, what="a snapshot's objects written, its manifest not yet")
        if all(client.get(i).done for i in ids):
            break
        for w in ("w0", "w1"):
            fleet.kill(w)
        kills += 1
        for w in ("w0", "w1"):
            fleet.start_worker(w)
        fleet.wait_for_workers(2, timeout_s=120)
    client.wait(ids, timeout_s=600)
    assert kills == 2, "the run ended before the kills: make it longer"
    assert_exact(client, store_url, ids, sp, model_cache, connect(chaos_redis.url))
    for exp_id in ids:
        assert {0, 4, 8, 10} <= set(store.versions(exp_id, snapshots_only=True))
    rebuilt = [e for w in ("w0", "w1") for e in log_events(
        tmp_path / "logs" / f"{w}.log", "adapter rebuilt from snapshot and replay log")]
    assert rebuilt, "no restart rebuilt an adapter from a snapshot (were the kills too late?)"
