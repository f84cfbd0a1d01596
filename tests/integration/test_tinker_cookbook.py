"""A tinker-cookbook recipe, unchanged, trains on a live local fleet through `lorafleet api`.

The recipe is `tinker_cookbook.recipes.sl_basic` (supervised chat fine-tuning), run as its README
says, with its documented overrides: our own conversations file instead of the hub dataset, the
`role_colon` renderer, a small batch. Offline: the recipe asks for the tokenizer of its model name
through Hugging Face, so the built-in tiny model's tokenizer is placed in a local HF cache under a
known model name (HF_HUB_OFFLINE=1), and the fleet serves its base model under that same name
(LORAFLEET_TINKER_BASE_MODEL). tinker-cookbook lives in .venv/cookbook-site (`make
setup-cookbook`, part of `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from tinker_kit import api_server

from lorafleet.common.keys import Keys
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.workers.tiny_model import resolve_model_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = ROOT / ".venv" / "cookbook-site"
MODEL_NAME = "Qwen/Qwen3-4B-Instruct-2507"  # a name the cookbook knows (it picks renderers by name)


def hf_cache_with(model_dir: Path, name: str, home: Path) -> None:
    """A Hugging Face cache in which `name` resolves to `model_dir`'s tokenizer files, offline."""
    repo = home / "hub" / f"models--{name.replace('/', '--')}"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        if (model_dir / f).exists():
            shutil.copy(model_dir / f, snap / f)


def test_sl_basic_recipe_runs_unchanged(make_fleet, r: redis.Redis, redis_url: str, fleet_env: dict,
                                        model_cache: Path, tmp_path: Path) -> None:
    assert (COOKBOOK / "tinker_cookbook").is_dir(), "run `make setup-cookbook` (make test does)"
    env = {**fleet_env, "LORAFLEET_TINKER_BASE_MODEL": MODEL_NAME}
    make_fleet(workers=1, env=env)
    hf_cache_with(resolve_model_dir("builtin:tiny-llama", model_cache), MODEL_NAME, tmp_path / "hf")
    data = COOKBOOK / "tinker_cookbook" / "example_data" / "conversations.jsonl"
    _, key = ApiKeyStore(r).create("cookbook")
    log_path = tmp_path / "run"
    with api_server(redis_url, env, tmp_path / "api.log") as base:
        proc = subprocess.run(
            [sys.executable, "-m", "tinker_cookbook.recipes.sl_basic", f"model_name={MODEL_NAME}",
             f"base_url={base}", f"log_path={log_path}", "renderer_name=role_colon", "lora_rank=4",
             "max_steps=3", "eval_every=0", "save_every=0",
             "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
             f"dataset_builder.file_path={data}",
             f"dataset_builder.common_config.model_name_for_tokenizer={MODEL_NAME}",
             "dataset_builder.common_config.renderer_name=role_colon",
             "dataset_builder.common_config.max_length=256",
             "dataset_builder.common_config.batch_size=4"],
            env={**os.environ, "PYTHONPATH": str(COOKBOOK), "HF_HOME": str(tmp_path / "hf"),
                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TINKER_API_KEY": key,
                 "TINKER_TELEMETRY": "0"},
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    (tmp_path / "recipe.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(losses) == 3 and all(x == x and x > 0 for x in losses), metrics  # finite, positive
    # the recipe's model is a lorafleet adapter: 3 optimizer steps -> version 3, published
    client_models = [e for e in r.zrange(Keys.experiments, 0, -1)
                     if r.hget(Keys.experiment(e), "kind") == "client"]
    assert len(client_models) == 1
    assert int(r.hget(Keys.experiment(client_models[0]), "step")) >= 3
