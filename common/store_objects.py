"""The object-store half of `AdapterStore` (S3, GCS, memory://): versions published with a
manifest written last (common/store_manifest.py) instead of a rename (a mixin: it uses the store's
fs and paths)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections.abc import Mapping
from typing import Any

from lorafleet.common.store_layout import (
    VERSION_RE,
    NewVersion,
    exists_error,
)
from lorafleet.common.store_manifest import MANIFEST_FILE, Manifest, manifest_bytes, parse_manifest

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
        sizes = {name: int(e.get("size", -1)) for name, e in self._listing(directory).items()}
        return manifest if manifest.sizes_match(sizes) else None

    def _publish_objects(self, nv: NewVersion, final: str, files: Mapping[str, bytes]) -> str:
        """Write `nv`'s objects under `final`, then its manifest (one PUT): only then it exists."""
        if self._valid_manifest(final) is not None:
            raise exists_error(nv.adapter_id, nv.version)
        if self._listing(final):  # objects of a publish that died before its manifest
            self.fs.rm(final, recursive=True)
        written: dict[str, bytes] = {}
        try:
            for name, data in files.items():  # version_payloads' order
                self.fs.pipe_file(posixpath.join(final, name), data)
                written[name] = data
            if self.test_objects_written_delay_s:
                time.sleep(self.test_objects_written_delay_s)
            self.fs.pipe_file(posixpath.join(final, MANIFEST_FILE),
                              manifest_bytes(nv.version, written))
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the sweep removes what stays
                if written:
                    self.fs.rm([posixpath.join(final, n) for n in written])
            raise
        return final

    def _remove_object_version(self, directory: str) -> None:
        # The manifest first: from then on no reader sees the version, however far the rest goes.
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(posixpath.join(directory, MANIFEST_FILE))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(directory, recursive=True)

    def _object_tree(self, adapter_root: str) -> dict[int, dict[str, dict[str, Any]]]:
        """version -> object name -> listing entry, for every `v<N>/` prefix of the adapter."""
        try:
            found = self.fs.find(adapter_root, maxdepth=2, detail=True)
        except FileNotFoundError:
            return {}
        prefix = adapter_root.rstrip("/") + "/"
        tree: dict[int, dict[str, dict[str, Any]]] = {}
        for path, entry in found.items():
            parts = path.removeprefix(prefix).split("/")
            if len(parts) == 2 and VERSION_RE.fullmatch(parts[0]):
                tree.setdefault(int(parts[0][1:]), {})[parts[1]] = entry
        return tree

    def _object_versions(self, adapter_root: str) -> dict[int, set[str]]:
        """The adapter's existing versions -> their object names. All manifests are read in one
        batched (concurrent on S3) request."""
        tree = self._object_tree(adapter_root)
        paths = {v: posixpath.join(adapter_root, f"v{v}", MANIFEST_FILE)
                 for v, names in tree.items() if MANIFEST_FILE in names}
        if not paths:
            return {}
        raw = self.fs.cat(list(paths.values()), on_error="return")
        result = {}
        for v, path in paths.items():
            data = raw.get(path, raw.get(self.fs._strip_protocol(path)))
            manifest = parse_manifest(data) if isinstance(data, bytes) else None
            sizes = {n: int(e.get("size", -1)) for n, e in tree[v].items()}
            if manifest is not None and manifest.sizes_match(sizes):
                result[v] = set(manifest.files)
        return result

    def _sweep_objects(self, adapter_root: str, older_than_s: float, now: float) -> list[str]:
        """Remove the objects of versions that do not exist (no manifest, or objects that do not
        match it) once their newest object is older than `older_than_s` -> removed prefixes."""
        tree = self._object_tree(adapter_root)
        existing = self._object_versions(adapter_root)
        removed = []
        for v, entries in tree.items():
            if v in existing:
                continue
            if now - max(_mtime(e, now) for e in entries.values()) >= older_than_s:
                directory = posixpath.join(adapter_root, f"v{v}")
                self._remove_object_version(directory)
                removed.append(directory)
        return removed
