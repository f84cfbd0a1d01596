"""The experiment registry in Redis: submit (validated), read, list, cancel.

Submitting writes each experiment as a `queued` `ExperimentRecord`; the leader scheduler
activates it. Everything a client sends is validated before anything is written (size, schema,
environment name and arguments, the fleet's admission limits): errors are `SpecError`s naming the
field and what is allowed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from lorafleet.common.experiment import ExperimentRecord, UnknownExperimentError
from lorafleet.common.ids import is_valid_id, new_id
from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.protocol import StepProtocol
from lorafleet.common.spec_input import AdmissionLimits, SpecError, SpecInput, parse_spec


class ExperimentRegistry:
    def __init__(self, r: redis.Redis, limits: AdmissionLimits | None = None) -> None:
        self.r = r
        self.limits = limits or AdmissionLimits()  # the fleet's: AdmissionLimits.from_settings
        self.protocol = StepProtocol(r)

    def submit(self, data: SpecInput) -> str:
        return self.submit_many([data])[0]

    def submit_many(self, specs: Sequence[SpecInput]) -> list[str]:
        """Validate every spec, then enqueue them all in one transaction (nothing is enqueued if
        any is invalid). The scheduler sees them together, so experiments submitted together
        start in the same first batch instead of one straggling a batch behind."""
        parsed = []
        for i, data in enumerate(specs):
            try:
                parsed.append(parse_spec(data, self.limits))
            except SpecError as exc:
                if len(specs) == 1:
                    raise
                raise SpecError(f"spec #{i + 1} of {len(specs)}: {exc}") from None
        now = int(time.time() * 1000)
        records = [ExperimentRecord.new(new_id(spec.name[:48]), spec, now) for spec in parsed]
        pipe = self.r.pipeline(transaction=True)
        for rec in records:
            pipe.hset(Keys.experiment(rec.id), mapping=rec.to_hash())
            pipe.zadd(Keys.experiments, {rec.id: now})
            pipe.sadd(Keys.active, rec.id)
            pipe.xadd(Keys.events, {"type": "submitted", "exp": rec.id}, maxlen=STREAM_MAXLEN,
                      approximate=True)
        pipe.execute()
        return [rec.id for rec in records]

    def get(self, exp_id: str) -> ExperimentRecord:
        if not is_valid_id(exp_id):
            raise UnknownExperimentError(exp_id)
        h = self.r.hgetall(Keys.experiment(exp_id))
        if not h:
            raise UnknownExperimentError(exp_id)
        return ExperimentRecord.from_hash(exp_id, h)

    def list(self, status: str | None = None) -> list[ExperimentRecord]:
        ids = self.r.zrange(Keys.experiments, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for exp_id in ids:
            pipe.hgetall(Keys.experiment(exp_id))
        records = [ExperimentRecord.from_hash(i, h) for i, h in zip(ids, pipe.execute() if ids else [],
                                                                    strict=True) if h]
        return [rec for rec in records if status is None or rec.status == status]

    def cancel(self, exp_id: str) -> bool:
        self.get(exp_id)  # raises for unknown ids
        return self.protocol.finish(exp_id, "cancelled", "cancelled by user")

    def extend(self, exp_id: str, steps: int) -> ExperimentRecord:
        """Continue an experiment for `steps` more steps from its last committed version (a
        completed one runs again), keeping its history: metrics, versions and step numbers go
        on where they stopped, so k steps then m more equal k+m steps in one go."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpecError(f"steps: must be a positive integer, got {steps!r}")
        rec = self.get(exp_id)
        if rec.status not in ("queued", "running", "completed"):
            raise SpecError(f"experiment {exp_id} is {rec.status}: only queued, running or completed "
                            "experiments can be extended")
        data = json.loads(rec.spec_json)
        data["steps"] = rec.steps_total + steps
        spec = parse_spec(data, self.limits)  # the fleet's limits apply to the new length too
        if not self.protocol.extend(exp_id, steps, spec.model_dump_json()):
            raise SpecError(f"experiment {exp_id} finished meanwhile ({self.get(exp_id).status})")
        return self.get(exp_id)

    def metrics(self, exp_id: str) -> list[dict[str, Any]]:
        self.get(exp_id)
        return [json.loads(m) for m in self.r.lrange(Keys.metrics(exp_id), 0, -1)]
