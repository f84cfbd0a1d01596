"""Retention of the adapter store: sizes, deleting versions, sweeping dead writers' leftovers."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

from lorafleet.common.store.layout import TMP_PREFIX


class StoreRetention:
    """The deleting half of `AdapterStore` (a mixin: it uses the store's fs, lock and listings)."""

    def usage(self, adapter_id: str) -> int:
        """Bytes the adapter's versions (and anything else under its directory) take."""
        try:
            return int(self.fs.du(self._adapter_root(adapter_id), total=True))
        except FileNotFoundError:
            return 0

    def delete(self, adapter_id: str, versions: list[int]) -> list[int]:
        """Delete exactly `versions` (never the one the latest pointer names) -> deleted."""
        done = []
        with self._adapter_lock(adapter_id):
            latest = self._read_pointer(adapter_id)
            for v in versions:
                if v != latest and self.exists(adapter_id, v):
                    self._remove_version(adapter_id, v)
                    done.append(v)
        return done

    def delete_versions(self, adapter_id: str, keep_last: int) -> list[int]:
        """Delete all but the `keep_last` newest versions; the latest is always kept.

        Returns the deleted versions, ascending.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        with self._adapter_lock(adapter_id):
            found = self.versions(adapter_id)
            if not found:
                return []
            keep = {found[-1], self._read_pointer(adapter_id), *found[len(found) - keep_last :]}
            doomed = [v for v in found if v not in keep]
            for version in doomed:
                self._remove_version(adapter_id, version)
        return doomed

    def _remove_version(self, adapter_id: str, version: int) -> None:
        directory = self._version_dir(adapter_id, version)
        if not self._local:
            self._remove_object_version(directory)
            return
        if self._local:
            # Rename first so no reader can open a version that is half deleted.
            doomed = f"{self._adapter_root(adapter_id)}/{TMP_PREFIX}del-{uuid.uuid4().hex}"
            os.rename(directory, doomed)
            directory = doomed
        self.fs.rm(directory, recursive=True)

    def sweep_temp(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Remove temporary directories and files (`.tmp-*`) left by writers that died, once
        they are older than `older_than_s` (a live writer finishes within a lease) -> removed.
        On object stores also the objects of versions without a (matching) manifest: publishes
        that died before writing it."""
        import time

        now = time.time() if now is None else now
        removed = []
        for adapter_id in self.adapters():
            try:
                entries = self.fs.ls(self._adapter_root(adapter_id), detail=True)
            except FileNotFoundError:
                continue
            for e in entries:
                name = posixpath.basename(e["name"].rstrip("/"))
                if TMP_PREFIX not in name:
                    continue
                mtime = e.get("mtime") or e.get("LastModified") or e.get("created")
                mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or now)
                if now - mtime >= older_than_s:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(e["name"], recursive=True)
                    removed.append(e["name"])
            if not self._local:
                removed += self._sweep_objects(self._adapter_root(adapter_id), older_than_s, now)
        return removed
