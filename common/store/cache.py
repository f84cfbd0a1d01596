"""Local copies of the adapter store's remote versions (published versions never change, so a
cached copy never goes stale)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from fsspec import AbstractFileSystem

from lorafleet.common.store.durable_fs import fsync_write
from lorafleet.common.store.layout import REQUIRED_FILES, TMP_PREFIX

CACHE_SUBDIR = "store-cache"


def complete_local(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def cache_root(cache_dir: Path | str, fs: AbstractFileSystem, root: str) -> Path:
    """The cache directory of the store at `root` on `fs`, under `cache_dir`."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{protocol}_{root}").strip("_")[:48]
    digest = hashlib.sha256(f"{protocol}://{root}".encode()).hexdigest()[:12]
    return Path(cache_dir) / CACHE_SUBDIR / f"{readable}-{digest}"


def download_version(fs: AbstractFileSystem, directory: str, names: list[str], target: Path,
                     check: Callable[[str, bytes], None] | None = None) -> Path:
    """Copy the files `names` of the version `directory` on `fs` into `target`, once (`check`:
    raises unless a file's bytes are the version's, e.g. `Manifest.check`; a copy that fails it
    is never renamed into place)."""
    if complete_local(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name in names:
            data = fs.cat_file(posixpath.join(directory, name))
            if check is not None:
                check(name, data)
            fsync_write(str(tmp / name), data)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same download first; keep its copy.
            if not complete_local(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
