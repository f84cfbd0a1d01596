"""A small fleet whose adapter store is a real S3-compatible server (moto_server over HTTP):
workers publish every version with the manifest protocol, and the client lists, loads and
downloads them from S3, reaching the server through the standard AWS environment only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from s3_server import S3Server
from safetensors.torch import load_file
from test_fleet import spec

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.manifest import MANIFEST_FILE
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow


def test_a_fleet_publishes_and_serves_every_version_through_s3(
    make_fleet, redis_url: str, s3_server: S3Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env().items():  # this process (the client) and the fleet
        monkeypatch.setenv(name, value)
    store_url = s3_server.url("fleet")
    make_fleet(workers=2, env={"LORAFLEET_STORE_URL": store_url, **s3_server.env()})
    client = FleetClient(redis_url, store_url)
    specs = [spec("digits", "char_class", {"cls": "digits"}, steps=4, seed=1),
             spec("nearz", "near_char", {"char": "z"}, steps=4, seed=2)]
    ids = [client.submit(s) for s in specs]
    states = client.wait(ids, timeout_s=600)
    assert [s.status for s in states] == ["completed"] * 2, [s.error for s in states]
    store = AdapterStore(store_url, cache_dir=tmp_path / "cache")
    assert not store._local and store.fs.protocol[0] == "s3"
    for s in states:
        assert [m["step"] for m in client.metrics(s.id)] == list(range(4)), "lost or repeated"
        assert s.version == 4 and store.versions(s.id) == list(range(5))
        for v in store.versions(s.id):
            assert MANIFEST_FILE in store._listing(store._version_dir(s.id, v))
        out = client.download_adapter(s.id, "latest", dest=tmp_path / "dl")
        assert out.name == f"{s.id}-v4"
        got, want = load_file(out / "adapter_model.safetensors"), store.load(s.id).weights
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
