"""Versioned, immutable LoRA adapter checkpoints on any fsspec filesystem (layout, records and
errors: common/store/layout.py; local copies of remote versions: common/store/cache.py).

On a local fs a version is written under a temporary name and renamed into place (atomic), so
readers (PEFT, vLLM, the next train step) never see half a version. Object stores have no rename:
there a version's objects are written under its prefix and a manifest (each object's size and
sha256) LAST, in one PUT; a version exists only when its manifest is there and its objects match
it (common/store/objects.py, common/store/manifest.py). A crashed publish's objects are never read,
the next publish of that version replaces them, and `sweep_temp` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec.core
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from lorafleet.common.ids import is_valid_id, validate_id
from lorafleet.common.settings import Settings, redacted
from lorafleet.common.store.cache import cache_root, download_version
from lorafleet.common.store.durable_fs import sync_paths
from lorafleet.common.store.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    DIGITS_RE,
    LATEST_FILE,
    LOCK_FILE,
    REQUIRED_FILES,
    TMP_PREFIX,
    TRAINER_META_FILE,
    TRAINER_TENSORS_FILE,
    VERSION_FILES,
    VERSION_RE,
    AdapterCheckpoint,
    AdapterNotFoundError,
    NewVersion,
    Version,
    VersionExistsError,
    check_version,
    exists_error,
    version_dir_name,
    version_payloads,
)
from lorafleet.common.store.manifest import ManifestMismatch
from lorafleet.common.store.objects import ObjectStoreVersions, object_store_options
from lorafleet.common.store.sweep import StoreRetention

if TYPE_CHECKING:  # torch is imported lazily: the torch-free client lists and downloads versions
    import torch


class AdapterStore(StoreRetention, ObjectStoreVersions):
    """Publish and load adapter checkpoints under `url` (`file://`, a plain path, `memory://`,
    or any fsspec URL such as `s3://bucket/prefix`; `storage_options` and `endpoint_url` go to
    the fsspec filesystem, see `object_store_options`)."""

    def __init__(self, url: str, *, cache_dir: Path | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.test_snapshot_delay_s = 0.0  # fault injection (tests): see publish_many
        self.url = url
        self._shown = redacted(url)  # object-store URLs may carry credentials
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        fs, root = fsspec.core.url_to_fs(
            url, **object_store_options(protocol, storage_options, endpoint_url))
        self.fs: AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self._local = isinstance(fs, LocalFileSystem)
        self._cache_dir = cache_dir

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterStore:
        """The fleet's store: `settings.store_url` (default: under the cache dir), with local
        copies of remote versions under `settings.cache_dir`."""
        return cls(settings.resolved_store_url, cache_dir=settings.cache_dir,
                   storage_options=settings.store_options,
                   endpoint_url=settings.store_endpoint_url)

    def __repr__(self) -> str:
        return f"AdapterStore({self._shown!r})"

    def _adapter_root(self, adapter_id: str) -> str:
        return posixpath.join(self.root, validate_id(adapter_id, "adapter id"))

    def _version_dir(self, adapter_id: str, version: int) -> str:
        return posixpath.join(self._adapter_root(adapter_id), version_dir_name(version))

    def publish(
        self,
        adapter_id: str,
        version: int,
        *,
        weights: Mapping[str, torch.Tensor],
        adapter_config: Mapping[str, Any],
        trainer_tensors: Mapping[str, torch.Tensor] | None = None,
        trainer_meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Write `version` of `adapter_id`, return its directory (a path on this fs). Raises
        `VersionExistsError`, leaving the published files untouched, if it already exists."""
        [result] = self.publish_many([NewVersion(adapter_id, version, weights, adapter_config,
                                                 trainer_tensors, trainer_meta)])
        if isinstance(result, VersionExistsError):
            raise result
        return result

    def publish_many(self, versions: list[NewVersion]) -> list[str | VersionExistsError]:
        """Publish several versions (of different adapters) together -> per version its
        directory, or the `VersionExistsError` that left an existing one untouched.

        On a local fs every file is written under a temporary directory, all of them are made
        durable with one filesystem sync, then renamed into place and the renames synced once
        more: a version directory that exists always has durable content, and when this returns
        every version is durable, as with one `publish` each, at a fraction of the fsyncs.
        On object stores each version's objects go straight under its prefix, its manifest last."""
        if not self._local:
            return self._publish_many_objects(versions)
        results: list[str | VersionExistsError | None] = [None] * len(versions)
        staged: list[tuple[int, str, str]] = []  # (index, temp dir, final dir)
        try:
            for i, nv in enumerate(versions):
                final = self._version_dir(nv.adapter_id, check_version(nv.version))
                if self.exists(nv.adapter_id, nv.version):
                    results[i] = exists_error(nv.adapter_id, nv.version)
                    continue
                staged.append((i, self._stage(nv), final))
            snapshot = any(versions[i].trainer_tensors is not None and versions[i].version  # not v0
                           for i, _, _ in staged)
            if self.test_snapshot_delay_s and snapshot:
                time.sleep(self.test_snapshot_delay_s)  # fault injection: a kill lands mid-snapshot
            if self._local and staged:
                files = [posixpath.join(tmp, n) for i, tmp, _ in staged
                         for n in version_payloads(versions[i])]
                sync_paths(files, [tmp for _, tmp, _ in staged])
            for i, tmp, final in staged:
                nv = versions[i]
                try:
                    self._move_into_place(tmp, final, nv.adapter_id, nv.version)
                    results[i] = final
                except VersionExistsError as exc:  # another writer won the race
                    results[i] = exc
            if self._local:
                done = [final for i, _, final in staged if isinstance(results[i], str)]
                if done:
                    sync_paths([], sorted({posixpath.dirname(f) for f in done}))
        finally:
            for _, tmp, _ in staged:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
        for nv, result in zip(versions, results, strict=True):
            if isinstance(result, str):
                self._advance_latest(nv.adapter_id, nv.version)
        return results  # type: ignore[return-value]

    def _stage(self, nv: NewVersion) -> str:
        """Write the version's files into a new temporary directory (not yet synced)."""
        adapter_root = self._adapter_root(nv.adapter_id)
        self.fs.makedirs(adapter_root, exist_ok=True)
        tmp = posixpath.join(adapter_root, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        self.fs.makedirs(tmp, exist_ok=True)
        try:
            for name, payload in version_payloads(nv).items():
                path, data = posixpath.join(tmp, name), payload()
                if self._local:
                    with open(path, "wb") as fh:  # synced with the whole batch, before the rename
                        fh.write(data)
                else:
                    self.fs.pipe_file(path, data)
        except BaseException:
            self.fs.rm(tmp, recursive=True)
            raise
        return tmp

    def same_content(self, nv: NewVersion) -> bool:
        """Whether the published `nv.version` holds exactly the bytes `nv` would write (sha256 of
        every file): a retry of a lost attempt that already published the same step finds its
        own result there."""
        directory = self._version_dir(nv.adapter_id, check_version(nv.version))
        payloads = version_payloads(nv)
        if not self._local:  # the manifest holds every object's sha256: nothing to download
            return self._same_objects(directory, payloads)
        if self._files(directory) & set(VERSION_FILES) != set(payloads):  # snapshot or not
            return False
        return all(hashlib.sha256(payloads[n]()).digest()
                   == hashlib.sha256(self.fs.cat_file(posixpath.join(directory, n))).digest()
                   for n in payloads)

    def replace_version(self, nv: NewVersion) -> str:
        """Publish `nv` in place of an existing version with other content. Only for a version
        that no reader may rely on yet: one that was published by an attempt whose commit never
        happened (the caller holds the step's claim, so no other commit can)."""
        with self._adapter_lock(nv.adapter_id):
            if self.exists(nv.adapter_id, nv.version):
                self._remove_version(nv.adapter_id, nv.version)
        [result] = self.publish_many([nv])
        if isinstance(result, VersionExistsError):
            raise result
        return result

    def _move_into_place(self, tmp: str, final: str, adapter_id: str, version: int) -> None:
        try:
            os.rename(tmp, final)  # fails if `final` exists and is not empty
        except OSError as exc:
            if self._is_complete(final):
                raise exists_error(adapter_id, version) from exc
            raise

    @contextlib.contextmanager
    def _adapter_lock(self, adapter_id: str) -> Iterator[None]:
        adapter_root = self._adapter_root(adapter_id)
        if not self._local or not os.path.isdir(adapter_root):
            yield  # best effort on object stores (no cheap lock); nothing to guard if no adapter
            return
        path = posixpath.join(adapter_root, LOCK_FILE)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _advance_latest(self, adapter_id: str, version: int) -> None:
        pointer = posixpath.join(self._adapter_root(adapter_id), LATEST_FILE)
        with self._adapter_lock(adapter_id):
            current = self._read_pointer(adapter_id)
            if current is not None and current >= version:
                return
            data = f"{version}\n".encode()
            if not self._local:
                self.fs.pipe_file(pointer, data)  # a single PUT is atomic on object stores
                return
            tmp = f"{pointer}{TMP_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            # readers see the old or the new number, never a torn one. Not fsynced: after a
            # machine crash the pointer may be old or empty, and an unreadable one falls back to
            # the highest complete version (`latest_version`); versions themselves are durable.
            os.replace(tmp, pointer)

    def _read_pointer(self, adapter_id: str) -> int | None:
        pointer = posixpath.join(self._adapter_root(adapter_id), LATEST_FILE)
        try:
            text = self.fs.cat_file(pointer).decode().strip()
        except FileNotFoundError:
            return None
        return int(text) if DIGITS_RE.fullmatch(text) else None

    def _files(self, directory: str) -> set[str]:
        try:
            listing = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(p.rstrip("/")) for p in listing}

    def _is_complete(self, version_dir: str) -> bool:
        if not self._local:
            return self._valid_manifest(version_dir) is not None
        return self._files(version_dir).issuperset(REQUIRED_FILES)

    def adapters(self) -> list[str]:
        """IDs of the adapters that have at least a directory in the store."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = (
            posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"
        )
        return sorted(name for name in names if is_valid_id(name))

    def versions(self, adapter_id: str, snapshots_only: bool = False) -> list[int]:
        """Published versions, ascending (only those with the AdamW state if `snapshots_only`).
        Temp directories and incomplete copies are skipped."""
        need = set(REQUIRED_FILES) | ({TRAINER_TENSORS_FILE} if snapshots_only else set())
        adapter_root = self._adapter_root(adapter_id)
        if not self._local:
            return sorted(v for v, names in self._object_versions(adapter_root).items()
                          if names.issuperset(need))
        try:
            files = self.fs.find(adapter_root, maxdepth=2)
        except FileNotFoundError:
            return []
        present: dict[int, set[str]] = {}
        prefix = adapter_root.rstrip("/") + "/"
        for path in files:
            parts = path.removeprefix(prefix).split("/")
            if len(parts) == 2 and VERSION_RE.fullmatch(parts[0]):
                present.setdefault(int(parts[0][1:]), set()).add(parts[1])
        return sorted(v for v, names in present.items() if names.issuperset(need))

    def exists(self, adapter_id: str, version: int) -> bool:
        return self._is_complete(self._version_dir(adapter_id, check_version(version)))

    def latest_version(self, adapter_id: str) -> int | None:
        """The version the `latest` pointer names; if there is no pointer (a publish died between
        the rename and the pointer update), the highest published version; None if none."""
        pointer = self._read_pointer(adapter_id)
        if pointer is not None:
            return pointer
        found = self.versions(adapter_id)
        return found[-1] if found else None

    def _resolve(self, adapter_id: str, version: Version) -> int:
        if version == "latest":
            latest = self.latest_version(adapter_id)
            if latest is None:
                raise AdapterNotFoundError(f"unknown adapter {adapter_id!r} in {self._shown}")
            return latest
        return check_version(version)

    def _require(self, adapter_id: str, version: Version) -> tuple[int, str]:
        resolved = self._resolve(adapter_id, version)
        directory = self._version_dir(adapter_id, resolved)
        if not self._is_complete(directory):
            known = self.versions(adapter_id)
            if not known:
                raise AdapterNotFoundError(f"unknown adapter {adapter_id!r} in {self._shown}")
            raise AdapterNotFoundError(
                f"adapter {adapter_id!r} has no version {resolved} in {self._shown}; "
                f"published versions: {known}"
            )
        return resolved, directory

    def load(self, adapter_id: str, version: Version = "latest") -> AdapterCheckpoint:
        from safetensors.torch import load as st_load

        resolved, directory = self._require(adapter_id, version)
        manifest = None if self._local else self._valid_manifest(directory)
        objects = directory if manifest is None else self._object_dir(directory, manifest)

        def read(name: str) -> bytes:
            data = self.fs.cat_file(posixpath.join(objects, name))
            if manifest is not None:
                try:
                    manifest.check(name, data)
                except ManifestMismatch as exc:
                    raise AdapterNotFoundError(
                        f"adapter {adapter_id!r} v{resolved} in {self._shown} does not match its "
                        f"manifest ({exc}): not a complete version") from exc
            return data

        if manifest is not None:
            snapshot = TRAINER_TENSORS_FILE in manifest.files
        else:
            snapshot = TRAINER_TENSORS_FILE in self._files(directory)
        return AdapterCheckpoint(
            adapter_id=adapter_id,
            version=resolved,
            weights=st_load(read(ADAPTER_WEIGHTS_FILE)),
            adapter_config=json.loads(read(ADAPTER_CONFIG_FILE)),
            trainer_tensors=st_load(read(TRAINER_TENSORS_FILE)) if snapshot else {},
            trainer_meta=json.loads(read(TRAINER_META_FILE)),
            snapshot=snapshot,
        )

    def adapter_config(self, adapter_id: str, version: Version = "latest") -> dict[str, Any]:
        """The PEFT adapter_config.json of a published version (no tensors read)."""
        _, directory = self._require(adapter_id, version)
        if not self._local:
            manifest = self._valid_manifest(directory)
            if manifest is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r}: version gone from {self._shown}")
            directory = self._object_dir(directory, manifest)
        return json.loads(self.fs.cat_file(posixpath.join(directory, ADAPTER_CONFIG_FILE)))

    def local_dir(self, adapter_id: str, version: Version = "latest") -> Path:
        """A local directory with the version's files, for PEFT `from_pretrained` and vLLM.

        Local stores return the version directory itself; others download it once into the
        cache (published versions never change, so a cached copy never goes stale).
        """
        resolved, directory = self._require(adapter_id, version)
        if self._local:
            return Path(directory)
        target = self._cache_root() / adapter_id / version_dir_name(resolved)
        manifest = self._valid_manifest(directory)
        if manifest is None:  # deleted or replaced since _require
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {resolved} in "
                                       f"{self._shown}")
        names = sorted(set(manifest.files) & set(VERSION_FILES))
        return download_version(self.fs, self._object_dir(directory, manifest), names, target,
                                check=manifest.check)

    def _cache_root(self) -> Path:
        if self._cache_dir is None:
            raise ValueError(f"{self!r} is not a local store: reading it needs a cache_dir "
                             "(AdapterStore.from_settings passes LORAFLEET_CACHE_DIR)")
        return cache_root(self._cache_dir, self.fs, self.root)
