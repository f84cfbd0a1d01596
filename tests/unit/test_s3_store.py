"""The adapter store against a real S3-compatible server (moto_server over HTTP): the manifest
protocol, what readers do with incomplete or torn versions, the sweep, and a kill -9 of a
process in the middle of publishing."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from s3_server import S3Server

from lorafleet.common.settings import Settings
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import (
    ADAPTER_WEIGHTS_FILE,
    TRAINER_TENSORS_FILE,
    AdapterNotFoundError,
    NewVersion,
    VersionExistsError,
)
from lorafleet.common.store.manifest import MANIFEST_FILE

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16, generator=gen,
                                                                 dtype=torch.float64)}


def _nv(version: int, seed: int = 0, adapter: str = "exp-a") -> NewVersion:
    return NewVersion(adapter, version, _weights(seed), CONFIG,
                      {"exp_avg": torch.full((4, 16), 0.5, dtype=torch.float64)}, {"step": version})


@pytest.fixture
def s3_store(s3_server: S3Server, tmp_path: Path) -> AdapterStore:
    return AdapterStore(s3_server.url(), cache_dir=tmp_path / "cache",
                        endpoint_url=s3_server.endpoint_url,
                        storage_options=s3_server.storage_options())


def _vdir(store: AdapterStore, version: int, adapter: str = "exp-a") -> str:
    return store._version_dir(adapter, version)


def _object(store: AdapterStore, version: int, name: str) -> str:
    """Where the manifest of `version` says its object `name` is."""
    manifest = store._read_manifest(_vdir(store, version))
    assert manifest is not None
    return posixpath.join(_vdir(store, version), manifest.attempt, name)


def test_settings_and_the_aws_environment_reach_the_server(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = s3_server.url()
    via_settings = AdapterStore.from_settings(Settings(
        store_url=url, cache_dir=tmp_path, store_endpoint_url=s3_server.endpoint_url,
        store_options=s3_server.storage_options()))
    via_settings.publish_many([_nv(0, seed=1)])
    for name, value in s3_server.env().items():  # the standard AWS environment alone
        monkeypatch.setenv(name, value)
    via_env = AdapterStore(url, cache_dir=tmp_path)
    assert via_env.versions("exp-a") == [0]
    assert torch.equal(via_env.load("exp-a").weights["base_model.model.q_proj.lora_A.weight"],
                       _weights(1)["base_model.model.q_proj.lora_A.weight"])


def test_the_manifest_is_written_last_and_lists_every_object(s3_store: AdapterStore) -> None:
    [path] = s3_store.publish_many([_nv(0)])
    manifest = s3_store._read_manifest(path)
    assert manifest is not None and manifest.version == 0
    assert set(s3_store._listing(path)) == {manifest.attempt, MANIFEST_FILE}
    listed = s3_store._listing(posixpath.join(path, manifest.attempt))
    assert set(listed) == set(manifest.files)
    for name, (size, _) in manifest.files.items():
        assert listed[name]["size"] == size
    # Written last: no object is newer than the manifest (S3 LastModified, 1 s resolution).
    written = s3_store._listing(path)[MANIFEST_FILE]["LastModified"]
    assert max(e["LastModified"] for e in listed.values()) <= written
    assert s3_store.same_content(_nv(0)) and not s3_store.same_content(_nv(0, seed=9))


def test_a_version_without_its_manifest_does_not_exist_for_any_reader(
    s3_store: AdapterStore,
) -> None:
    s3_store.publish_many([_nv(0)])
    s3_store.publish_many([_nv(1, seed=1)])
    s3_store.fs.rm_file(posixpath.join(_vdir(s3_store, 1), MANIFEST_FILE))  # a publish that died
    assert s3_store.versions("exp-a") == [0]
    assert not s3_store.exists("exp-a", 1)
    with pytest.raises(AdapterNotFoundError, match="published versions: \\[0\\]"):
        s3_store.load("exp-a", 1)
    with pytest.raises(AdapterNotFoundError):
        s3_store.local_dir("exp-a", 1)
    # retention never counts it, and a new publish of the version replaces its leftovers
    assert s3_store.delete_versions("exp-a", keep_last=5) == []
    s3_store.publish_many([_nv(1, seed=2)])
    assert s3_store.versions("exp-a") == [0, 1]
    assert torch.equal(s3_store.load("exp-a", 1).weights["base_model.model.q_proj.lora_A.weight"],
                       _weights(2)["base_model.model.q_proj.lora_A.weight"])


def test_objects_that_do_not_match_the_manifest_are_never_loaded(
    s3_store: AdapterStore, tmp_path: Path
) -> None:
    s3_store.publish_many([_nv(0), _nv(1)])
    # another size: the version is gone for listings
    s3_store.fs.pipe_file(_object(s3_store, 1, ADAPTER_WEIGHTS_FILE), b"short")
    assert s3_store.versions("exp-a") == [0] and not s3_store.exists("exp-a", 1)
    torn = bytearray(s3_store.fs.cat_file(_object(s3_store, 0, ADAPTER_WEIGHTS_FILE)))
    torn[-1] ^= 0xFF  # same size, other bytes: only the sha256 tells
    s3_store.fs.pipe_file(_object(s3_store, 0, ADAPTER_WEIGHTS_FILE), bytes(torn))
    with pytest.raises(AdapterNotFoundError, match="does not match its manifest"):
        s3_store.load("exp-a", 0)
    with pytest.raises(Exception, match="differs from the manifest"):
        s3_store.local_dir("exp-a", 0)
    cache = tmp_path / "cache"
    assert not any(p.name == "v0" for p in cache.rglob("v0"))  # no torn copy in the cache


def test_local_dir_downloads_a_version_once_into_a_cache_keyed_by_version(
    s3_store: AdapterStore, tmp_path: Path
) -> None:
    s3_store.publish_many([_nv(0), _nv(1, seed=1)])
    local = s3_store.local_dir("exp-a", 1)
    assert local.is_relative_to(tmp_path / "cache") and local.name == "v1"
    assert MANIFEST_FILE not in {p.name for p in local.iterdir()}
    assert (local / TRAINER_TENSORS_FILE).is_file()
    assert s3_store.local_dir("exp-a", "latest") == local


def test_delete_removes_the_manifest_first_and_sweep_removes_dead_publishes(
    s3_store: AdapterStore,
) -> None:
    s3_store.publish_many([_nv(v) for v in range(3)])
    assert s3_store.delete("exp-a", [0]) == [0]
    assert s3_store.versions("exp-a") == [1, 2] and not s3_store.fs.exists(_vdir(s3_store, 0))
    s3_store.fs.pipe_file(posixpath.join(_vdir(s3_store, 7), ADAPTER_WEIGHTS_FILE), b"dead")
    assert s3_store.sweep_temp(older_than_s=60) == []  # too young: maybe a live publish
    removed = s3_store.sweep_temp(older_than_s=60, now=time.time() + 3600)
    assert removed == [_vdir(s3_store, 7)]
    assert not s3_store.fs.exists(_vdir(s3_store, 7))
    assert s3_store.versions("exp-a") == [1, 2] and s3_store.latest_version("exp-a") == 2
    # objects of another attempt beside a published version: a writer that lost or died
    stale = posixpath.join(_vdir(s3_store, 2), ".a-0123456789abcdef")
    s3_store.fs.pipe_file(posixpath.join(stale, ADAPTER_WEIGHTS_FILE), b"lost")
    assert s3_store.sweep_temp(older_than_s=60, now=time.time() + 3600) == [stale]
    assert s3_store.versions("exp-a") == [1, 2] and s3_store.load("exp-a", 2).version == 2


def test_two_writers_of_one_version_the_first_manifest_wins_whole(
    s3_server: S3Server, s3_store: AdapterStore
) -> None:
    """A lost attempt and its retry publish the same version at once: each writes its own
    objects, the manifest is created only if absent, so the version is one writer's, whole."""
    slow = AdapterStore(s3_store.url, endpoint_url=s3_server.endpoint_url,
                        storage_options=s3_server.storage_options())
    slow.test_snapshot_delay_s = 2.0  # its objects are written, its manifest waits
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try(slow, _nv(1, seed=1))))
    thread.start()
    deadline = time.monotonic() + 120  # a safety net, as the join below
    while len(s3_store.fs.find(_vdir(s3_store, 1))) < 4:  # the slow writer's objects are there
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [fast] = s3_store.publish_many([_nv(1, seed=2)])
    thread.join(120)
    assert not thread.is_alive()
    assert fast == _vdir(s3_store, 1)
    assert isinstance(outcome[0], VersionExistsError)  # If-None-Match: the manifest was there
    assert s3_store.same_content(_nv(1, seed=2)) and not s3_store.same_content(_nv(1, seed=1))
    manifest = s3_store._read_manifest(_vdir(s3_store, 1))
    assert manifest is not None and set(s3_store._listing(_vdir(s3_store, 1))) == {
        manifest.attempt, MANIFEST_FILE}  # the loser removed its own objects


def _try(store: AdapterStore, nv: NewVersion) -> object:
    try:
        return store.publish_many([nv])[0]
    except Exception as exc:  # noqa: BLE001 (the outcome is asserted)
        return exc


_CHILD = """
import sys, torch
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import NewVersion
store = AdapterStore(sys.argv[1])
store.test_snapshot_delay_s = 120.0  # all objects written, the manifest not yet: killed here
store.publish_many([NewVersion("exp-a", 1, {"w": torch.ones(64, 64)}, {"r": 4},
                               {"m": torch.ones(64, 64)}, {"step": 1})])
"""


def test_kill_9_in_the_middle_of_publishing_leaves_no_version(
    s3_server: S3Server, s3_store: AdapterStore
) -> None:
    s3_store.publish_many([_nv(0)])
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, s3_store.url], env=env)
    try:
        v1 = _vdir(s3_store, 1)
        deadline = time.monotonic() + 60
        while len(s3_store.fs.find(v1)) < 4:  # every object of the snapshot version is there
            assert child.poll() is None, "the publisher exited before it was killed"
            assert time.monotonic() < deadline, "the publisher never wrote its objects"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert MANIFEST_FILE not in s3_store._listing(v1) and len(s3_store.fs.find(v1)) == 4
    assert s3_store.versions("exp-a") == [0] and not s3_store.exists("exp-a", 1)
    assert s3_store.latest_version("exp-a") == 0 and s3_store.load("exp-a").version == 0
    with pytest.raises(AdapterNotFoundError):
        s3_store.load("exp-a", 1)
    # the sweep removes the dead publish's objects, and a later publish of v1 succeeds
    assert s3_store.sweep_temp(older_than_s=60, now=time.time() + 3600) == [v1]
    s3_store.publish_many([_nv(1, seed=5)])
    assert s3_store.versions("exp-a") == [0, 1] and s3_store.load("exp-a").version == 1


def test_an_invalid_manifest_is_replaced_by_the_next_publish(s3_store: AdapterStore) -> None:
    s3_store.publish_many([_nv(0)])
    s3_store.fs.pipe_file(posixpath.join(_vdir(s3_store, 0), MANIFEST_FILE), b"{not json")
    assert s3_store.versions("exp-a") == [] and not s3_store.exists("exp-a", 0)
    s3_store.publish_many([_nv(0, seed=3)])
    assert s3_store.versions("exp-a") == [0] and s3_store.same_content(_nv(0, seed=3))


def test_store_credentials_never_show_in_settings_dumps() -> None:
    settings = Settings(store_url="s3://b/p", store_options={"key": "AKIA1", "secret": "s3cr3t"})
    for shown in (repr(settings), str(settings), str(settings.safe_dump())):
        assert "s3cr3t" not in shown and "AKIA1" not in shown
    assert settings.store_options["secret"] == "s3cr3t"  # the real value is kept
