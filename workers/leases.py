"""`renewing`: keep a claim's lease alive on a thread while its work runs (client ops and client
sample requests; a lease shorter than the work would lapse, the leader would publish the work
again and a second worker would run it while the first still does)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lorafleet.common.logging import get_logger

log = get_logger("lorafleet.worker.leases")


@contextmanager
def renewing(renew: Callable[[], object], lease_ms: int, name: str) -> Iterator[None]:
    """Call `renew` every third of a lease on a thread while the body runs (claims of ops and of
    sample requests: a lease shorter than the work would be reaped and the work run twice)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(lease_ms / 3000):
            try:
                renew()
            except Exception as exc:  # a lapsed lease is fenced at commit: nothing is lost
                log.warning("lease renewal failed", thread=name, error=repr(exc))

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
