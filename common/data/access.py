"""The data-access policy: what data an API key may name (DESIGN.md section 8, "Security").

Whoever reaches Redis (the CLI without the API, `FleetClient`) or holds an admin key operates
the fleet and is trusted. An ordinary API key is a tenant: the API applies this policy to
everything such a key names, before anything it names is opened. A tenant may name

  (a) datasets it uploaded, by id (`dataset: {id: ds-...}`, `common/data/uploads.py`),
  (b) URLs under a prefix allowed for the fleet (`LORAFLEET_ALLOWED_DATA_URLS`) or for its key
      (`lorafleet keys create --allow-data-url`),
  (c) experiments it owns, by id (`train.init_from: EXP@vK`).

Never a bare path, `file://`, `local://`, `memory://`, a chained (`::`) URL, a wrapper or
archive filesystem (`zip://`, `tar://`, `reference://`, caches), anything under the adapter
store or the cache directory (even when an allowed prefix covers them), nor an http(s) URL whose
host is `localhost` or a literal loopback, private, link-local or otherwise non-public address.
Prefixes match a normalised URL segment by segment, so `s3://b/datasets/../other/x` and
`s3://b/datasets-evil/x` are not under `s3://b/datasets/`. Messages name the field and never
echo anything read from the data (nothing is read here). Torch-free; imports nothing of
scheduler/ or workers/.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from lorafleet.common.ids import is_valid_id
from lorafleet.common.keys import Keys
from lorafleet.common.schemas import DATASET_ID_PATTERN
from lorafleet.common.store.adapter_import import parse_init_from

if TYPE_CHECKING:
    import redis

    from lorafleet.common.schemas import DatasetSpec, ExperimentSpec
    from lorafleet.common.settings import Settings

# fsspec protocols that read this machine, wrap another URL, or open an archive: never a
# tenant's, whatever prefix an operator allowed
FORBIDDEN_SCHEMES = frozenset({
    "file", "local", "memory", "dir", "reference", "zip", "tar", "libarchive", "jlab", "jupyter",
    "simplecache", "blockcache", "filecache", "cached", "data", "arrow_hdfs", "root",
})
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_SHOWN = 80  # longest part of a user's URL quoted back


class DataAccessError(ValueError):
    """A URL or id a key may not name: answered 403 (404 for an id that is not the key's,
    as if it did not exist). The message starts with the field."""

    def __init__(self, field: str, message: str, status: int = 403) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def _shown(url: str) -> str:
    return repr(url if len(url) <= _SHOWN else url[: _SHOWN - 3] + "...")


@dataclass(frozen=True)
class NormalUrl:
    scheme: str  # lower case
    host: str  # netloc, lower case (bucket or host[:port])
    segments: tuple[str, ...]  # the path's segments, percent-decoded

    def under(self, prefix: NormalUrl) -> bool:
        """Equal to `prefix`, or inside it (whole segments only)."""
        return (self.scheme, self.host) == (prefix.scheme, prefix.host) \
            and self.segments[: len(prefix.segments)] == prefix.segments


def normalise(url: str, field: str) -> NormalUrl:
    """`url` as scheme, host and path segments; DataAccessError for anything a prefix check
    could be fooled by: `..` or `.` segments, empty segments (`//`), encoded slashes or dots,
    userinfo, fragments, control characters or backslashes."""
    if not isinstance(url, str) or "://" not in url:
        raise DataAccessError(field, "API keys name data by an allowed URL, an uploaded dataset id "
                                     "or an owned experiment id; server paths need an admin key")
    if "::" in url:
        # fsspec reads '::' anywhere as a chain (an IPv6 literal like [::1] included)
        raise DataAccessError(field, "URLs with '::' (chained URLs a::b, IPv6 literals) are not allowed "
                                     "for API keys")
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in url):
        raise DataAccessError(field, "the URL has whitespace, control characters or backslashes")
    scheme, rest = url.split("://", 1)
    if not _SCHEME_RE.fullmatch(scheme):
        raise DataAccessError(field, f"not a URL scheme: {_shown(scheme)}")
    scheme = scheme.lower()
    if scheme in FORBIDDEN_SCHEMES:
        raise DataAccessError(field, f"{scheme}:// URLs are not allowed for API keys (they read the "
                                     "server's own files or wrap other URLs)")
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise DataAccessError(field, "not a well-formed URL") from None
    if parts.fragment or "#" in rest:
        raise DataAccessError(field, "URL fragments (#...) are not allowed")
    if "@" in parts.netloc:
        raise DataAccessError(field, "URLs with credentials or userinfo (user@host) are not allowed")
    if "%" in parts.netloc or not parts.netloc:
        raise DataAccessError(field, "the URL needs a plain host or bucket name")
    if parts.query and scheme not in ("http", "https"):
        raise DataAccessError(field, "query strings are only allowed in http(s) URLs")
    raw = parts.path.split("/")[1:] if parts.path else []
    if raw and raw[-1] == "":  # one trailing slash names the same directory
        raw = raw[:-1]
    segments = tuple(unquote(s) for s in raw)
    for s in segments:
        if s in ("", ".", "..") or "/" in s or "\\" in s or "%" in s or any(ord(c) < 0x20 for c in s):
            raise DataAccessError(field, "the URL's path has empty, '.' or '..' segments or encoded "
                                         "separators")
    return NormalUrl(scheme, parts.netloc.lower(), segments)


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, in any form a resolver accepts (`127.1`, `0x7f.1`,
    `2130706433`, `[::ffff:127.0.0.1]`), else None."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-Fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_http_host(url: NormalUrl, field: str) -> None:
    """Refuse http(s) to localhost or a literal non-public address (the connection-level guard
    resolves names and re-checks every address; this is the cheap early refusal)."""
    host = url.host.rsplit("@", 1)[-1]
    host = host[: host.rindex("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    name = host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        raise DataAccessError(field, "http(s) URLs may not name this host (localhost)")
    ip = _literal_ip(name)
    if ip is not None and not _public_address(ip):
        raise DataAccessError(field, "http(s) URLs may not name a loopback, private, link-local or "
                                     "otherwise non-public address")


def _normal_root(url: str) -> NormalUrl:
    """A server location (the store, the cache dir) as a NormalUrl, for "never under it"."""
    text = url if "://" in url else "file://" + str(Path(url).resolve())
    scheme, rest = text.split("://", 1)
    parts = urlsplit(f"{scheme.lower()}://{rest}")
    segments = tuple(unquote(s) for s in parts.path.split("/") if s)
    return NormalUrl(scheme.lower(), parts.netloc.lower(), segments)


def check_data_url(url: str, *, field: str, allowed_prefixes: Iterable[str], store_url: str,
                   cache_dir: str | Path) -> None:
    """Raise DataAccessError unless a tenant may read `url` (see the module docstring)."""
    normal = normalise(url, field)
    for root in (store_url, str(cache_dir)):
        if normal.under(_normal_root(root)):
            raise DataAccessError(field, "URLs under the fleet's adapter store or cache are not "
                                         "allowed for API keys; name experiments by id")
    if normal.scheme in ("http", "https"):
        check_http_host(normal, field)
    for prefix in allowed_prefixes:
        try:
            allowed = normalise(prefix, "allowed prefix")
        except DataAccessError:
            continue  # a malformed or forbidden prefix allows nothing
        if normal.under(allowed):
            return
    raise DataAccessError(field, f"{_shown(url)} is not under a URL prefix allowed for this key "
                                 "(LORAFLEET_ALLOWED_DATA_URLS, `lorafleet keys create "
                                 "--allow-data-url`); upload the data with POST /v1/datasets instead")


def split_prefixes(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of URL prefixes (LORAFLEET_ALLOWED_DATA_URLS) as a tuple."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


class Caller(Protocol):
    """What the policy needs of an API key (common/api_keys.ApiKey)."""

    id: str
    admin: bool
    allowed_data_urls: tuple[str, ...]


@dataclass(frozen=True)
class DataAccessPolicy:
    """The policy for one caller; `trusted` (an admin key, an operator) allows everything."""

    trusted: bool
    owner: str  # the key id whose datasets and experiments may be named
    allowed_prefixes: tuple[str, ...]
    store_url: str
    cache_dir: str
    r: redis.Redis | None = None  # where ownership is looked up

    @classmethod
    def for_key(cls, settings: Settings, key: Caller, r: redis.Redis) -> DataAccessPolicy:
        return cls(trusted=key.admin, owner=key.id,
                   allowed_prefixes=split_prefixes(settings.allowed_data_urls) + key.allowed_data_urls,
                   store_url=settings.resolved_store_url, cache_dir=str(settings.cache_dir), r=r)

    def check_url(self, url: str, field: str) -> None:
        if not self.trusted:
            check_data_url(url, field=field, allowed_prefixes=self.allowed_prefixes,
                           store_url=self.store_url, cache_dir=self.cache_dir)

    def _owner_of(self, hash_key: str) -> str | None:
        assert self.r is not None, "ownership checks need Redis"
        return self.r.hget(hash_key, "owner")

    def check_experiment(self, exp_id: str, field: str) -> None:
        """404 unless the experiment exists and is the caller's (trusted callers: the registry
        answers for unknown ids, as it does for Redis clients)."""
        if self.trusted:
            return
        owner = self._owner_of(Keys.experiment(exp_id)) if is_valid_id(exp_id) else None
        if owner is None or (not self.trusted and owner != self.owner):
            raise DataAccessError(field, f"no experiment {_shown(exp_id)}", 404)

    def check_dataset_id(self, ds_id: str, field: str) -> None:
        """404 unless the dataset exists and is the caller's (trusted: any, as above)."""
        if self.trusted:
            return
        owner = self._owner_of(Keys.dataset(ds_id)) if is_valid_id(ds_id) else None
        if owner is None or (not self.trusted and owner != self.owner):
            raise DataAccessError(field, f"no dataset {_shown(ds_id)}", 404)

    def check_dataset(self, dataset: DatasetSpec, field: str = "dataset") -> None:
        if dataset.id is not None:
            self.check_dataset_id(dataset.id, f"{field}.id")
        if dataset.path is not None:
            self.check_url(dataset.path, f"{field}.path")

    def check_init_from(self, value: str, field: str = "train.init_from") -> None:
        try:
            src = parse_init_from(value)
        except ValueError as exc:
            raise DataAccessError(field, str(exc), 400) from None
        if src.is_fork:
            self.check_experiment(src.exp_id or "", field)
        else:
            self.check_url(src.url or "", field)

    def check_spec(self, spec: ExperimentSpec) -> None:
        """Every piece of data `spec` names: its dataset and its `train.init_from`."""
        if spec.dataset is not None:
            self.check_dataset(spec.dataset)
        if spec.train.init_from is not None:
            self.check_init_from(spec.train.init_from)

    def check_extend_dataset(self, value: str, field: str = "dataset") -> None:
        """`extend`'s new dataset: an uploaded dataset's id or a URL."""
        if re.fullmatch(DATASET_ID_PATTERN, value):
            self.check_dataset_id(value, field)
        else:
            self.check_url(value, field)
