"""The object-store half of `AdapterStore` (S3, GCS, memory://): versions published with a
manifest written last (common/store/manifest.py) instead of a rename (a mixin: it uses the store's
fs and paths)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from lorafleet.common.store.layout import (
    VERSION_RE,
    NewVersion,
    VersionExistsError,
    check_version,
    exists_error,
    version_payloads,
)
from lorafleet.common.store.manifest import (
    ATTEMPT_PREFIX,
    MANIFEST_FILE,
    Manifest,
    ManifestMismatch,
    manifest_bytes,
    parse_manifest,
)

S3_PROTOCOLS = ("s3", "s3a")


def object_store_options(protocol: str, options: Mapping[str, Any] | None,
                         endpoint_url: str | None) -> dict[str, Any]:
    """fsspec storage options for the store's filesystem.

    S3: the endpoint comes from the argument (Settings.store_endpoint_url) or AWS_ENDPOINT_URL
    (so an S3-compatible server works with the standard AWS environment alone); credentials come
    from `options` or the standard AWS chain (AWS_ACCESS_KEY_ID, ...). The listings cache is off:
    other processes publish versions, and a cached listing would hide them."""
    opts = dict(options or {})
    if protocol in S3_PROTOCOLS:
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts:
            opts["endpoint_url"] = endpoint
        opts.setdefault("use_listings_cache", False)
    return opts


def _mtime(entry: Mapping[str, Any], default: float) -> float:
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
    if value is None:
        return default
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


class ObjectStoreVersions:
    """Publishing, listing and sweeping versions on a store without rename."""

    test_objects_written_delay_s = 0.0  # fault injection (tests): a kill lands before the manifest

    def _listing(self, directory: str) -> dict[str, dict[str, Any]]:
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): e for e in entries}

    def _read_manifest(self, directory: str) -> Manifest | None:
        try:
            return parse_manifest(self.fs.cat_file(posixpath.join(directory, MANIFEST_FILE)))
        except FileNotFoundError:
            return None

    def _valid_manifest(self, directory: str) -> Manifest | None:
        """The version's manifest if the version exists (manifest there, objects there with the
        listed sizes), else None."""
        manifest = self._read_manifest(directory)
        if manifest is None:
            return None
        listing = self._listing(posixpath.join(directory, manifest.attempt))
        sizes = {name: int(e.get("size", -1)) for name, e in listing.items()}
        return manifest if manifest.sizes_match(sizes) else None

    def _object_dir(self, directory: str, manifest: Manifest) -> str:
        """Where the version's objects are (under its prefix, in the manifest's attempt)."""
        return posixpath.join(directory, manifest.attempt)

    def _publish_many_objects(self, versions: list[NewVersion]) -> list[str | VersionExistsError]:
        # Serialise every item before the first write: a bad one publishes none (as on a local fs).
        files = [{name: payload() for name, payload in version_payloads(nv).items()}
                 for nv in versions if self._version_dir(nv.adapter_id, check_version(nv.version))]
        results: list[str | VersionExistsError] = []
        delay = self.test_snapshot_delay_s
        for nv, data in zip(versions, files, strict=True):
            self.test_objects_written_delay_s = delay if nv.trainer_tensors is not None else 0.0
            try:
                results.append(self._publish_objects(
                    nv, self._version_dir(nv.adapter_id, nv.version), data))
            except VersionExistsError as exc:
                results.append(exc)
        for nv, result in zip(versions, results, strict=True):
            if isinstance(result, str):
                self._advance_latest(nv.adapter_id, nv.version)
        return results

    def _same_objects(self, directory: str, payloads: Mapping[str, Callable[[], bytes]]) -> bool:
        manifest = self._valid_manifest(directory)
        if manifest is None or set(manifest.files) != set(payloads):
            return False
        try:
            for name, payload in payloads.items():
                manifest.check(name, payload())
        except ManifestMismatch:
            return False
        return True

    def _publish_objects(self, nv: NewVersion, final: str, files: Mapping[str, bytes]) -> str:
        """Write `nv`'s objects under `final/<new attempt>/`, then its manifest (one PUT, only if
        absent): only then the version exists."""
        manifest_path = posixpath.join(final, MANIFEST_FILE)
        if MANIFEST_FILE in self._listing(final):
            if self._valid_manifest(final) is not None:
                raise exists_error(nv.adapter_id, nv.version)
            # There but invalid (unreadable, or naming objects that are not all there): not a
            # version, and no create could succeed while it is there. No writer can have
            # replaced it since the check: manifests are only created where none is.
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(manifest_path)
        attempt = f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:16]}"
        objects = posixpath.join(final, attempt)
        try:
            for name, data in files.items():  # version_payloads' order
                self.fs.pipe_file(posixpath.join(objects, name), data)
            if self.test_objects_written_delay_s:
                time.sleep(self.test_objects_written_delay_s)
            try:
                self.fs.pipe_file(manifest_path, manifest_bytes(nv.version, attempt, files),
                                  mode="create")
            except OSError as exc:  # FileExistsError (If-None-Match), or a store's 412 variant
                if self._read_manifest(final) is None:
                    raise
                raise exists_error(nv.adapter_id, nv.version) from exc  # another writer won
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the sweep removes what stays
                self.fs.rm(objects, recursive=True)
            raise
        return final

    def _remove_object_version(self, directory: str) -> None:
        # The manifest first: from then on no reader sees the version, however far the rest goes.
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(posixpath.join(directory, MANIFEST_FILE))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(directory, recursive=True)

    def _object_tree(self, adapter_root: str) -> dict[int, dict[str, dict[str, Any]]]:
        """version -> path under `v<N>/` ("manifest.json", "<attempt>/<name>") -> listing entry."""
        try:
            found = self.fs.find(adapter_root, maxdepth=3, detail=True)
        except FileNotFoundError:
            return {}
        prefix = adapter_root.rstrip("/") + "/"
        tree: dict[int, dict[str, dict[str, Any]]] = {}
        for path, entry in found.items():
            head, _, rest = path.removeprefix(prefix).partition("/")
            if rest and VERSION_RE.fullmatch(head):
                tree.setdefault(int(head[1:]), {})[rest] = entry
        return tree

    def _manifests(self, adapter_root: str, tree: dict[int, dict[str, dict[str, Any]]]
                   ) -> dict[int, Manifest]:
        """The adapter's existing versions -> their manifests. All manifests are read in one
        batched (concurrent on S3) request; each is checked against the listing."""
        paths = {v: posixpath.join(adapter_root, f"v{v}", MANIFEST_FILE)
                 for v, entries in tree.items() if MANIFEST_FILE in entries}
        if not paths:
            return {}
        raw = self.fs.cat(list(paths.values()), on_error="return")
        result = {}
        for v, path in paths.items():
            data = raw.get(path, raw.get(self.fs._strip_protocol(path)))
            manifest = parse_manifest(data) if isinstance(data, bytes) else None
            if manifest is None:
                continue
            sizes = {rel.split("/", 1)[1]: int(e.get("size", -1)) for rel, e in tree[v].items()
                     if rel.startswith(manifest.attempt + "/")}
            if manifest.sizes_match(sizes):
                result[v] = manifest
        return result

    def _object_versions(self, adapter_root: str) -> dict[int, set[str]]:
        """The adapter's existing versions -> their object names."""
        return {v: set(m.files) for v, m in self._manifests(
            adapter_root, self._object_tree(adapter_root)).items()}

    def _sweep_objects(self, adapter_root: str, older_than_s: float, now: float) -> list[str]:
        """Remove objects no valid manifest names (publishes that died or lost a race), and
        versions whose manifest does not match their objects, once the newest of them is older
        than `older_than_s` (a live publish writes within a lease) -> removed prefixes."""
        tree = self._object_tree(adapter_root)
        manifests = self._manifests(adapter_root, tree)
        removed = []
        for v, entries in tree.items():
            directory = posixpath.join(adapter_root, f"v{v}")
            if v not in manifests:
                if now - max(_mtime(e, now) for e in entries.values()) >= older_than_s:
                    self._remove_object_version(directory)
                    removed.append(directory)
                continue
            stale: dict[str, float] = {}  # attempt prefix -> newest object
            for rel, e in entries.items():
                attempt = rel.split("/", 1)[0]
                if rel != MANIFEST_FILE and attempt != manifests[v].attempt:
                    stale[attempt] = max(stale.get(attempt, 0.0), _mtime(e, now))
            for attempt, newest in sorted(stale.items()):
                if now - newest >= older_than_s:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(posixpath.join(directory, attempt), recursive=True)
                    removed.append(posixpath.join(directory, attempt))
        return removed
