import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.common.store import durable_fs
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LATEST_FILE,
    TMP_PREFIX,
    VERSION_FILES,
    AdapterCheckpoint,
    AdapterNotFoundError,
    AdapterStoreError,
    NewVersion,
    VersionExistsError,
)

PREFIX = "base_model.model.layers.0.q_proj"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{PREFIX}.lora_A.weight": torch.randn(4, 16, generator=gen),
        f"{PREFIX}.lora_B.weight": torch.randn(16, 4, generator=gen, dtype=torch.float64),
        "base_model.model.layers.0.v_proj.lora_A.weight": torch.randn(4, 16, generator=gen).to(
            torch.bfloat16
        ),
    }


def _trainer_tensors() -> dict[str, torch.Tensor]:
    return {
        "exp_avg.0": torch.full((4, 16), 0.25, dtype=torch.float64),
        "rng": torch.random.get_rng_state(),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # Compare raw bytes: exact even for NaNs and for bfloat16.
        raw_a, raw_b = (t.reshape(-1).view(torch.uint8) for t in (a[name], b[name]))
        assert torch.equal(raw_a, raw_b), name


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore("file://" + str(tmp_path / "store"), cache_dir=tmp_path / "cache")


@pytest.fixture(params=["memory", "s3"])
def memory_store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    """An object store (no rename: the manifest protocol): fsspec's memory filesystem, and a real
    S3-compatible server (moto_server)."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        return AdapterStore(s3.url(), cache_dir=tmp_path / "cache", endpoint_url=s3.endpoint_url,
                            storage_options=s3.storage_options())
    # The memory filesystem is global to the process: give each test its own root.
    return AdapterStore(f"memory://store-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")


def _publish(store: AdapterStore, adapter_id: str, version: int, seed: int = 0) -> str:
    return store.publish(
        adapter_id,
        version,
        weights=_weights(seed),
        adapter_config=CONFIG,
        trainer_tensors=_trainer_tensors(),
        trainer_meta={"step": version, "lr": 1e-4, "history": [1, 2]},
    )


def _leftovers(store: AdapterStore, adapter_id: str) -> list[str]:
    root = f"{store.root}/{adapter_id}"
    if not store.fs.exists(root):
        return []
    return [p for p in store.fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(".tmp")]


def test_round_trip_is_bitwise(store: AdapterStore) -> None:
    path = _publish(store, "exp-a", 0)
    assert Path(path) == store.local_dir("exp-a", 0)
    assert sorted(p.name for p in Path(path).iterdir()) == sorted(VERSION_FILES)
    loaded = store.load("exp-a")
    assert isinstance(loaded, AdapterCheckpoint)
    assert (loaded.adapter_id, loaded.version) == ("exp-a", 0)
    _assert_bitwise_equal(loaded.weights, _weights(0))
    _assert_bitwise_equal(loaded.trainer_tensors, _trainer_tensors())
    assert loaded.adapter_config == CONFIG
    assert loaded.trainer_meta == {"step": 0, "lr": 1e-4, "history": [1, 2]}
    # Sorted keys, so identical configs give identical bytes.
    text = (Path(path) / ADAPTER_CONFIG_FILE).read_text()
    assert list(json.loads(text)) == sorted(CONFIG)


def test_empty_trainer_state_still_writes_valid_files(store: AdapterStore) -> None:
    store.publish("exp-a", 3, weights=_weights(), adapter_config=CONFIG)
    loaded = store.load("exp-a", 3)
    assert loaded.trainer_tensors == {}
    assert loaded.trainer_meta == {}


def test_non_contiguous_and_shared_tensors_are_saved(store: AdapterStore) -> None:
    base = torch.randn(8, 4)
    weights = {"t": base.t(), "view": base[:2], "same": base}
    store.publish("exp-a", 0, weights=weights, adapter_config=CONFIG)
    loaded = store.load("exp-a", 0).weights
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor)


def test_published_version_is_immutable(store: AdapterStore) -> None:
    path = Path(_publish(store, "exp-a", 1, seed=1))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(VersionExistsError):
        _publish(store, "exp-a", 1, seed=2)
    assert issubclass(VersionExistsError, AdapterStoreError)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    _assert_bitwise_equal(store.load("exp-a", 1).weights, _weights(1))
    assert _leftovers(store, "exp-a") == []


def test_latest_pointer_only_moves_forward(store: AdapterStore) -> None:
    assert store.latest_version("exp-a") is None
    _publish(store, "exp-a", 2)
    assert store.latest_version("exp-a") == 2
    _publish(store, "exp-a", 5)
    _publish(store, "exp-a", 3)  # a late publish of an older version
    assert store.latest_version("exp-a") == 5
    assert store.load("exp-a").version == 5
    assert store.versions("exp-a") == [2, 3, 5]
    pointer = Path(store.root) / "exp-a" / LATEST_FILE
    assert pointer.read_text().strip() == "5"


def test_missing_pointer_falls_back_to_highest_version(store: AdapterStore) -> None:
    _publish(store, "exp-a", 0)
    _publish(store, "exp-a", 1)
    (Path(store.root) / "exp-a" / LATEST_FILE).unlink()
    assert store.latest_version("exp-a") == 1


def _new(adapter_id: str, version: int, seed: int = 0) -> NewVersion:
    return NewVersion(adapter_id, version, _weights(seed), CONFIG, _trainer_tensors(), {"step": version})


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_publish_many_publishes_each_and_keeps_existing_versions(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    if not syncfs:  # the portable path: one fsync per file and directory
        monkeypatch.setattr(durable_fs, "_libc_syncfs", lambda: None)
    original = Path(_publish(store, "exp-b", 1, seed=7))
    results = store.publish_many([_new("exp-a", 0, seed=1), _new("exp-b", 1, seed=2),
                                  _new("exp-c", 3, seed=3)])
    assert results[0] == store._version_dir("exp-a", 0) and results[2] == store._version_dir("exp-c", 3)
    assert isinstance(results[1], VersionExistsError)  # in its slot, not raised: the others went on
    _assert_bitwise_equal(store.load("exp-b", 1).weights, _weights(7))  # untouched
    assert sorted(p.name for p in original.iterdir()) == sorted(VERSION_FILES)
    for adapter_id, version, seed in [("exp-a", 0, 1), ("exp-c", 3, 3)]:
        loaded = store.load(adapter_id)  # the latest pointer moved
        assert loaded.version == version
        _assert_bitwise_equal(loaded.weights, _weights(seed))
        assert _leftovers(store, adapter_id) == []


def test_publish_many_with_a_bad_item_leaves_nothing_behind(store: AdapterStore) -> None:
    bad = NewVersion("exp-b", 0, {"a": torch.zeros(2)}, {"nan": float("nan")})
    with pytest.raises(TypeError):
        store.publish_many([_new("exp-a", 0), bad])
    assert store.versions("exp-a") == [] and store.versions("exp-b") == []
    assert _leftovers(store, "exp-a") == [] and _leftovers(store, "exp-b") == []


def test_unreadable_pointer_falls_back_to_highest_version(store: AdapterStore) -> None:
    """The pointer is not fsynced: after a machine crash it may be empty."""
    _publish(store, "exp-a", 0)
    _publish(store, "exp-a", 1)
    (Path(store.root) / "exp-a" / LATEST_FILE).write_text("")
    assert store.latest_version("exp-a") == 1


@pytest.mark.parametrize(
    ("weights", "config", "meta"),
    [
        ({"a": torch.zeros(2), "b": [1.0, 2.0]}, CONFIG, None),  # not a tensor
        ({"a": torch.zeros(2)}, {"bad": object()}, None),  # config not JSON
        ({"a": torch.zeros(2)}, CONFIG, {"bad": {1, 2}}),  # meta not JSON
        ({"a": torch.zeros(2)}, {"nan": float("nan")}, None),  # NaN is not JSON
    ],
)
def test_failed_publish_leaves_nothing_behind(
    store: AdapterStore, weights: dict, config: dict, meta: dict | None
) -> None:
    _publish(store, "exp-a", 0)
    with pytest.raises(TypeError):
        store.publish("exp-a", 1, weights=weights, adapter_config=config, trainer_meta=meta)
    assert store.versions("exp-a") == [0]
    assert not store.exists("exp-a", 1)
    assert store.latest_version("exp-a") == 0
    assert _leftovers(store, "exp-a") == []


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", ".hidden", "x" * 65, "..", "a\nb"])
def test_bad_adapter_ids_are_rejected_before_writing(store: AdapterStore, bad_id: str) -> None:
    with pytest.raises(ValueError, match="adapter id"):
        store.publish(bad_id, 0, weights=_weights(), adapter_config=CONFIG)
    for call in (store.load, store.local_dir, store.latest_version, store.versions):
        with pytest.raises(ValueError):
            call(bad_id)
    assert not Path(store.root).exists()  # nothing at all was written
    assert not (Path(store.root).parent / "x").exists()


@pytest.mark.parametrize("bad_version", [-1, 1.0, "1", True, None])
def test_bad_versions_are_rejected(store: AdapterStore, bad_version: object) -> None:
    with pytest.raises(ValueError, match="version"):
        store.publish("exp-a", bad_version, weights=_weights(), adapter_config=CONFIG)  # type: ignore[arg-type]
    assert not Path(store.root).exists()


def test_unknown_adapter_or_version_is_a_clear_error(store: AdapterStore) -> None:
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        store.load("nope")
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        store.load("nope", 0)
    _publish(store, "exp-a", 0)
    with pytest.raises(AdapterNotFoundError, match=r"no version 4 .*published versions: \[0\]"):
        store.load("exp-a", 4)
    with pytest.raises(AdapterNotFoundError):
        store.local_dir("exp-a", 4)
    assert not store.exists("exp-a", 4)


def test_listing(store: AdapterStore) -> None:
    assert store.adapters() == []
    assert store.versions("exp-a") == []
    _publish(store, "exp-b", 0)
    _publish(store, "exp-a", 1)
    _publish(store, "exp-a", 0)
    (Path(store.root) / "exp-a" / f"{TMP_PREFIX}crashed").mkdir()  # a dead publisher's leftover
    (Path(store.root) / "exp-a" / "v9").mkdir()  # incomplete: not a version
    assert store.adapters() == ["exp-a", "exp-b"]
    assert store.versions("exp-a") == [0, 1]
    assert store.exists("exp-a", 1) and not store.exists("exp-a", 9)


def test_delete_versions_keeps_the_latest(store: AdapterStore) -> None:
    for version in range(5):
        _publish(store, "exp-a", version)
    assert store.delete_versions("exp-a", keep_last=2) == [0, 1, 2]
    assert store.versions("exp-a") == [3, 4]
    assert store.delete_versions("exp-a", keep_last=0) == [3]
    assert store.versions("exp-a") == [4]
    assert store.load("exp-a").version == 4
    assert store.delete_versions("exp-a", keep_last=0) == []
    assert store.delete_versions("never-published", keep_last=1) == []
    assert _leftovers(store, "exp-a") == []
    with pytest.raises(ValueError):
        store.delete_versions("exp-a", keep_last=-1)


def test_memory_store_round_trip_and_local_dir_cache(
    memory_store: AdapterStore, tmp_path: Path
) -> None:
    _publish(memory_store, "exp-m", 0, seed=3)
    _publish(memory_store, "exp-m", 1, seed=4)
    with pytest.raises(VersionExistsError):
        _publish(memory_store, "exp-m", 1, seed=5)
    assert memory_store.versions("exp-m") == [0, 1]
    assert memory_store.latest_version("exp-m") == 1
    assert memory_store.adapters() == ["exp-m"]
    _assert_bitwise_equal(memory_store.load("exp-m", 0).weights, _weights(3))
    assert _leftovers(memory_store, "exp-m") == []

    local = memory_store.local_dir("exp-m")
    assert local.is_relative_to(tmp_path / "cache" / "store-cache")
    assert local.parts[-2:] == ("exp-m", "v1")
    assert sorted(p.name for p in local.iterdir()) == sorted(VERSION_FILES)
    _assert_bitwise_equal(load_file(local / ADAPTER_WEIGHTS_FILE), _weights(4))
    # Downloaded once: a second call reuses the cached copy.
    mtime = (local / ADAPTER_WEIGHTS_FILE).stat().st_mtime_ns
    assert memory_store.local_dir("exp-m", 1) == local
    assert (local / ADAPTER_WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert [p.name for p in local.parent.iterdir()] == ["v1"]  # no temp dirs left


def test_memory_store_failed_publish_cleans_up(memory_store: AdapterStore) -> None:
    with pytest.raises(TypeError):
        memory_store.publish("exp-m", 0, weights={"a": "nope"}, adapter_config=CONFIG)  # type: ignore[dict-item]
    assert memory_store.versions("exp-m") == []
    assert _leftovers(memory_store, "exp-m") == []


def test_memory_store_delete_versions(memory_store: AdapterStore) -> None:
    for version in range(3):
        _publish(memory_store, "exp-m", version)
    assert memory_store.delete_versions("exp-m", keep_last=1) == [0, 1]
    assert memory_store.versions("exp-m") == [2]


def test_plain_path_url_works(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "plain"))
    _publish(store, "exp-a", 0)
    assert (tmp_path / "plain" / "exp-a" / "v0" / ADAPTER_WEIGHTS_FILE).is_file()


def test_safetensors_reader_sees_the_same_tensors(store: AdapterStore) -> None:
    directory = Path(_publish(store, "exp-a", 0))
    _assert_bitwise_equal(load_file(directory / ADAPTER_WEIGHTS_FILE), _weights(0))


def test_peft_loads_a_published_version(store: AdapterStore) -> None:
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.q_proj(x)))

    torch.manual_seed(0)
    base_state = Tiny().state_dict()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)

    def fresh_base() -> Tiny:
        model = Tiny()
        model.load_state_dict(base_state)
        return model

    trained = peft.get_peft_model(fresh_base(), config)
    weights = get_peft_model_state_dict(trained)
    adapter_config = json.loads(json.dumps(config.to_dict(), default=sorted))
    directory = store.publish("exp-peft", 0, weights=weights, adapter_config=adapter_config)

    loaded = peft.PeftModel.from_pretrained(fresh_base(), directory)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        assert not torch.equal(loaded(x), fresh_base()(x))  # the adapter is really applied


def _nv(version: int, seed: int) -> NewVersion:
    return NewVersion("exp-a", version, _weights(seed), CONFIG, _trainer_tensors(), {"step": version})


def test_same_content_compares_every_file_byte_for_byte(store: AdapterStore) -> None:
    """A retried attempt that finds its version already published commits only if the store
    holds exactly what it would have written."""
    [path] = store.publish_many([_nv(1, seed=0)])
    assert isinstance(path, str)
    assert store.same_content(_nv(1, seed=0))
    assert not store.same_content(_nv(1, seed=1))  # other weights
    other_meta = NewVersion("exp-a", 1, _weights(0), CONFIG, _trainer_tensors(), {"step": 99})
    assert not store.same_content(other_meta)


def test_replace_version_swaps_an_uncommitted_version_whole(store: AdapterStore) -> None:
    store.publish_many([_nv(1, seed=0)])
    store.replace_version(_nv(1, seed=1))
    _assert_bitwise_equal(store.load("exp-a", 1).weights, _weights(1))
    assert store.versions("exp-a") == [1]
    assert not [p for p in (Path(store.root) / "exp-a").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_sweep_removes_only_orphaned_temp_dirs_older_than_the_bound(store: AdapterStore) -> None:
    import os
    import time

    store.publish_many([_nv(0, seed=0)])
    root = Path(store.root) / "exp-a"
    old_dir, new_dir = root / f"{TMP_PREFIX}dead", root / f"{TMP_PREFIX}live"
    old_file = root / f"{LATEST_FILE}{TMP_PREFIX}dead"
    for d in (old_dir, new_dir):
        d.mkdir()
        (d / ADAPTER_WEIGHTS_FILE).write_bytes(b"x" * 1000)
    old_file.write_text("3\n")
    hour_ago = time.time() - 3600
    for p in (old_dir, old_file):
        os.utime(p, (hour_ago, hour_ago))
    removed = store.sweep_temp(older_than_s=60)
    assert sorted(Path(p).name for p in removed) == sorted([old_dir.name, old_file.name])
    assert not old_dir.exists() and not old_file.exists() and new_dir.exists()
    assert store.versions("exp-a") == [0] and store.latest_version("exp-a") == 0
    assert store.sweep_temp(older_than_s=60) == []
