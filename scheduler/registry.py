"""The experiment registry in Redis: submit (validated), read, list, cancel.

Submitting writes each experiment as a `queued` `ExperimentRecord`; the leader scheduler
activates it. Everything a client sends is validated before anything is written (size, schema,
environment name and arguments, the fleet's admission limits): errors are `SpecError`s naming the
field and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from lorafleet.common.data.uploads import DatasetStore
from lorafleet.common.ids import is_valid_id, new_id
from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.schemas import DATASET_ID_PATTERN, ExperimentSpec
from lorafleet.common.spec_input import AdmissionLimits, DatasetResolver, SpecError, SpecInput, parse_spec
from lorafleet.common.state.experiment import ExperimentRecord, UnknownExperimentError
from lorafleet.common.state.phases import EXTENDABLE
from lorafleet.common.state.protocol import StepProtocol
from lorafleet.common.state.ready_index import ReadyIndex
from lorafleet.common.store.adapter_import import resolve_init_from

if TYPE_CHECKING:
    from lorafleet.common.store.adapter_import import StoreSource
    from lorafleet.common.store.adapter_store import AdapterStore


def admit_spec(data: SpecInput, limits: AdmissionLimits, store: StoreSource,
               base_dir: str | os.PathLike[str] | None = None,
               datasets: DatasetResolver | None = None) -> ExperimentSpec:
    """The one admission check of a spec, for every path in: `submit` and `validate` of the CLI,
    `FleetClient` and the HTTP API, and `lorafleet run`. `parse_spec` (schema, limits, env,
    reward, dataset), then `train.init_from` resolved against what it names: a fork must be a
    published version in `store` (a snapshot unless `init_optimizer: false`; `store` may be a
    function that opens it, called only for a fork), a directory a PEFT LoRA adapter whose shape
    agrees with `train.lora`. Writes nothing, needs no Redis; every error is a one-line
    `SpecError` naming the field. Idempotent: an admitted spec admits as is."""
    spec = parse_spec(data, limits, base_dir=base_dir, datasets=datasets)
    try:
        spec = resolve_init_from(spec, store)
    except ValueError as exc:
        raise SpecError(f"train.init_from: {exc}") from None
    if spec.train.lora.rank > limits.max_lora_rank:
        raise SpecError(f"train.init_from: the adapter's rank {spec.train.lora.rank} exceeds the fleet "
                        f"limit max_lora_rank={limits.max_lora_rank} (LORAFLEET_MAX_LORA_RANK)")
    return spec


class ExperimentRegistry:
    def __init__(self, r: redis.Redis, limits: AdmissionLimits | None = None,
                 store: AdapterStore | None = None) -> None:
        self.r = r
        self.store = store  # where `train.init_from: ID@vK` forks are looked up
        # where `dataset: {id: ds-...}` is resolved (uploads live in the same store)
        self.datasets = DatasetStore(r, store.url) if store is not None else None
        self.limits = limits or AdmissionLimits()  # the fleet's: AdmissionLimits.from_settings
        self.protocol = StepProtocol(r)
        self.index = ReadyIndex(r)  # owns the index entries a new experiment starts with

    def submit(self, data: SpecInput, owner: str = "") -> str:
        return self.submit_many([data], owner)[0]

    def submit_many(self, specs: Sequence[SpecInput], owner: str = "") -> list[str]:
        """Validate every spec, then enqueue them all in one transaction (nothing is enqueued if
        any is invalid). The scheduler sees them together, so experiments submitted together
        start in the same first batch instead of one straggling a batch behind. `owner`: the id
        of the API key submitting them ("" for Redis clients); the leader activates an owner's
        experiments only up to its key's `max_experiments` running at once."""
        parsed = []
        for i, data in enumerate(specs):
            try:
                parsed.append(self.admit(data))
            except SpecError as exc:
                if len(specs) == 1:
                    raise
                raise SpecError(f"spec #{i + 1} of {len(specs)}: {exc}") from None
        now = int(time.time() * 1000)
        records = [ExperimentRecord.new(new_id(spec.name[:48]), spec, now) for spec in parsed]
        for rec in records:
            rec.owner = owner
        uses = {rec.id: rec.spec.dataset.id for rec in records
                if rec.spec.dataset is not None and rec.spec.dataset.id is not None}
        with self.r.pipeline(transaction=True) as pipe:
            try:
                self._write_new(pipe, records, uses, owner, now)
            except redis.WatchError:  # a dataset's record changed meanwhile: deleted, most likely
                raise SpecError("dataset.id: the dataset was deleted while the spec was submitted") from None
        return [rec.id for rec in records]

    def _resolver(self) -> Any:
        return self.datasets.url_of if self.datasets is not None else None

    def _write_new(self, pipe: Any, records: list[ExperimentRecord], uses: dict[str, str], owner: str,
                   now: int) -> None:
        """The new experiments in one transaction. Those submitted with an uploaded dataset are
        recorded as its users, unless the dataset was deleted since it was resolved (WATCH: a
        delete refuses while users are active, `DatasetStore.delete`)."""
        if uses:
            pipe.watch(*(Keys.dataset(ds) for ds in set(uses.values())))
            gone = [ds for ds in sorted(set(uses.values())) if not pipe.exists(Keys.dataset(ds))]
            if gone:
                raise SpecError(f"dataset.id: no dataset {gone[0]!r} (deleted while submitting)")
        pipe.multi()
        for rec in records:
            pipe.hset(Keys.experiment(rec.id), mapping=rec.to_hash())
            pipe.zadd(Keys.experiments, {rec.id: now})
            pipe.sadd(Keys.active, rec.id)
            if owner:
                pipe.zadd(Keys.owner_experiments(owner), {rec.id: now})
            self.index.add_queued(pipe, rec.id)  # its index entries, in the same transaction
            pipe.xadd(Keys.events, {"type": "submitted", "exp": rec.id}, maxlen=STREAM_MAXLEN,
                      approximate=True)
            if rec.id in uses:
                pipe.sadd(Keys.dataset_experiments(uses[rec.id]), rec.id)
        pipe.execute()

    def admit(self, data: SpecInput) -> ExperimentSpec:
        """What `submit` checks, writing nothing (`admit_spec` with this fleet's limits and store)."""
        return admit_spec(data, self.limits, self.store, datasets=self._resolver())

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

    def extend(self, exp_id: str, steps: int, dataset: str | None = None) -> ExperimentRecord:
        """Continue an experiment for `steps` more steps from its last committed version (a
        completed one runs again), keeping its history: metrics, versions and step numbers go
        on where they stopped, so k steps then m more equal k+m steps in one go. `dataset`: a
        new prompt dataset (same field mapping) for the steps to come, checked like at submit."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpecError(f"steps: must be a positive integer, got {steps!r}")
        rec = self.get(exp_id)
        if rec.status not in EXTENDABLE:
            raise SpecError(f"experiment {exp_id} is {rec.status}: only queued, running or completed "
                            "experiments can be extended")
        data = json.loads(rec.spec_json)
        data["steps"] = rec.steps_total + steps
        if dataset is not None:
            if not data.get("dataset"):
                raise SpecError(f"--dataset: experiment {exp_id} draws its prompts from env "
                                f"{data.get('env')!r}, not a dataset")
            # an uploaded dataset by its id (ds-...), else a path or URL: the other one goes
            ref = {"id": dataset} if re.fullmatch(DATASET_ID_PATTERN, dataset) else {"path": dataset}
            kept = {k: v for k, v in data["dataset"].items() if k not in ("id", "path")}
            data["dataset"] = {**kept, **ref}
        # the fleet's limits apply to the new length too
        spec = parse_spec(data, self.limits, datasets=self._resolver())
        if spec.dataset is not None and spec.dataset.id is not None:  # a user of it from now on
            self.r.sadd(Keys.dataset_experiments(spec.dataset.id), exp_id)
        if not self.protocol.extend(exp_id, steps, spec.model_dump_json()):
            raise SpecError(f"experiment {exp_id} finished meanwhile ({self.get(exp_id).status})")
        return self.get(exp_id)

    def metrics(self, exp_id: str) -> list[dict[str, Any]]:
        self.get(exp_id)
        return [json.loads(m) for m in self.r.lrange(Keys.metrics(exp_id), 0, -1)]
