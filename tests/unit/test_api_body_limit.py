"""LORAFLEET_API_MAX_BODY_BYTES on a real uvicorn server, with raw HTTP/1.1 on a socket: a body
over the limit is 413 whether it declares its length or comes chunked, and the connection is
then either still usable or cleanly closed (never reset, never left hanging)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import redis
from tinker_kit import serve

from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore

LIMIT = 4096


def _request(path: str, key: str, chunks: list[bytes] | None = None, body: bytes | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n"
    if chunks is not None:
        data = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + data
    assert body is not None
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body with Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        assert got, f"connection closed before a response: {buf!r}"
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        got = sock.recv(65536)
        assert got, "connection closed inside a response body"
        rest += got
    return status, headers, rest[:length]


def _usable_or_closed(sock: socket.socket, headers: dict[str, str], key: str) -> str:
    """After the 413: a second request on the same connection is answered, or the server
    closed it cleanly (EOF, no reset) and said so."""
    if headers.get("connection", "").lower() == "close":
        sock.settimeout(30)
        rest = b""
        while got := sock.recv(65536):  # EOF, not ConnectionResetError
            rest += got
        return "closed"
    sock.sendall(f"GET /v1/experiments HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode())
    status, _, body = _read_response(sock)
    assert status == 200, body
    return "reused"


def test_bodies_over_the_limit_are_413_chunked_or_not(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    _, key = ApiKeyStore(r).create("u")
    settings = Settings(redis_url=redis_url, store_url=str(tmp_path / "s"), api_max_body_bytes=LIMIT)
    big = json.dumps({"name": "x" * (4 * LIMIT), "env": "char_class", "steps": 1}).encode()
    chunked = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    outcomes = set()
    with serve(create_app(settings, r)) as url:
        port = int(url.rsplit(":", 1)[1])
        cases = [("/v1/experiments", _request("/v1/experiments", key, chunks=chunked)),
                 ("/v1/validate", _request("/v1/validate", key, chunks=chunked)),
                 ("/v1/experiments", _request("/v1/experiments", key, body=big)),
                 ("/api/v1/create_session", _request("/api/v1/create_session", key, chunks=chunked))]
        for path, raw in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(raw)
                status, headers, body = _read_response(sock)
                assert status == 413, (path, status, body)
                answer = json.loads(body)
                if path.startswith("/api/v1"):
                    assert answer["category"] == "user" and "larger than the limit" in answer["error"]
                else:
                    assert answer["error"]["code"] == "payload_too_large", answer
                    assert "LORAFLEET_API_MAX_BODY_BYTES" in answer["error"]["message"]
                outcomes.add(_usable_or_closed(sock, headers, key))
        # a chunked body under the limit still goes through
        small = json.dumps({"name": "ok", "env": "char_class", "steps": 1}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(_request("/v1/validate", key, chunks=[small[:10], small[10:]]))
            status, _, body = _read_response(sock)
            assert status == 200, body
    assert outcomes == {"closed"}  # the rest of the body is never read: the 413 says Connection: close
