"""The built-in tiny base model: a small Llama (or Qwen2) causal LM with a character tokenizer,
built locally and deterministically (no model hub is reachable).

head_dim is 32 so that vLLM can load it. Any local Hugging Face model directory works as a base
model too: `load_base_model("/path/to/model")`.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

BUILTIN_PREFIX = "builtin:"
BUILD_VERSION = 1  # bump when the recipe changes: cached builds are rebuilt
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
VOCAB_SIZE = 128  # len(SPECIALS) + len(CHARS) = 100, padded for aligned matmuls

Arch = Literal["llama", "qwen2"]

SIZES: dict[str, dict[str, int]] = {
    # hidden 128 / 4 heads = head_dim 32 (vLLM needs >= 32)
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # the "larger CPU config" of the benchmarks
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; decoding concatenates (no spaces inserted)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", model_max_length=512,
    )


def model_config(arch: Arch = "llama", size: str = "tiny") -> LlamaConfig | Qwen2Config:
    tok = build_tokenizer()
    common = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32", **SIZES[size],
    )
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def build_model_dir(dest: Path, arch: Arch = "llama", size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised model + tokenizer to `dest`, atomically (temp dir, rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(model_config(arch, size))
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        (tmp / "lorafleet_build.json").write_text(
            json.dumps({"version": BUILD_VERSION, "arch": arch, "size": size, "seed": seed})
        )
        try:
            os.rename(tmp, dest)
        except OSError:  # another process built it first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """`builtin:tiny-llama`, `builtin:small-qwen2`, ... -> a local directory (built once);
    anything else is taken as a local model directory."""
    if not name.startswith(BUILTIN_PREFIX):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name!r} is not a model directory (no config.json)")
        return path
    size, _, arch = name[len(BUILTIN_PREFIX):].partition("-")
    if size not in SIZES or arch not in ("llama", "qwen2"):
        raise ValueError(
            f"unknown built-in model {name!r}; use builtin:<{'|'.join(SIZES)}>-<llama|qwen2>"
        )
    if cache_dir is None:
        raise ValueError(f"building {name!r} needs a cache_dir (settings.cache_dir)")
    dest = Path(cache_dir) / "models" / f"{size}-{arch}-v{BUILD_VERSION}"
    if not (dest / "lorafleet_build.json").is_file():
        build_model_dir(dest, arch, size)  # type: ignore[arg-type]
    return dest


def load_base_model(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
    cache_dir: Path | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, Path]:
    path = resolve_model_dir(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tok, path


if __name__ == "__main__":  # python -m lorafleet.workers.tiny_model [NAME]
    import sys

    from lorafleet.common.settings import Settings

    print(resolve_model_dir(sys.argv[1] if len(sys.argv) > 1 else "builtin:tiny-llama", Settings().cache_dir))
