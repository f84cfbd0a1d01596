"""`ExperimentRecord`: the one owner of an experiment's Redis hash (`lf:exp:<id>`).

Its dataclass fields are the hash fields: their names, defaults and encoding live here and
nowhere else. The registry writes a new record, the scheduler and clients read records, and the
Lua scripts of the step protocol are rendered with the same field names (`FIELD_NAMES`), so a
field that does not exist is an error when the scripts are built, not a silent nil in Redis.
Its `status` and `phase` take the values of the phase machine (`common/state/phases.py`).

There is no separate "version" field: the adapter version an experiment's next step starts from
is the number of train steps it has committed, which is `step`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Literal

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.phases import FIRST_PHASE, TERMINAL, Phase, Status


class UnknownExperimentError(KeyError):
    def __str__(self) -> str:
        return f"unknown experiment id {self.args[0]!r}"


@dataclass
class ExperimentRecord:
    """One experiment = one adapter. Mutable like rq's `Job`: the scheduler plans on a copy it
    read; only the Lua scripts change the hash itself."""

    id: str
    # ---- written once at submit (the spec, and values derived from it that Lua reads) --------
    spec_json: str = "{}"
    name: str = ""
    env: str = ""
    steps_total: int = 0
    weight: float = 1.0
    rows: int = 0  # sequences per step: prompts x group size (fair-share accounting)
    created_at: int = 0  # ms, Redis clock of the submitting client
    # "rl": the server runs its loop (rollout, train); "client": a client drives it one primitive
    # op at a time (the Tinker endpoint, `common/tinker/op_store.py`); the scheduler's indexes skip it
    kind: Literal["rl", "client"] = "rl"
    owner: str = ""  # id of the API key that submitted it ("": Redis clients, the CLI)
    # ---- changed by the protocol's Lua scripts ------------------------------------------------
    status: Status = "queued"
    step: int = 0  # committed train steps == the adapter version the next step starts from
    phase: Phase = FIRST_PHASE  # the statuses and phases and their moves: common/state/phases.py
    node: str = ""  # the node that holds the adapter hot ("" until placed)
    inflight: str = ""  # batch id of the step's published or claimed task ("" when none)
    inflight_at: int = 0
    attempts: int = 0  # failed attempts of the current task (poison cap)
    not_before: int = 0  # ms, Redis clock: a failed attempt is published again after a backoff
    served: int = 0  # rows served so far (fair share)
    # the committed trajectories of steps log_from..step-1 are kept: the replay log that rebuilds
    # the AdamW state from the snapshot at version log_from (workers/replay.py)
    log_from: int = 0
    rollout_summary: str = ""  # JSON: reward stats of the committed rollout awaiting training
    error: str = ""  # why it failed; while running, why its last attempt was given up
    started_at: int = 0
    finished_at: int = 0

    # ---- derived ---------------------------------------------------------------------------
    @cached_property
    def spec(self) -> ExperimentSpec:
        return ExperimentSpec.model_validate_json(self.spec_json)

    @property
    def version(self) -> int:
        """The latest committed adapter version (v0 is the seed's initial adapter)."""
        return self.step

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def fair_key(self) -> float:
        """Rows served per unit of weight: the smallest goes first."""
        return self.served / self.weight

    # ---- encoding ----------------------------------------------------------------------------
    @classmethod
    def new(cls, exp_id: str, spec: ExperimentSpec, now_ms: int) -> ExperimentRecord:
        return cls(id=exp_id, spec_json=spec.model_dump_json(), name=spec.name, env=spec.task_name,
                   steps_total=spec.steps, weight=spec.weight,
                   rows=spec.prompts_per_step * spec.group_size, created_at=now_ms)

    def to_hash(self) -> dict[str, str | int | float]:
        return {f: getattr(self, f) for f in FIELD_NAMES}

    @classmethod
    def from_hash(cls, exp_id: str, h: Mapping[str, str | None]) -> ExperimentRecord:
        """Decode the fields present in `h` (a full HGETALL, or an HMGET of a few fields); a
        missing field keeps its default."""
        values: dict[str, Any] = {"id": exp_id}
        for name, value in h.items():
            if value is None or name not in _DECODE:
                continue
            values[name] = _DECODE[name](value)
        return cls(**values)

    @classmethod
    def from_values(cls, exp_id: str, names: Iterable[str], values: Iterable[str | None]
                    ) -> ExperimentRecord:
        """Decode an HMGET reply of `names`."""
        return cls.from_hash(exp_id, dict(zip(names, values, strict=True)))

    def summary(self) -> dict[str, Any]:
        """A JSON-able view (CLI `status --json`)."""
        out: dict[str, Any] = {f: getattr(self, f) for f in FIELD_NAMES if f not in ("spec_json",)}
        out.update(id=self.id, version=self.version, spec=json.loads(self.spec_json),
                   rollout_summary=json.loads(self.rollout_summary or "{}"))
        return out


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ExperimentRecord) if f.name != "id")
# What the scheduler reads of every active experiment on every tick (never the spec).
SCHEDULING_FIELDS: tuple[str, ...] = ("status", "step", "phase", "node", "inflight", "inflight_at",
                                      "served", "weight", "rows", "created_at", "not_before")
_CASTS: dict[type | str, Any] = {"int": int, "float": float, "str": str}
_DECODE: dict[str, Any] = {
    f.name: _CASTS.get(str(f.type), str) for f in fields(ExperimentRecord) if f.name != "id"
}
