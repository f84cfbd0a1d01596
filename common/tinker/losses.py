"""The closed set of Tinker loss functions the server runs, written once, torch-free.

Every user refers to these names: the API's protobuf decoding (`scheduler/api/tinker/wire.py`)
accepts exactly `LOSS_FNS`, the op runner (`workers/tinker/op_runner.py`) turns each into a
`ClientLoss`, and `workers/losses.py` computes it (`client_elementwise`). Adding a loss means one
entry here and its math in `workers/losses.py`; `tests/unit/test_tinker_closed_sets.py` checks
that nothing else spells the set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

LossFn = Literal["cross_entropy", "importance_sampling", "ppo"]
LOSS_FNS: tuple[str, ...] = get_args(LossFn)

# `loss_fn_config` keys each loss understands, with their defaults (Tinker's ppo clip thresholds)
PPO_CLIP_LOW, PPO_CLIP_HIGH = 0.8, 1.2
LOSS_CONFIG: Mapping[str, Mapping[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": PPO_CLIP_LOW, "clip_high_threshold": PPO_CLIP_HIGH},
}
# loss_fn_inputs each loss needs (a missing CE `weights` means all ones, as in Tinker's docs)
REQUIRED_INPUTS: Mapping[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
KNOWN_INPUTS = ("target_tokens", "weights", "logprobs", "advantages")
FLOAT_INPUTS = frozenset({"weights", "logprobs", "advantages"})
