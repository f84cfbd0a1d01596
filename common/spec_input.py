"""Spec input at the boundary: YAML/JSON text, a dict or a model -> a validated `ExperimentSpec`.

Every client path (CLI `validate`/`submit`/`run`, `FleetClient.submit`) goes through
`parse_spec`; every error is a `SpecError` whose message names the field and what is allowed
(CLI exit code 2, HTTP 400).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import ValidationError

from lorafleet.common.envs import get_env
from lorafleet.common.schemas import ExperimentSpec


class SpecError(ValueError):
    """A spec or request a user must fix (CLI exit code 2, HTTP 400)."""


def parse_spec(data: ExperimentSpec | dict[str, Any] | str | bytes, max_bytes: int) -> ExperimentSpec:
    """A spec from a model, a dict, or YAML/JSON text; every error is a `SpecError`."""
    if isinstance(data, ExperimentSpec):
        spec = data
    else:
        if isinstance(data, (str, bytes)):
            raw = data.encode() if isinstance(data, str) else data
            if len(raw) > max_bytes:
                raise SpecError(f"spec is {len(raw)} bytes; the limit is {max_bytes} bytes")
            try:
                data = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise SpecError(f"spec is not valid YAML/JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError("spec must be a mapping of fields (YAML or JSON object)")
        if len(json.dumps(data, default=str)) > max_bytes:
            raise SpecError(f"spec is larger than {max_bytes} bytes")
        try:
            spec = ExperimentSpec.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_explain(exc)) from None
    try:
        get_env(spec.env, spec.env_args)
    except ValueError as exc:
        raise SpecError(f"env: {exc}") from None
    return spec


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        lines.append(f"{field}: {err['msg']}")
    return "invalid spec:\n  " + "\n  ".join(lines)
