"""The manifest that makes a version exist on an object store (torch-free).

Object stores have no rename, so a version cannot appear all at once the way a renamed directory
does. Instead its objects are written under `v<N>/<attempt>/` first (`attempt`: a fresh
`.a-<hex>` per publish, so two writers of one version — a lost attempt and its retry — never
overwrite each other's objects) and `v<N>/manifest.json` LAST, in one PUT (atomic on S3: a reader
sees the whole object or none), created only if absent (If-None-Match: the first writer wins).
The manifest names the attempt and lists every object's size and sha256; a version exists only
when its manifest is there and the listed objects are there with those sizes, and readers check
the sha256 of what they read. A publish that died (or lost) leaves objects no manifest names;
the store's sweep removes them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
ATTEMPT_PREFIX = ".a-"
ATTEMPT_RE = re.compile(r"\.a-[0-9a-f]{8,32}")


@dataclass(frozen=True)
class Manifest:
    version: int
    attempt: str  # the prefix under v<N>/ that holds the objects
    files: dict[str, tuple[int, str]]  # name -> (size in bytes, sha256 hex)

    def sizes_match(self, listed: Mapping[str, int]) -> bool:
        """Whether the listing (name -> size) holds every object of the manifest, same size."""
        return all(listed.get(name) == size for name, (size, _) in self.files.items())

    def check(self, name: str, data: bytes) -> None:
        """Raise `ManifestMismatch` unless `data` is what the manifest lists for `name`."""
        size, digest = self.files[name]
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise ManifestMismatch(f"{name}: content differs from the manifest")


class ManifestMismatch(Exception):
    """An object of a version does not match its manifest (a torn or tampered version)."""


def manifest_bytes(version: int, attempt: str, files: Mapping[str, bytes]) -> bytes:
    entries = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in files.items()}
    doc = {"format": MANIFEST_FORMAT, "version": version, "attempt": attempt, "files": entries}
    return json.dumps(doc, sort_keys=True, indent=1).encode()


def parse_manifest(raw: bytes) -> Manifest | None:
    """The manifest in `raw`, or None if it is not a well-formed one (treated as absent)."""
    try:
        doc = json.loads(raw)
        files = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in doc["files"].items()}
        attempt = str(doc["attempt"])
        if not ATTEMPT_RE.fullmatch(attempt):
            return None
        return Manifest(int(doc["version"]), attempt, files)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
