"""Celery message bodies: IDs and versions only, never tensors or code.

Every string is an ID of the strict pattern of `common/ids.py` (at most ID_MAX_LEN characters),
every list bounded: a body a lorafleet sender never writes (a 20 MB `batch_id`) is refused by the
broker transport's screen, and no field can make a log line or a dead-letter record large."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafleet.common.ids import ID_MAX_LEN, validate_id
from lorafleet.common.state.phases import BatchPhase

MAX_ITEMS = 4096  # per message: far above max_batch_rows / max_sample_rows
MAX_STEP = 2**53  # a JSON number every reader keeps exact


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exp_id: str = Field(max_length=ID_MAX_LEN)
    step: int = Field(ge=0, le=MAX_STEP)  # the step, and the committed adapter version it starts from

    @field_validator("exp_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return validate_id(v, "experiment id")


class BatchMessage(BaseModel):
    """One Celery message = one mixed-adapter batch = one ack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str = Field(max_length=ID_MAX_LEN)
    phase: BatchPhase  # a step phase, or ops: client-driven models (common/state/phases.py)
    node: str | None = Field(default=None, max_length=ID_MAX_LEN)  # whose queue carries it (train affinity)
    epoch: int = Field(ge=0, le=MAX_STEP)  # scheduler leadership epoch that published it
    items: tuple[BatchItem, ...] = Field(min_length=1, max_length=MAX_ITEMS)

    @field_validator("batch_id")
    @classmethod
    def _batch_id(cls, v: str) -> str:
        return validate_id(v, "batch id")

    @field_validator("node")
    @classmethod
    def _node(cls, v: str | None) -> str | None:
        return None if v is None else validate_id(v, "node name")


class SampleMessage(BaseModel):
    """One Celery message = one generation batch of client sample requests (`lf.sample_batch`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str = Field(max_length=ID_MAX_LEN)
    epoch: int = Field(ge=0, le=MAX_STEP)
    request_ids: tuple[str, ...] = Field(min_length=1, max_length=MAX_ITEMS)

    @field_validator("batch_id")
    @classmethod
    def _batch_id(cls, v: str) -> str:
        return validate_id(v, "batch id")

    @field_validator("request_ids")
    @classmethod
    def _request_ids(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for rid in v:
            validate_id(rid, "request id")
        return v
