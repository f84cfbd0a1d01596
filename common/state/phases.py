"""The phase machine of an experiment: its statuses, the phases of a step, and which follows which.

This is the one place the closed sets are written; every user imports them from here (the
message schema's `BatchPhase`, the record's `Status`/`Phase`, the ready index's zsets, the
scheduler's backlog, and the Lua scripts through `LUA_NAMES`). `tests/unit/test_closed_sets.py`
checks that no other module spells them again.

Statuses (the `status` field of `lf:exp:<id>`), moved only by the step protocol's Lua scripts
(`common/state/protocol_lua.py`):

    queued --ACTIVATE--> running --COMMIT_TRAIN of the last step--> completed --EXTEND--> running
    queued | running --FINISH (poison cap, cancel)--> failed | cancelled
    running --GIVE_UP_ATTEMPT (max_attempts counted failures)--> failed

A terminal experiment holds no work and is out of `lf:active`; only a completed one may be
extended (continual learning), which makes it running again.

Phases (the `phase` field) of a running RL experiment's step, in order: `rollout` (generate and
score a group per prompt) then `train` (one optimizer step on the committed rollout). Committing
a phase moves to the next one (COMMIT_ROLLOUT: rollout -> train, same step; COMMIT_TRAIN: train
-> rollout of step + 1, a new adapter version). A client-driven model (`kind == "client"`, the
Tinker endpoint) has no step phases: its batches travel as the message-only phase `ops`.
"""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
ACTIVE: tuple[Status, ...] = ("queued", "running")
TERMINAL: tuple[Status, ...] = ("completed", "failed", "cancelled")
# status -> the statuses a script may move it to (see the diagram above)
STATUS_MOVES: dict[Status, tuple[Status, ...]] = {
    "queued": ("running", "failed", "cancelled"),
    "running": ("completed", "failed", "cancelled"),
    "completed": ("running",),
    "failed": (),
    "cancelled": (),
}
EXTENDABLE: tuple[Status, ...] = ("queued", "running", "completed")  # what EXTEND accepts

Phase = Literal["rollout", "train"]
PHASES: tuple[Phase, ...] = get_args(Phase)  # a step's phases, in order
FIRST_PHASE: Phase = PHASES[0]  # a new experiment's, and every step's after a train commit
LAST_PHASE: Phase = PHASES[-1]  # its commit ends the step (step + 1)
# phase -> the phase its commit moves to (from the last one: the first of the next step)
NEXT_PHASE: dict[Phase, Phase] = {p: PHASES[(i + 1) % len(PHASES)] for i, p in enumerate(PHASES)}

OPS: Literal["ops"] = "ops"  # the batches of client-driven models (common/tinker/op_store.py)
BatchPhase = Literal[Phase, "ops"]  # what a `BatchMessage` carries
BATCH_PHASES: tuple[BatchPhase, ...] = get_args(BatchPhase)

# The phase names as Lua templates spell them ('$rollout', '$train'), rendered by `LuaNames`
# (common/redis/lua.py): a script never writes a phase name literally, and a misspelt one raises.
LUA_NAMES: dict[str, str] = {p: p for p in PHASES}
