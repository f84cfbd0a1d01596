"""Guarded HTTP(S) reads for datasets named by `http://` / `https://` URLs (server-side request
forgery guard).

The API and the workers read datasets that users name, so an http URL must never reach the
fleet's own network: loopback (the API itself, Redis), private ranges (other hosts of the fleet),
link-local (cloud metadata at 169.254.169.254), multicast, reserved or unspecified addresses, in
IPv4 or IPv6 (an IPv4-mapped IPv6 address is judged as its IPv4 address).

The check sits where a connection is made, so nothing gets around it: fsspec's `HTTPFileSystem`
builds its aiohttp session through `guarded_client`, whose `TCPConnector` has

- a resolver that refuses a host name resolving to a forbidden address (a clear message naming the
  host), and
- a `socket_factory` that checks the address each socket is about to connect to. aiohttp hands
  literal IP hosts (`http://127.0.0.1/`) to the connector without calling the resolver, and
  follows redirects inside one request, so this is the check that covers every connection: the
  first hop, every redirect hop, literal or resolved. The socket connects to the very address
  checked (no second DNS lookup, so DNS rebinding between the check and the connect is moot).

Each response is capped at `max_response_bytes` (a trace counts the body's chunks) and each request
has connect and total timeouts. `trust_env=False`: no proxy from the environment (a proxy would
make the connection on our behalf, unchecked).

`allow_private` (`LORAFLEET_HTTP_ALLOW_PRIVATE=1`) turns the address check off for test fleets
whose dataset servers are on a private network; the limits stay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class AddressRefused(OSError):
    """A connection to a forbidden address; the message says which address and why."""


class ResponseTooLarge(OSError):
    """A response body over the byte limit."""


@dataclass(frozen=True)
class HttpPolicy:
    allow_private: bool = False  # LORAFLEET_HTTP_ALLOW_PRIVATE: test fleets on private networks
    connect_timeout_s: float = 10.0
    timeout_s: float = 300.0  # a whole request, body included
    max_response_bytes: int = 256 * 1024 * 1024


def address_problem(address: str) -> str | None:
    """Why `address` (an IP literal) may not be connected to, e.g. "loopback", or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of it
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for kind, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                      ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if hit:
            return kind
    if not ip.is_global:  # shared address space (100.64/10), 6to4/Teredo relays, ...
        return "not globally routable"
    return None


def check_address(address: str, host: str | None = None) -> None:
    """Raise AddressRefused if `address` is forbidden."""
    kind = address_problem(address)
    if kind is not None:
        via = f" (host {host})" if host and host != address else ""
        raise AddressRefused(f"address {address}{via} is {kind}: refused")


class GuardedResolver(AbstractResolver):
    """The threaded (getaddrinfo) resolver, refusing a name that resolves to a forbidden address.
    Every address is checked: a name with one public and one private address is refused, rather
    than left for the connector to pick from."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(result["host"], host)
        return results

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohappyeyeballs' socket factory: called for every address aiohttp connects to, resolved
    or literal, first hop or redirect."""
    family, type_, proto, _, address = addr_info
    check_address(str(address[0]))
    return socket.socket(family=family, type=type_, proto=proto)


def _size_trace(max_bytes: int) -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_chunk(_session: Any, ctx: Any, params: aiohttp.TraceResponseChunkReceivedParams) -> None:
        ctx.received = getattr(ctx, "received", 0) + len(params.chunk)
        if ctx.received > max_bytes:
            raise ResponseTooLarge(f"response is larger than {max_bytes} bytes: refused")

    trace.on_response_chunk_received.append(on_chunk)
    return trace


async def guarded_client(policy: HttpPolicy, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session that connects only to allowed addresses, within the policy's limits
    (fsspec's `get_client` hook: it passes `loop` and the filesystem's `client_kwargs`)."""
    kwargs.pop("loop", None)  # the session binds the running loop (fsspec runs this on its loop)
    if policy.allow_private:
        connector = aiohttp.TCPConnector()
    else:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(), socket_factory=guarded_socket)
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s, sock_connect=policy.connect_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 trace_configs=[_size_trace(policy.max_response_bytes)], **kwargs)


def http_storage_options(policy: HttpPolicy) -> dict[str, Any]:
    """fsspec storage options for `HTTPFileSystem` that route every connection through the guard."""
    return {"get_client": partial(guarded_client, policy)}


def describe_http_failure(exc: BaseException) -> str | None:
    """A short cause for an aiohttp failure anywhere in `exc`'s chain, or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AddressRefused | ResponseTooLarge):
            return str(e)
        text = str(e)
        if isinstance(e, OSError) and text.endswith(": refused") and "address " in text:
            return text[text.index("address "):]  # aiohappyeyeballs joined several attempts' errors
        if isinstance(e, aiohttp.ClientResponseError):
            return f"HTTP {e.status} {e.message}".strip()
        if isinstance(e, aiohttp.TooManyRedirects):
            return "too many redirects"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, aiohttp.ClientConnectorError):
            if isinstance(e.os_error, ConnectionRefusedError):
                return "connection refused"
            stack.append(e.os_error)
            continue
        if isinstance(e, asyncio.TimeoutError | TimeoutError):
            return "timed out"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host ({e.strerror})"
        stack.extend([e.__cause__, e.__context__])
    return None
