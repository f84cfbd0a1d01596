"""`FleetClient`: the Python client. Talks to Redis only (no torch, no Celery), so it runs in
any process that can reach Redis: a notebook, a CI job, another service."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lorafleet.common.data.uploads import (
    OPERATOR,
    UPLOADS_SUBDIR,
    DatasetRecord,
    DatasetStore,
    UploadSpool,
    store_upload,
)
from lorafleet.common.ids import validate_id
from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.common.spec_input import AdmissionLimits
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.state.phases import TERMINAL
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import Version
from lorafleet.common.store.retention import doomed_versions, retention_of
from lorafleet.common.tinker.op_store import OpStore
from lorafleet.scheduler.fleet_status import FleetStatus, read_fleet_status
from lorafleet.scheduler.registry import ExperimentRegistry, UnknownExperimentError


class FleetClient:
    """`FleetClient()` reads LORAFLEET_* like every lorafleet process; arguments win over it."""

    def __init__(self, redis_url: str | None = None, store_url: str | None = None, *,
                 settings: Settings | None = None) -> None:
        self.settings = (settings or Settings()).with_overrides(redis_url=redis_url, store_url=store_url)
        self.r = connect(self.settings.require_redis_url())
        self.registry = ExperimentRegistry(self.r, AdmissionLimits.from_settings(self.settings),
                                           AdapterStore.from_settings(self.settings))

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetClient:
        return cls(settings=settings)

    def submit(self, spec: ExperimentSpec | dict[str, Any] | str | bytes) -> str:
        """Validate and enqueue; returns the experiment id. Raises `SpecError` on bad input."""
        return self.registry.submit(spec)

    def validate(self, spec: ExperimentSpec | dict[str, Any] | str | bytes) -> ExperimentSpec:
        """Every check `submit` makes (a fork or `init_from` against this client's store),
        enqueuing nothing; returns the spec as it would run. Raises `SpecError` on bad input."""
        return self.registry.admit(spec)

    def submit_many(self, specs: Sequence[ExperimentSpec | dict[str, Any] | str | bytes]) -> list[str]:
        """Validate all, then enqueue all at once (one transaction): they start together, in the
        same first batch. Raises `SpecError` naming the bad spec, with nothing enqueued."""
        return self.registry.submit_many(specs)

    def get(self, exp_id: str) -> ExperimentRecord:
        return self.registry.get(exp_id)

    def list(self, status: str | None = None) -> list[ExperimentRecord]:
        return self.registry.list(status)

    def cancel(self, exp_id: str) -> bool:
        return self.registry.cancel(exp_id)

    def extend(self, exp_id: str, steps: int, dataset: str | None = None) -> ExperimentRecord:
        """Continue an experiment for `steps` more steps (a completed one runs again from its
        last version), optionally on a new `dataset` (path, URL or uploaded id); raises `SpecError` for a
        failed/cancelled one, a bad count or an unreadable dataset."""
        return self.registry.extend(exp_id, steps, dataset)

    # ---- uploaded datasets (common/data/uploads.py): specs name them `dataset: {id: ds-...}` --
    def _datasets(self) -> DatasetStore:
        return DatasetStore.from_settings(self.r, self.settings)

    def upload_dataset(self, source: str | os.PathLike[str] | bytes, name: str | None = None,
                       fmt: str | None = None) -> DatasetRecord:
        """Upload a JSONL or Parquet file (a local path, or its bytes) as a dataset owned by the
        operator; returns its record (`.id` is what specs name). Checked row by row first:
        raises `DatasetUploadError` (a ValueError) naming the bad line, or the cap it is over
        (LORAFLEET_MAX_DATASET_BYTES, LORAFLEET_MAX_DATASET_ROWS); nothing is stored then."""
        spool = UploadSpool(self.settings.max_dataset_bytes, self.settings.cache_dir / UPLOADS_SUBDIR)
        try:
            if isinstance(source, bytes):
                spool.write(source)
            else:
                with open(source, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        spool.write(chunk)
        except BaseException:
            spool.discard()
            raise
        shown = name or ("dataset" if isinstance(source, bytes) else Path(source).name)
        return store_upload(self._datasets(), spool, owner=OPERATOR, name=shown, fmt=fmt,
                            max_rows=self.settings.max_dataset_rows, quota=None)

    def list_datasets(self, owner: str | None = None) -> list[DatasetRecord]:
        """Every uploaded dataset (only `owner`'s: an API key id, or "operator")."""
        return self._datasets().list(owner)

    def delete_dataset(self, ds_id: str) -> DatasetRecord:
        """Delete an uploaded dataset: `LookupError` if there is none, `DatasetInUseError` (a
        ValueError) while a queued or running experiment uses it."""
        return self._datasets().delete(ds_id)

    def metrics(self, exp_id: str) -> list[dict[str, Any]]:
        """One dict per committed step: reward stats, loss, grad norm, timings, worker."""
        return self.registry.metrics(exp_id)

    def refusals(self, exp_id: str) -> dict[str, int]:
        """Refused claims and commits of the experiment by reason ("claim:stale",
        "commit:lease_lost", ...): duplicate deliveries, zombies fenced out, stale messages."""
        return {k: int(v) for k, v in self.r.hgetall(Keys.refusals(exp_id)).items()}

    def fleet(self, recent_dead_letters: int = 5) -> FleetStatus:
        """Live workers, queue lengths, the backlog of experiments waiting for a batch, and the
        poison payloads dead-lettered off the queues."""
        return read_fleet_status(self.r, recent_dead_letters)

    def gc(self, dry_run: bool = False) -> dict[str, list[int]]:
        """`collect_garbage` on this client's fleet -> deleted versions per id."""
        return collect_garbage(self.r, self.settings, self.list(), dry_run)

    def store_usage(self, exp_id: str) -> int:
        """Bytes the experiment's checkpoints take in the store."""
        return AdapterStore.from_settings(self.settings).usage(exp_id)

    def wait(self, exp_ids: Iterable[str], timeout_s: float | None = None,
             poll_s: float = 0.2) -> list[ExperimentRecord]:
        ids = list(exp_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            states = [self.get(i) for i in ids]
            if all(s.status in TERMINAL for s in states):
                return states
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"not finished after {timeout_s}s: "
                                   + ", ".join(f"{s.id}={s.status}@{s.step}" for s in states if not s.done))
            time.sleep(poll_s)

    def events(self, since: str = "0", block_ms: int = 1000,
               stop: Any = None) -> Iterator[dict[str, str]]:
        """Follow the event stream (commits, completions, failures) from `since` ("$": new only)."""
        last = since
        while stop is None or not stop():
            got = self.r.xread({Keys.events: last}, block=block_ms, count=100)
            for _, entries in got or []:
                for event_id, fields in entries:
                    last = event_id
                    yield {"id": event_id, **fields}

    def download_adapter(self, exp_id: str, version: Version = "latest",
                         dest: str | Path = ".") -> Path:
        """Copy a published PEFT checkpoint to `dest/<exp_id>-v<version>`; returns that dir.

        Raises `ValueError` for a bad id or version, `AdapterNotFoundError` for an unknown one.
        Nothing is ever written outside `dest`."""
        validate_id(exp_id, "experiment id")
        if version != "latest" and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise ValueError(f"version must be 'latest' or an int >= 0, got {version!r}")
        if version == "latest":  # the committed version: the store may hold a lost attempt's newer one
            with contextlib.suppress(UnknownExperimentError):  # gone from Redis: the store's pointer
                version = self.get(exp_id).step
        store = AdapterStore.from_settings(self.settings)
        src = store.local_dir(exp_id, version)
        root = Path(dest).resolve()
        out = root / f"{exp_id}-{src.name}"
        # resolve() follows a symlink already sitting at `out`: copying through it would write
        # wherever it points, so the target must still be a child of `dest`.
        if out.resolve().parent != root or (out.exists() and not out.is_dir()):
            raise ValueError(f"refusing to write {out}: it is not a directory inside {root}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".lorafleet-download-", dir=root))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            out.mkdir(exist_ok=True)
            for f in tmp.iterdir():
                # rename replaces a symlink planted at out/<file> instead of writing through it
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def collect_garbage(r: Any, settings: Settings, records: Iterable[ExperimentRecord], dry_run: bool = False
                    ) -> dict[str, list[int]]:
    """Apply checkpoint retention to every experiment's published versions (what a worker
    deletes after each commit, plus whatever a crash left) -> deleted versions per id. The replay
    log (committed trajectories since the last snapshot) of a failed or cancelled experiment goes
    too: it can never be resumed (a completed one has none left). A Tinker model's named
    checkpoints (`save_state`, `save_weights_for_sampler`) are pinned: never deleted."""
    store = AdapterStore.from_settings(settings)
    ops = OpStore(r, settings)
    out: dict[str, list[int]] = {}
    for rec in records:
        if rec.status in ("failed", "cancelled") and not dry_run:
            for key in r.scan_iter(match=Keys.trajectory_prefix(rec.id) + "*", count=1000):
                r.delete(key)
        keep_last, keep_every = retention_of(rec.spec, settings)
        pinned = ops.pinned_versions(rec.id) if rec.kind == "client" else set()
        doomed = doomed_versions(store.versions(rec.id), rec.step, keep_last, keep_every,
                                 store.versions(rec.id, snapshots_only=True), pinned, replays=not rec.done)
        if doomed:
            out[rec.id] = doomed if dry_run else store.delete(rec.id, doomed)
    return out
