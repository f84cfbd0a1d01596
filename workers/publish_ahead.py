"""`PublishAhead`: a train step's new versions are written while the next step is generated.

Publishing costs what the disk costs (the weights of every adapter of the batch, made durable
with one sync): on the CPU benchmark that was most of a worker's time outside generation and
training. It cannot be skipped — a commit names a durable version — but it need not idle the
worker. After the fused step, the versions are copied out of the trainer (`prepare`, on this
thread), then written on the publisher thread while this thread generates the next step of the
same experiments from the same in-memory weights. The commit still waits for the write. The
rollouts generated ahead count only for the steps that the train commits then claim here
(CLAIM_NEXT_ROLLOUTS, in the same round trip); the others are dropped. Generation is a pure
function of (weights, step), so a rollout generated ahead is exactly the one generated after
the commit would have been.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from lorafleet.common.state.protocol import StepItem
from lorafleet.workers.pipeline import RLStepPipeline, RolloutOutput
from lorafleet.workers.residency import ResidentAdapters


class PublishAhead:
    def __init__(self, adapters: ResidentAdapters, pipeline: RLStepPipeline) -> None:
        self.adapters = adapters
        self.pipeline = pipeline
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-publish")

    def publish_while_generating(self, stepped: list[StepItem], metrics: dict[str, dict[str, Any]],
                                 ) -> tuple[dict[str, bool], RolloutOutput | None]:
        """Publish version step+1 of `stepped` and generate their step+1 meanwhile ->
        (per experiment whether the store holds what memory holds, the rollouts generated
        ahead or None). Adds `publish_s` (the write) and `publish_wait_s` (the part of it this
        thread waited for after generating) to each item's `metrics`."""
        versions = self.adapters.prepare(stepped)
        t0 = time.perf_counter()

        def write() -> tuple[dict[str, bool], float]:
            in_memory = self.adapters.write(versions)
            return in_memory, time.perf_counter() - t0

        writing = self._writer.submit(write)
        ahead = None
        try:
            nxt = [replace(i, step=i.step + 1, token=0) for i in stepped if i.step + 1 < i.spec.steps]
            for item in nxt:  # hold the trained version: the rollout reuses it, no reload
                self.adapters.advance(item.exp_id, item.step)
            ahead = self.pipeline.rollout(nxt) if nxt else None
        finally:
            waited_from = time.perf_counter()
            in_memory, publish_s = writing.result()  # the commit needs the write, failed or not
        for item in stepped:
            metrics[item.exp_id].update(publish_s=publish_s, publish_wait_s=time.perf_counter() - waited_from)
        return in_memory, ahead

    def close(self) -> None:
        self._writer.shutdown(wait=True)
