"""The experiment registry in Redis: submit (validated), read, list, cancel.

Submitting writes the experiment as `queued`; the leader scheduler activates it. Everything a
client sends is validated here, before anything is written: size, schema, environment name and
arguments. Errors are `SpecError`s whose message names the field and what is allowed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import yaml
from pydantic import ValidationError

from lorafleet.common.envs import get_env
from lorafleet.common.ids import is_valid_id
from lorafleet.common.keys import Keys
from lorafleet.common.protocol import StepProtocol
from lorafleet.common.schemas import ExperimentSpec

TERMINAL = ("completed", "failed", "cancelled")


class SpecError(ValueError):
    """A spec or request a user must fix (CLI exit code 2, HTTP 400)."""


class UnknownExperimentError(KeyError):
    def __str__(self) -> str:
        return f"unknown experiment id {self.args[0]!r}"


@dataclass(frozen=True)
class ExperimentState:
    id: str
    name: str
    env: str
    status: str
    step: int
    phase: str
    version: int
    steps_total: int
    node: str
    error: str
    weight: float
    created_at: int
    finished_at: int | None
    spec: ExperimentSpec

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_hash(cls, exp_id: str, h: dict[str, str]) -> ExperimentState:
        return cls(
            id=exp_id, name=h.get("name", ""), env=h.get("env", ""), status=h["status"],
            step=int(h.get("step", 0)), phase=h.get("phase", ""), version=int(h.get("version", 0)),
            steps_total=int(h["steps_total"]), node=h.get("node", ""), error=h.get("error", ""),
            weight=float(h.get("weight", 1.0)), created_at=int(h.get("created_at", 0)),
            finished_at=int(h["finished_at"]) if h.get("finished_at") else None,
            spec=ExperimentSpec.model_validate_json(h["spec"]),
        )


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


class ExperimentRegistry:
    def __init__(self, r: redis.Redis, max_spec_bytes: int = 65536) -> None:
        self.r = r
        self.max_spec_bytes = max_spec_bytes
        self.protocol = StepProtocol(r)

    def submit(self, data: ExperimentSpec | dict[str, Any] | str | bytes) -> str:
        return self.submit_many([data])[0]

    def submit_many(self, specs: Sequence[ExperimentSpec | dict[str, Any] | str | bytes]) -> list[str]:
        """Validate every spec, then enqueue them all in one transaction (nothing is enqueued if
        any is invalid). The scheduler sees them together, so experiments submitted together
        start in the same first batch instead of one straggling a batch behind."""
        parsed = []
        for i, data in enumerate(specs):
            try:
                parsed.append(parse_spec(data, self.max_spec_bytes))
            except SpecError as exc:
                if len(specs) == 1:
                    raise
                raise SpecError(f"spec #{i + 1} of {len(specs)}: {exc}") from None
        now = int(time.time() * 1000)
        ids = [f"{spec.name[:48]}-{uuid.uuid4().hex[:8]}" for spec in parsed]
        pipe = self.r.pipeline(transaction=True)
        for exp_id, spec in zip(ids, parsed, strict=True):
            pipe.hset(Keys.experiment(exp_id), mapping={
                "spec": spec.model_dump_json(), "name": spec.name, "env": spec.env,
                "status": "queued", "step": 0, "phase": "rollout", "version": 0,
                "steps_total": spec.steps, "weight": spec.weight, "served": 0, "node": "",
                "inflight": "", "attempts": 0, "error": "", "created_at": now,
            })
            pipe.zadd(Keys.experiments, {exp_id: now})
            pipe.sadd(Keys.active, exp_id)
            pipe.xadd(Keys.events, {"type": "submitted", "exp": exp_id}, maxlen=100_000, approximate=True)
        pipe.execute()
        return ids

    def get(self, exp_id: str) -> ExperimentState:
        if not is_valid_id(exp_id):
            raise UnknownExperimentError(exp_id)
        h = self.r.hgetall(Keys.experiment(exp_id))
        if not h:
            raise UnknownExperimentError(exp_id)
        return ExperimentState.from_hash(exp_id, h)

    def list(self, status: str | None = None) -> list[ExperimentState]:
        out = []
        for exp_id in self.r.zrange(Keys.experiments, 0, -1):
            h = self.r.hgetall(Keys.experiment(exp_id))
            if h and (status is None or h["status"] == status):
                out.append(ExperimentState.from_hash(exp_id, h))
        return out

    def cancel(self, exp_id: str) -> bool:
        self.get(exp_id)  # raises for unknown ids
        return self.protocol.finish(exp_id, "cancelled", "cancelled by user")

    def metrics(self, exp_id: str) -> list[dict[str, Any]]:
        self.get(exp_id)
        return [json.loads(m) for m in self.r.lrange(Keys.metrics(exp_id), 0, -1)]
