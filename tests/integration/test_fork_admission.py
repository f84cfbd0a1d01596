"""`train.init_from` admission is one check, the same for `validate` and `submit` on every path
in (CLI, `FleetClient`, HTTP API): a fork must be a published version of an experiment in the
store (a snapshot unless `init_optimizer: false`), a directory a PEFT LoRA adapter whose shape
agrees with `train.lora`. A refusal is one line naming `train.init_from` and what to fix, CLI
exit code 2, HTTP 400, and nothing is written to Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import free_port
from lorafleet.common.settings import Settings
from lorafleet.common.spec_input import SpecError
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.client import FleetClient

SRC = "src-1"  # published v0..v12; snapshots (with the AdamW state) at v0 and v10
BASE = {"name": "fork", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2}
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _publish_source(store: AdapterStore, exp: str = SRC) -> None:
    w = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    for v in range(13):
        store.publish(exp, v, weights=w, adapter_config=CONFIG,
                      trainer_tensors={} if v in (0, 10) else None)


def _peft_dir(path: Path, **config) -> Path:
    """A PEFT adapter directory: what PEFT's `save_pretrained` writes (config and weights)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({**CONFIG, **config}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(path / "adapter_model.safetensors"))
    return path


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore(f"file://{tmp_path}/store")
    _publish_source(s)
    return s


def _cases(tmp_path: Path) -> list[tuple[dict, str]]:
    (tmp_path / "not-peft").mkdir()
    (tmp_path / "not-peft" / "README.md").write_text("weights are elsewhere\n")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(CONFIG))
    rank16 = _peft_dir(tmp_path / "rank16", r=16, lora_alpha=32)
    return [
        ({"init_from": f"{SRC}@v13"}, f"experiment {SRC} has no version 13 in the store (versions: v0-v12)"),
        ({"init_from": f"{SRC}@v7"}, f"v7 of {SRC} is not a snapshot (snapshots keep the optimizer state: "
                                     "v0, v10; fork one of those, or set train.init_optimizer: false"),
        ({"init_from": "ghost-1@v3"}, "no experiment ghost-1 in the adapter store"),
        ({"init_from": "ghost@vx"}, "is not EXPERIMENT_ID@vK"),
        ({"init_from": str(tmp_path / "nowhere")}, f"{tmp_path / 'nowhere'} does not exist"),
        ({"init_from": str(tmp_path / "not-peft")},
         f"{tmp_path / 'not-peft'} is not a PEFT adapter directory (no adapter_config.json)"),
        ({"init_from": str(no_weights)},
         f"{no_weights} is not a PEFT adapter directory (no adapter_model.safetensors)"),
        ({"init_from": str(rank16), "lora": {"rank": 8, "alpha": 16}},
         "rank 16 of the source adapter does not match train.lora.rank 8"),
    ]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def _written(r) -> set[str]:
    # the fence counter of replicated writes aside: the fixture's own flush wrote it
    return set(r.keys("lf:*")) - {Keys.replication_fence}


def test_cli_validate_and_submit_refuse_bad_init_froms_in_one_line_and_take_good_forks(
        tmp_path, redis_url, r, store):
    env = {"LORAFLEET_STORE_URL": store.url, "LORAFLEET_CACHE_DIR": str(tmp_path / "cache")}
    for i, (train, needle) in enumerate(_cases(tmp_path)):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump({**BASE, "train": train}))
        said = _one_line(_cli("validate", str(path), env=env))
        assert said.startswith(f"error: {path}: train.init_from: ") and needle in said, said
        assert _one_line(_cli("submit", str(path), "--redis-url", redis_url, env=env)) == said
        assert not _written(r), (train, _written(r))
    # `run` refuses it before starting anything (no Redis, no workers, no log directory)
    out = _cli("run", str(path), "--redis-url", redis_url, "--log-dir", str(tmp_path / "logs"), env=env)
    assert "train.init_from: " in _one_line(out) and not (tmp_path / "logs").exists()
    assert not _written(r)
    # a good fork still validates and submits
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**BASE, "train": {"init_from": f"{SRC}@v10"}}))
    weights_only = tmp_path / "weights-only.yaml"  # a version without optimizer state, weights alone
    weights_only.write_text(yaml.safe_dump({**BASE, "train": {"init_from": f"{SRC}@v7",
                                                               "init_optimizer": False}}))
    out = _cli("validate", str(good), str(weights_only), env=env)
    assert out.returncode == 0 and out.stdout.splitlines() == [f"{good}: ok", f"{weights_only}: ok"], out
    out = _cli("submit", str(good), str(weights_only), "--redis-url", redis_url, env=env)
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    client = FleetClient(redis_url, store.url)
    assert [client.get(i).spec.train.step_offset for i in ids] == [10, 7]
    assert client.get(ids[0]).spec.train.lora.rank == 4  # the shape is the source's


def test_validate_needs_the_store_for_a_fork_only_and_says_when_it_cannot_reach_it(tmp_path):
    """`validate` checks forks against the adapter store (LORAFLEET_STORE_URL), never Redis: a
    store it cannot reach is exit 1 naming the store, like every command that cannot reach a
    service; a spec without a fork does not open the store at all."""
    env = {"LORAFLEET_STORE_URL": f"ftp://127.0.0.1:{free_port()}/store",  # nothing listens there
           "LORAFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    fork = tmp_path / "fork.yaml"
    fork.write_text(yaml.safe_dump({**BASE, "train": {"init_from": f"{SRC}@v10"}}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(BASE))
    out = _cli("validate", str(plain), env=env)
    assert out.returncode == 0 and out.stdout == f"{plain}: ok\n", out
    out = _cli("validate", str(fork), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: adapter store {env['LORAFLEET_STORE_URL']}: ") and "refused" in line, line
    out = _cli("validate", str(fork), env={**env, "LORAFLEET_STORE_URL": "nosuch://x/store"})
    assert _one_line(out) == "error: LORAFLEET_STORE_URL nosuch://x/store: Protocol not known: nosuch"


def test_the_python_client_validates_like_it_submits(tmp_path, redis_url, r, store):
    client = FleetClient(redis_url, store.url)
    for train, needle in _cases(tmp_path):
        for check in (client.validate, client.submit):
            with pytest.raises(SpecError) as info:
                check({**BASE, "train": train})
            assert str(info.value).startswith("train.init_from: ") and needle in str(info.value)
    assert not _written(r)
    spec = client.validate({**BASE, "train": {"init_from": f"{SRC}@v10"}})
    assert (spec.train.step_offset, spec.train.lora.rank) == (10, 4)


def test_the_api_validates_a_fork_like_it_submits_it(tmp_path, redis_url, r):
    settings = Settings(redis_url=redis_url, store_url=str(tmp_path / "store"),
                        cache_dir=str(tmp_path / "cache"))
    _, plaintext = ApiKeyStore(r).create("a")
    h = {"X-API-Key": plaintext}
    with TestClient(create_app(settings, r)) as api:
        res = api.post("/v1/experiments", json=BASE, headers=h)  # the key's own experiment to fork
        assert res.status_code == 201, res.text
        [src] = res.json()["ids"]
        _publish_source(AdapterStore.from_settings(settings), src)
        before = _written(r)
        for version, needle in ((13, f"experiment {src} has no version 13 in the store (versions: v0-v12)"),
                                (7, f"v7 of {src} is not a snapshot")):
            fork = {**BASE, "train": {"init_from": f"{src}@v{version}"}}
            for route in ("/v1/validate", "/v1/experiments"):
                res = api.post(route, json=fork, headers=h)
                assert res.status_code == 400, (route, res.text)
                error = res.json()["error"]
                assert error["field"] == "train.init_from" and needle in error["message"], error
        assert _written(r) == before
        good = {**BASE, "train": {"init_from": f"{src}@v10"}}
        assert api.post("/v1/validate", json=good, headers=h).json() == {"ok": True, "count": 1}
        assert api.post("/v1/experiments", json=good, headers=h).status_code == 201
