"""A real S3-compatible server for tests: moto's standalone server (`python -m moto.server`, the
`moto_server` of PyPI's moto[server]) in a subprocess on a free local port, with a bucket.

Everything talks to it over HTTP through s3fs/botocore exactly as it would to S3; only the
credentials are dummies (moto accepts any)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The standard AWS environment a process needs to reach this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def url(self, prefix: str | None = None) -> str:
        """A fresh `s3://bucket/<prefix>` store URL (one per test: the bucket is shared)."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex}"

    def storage_options(self) -> dict[str, str]:
        return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str = "lorafleet-test") -> Iterator[S3Server]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto_server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited ({proc.returncode}): see {log.name}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing",
                          skip_instance_cache=True).mkdir(bucket)
        yield S3Server(endpoint, bucket)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
