"""Celery message bodies: IDs and versions only, never tensors or code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafleet.common.ids import validate_id

Phase = Literal["rollout", "train", "ops"]  # ops: client-driven models (common/client_ops.py)


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exp_id: str
    step: int = Field(ge=0)  # the step, and the committed adapter version it starts from

    @field_validator("exp_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return validate_id(v, "experiment id")


class BatchMessage(BaseModel):
    """One Celery message = one mixed-adapter batch = one ack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    phase: Phase
    node: str | None = None  # the node whose queue carries it (train affinity)
    epoch: int = Field(ge=0)  # scheduler leadership epoch that published it
    items: tuple[BatchItem, ...] = Field(min_length=1, max_length=4096)


class SampleMessage(BaseModel):
    """One Celery message = one generation batch of client sample requests (`lf.sample_batch`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    epoch: int = Field(ge=0)
    request_ids: tuple[str, ...] = Field(min_length=1, max_length=4096)
