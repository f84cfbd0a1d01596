"""`SharedGeneration`: client sample requests ride in the server-driven experiments' generation
batch (issue 13 item 7: "sampling requests of many models go into one generation batch with the
server-driven experiments'").

It wraps the RL pipeline's engine. Each `generate` of a rollout batch first claims the
client sample requests that wait (queued in `Keys.tk_samples`, or published by the leader in a
`SampleMessage` that no worker has claimed yet: both have status "queued"), up to
`max_sample_rows` sequences, prepares them with the worker's `ClientSampler` (adapters `exp@vK`
loaded), and runs the rollout rows and the client rows in ONE `engine.generate`; the client
results are committed right after, the rollout rows go back to the pipeline unchanged.

Exactly once: `OpStore.claim_samples` is fenced, so a request the leader also published is
claimed by one worker only (the other's claim is refused and its message is a no-op); claims are
renewed while the batch generates. A failed commit or generation leaves the claims to lapse: the
leader's reaper queues them again, and a re-run gives the same answer (samples are a function of
weights, request and seed). A client request never fails the rollout batch.

Torch or vLLM: on vLLM the sampler syncs each client version as its own route `exp@vK`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from lorafleet.common.keys import Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.tinker.op_store import OpStore, SampleJob
from lorafleet.workers.leases import renewing
from lorafleet.workers.rollout import RolloutRequest, Sample
from lorafleet.workers.tinker.sampling import ClientSampler

log = get_logger("lorafleet.worker.shared_generation")

SCAN = 512  # waiting request ids read per batch (the rows bound cuts them further)


class SharedGeneration:
    def __init__(self, inner: Any, sampler: ClientSampler, r: redis.Redis, ops: OpStore, *,
                 max_rows: int) -> None:
        self.inner = inner  # the pipeline's engine: TorchRolloutEngine or VLLMRolloutEngine
        self.sampler = sampler
        self.r = r
        self.ops = ops
        self.max_rows = max_rows
        self.shared = 0  # generate calls that carried client rows (tests, logs)

    def __getattr__(self, name: str) -> Any:  # max_model_len and the rest: the inner engine's
        return getattr(self.inner, name)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        jobs = self._claim() if requests else []
        if not jobs:
            return self.inner.generate(requests)
        s = self.sampler
        with renewing(lambda: self.ops.renew_samples(jobs, s.lease_ms), s.lease_ms, "lorafleet-shared-lease"):
            try:
                results, runnable = s.prepare(jobs)
            except Exception as exc:  # noqa: BLE001 - the claims lapse and are run elsewhere
                log.warning("client samples not prepared: left to their leases", error=repr(exc)[:300])
                return self.inner.generate(requests)
            out, client = s.generate([req for _, req in runnable], requests, self.inner)  # ONE call
            self.shared += 1
            try:
                s.finish(jobs, results, runnable, client)
            except Exception as exc:  # noqa: BLE001 - the same
                log.warning("client samples not committed: left to their leases", error=repr(exc)[:300])
        log.debug("client samples in a rollout batch", rollout_requests=len(requests),
                  client_requests=len(jobs))
        return out

    def _claim(self) -> list[SampleJob]:
        """Claim waiting client requests, up to `max_rows` sequences ([] on any Redis trouble:
        the leader's own sample batches serve them then)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.zrange(Keys.tk_samples, 0, SCAN - 1)
            pipe.zrange(Keys.tk_samples_running, 0, SCAN - 1)
            waiting, published = pipe.execute()
            rids = list(dict.fromkeys([*waiting, *published]))
            if not rids:
                return []
            pipe = self.r.pipeline(transaction=False)
            for rid in rids:
                pipe.hget(Keys.tk_future(rid), "status")
                pipe.get(Keys.tk_payload(rid))
            got = pipe.execute()
            picked, rows = [], 0
            for rid, status, payload in zip(rids, got[0::2], got[1::2], strict=True):
                if status != "queued" or payload is None:
                    continue
                n = max(1, int((json.loads(payload) or {}).get("num_samples") or 1))
                if picked and rows + n > self.max_rows:
                    break
                picked.append(rid)
                rows += n
            return self.ops.claim_samples(picked, self.sampler.worker, self.sampler.lease_ms)
        except (redis.RedisError, ValueError, TypeError, AttributeError) as exc:
            log.warning("could not claim client samples for a rollout batch", error=repr(exc)[:300])
            return []
