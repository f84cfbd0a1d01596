"""Spec input at the boundary: YAML/JSON text, a dict or a model -> a validated `ExperimentSpec`.

Every client path (CLI `validate`/`submit`/`run`, `FleetClient.submit`) goes through
`parse_spec`; every error is a one-line `SpecError` whose message names the field and what is
allowed (CLI exit code 2, HTTP 400).

Spec text comes from users, so it is read with `SpecLoader`, a SafeLoader that refuses what a
spec never needs and an attacker would use: aliases/anchors (a 500-byte "billion laughs" expands
to gigabytes), duplicate keys (last-wins silently drops a setting), non-string keys (a date or an
int as a key) and deep nesting (the composer and pydantic recurse). These are checked while the
document is composed, before anything is constructed or expanded. The fleet's admission limits
(`AdmissionLimits`, from `Settings`) then bound the work one experiment may ask of a worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node

from lorafleet.common.data.datasets import DatasetError, DatasetLimits, check_dataset, resolve_path
from lorafleet.common.data.http_guard import HttpPolicy
from lorafleet.common.schemas import DatasetSpec, ExperimentSpec
from lorafleet.common.settings import ENV_PREFIX, Settings
from lorafleet.common.tasks.envs import get_env
from lorafleet.common.tasks.rewards import make_reward

# A spec is 5 levels deep (spec > train > optimizer > betas > value); 32 leaves room for env
# arguments without letting a hostile document recurse the composer or pydantic.
MAX_DEPTH = 32
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SHOWN = 60  # longest repr of a user value in a message


class SpecError(ValueError):
    """A spec or request a user must fix (CLI exit code 2, HTTP 400)."""


def _default(field: str) -> int:
    return int(Settings.model_fields[field].default)


@dataclass(frozen=True)
class AdmissionLimits:
    """What one experiment may ask of the fleet; defaults are `Settings`' defaults."""

    max_spec_bytes: int = _default("max_spec_bytes")
    max_rows_per_step: int = _default("max_rows_per_step")
    max_tokens_per_step: int = _default("max_tokens_per_step")
    max_steps: int = _default("max_steps")
    max_lora_rank: int = _default("max_lora_rank")
    max_dataset_bytes: int = _default("max_dataset_bytes")
    max_dataset_rows: int = _default("max_dataset_rows")
    # how a dataset named by an http(s) URL is fetched at submit (common/data/http_guard.py)
    http_allow_private: bool = bool(Settings.model_fields["http_allow_private"].default)
    http_connect_timeout_s: float = float(Settings.model_fields["http_connect_timeout_s"].default)
    http_timeout_s: float = float(Settings.model_fields["http_timeout_s"].default)
    s3_endpoint_url: str | None = None  # the store's (uploaded datasets live in the store)

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionLimits:
        return cls(max_spec_bytes=settings.max_spec_bytes, max_rows_per_step=settings.max_rows_per_step,
                   max_tokens_per_step=settings.max_tokens_per_step, max_steps=settings.max_steps,
                   max_lora_rank=settings.max_lora_rank, max_dataset_bytes=settings.max_dataset_bytes,
                   max_dataset_rows=settings.max_dataset_rows, http_allow_private=settings.http_allow_private,
                   http_connect_timeout_s=settings.http_connect_timeout_s,
                   http_timeout_s=settings.http_timeout_s, s3_endpoint_url=settings.store_endpoint_url)

    def dataset_limits(self) -> DatasetLimits:
        """The limits a dataset is checked against at submit."""
        return DatasetLimits(max_bytes=self.max_dataset_bytes, max_rows=self.max_dataset_rows,
                             http=HttpPolicy(allow_private=self.http_allow_private,
                                             connect_timeout_s=self.http_connect_timeout_s,
                                             timeout_s=self.http_timeout_s,
                                             max_response_bytes=self.max_dataset_bytes),
                             s3_endpoint_url=self.s3_endpoint_url)

    def violations(self, spec: ExperimentSpec) -> list[str]:
        """One message per limit `spec` exceeds, naming the limit and its setting."""
        rows = spec.prompts_per_step * spec.group_size
        tokens = rows * spec.max_new_tokens
        checks = [
            (rows, "max_rows_per_step",
             f"rows per step {rows} (prompts_per_step {spec.prompts_per_step} "
             f"× group_size {spec.group_size})"),
            (tokens, "max_tokens_per_step",
             f"tokens per step {tokens} (rows {rows} × max_new_tokens {spec.max_new_tokens})"),
            (spec.steps, "max_steps", f"steps {spec.steps}"),
            (spec.train.lora.rank, "max_lora_rank", f"train.lora.rank {spec.train.lora.rank}"),
        ]
        return [f"{what} exceeds the fleet limit {name}={getattr(self, name)} ({ENV_PREFIX}{name.upper()})"
                for value, name, what in checks if value > getattr(self, name)]


class RefusedYAML(yaml.YAMLError):
    """Valid YAML that a spec may not use; the message says what and where."""

    def __init__(self, message: str, node_or_event: Any) -> None:
        mark = node_or_event.start_mark
        super().__init__(f"{message} (line {mark.line + 1}, column {mark.column + 1})")


class SpecLoader(yaml.SafeLoader):
    """SafeLoader without aliases/anchors, merge keys, duplicate or non-string keys, or nesting
    deeper than `MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        # Refused before the composer resolves them: an alias is never expanded at all.
        if isinstance(event, AliasEvent) or event.anchor is not None:
            raise RefusedYAML("YAML aliases/anchors are not allowed", event)
        if self._depth >= MAX_DEPTH:
            raise RefusedYAML(f"spec is nested deeper than {MAX_DEPTH} levels", event)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[str, Any]:
        if not isinstance(node, MappingNode):
            raise RefusedYAML(f"expected a mapping, found {node.id}", node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise RefusedYAML("YAML merge keys (<<) are not allowed", key_node)
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise RefusedYAML(f"mapping keys must be strings, got {type(key).__name__} "
                                  f"{_shown(key)}", key_node)
            if key in mapping:
                raise RefusedYAML(f"duplicate key {key!r}", key_node)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def load_spec_text(raw: bytes) -> Any:
    """The document in `raw` (UTF-8 YAML or JSON), read with `SpecLoader`; errors are `SpecError`s."""
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless; nothing else is read
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec must be UTF-8 text: byte {raw[exc.start]:#04x} at offset {exc.start} "
                        "is not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except RefusedYAML as exc:
        raise SpecError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec is not valid YAML/JSON: {' '.join(str(exc).split())}") from None


def check_tree(data: Any, max_bytes: int) -> None:
    """Dict input gets the loader's checks too: string keys, nesting depth, and a node budget
    (every node is at least a byte of JSON, so a structure of shared sub-lists that would dump
    to gigabytes is refused before `json.dumps` walks it). The budget is 4x the byte limit
    because a byte of YAML can make more than one node (`{a, b}`: four nodes and two nulls)."""
    budget = 4 * max_bytes
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        budget -= 1 + (len(node) if isinstance(node, str | bytes) else 0)
        if budget < 0:
            raise SpecError(f"spec is larger than the limit of {max_bytes} bytes "
                            f"({ENV_PREFIX}MAX_SPEC_BYTES)")
        if depth > MAX_DEPTH:
            raise SpecError(f"spec is nested deeper than {MAX_DEPTH} levels (at {path or 'the top'})")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise SpecError(f"mapping keys must be strings, got {type(key).__name__} "
                                    f"{_shown(key)} in {path or 'the spec'}")
                stack.append((value, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(node))


SpecInput = ExperimentSpec | dict[str, Any] | str | bytes


def parse_spec(data: SpecInput, limits: AdmissionLimits,
               base_dir: str | os.PathLike[str] | None = None,
               datasets: DatasetResolver | None = None) -> ExperimentSpec:
    """A spec from a model, a dict, or YAML/JSON text, within the fleet's `limits`; every error
    is a `SpecError`. A relative local `dataset.path` is made absolute against `base_dir` (the
    CLI passes the spec file's directory; default: the current directory), and the dataset is
    checked (`check_task`). `datasets` resolves `dataset.id` (the registry's DatasetStore)."""
    if isinstance(data, ExperimentSpec):
        spec = data
    else:
        from_text = isinstance(data, str | bytes)
        if isinstance(data, str | bytes):
            try:
                raw = data.encode() if isinstance(data, str) else data
            except UnicodeEncodeError:
                raise SpecError("spec must be valid Unicode text (it has an unpaired surrogate)") from None
            if len(raw) > limits.max_spec_bytes:
                raise SpecError(f"spec is {len(raw)} bytes; the limit is {limits.max_spec_bytes} bytes "
                                f"({ENV_PREFIX}MAX_SPEC_BYTES)")
            data = load_spec_text(raw)
        if not isinstance(data, dict):
            raise SpecError("spec must be a mapping of fields (YAML or JSON object)")
        check_tree(data, limits.max_spec_bytes)
        # Text was measured as sent (without aliases it cannot grow); a dict is measured as JSON.
        if not from_text and len(json.dumps(data, default=str)) > limits.max_spec_bytes:
            raise SpecError(f"spec is larger than the limit of {limits.max_spec_bytes} bytes "
                           f"({ENV_PREFIX}MAX_SPEC_BYTES)")
        try:
            spec = ExperimentSpec.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_explain(exc)) from None
    if spec.kind == "client":  # made by the Tinker endpoint (OpStore.register_model), never submitted
        raise SpecError("kind: 'client' models are created through the Tinker API, not submitted")
    over = limits.violations(spec)
    if over:
        raise SpecError("; ".join(over))
    if spec.dataset is not None:
        spec = spec.model_copy(update={"dataset": _resolved_dataset(spec.dataset, datasets, base_dir)})
    check_task(spec, limits)
    return spec


DatasetResolver = Callable[[str], str]  # an uploaded dataset's id -> its URL; LookupError: none


def _resolved_dataset(ds: DatasetSpec, datasets: DatasetResolver | None,
                      base_dir: str | os.PathLike[str] | None) -> DatasetSpec:
    """`dataset.id` resolved to its stored object (left as it is without a resolver: the
    registry resolves it at submit); a relative local path made absolute."""
    if ds.id is not None:
        if datasets is None:
            return ds
        try:
            url = datasets(ds.id)
        except LookupError:
            raise SpecError(f"dataset.id: no dataset {ds.id!r} (see `lorafleet datasets list`)") from None
        if ds.path is not None and ds.path != url:  # a resolved spec (extend) has the same path
            raise SpecError("dataset: give exactly one of path (a file or URL) or id (an uploaded dataset)")
        return ds.model_copy(update={"path": url})
    assert ds.path is not None  # the schema's rule
    path = resolve_path(ds.path, base_dir)
    return ds if path == ds.path else ds.model_copy(update={"path": path})


def check_task(spec: ExperimentSpec, limits: AdmissionLimits | None = None) -> None:
    """What a worker will need, checked without torch: the env and its args; or the reward fn
    and its args, and the dataset (readable, within the fleet's dataset limits, its first rows with
    the mapped fields: the prompt, and the answer when the reward reads one). Errors are
    `SpecError`s naming the field, and the file and row."""
    if spec.env is not None:
        try:
            get_env(spec.env, spec.env_args)
        except ValueError as exc:
            raise SpecError(f"env: {exc}") from None
        return
    assert spec.dataset is not None and spec.reward is not None  # the schema's rule
    try:
        reward = make_reward(spec.reward)
    except ValueError as exc:
        raise SpecError(f"reward: {exc}") from None
    if spec.dataset.path is None:  # an uploaded dataset's id, not resolved yet: checked at submit
        return
    try:
        check_dataset(spec.dataset, spec.prompt_format == "chat", reward.needs_answer,
                      limits=(limits or AdmissionLimits()).dataset_limits())
    except DatasetError as exc:  # the field to fix: dataset.path (the file), dataset (a row)
        msg, field = str(exc), exc.field
        if spec.dataset.id is not None:  # the id its owner knows, not where the fleet stores it
            msg = msg.replace(spec.dataset.path, spec.dataset.id)
            field = "dataset.id" if field == "dataset.path" else field
        raise SpecError(f"{field}: {' '.join(msg.split())}") from None


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + "..."


def _explain(exc: ValidationError) -> str:
    """One line naming each bad field, what was given and what is allowed."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = "must be a finite number" if err["type"] == "finite_number" else err["msg"]
        given = err.get("input")
        # a custom validator's message already shows the value
        if isinstance(given, bool | int | float | str) and err["type"] not in ("missing", "value_error"):
            msg += f", got {_shown(given)}"
        parts.append(f"{field}: {msg}")
    return "invalid spec: " + "; ".join(parts)
