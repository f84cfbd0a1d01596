"""The built-in tiny base models: small Llama, Qwen2, Qwen3 or Mistral causal LMs with a character
tokenizer, built locally and deterministically (no model hub is reachable):
`builtin:<tiny|small>-<llama|qwen2|qwen3|mistral>`. The pretrained built-ins
(`builtin:smollm2-135m-instruct`) are common/models.py, converted by workers/model_prep.py.

head_dim is 32 so that vLLM can load them. The lm_head is initialised with std hidden**-0.5
(not the config's initializer_range 0.02): the final RMSNorm gives the last hidden state a norm
of about sqrt(hidden), so the logits start with std ~1 (log-probabilities of a real LM's scale)
and an adapter can move them by several units. With 0.02 the logits spanned only about +-2.5
whatever an adapter did: at temperature 1 the policy stayed nearly uniform over the vocab and RL
rewards barely moved (tests/unit/test_rl_learning.py).

Any local Hugging Face model directory works as a base model too:
`load_base_model("/path/to/model")` (its tokenizer, chat template and generation config come
with it; a tokenizer without a pad token pads with its eos).
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
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lorafleet.common.models import PACKAGED_MODELS, packaged_model

BUILTIN_PREFIX = "builtin:"
BUILD_VERSION = 2  # bump when the recipe changes: cached builds are rebuilt (2: lm_head std)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
VOCAB_SIZE = 128  # len(SPECIALS) + len(CHARS) = 100, padded for aligned matmuls
# ChatML's layout with the tokenizer's own specials as turn markers (one token each, and a turn
# ends with eos, where generation stops): "<s>user\nWhat is 2 + 3?</s>\n<s>assistant\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

Arch = Literal["llama", "qwen2", "qwen3", "mistral"]
ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
}

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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(arch: Arch = "llama", size: str = "tiny", **overrides: object) -> PretrainedConfig:
    """The config of a built-in model; `overrides` (e.g. `sliding_window`) go to the config class."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
    tok = build_tokenizer()
    dims = SIZES[size]
    common: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
        head_dim=dims["hidden_size"] // dims["num_attention_heads"], **dims,
    )
    if arch == "mistral":  # Mistral's default window (4096) is beyond the context: no window
        common["sliding_window"] = None
    return CONFIGS[arch](**{**common, **overrides})


def init_lm_head(model: torch.nn.Module, seed: int) -> None:
    """lm_head ~ N(0, hidden**-0.5): logits of std ~1 after the final RMSNorm (module doc)."""
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * head.weight.shape[1] ** -0.5)


def build_model_dir(dest: Path, arch: Arch = "llama", size: str = "tiny", seed: int = 0,
                    **overrides: object) -> Path:
    """Write a randomly initialised model + tokenizer to `dest`, atomically (temp dir, rename);
    `overrides` go to the config (`model_config`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(model_config(arch, size, **overrides))
        init_lm_head(model, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        (tmp / "lorafleet_build.json").write_text(
            json.dumps({"version": BUILD_VERSION, "arch": arch, "size": size, "seed": seed,
                        "overrides": overrides}, default=str)
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
    """`builtin:tiny-llama`, `builtin:small-qwen3`, ... -> a local directory (built once, under
    a name that carries BUILD_VERSION); `builtin:smollm2-135m-instruct` -> its prepared directory
    (converted on first use); anything else is taken as a local model directory."""
    if not name.startswith(BUILTIN_PREFIX):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name!r} is not a model directory (no config.json)")
        return path
    if packaged_model(name) is not None:  # a pretrained model converted once from its wheel
        if cache_dir is None:
            raise ValueError(f"preparing {name!r} needs a cache_dir (settings.cache_dir)")
        from lorafleet.workers.model_prep import prepare

        return prepare(name, Path(cache_dir))
    size, _, arch = name[len(BUILTIN_PREFIX):].partition("-")
    if size not in SIZES or arch not in ARCHS:
        raise ValueError(
            f"unknown built-in model {name!r}; use builtin:<{'|'.join(SIZES)}>-<{'|'.join(ARCHS)}> "
            f"or one of {', '.join(m.builtin_name for m in PACKAGED_MODELS.values())}"
        )
    if cache_dir is None:
        raise ValueError(f"building {name!r} needs a cache_dir (settings.cache_dir)")
    dest = Path(cache_dir) / "models" / f"{size}-{arch}-v{BUILD_VERSION}"
    if not (dest / "lorafleet_build.json").is_file():
        build_model_dir(dest, arch, size)  # type: ignore[arg-type]
    return dest


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer (tokenizer.json: the fast tokenizer as saved, which is what
    vLLM decodes with too; else whatever AutoTokenizer makes of it). No pad token: pad with eos."""
    if (Path(path) / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
    cache_dir: Path | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Path]:
    path = resolve_model_dir(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = load_tokenizer(path)
    if name.startswith(BUILTIN_PREFIX) and not tok.chat_template:  # built before it had one
        tok.chat_template = CHAT_TEMPLATE
    return model, tok, path


if __name__ == "__main__":  # python -m lorafleet.workers.tiny_model [NAME]
    import sys

    from lorafleet.common.settings import Settings

    print(resolve_model_dir(sys.argv[1] if len(sys.argv) > 1 else "builtin:tiny-llama", Settings().cache_dir))
