"""Starting an experiment from an adapter that already exists (continual learning).

`train.init_from` names either a PEFT LoRA adapter directory (a path or any fsspec URL: its
`adapter_config.json` and `adapter_model.safetensors`), or `EXPERIMENT_ID@vK`, version K of an
experiment in this fleet's store (a fork). Torch-free: the scheduler resolves and checks
`init_from` at submit; the worker loads the weights (`workers/residency.py`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import fsspec
from pydantic import ValidationError

from lorafleet.common.schemas import ExperimentSpec, LoRASpec
from lorafleet.common.store.layout import AdapterNotFoundError, AdapterStoreError

if TYPE_CHECKING:
    from lorafleet.common.store.adapter_store import AdapterStore

    # where forks are looked up: the store, or a function that opens it (called only for a fork,
    # so a spec without one never depends on the store being reachable)
    StoreSource: TypeAlias = AdapterStore | Callable[[], AdapterStore] | None

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few hundred bytes
_FORK_RE = re.compile(r"(?P<exp>[A-Za-z0-9_-]{1,128})@v(?P<version>0|[1-9][0-9]{0,17})")


@dataclass(frozen=True)
class InitFrom:
    """A parsed `init_from`: a fork of (exp_id, version), or a PEFT directory at `url`."""

    exp_id: str | None = None
    version: int | None = None
    url: str | None = None

    @property
    def is_fork(self) -> bool:
        return self.exp_id is not None


def parse_init_from(value: str) -> InitFrom:
    m = _FORK_RE.fullmatch(value)
    if m:
        return InitFrom(exp_id=m["exp"], version=int(m["version"]))
    if "@v" in value and "/" not in value:
        raise ValueError(f"{value!r} is not EXPERIMENT_ID@vK (K a version number) nor a PEFT directory")
    return InitFrom(url=value)


def lora_spec_from_peft_config(config: Mapping[str, Any]) -> LoRASpec:
    """The LoRA shape a PEFT adapter_config.json describes (only plain LoRA is supported)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA checkpoint: peft_type={config.get('peft_type')!r}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        raise ValueError("regex target_modules are not supported; list the module names")
    return LoRASpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]), target_modules=tuple(targets),
                    dropout=float(config.get("lora_dropout", 0.0)),
                    use_rslora=bool(config.get("use_rslora", False)))


def read_peft_config(url: str) -> dict[str, Any]:
    with fsspec.open(posixpath.join(url.rstrip("/"), PEFT_CONFIG_FILE), "rb") as fh:
        return json.loads(fh.read())


def read_peft_weights_bytes(url: str) -> bytes:
    with fsspec.open(posixpath.join(url.rstrip("/"), PEFT_WEIGHTS_FILE), "rb") as fh:
        return fh.read()


def lora_mismatch(given: LoRASpec, found: LoRASpec) -> str | None:
    """Which LoRA field of the spec disagrees with the adapter's config (None: none)."""
    for field in ("rank", "alpha", "target_modules", "use_rslora"):
        a, b = getattr(given, field), getattr(found, field)
        if field == "target_modules":
            a, b = sorted(a), sorted(b)
        if a != b:
            return (f"{field} {b!r} of the source adapter does not match train.lora.{field} {a!r} "
                    "(leave train.lora out to take the adapter's)")
    return None


def version_span(versions: list[int], most: int = 8) -> str:
    """`[0, 1, 2, 3, 10]` -> "v0-v3, v10": runs of consecutive versions, at most `most` of them
    (a long-lived experiment has thousands of versions; a message stays one short line)."""
    runs: list[tuple[int, int]] = []
    for v in versions:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    shown = [f"v{a}" if a == b else f"v{a}-v{b}" for a, b in runs[:most]]
    if len(runs) > most:
        shown.append(f"... ({len(versions)} in all)")
    return ", ".join(shown) or "none"


def _admit_fork(src: InitFrom, store: StoreSource, init_optimizer: bool) -> dict[str, Any]:
    """The adapter config of the fork `src` (raises ValueError saying what to fix; a store that
    cannot be read raises `AdapterStoreError`: the fleet's problem, not the spec's)."""
    assert src.exp_id is not None and src.version is not None
    exp, version = src.exp_id, src.version
    if callable(store):
        store = store()
    if store is None:
        raise ValueError(f"forks need the adapter store, to check that {exp}@v{version} exists")
    try:
        return _fork_config(store, exp, version, init_optimizer)
    except (ValueError, AdapterStoreError):
        raise
    # an object store's client raises its own errors (no credentials, endpoint down)
    except Exception as exc:  # noqa: BLE001
        raise AdapterStoreError(f"cannot read the adapter store: {_detail(exc)}") from exc


def _fork_config(store: AdapterStore, exp: str, version: int, init_optimizer: bool) -> dict[str, Any]:
    known = store.versions(exp)
    if not known:
        raise ValueError(f"no experiment {exp} in the adapter store (it has no published version): "
                         "name one of this fleet's experiments and a published version, EXPERIMENT_ID@vK")
    if version not in known:
        raise ValueError(f"experiment {exp} has no version {version} in the store "
                         f"(versions: {version_span(known)})")
    if init_optimizer:
        snapshots = store.versions(exp, snapshots_only=True)
        if version not in snapshots:
            raise ValueError(f"v{version} of {exp} is not a snapshot (snapshots keep the optimizer "
                             f"state: {version_span(snapshots)}; fork one of those, or set "
                             "train.init_optimizer: false to start from the weights alone)")
    try:
        return store.adapter_config(exp, version)
    except AdapterNotFoundError:  # deleted by retention since the listing above
        raise ValueError(f"v{version} of {exp} was just deleted from the store (retention): "
                         "fork a newer version") from None


def _detail(exc: BaseException) -> str:
    """An fsspec error as a short line (type and message only: never a file's contents)."""
    msg = " ".join(str(exc).split())
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


_DIRECTORY_HINT = "a PEFT LoRA adapter directory the workers can read, or an fsspec URL"


def _peft_config_bytes(url: str) -> tuple[str | None, bytes]:
    """(what is wrong with the directory at `url`, or None; the start of its adapter_config.json).
    The config is opened directly, as the worker will: an http(s) directory need not be listable."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        with fs.open(posixpath.join(root, PEFT_CONFIG_FILE), "rb") as fh:
            raw = fh.read(_MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError) as exc:  # say which: no such path, a file, no config
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, FileNotFoundError):
            raise cause from None  # fsspec's http reads a refused connection as "not found": it is not
        if not fs.exists(root):
            return f"{url} does not exist ({_DIRECTORY_HINT})", b""
        if fs.isfile(root):
            return f"{url} is a file, not {_DIRECTORY_HINT}", b""
        return f"{url} is not a PEFT adapter directory (no {PEFT_CONFIG_FILE})", b""
    if not fs.exists(posixpath.join(root, PEFT_WEIGHTS_FILE)):  # the worker reads it too
        return f"{url} is not a PEFT adapter directory (no {PEFT_WEIGHTS_FILE})", b""
    return None, raw


def _admit_directory(url: str) -> dict[str, Any]:
    """The adapter config of the PEFT directory at `url` (raises ValueError saying what to fix)."""
    try:
        problem, raw = _peft_config_bytes(url)
    # anything fsspec raises for a URL the user named (no such protocol, its package missing, no
    # credentials, refused connection) is bad input: one line, never a traceback
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {url} ({_DIRECTORY_HINT}): {_detail(exc)}") from None
    if problem:
        raise ValueError(problem)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{PEFT_CONFIG_FILE} of {url} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except ValueError:  # its message would quote the file: say only where
        raise ValueError(f"{PEFT_CONFIG_FILE} of {url} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{PEFT_CONFIG_FILE} of {url} is not a JSON object")
    return config


def resolve_init_from(spec: ExperimentSpec, store: StoreSource) -> ExperimentSpec:
    """`spec` with `train.init_from` checked against what it names (raises ValueError saying
    what to fix): the LoRA shape is taken from the adapter's config unless the spec sets
    `train.lora`, which must then agree; a fork's `step_offset` defaults to its version; a
    relative directory becomes absolute (workers read it: use a path they can reach, or a URL).
    `store` may be a function that opens it: only a fork calls it. Idempotent: a resolved spec
    resolves to itself."""
    t = spec.train
    if t.init_from is None:
        return spec
    src = parse_init_from(t.init_from)
    init_from, offset = t.init_from, t.step_offset
    if src.is_fork:
        config = _admit_fork(src, store, t.init_optimizer)
        if "step_offset" not in t.model_fields_set:
            offset = src.version
    else:
        assert src.url is not None
        if "://" not in src.url:
            init_from = os.path.abspath(src.url)
        config = _admit_directory(init_from)
    try:
        found = lora_spec_from_peft_config(config)
    except KeyError as exc:
        raise ValueError(f"{init_from} is not a usable LoRA adapter: its {PEFT_CONFIG_FILE} has no "
                         f"{exc.args[0]!r}") from None
    except (TypeError, ValueError, ValidationError) as exc:
        raise ValueError(f"{init_from} is not a usable LoRA adapter: {_detail(exc)}") from None
    lora = found
    if "lora" in t.model_fields_set:
        mismatch = lora_mismatch(t.lora, found)
        if mismatch:
            raise ValueError(mismatch)
        lora = t.lora
    train = t.model_copy(update={"lora": lora, "init_from": init_from, "step_offset": offset})
    return spec.model_copy(update={"train": train})
