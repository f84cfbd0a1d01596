"""The SSRF guard on http(s) datasets (common/data/http_guard.py), against real HTTP servers on loopback:
a dataset URL that reaches a loopback / private / link-local address is refused with the address
and why, by literal, by host name and through a redirect; the escape hatch reads the same URL; the
size and time limits hold; a refused connection says so (not "no such file")."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorafleet.common.data import datasets, http_guard
from lorafleet.common.data.datasets import DatasetError, DatasetLimits, load_dataset, open_filesystem
from lorafleet.common.data.http_guard import HttpPolicy, address_problem
from lorafleet.common.spec_input import AdmissionLimits, SpecError, parse_spec

ROWS = [{"prompt": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(5)]
OPEN = DatasetLimits(http=HttpPolicy(allow_private=True))  # LORAFLEET_HTTP_ALLOW_PRIVATE=1


class Handler(SimpleHTTPRequestHandler):
    """Files, with Range requests (as object stores and web servers answer them; http.server
    ignores them), redirects, and a slow path."""

    redirects: dict[str, str] = {}
    release = threading.Event()  # /slow answers once set
    ranges = True

    def _route(self) -> bool:
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        if self.path.startswith("/slow"):
            self.release.wait(60)
            with contextlib.suppress(OSError):  # the client gave up (its timeout): no one to answer
                self.send_error(503)
            return True
        wanted = self.headers.get("Range", "")
        file = Path(self.directory) / self.path.lstrip("/")
        if self.ranges and wanted.startswith("bytes=") and file.is_file():
            data = file.read_bytes()
            first, _, last = wanted[len("bytes="):].partition("-")
            start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data[start:end + 1])
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        if not self._route():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._route():
            super().do_HEAD()

    def log_message(self, *_args) -> None:
        pass


@contextmanager
def http_server(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    server = ThreadingHTTPServer((host, 0), partial(Handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        Handler.release.set()
        server.shutdown()
        server.server_close()
        Handler.release.clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
    datasets.clear_cache()
    Handler.redirects = {}
    yield
    datasets.clear_cache()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with http_server(tmp_path) as base:
        yield base


def spec_of(url: str) -> dict:
    return {"name": "h", "dataset": {"path": url}, "reward": {"fn": "numeric_match"}}


def refused(url: str, limits: AdmissionLimits | None = None) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_of(url), limits or AdmissionLimits())
    return str(info.value)


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "private"), ("100.64.0.1", "not globally routable"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("93.184.216.34", None), ("2606:4700::1111", None), ("::ffff:93.184.216.34", None),
])
def test_address_classes(address: str, kind: str | None) -> None:
    assert address_problem(address) == kind


def test_a_loopback_dataset_url_is_refused_by_literal_name_and_mapped_address(served: str) -> None:
    port = served.rsplit(":", 1)[1]
    url = f"{served}/train.jsonl"
    assert refused(url) == f"dataset.path: {url}: address 127.0.0.1 is loopback: refused"
    by_name = f"http://localhost:{port}/train.jsonl"
    assert "(host localhost) is loopback: refused" in refused(by_name)
    mapped = f"http://[0:0:0:0:0:ffff:7f00:1]:{port}/train.jsonl"  # IPv4-mapped IPv6: the same socket
    assert "address ::ffff:7f00:1 is loopback: refused" in refused(mapped)
    chained = f"simplecache::{url}"  # a chain's http layer goes through the guard too
    assert refused(chained) == f"dataset.path: {chained}: address 127.0.0.1 is loopback: refused"
    with pytest.raises(DatasetError, match="address 127.0.0.1 is loopback: refused"):
        load_dataset(url)  # a worker's load too
    # with the operator's escape hatch the same URLs are read, rows by ranged reads
    parse_spec(spec_of(url), AdmissionLimits(http_allow_private=True))
    for u in (url, by_name, mapped):
        ds = load_dataset(u, OPEN)
        assert [ds.raw_row(i) for i in range(len(ds))] == ROWS, u


def test_a_redirect_to_loopback_is_refused_at_its_connection(served: str, tmp_path: Path,
                                                              monkeypatch) -> None:
    """The first hop goes to 127.0.0.2, which this test declares public (the one thing patched:
    `address_problem` for that address); it redirects to the real loopback server. aiohttp follows
    redirects inside one request, so only a check at each connection catches the second hop."""
    real = http_guard.address_problem
    monkeypatch.setattr(http_guard, "address_problem", lambda a: None if a == "127.0.0.2" else real(a))
    port = served.rsplit(":", 1)[1]
    with http_server(tmp_path, host="127.0.0.2") as allowed:
        assert [load_dataset(f"{allowed}/train.jsonl").raw_row(i) for i in range(5)] == ROWS  # hop 1 ok
        datasets.clear_cache()
        Handler.redirects = {"/to-literal.jsonl": f"{served}/train.jsonl",
                             "/to-name.jsonl": f"http://localhost:{port}/train.jsonl"}
        assert (refused(f"{allowed}/to-literal.jsonl")
                == f"dataset.path: {allowed}/to-literal.jsonl: address 127.0.0.1 is loopback: refused")
        assert "(host localhost) is loopback: refused" in refused(f"{allowed}/to-name.jsonl")
        with pytest.raises(DatasetError, match="address 127.0.0.1 is loopback: refused"):
            load_dataset(f"{allowed}/to-literal.jsonl")
        # the same redirect is followed where private addresses are allowed
        ds = load_dataset(f"{allowed}/to-literal.jsonl", OPEN)
        assert [ds.raw_row(i) for i in range(len(ds))] == ROWS


def test_response_size_and_time_limits(served: str) -> None:
    url = f"{served}/train.jsonl"
    size = len("".join(json.dumps(r) + "\n" for r in ROWS))
    small = HttpPolicy(allow_private=True, max_response_bytes=size - 1)
    fs, path = open_filesystem(url, DatasetLimits(http=small))
    with pytest.raises(http_guard.ResponseTooLarge, match=f"larger than {size - 1} bytes"):
        fs.cat_file(path)  # a whole-body read: the guard's own count stops it
    with pytest.raises(DatasetError, match=f"{size} bytes, over the limit max_dataset_bytes={size - 1}"):
        load_dataset(url, DatasetLimits(max_bytes=size - 1, http=small))
    impatient = DatasetLimits(http=HttpPolicy(allow_private=True, timeout_s=0.5))
    with pytest.raises(DatasetError, match=r"slow.jsonl: timed out"):
        load_dataset(f"{served}/slow.jsonl", impatient)


def test_a_server_without_range_requests_is_refused_at_load(served: str, monkeypatch) -> None:
    monkeypatch.setattr(Handler, "ranges", False)
    with pytest.raises(DatasetError, match="the server ignores HTTP Range requests"):
        load_dataset(f"{served}/train.jsonl", OPEN)


def test_http_failures_name_the_real_cause(served: str) -> None:
    with http_server(Path("/nonexistent")) as closed:
        pass  # its port is closed now
    assert refused(f"{closed}/train.jsonl", AdmissionLimits(http_allow_private=True)) == (
        f"dataset.path: {closed}/train.jsonl: connection refused")
    assert refused(f"{served}/nope.jsonl", AdmissionLimits(http_allow_private=True)) == (
        f"dataset.path: {served}/nope.jsonl: HTTP 404 File not found")
