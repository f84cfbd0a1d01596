"""Tinker's client objectives (sums, no normalisation) against hand computations in plain
Python floats (math.exp), float64 tensors: tolerance 1e-12 (a few ulps of the ~1-10 values)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafleet.workers.batch import ClientRow, collate_client, micro_batches
from lorafleet.workers.losses import ClientLoss, chunked_token_logprobs, client_elementwise

LOGP = [[-0.5, -2.0, -0.1, -3.0], [-1.2, -0.7, -4.0, -0.05]]
Q = [[-0.6, -1.0, -0.3, -3.0], [-1.0, -0.9, -2.5, -0.2]]  # sampler logprobs
ADV = [[1.5, -2.0, 0.7, 0.0], [-1.0, 3.0, 2.0, -0.5]]
W = [[1.0, -0.5, 2.5, 0.0], [0.25, -3.0, 1.0, 7.0]]  # arbitrary floats, negative allowed


def run(loss: ClientLoss) -> list[list[float]]:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return client_elementwise(loss, t(LOGP), t(W), t(ADV), t(Q)).tolist()


def hand(fn) -> list[list[float]]:
    return [[fn(LOGP[i][j], Q[i][j], ADV[i][j], W[i][j]) for j in range(4)] for i in range(2)]


def close(a: list[list[float]], b: list[list[float]]) -> None:
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, abs=1e-12, rel=0)


def test_cross_entropy_is_minus_weight_times_logprob() -> None:
    close(run(ClientLoss("cross_entropy")), hand(lambda lp, q, a, w: -w * lp))
    # a negative weight flips the sign: the "loss" rewards lowering that token's logprob
    assert run(ClientLoss("cross_entropy"))[0][1] == pytest.approx(-1.0, abs=1e-15)


def test_importance_sampling_is_minus_ratio_times_advantage() -> None:
    close(run(ClientLoss("importance_sampling")), hand(lambda lp, q, a, w: -math.exp(lp - q) * a))


@pytest.mark.parametrize("low,high", [(0.8, 1.2), (0.5, 1.05)])
def test_ppo_is_the_pessimistic_clipped_surrogate(low: float, high: float) -> None:
    def ppo(lp: float, q: float, a: float, w: float) -> float:
        r = math.exp(lp - q)
        return -min(r * a, min(max(r, low), high) * a)

    got = run(ClientLoss("ppo", low, high))
    close(got, hand(ppo))
    # the data exercises both clip sides with both advantage signs (else this proves little)
    ratios = [math.exp(lp - q) for rl, rq in zip(LOGP, Q, strict=True)
              for lp, q in zip(rl, rq, strict=True)]
    assert any(r > high for r in ratios) and any(r < low for r in ratios)
    # r = e^-1 ~ 0.37 < low with A = -2: the clipped term is the min, so the loss is -clip*A
    assert got[0][1] == pytest.approx(-(low * -2.0), abs=1e-12)


def test_ppo_config_keys_and_defaults() -> None:
    assert ClientLoss.from_config("ppo", {}) == ClientLoss("ppo", 0.8, 1.2)
    assert ClientLoss.from_config("ppo", {"clip_low_threshold": 0.7,
                                          "clip_high_threshold": 1.3}) == ClientLoss("ppo", 0.7, 1.3)
    assert ClientLoss.from_config("cross_entropy", None).fn == "cross_entropy"
    with pytest.raises(ValueError, match="clip_eps"):
        ClientLoss.from_config("ppo", {"clip_eps": 0.2})
    with pytest.raises(ValueError, match="not understood"):
        ClientLoss.from_config("cross_entropy", {"clip_low_threshold": 0.7})
    with pytest.raises(ValueError, match="unsupported loss_fn 'dro'"):
        ClientLoss.from_config("dro", {})
    with pytest.raises(ValueError, match="clip_low_threshold <= clip_high_threshold"):
        ClientLoss("ppo", 1.3, 1.2)


def test_client_rows_need_one_target_and_input_per_token() -> None:
    with pytest.raises(ValueError, match="one target per token"):
        ClientRow("a", "op", [1, 2, 3], [2, 3])
    with pytest.raises(ValueError, match="weights has 2 entries"):
        ClientRow("a", "op", [1, 2, 3], [2, 3, 4], weights=[1.0, 1.0])
    ClientRow("a", "op", [7], [8])  # a single position is a datum (it predicts its target)


def test_explicit_targets_score_every_position_at_its_own_target() -> None:
    """Position t is scored at targets[t] (no shift, nothing dropped), chunked or not."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False).double()
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    direct = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    for chunk in (1, 3, 64):
        got = chunked_token_logprobs(hidden, head, ids, chunk, targets=targets)
        assert got.shape == (2, 5)
        assert (got - direct).abs().max().item() < 1e-12
    # without targets: the shifted next-token path, unchanged
    shifted = chunked_token_logprobs(hidden, head, ids, 3)
    ref = torch.log_softmax(head(hidden[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (shifted - ref).abs().max().item() < 1e-12


def test_collate_client_is_adapter_major_and_maps_rows_back() -> None:
    rows = [ClientRow("b", "op2", [1, 2, 3], [2, 3, 4], advantages=[1.0] * 3,
                      sampling_logprobs=[-1.0] * 3),
            ClientRow("a", "op1", [5, 6], [6, 7], weights=[0.5, -2.0]),
            ClientRow("b", "op2", [8], [9], advantages=[2.0], sampling_logprobs=[-0.5]),
            ClientRow("a", "op3", [4, 4, 4, 4], [1, 1, 1, 1])]
    batch = collate_client(rows, pad_id=0, dtype=torch.float64)
    assert batch.layout.adapters == ["a", "b"]
    assert batch.row_ids.tolist() == [1, 3, 0, 2]  # stable within an adapter
    assert batch.op_keys == ("op2", "op1", "op3")
    assert [batch.op_keys[k] for k in batch.row_op.tolist()] == ["op1", "op3", "op2", "op2"]
    assert batch.targets[0].tolist() == [6, 7, 0, 0]
    assert batch.token_weights[0].tolist() == [0.5, -2.0, 0.0, 0.0]
    assert batch.token_weights[1].tolist() == [1.0] * 4  # no weights given: 1
    assert batch.sampling_logprobs[3].tolist() == [-0.5, 0.0, 0.0, 0.0]
    # micro-batches carry every client tensor, trimmed to their own width
    seen = []
    for mb in micro_batches(batch, max_tokens=4):
        w = mb.input_ids.shape[1]
        for name in ("targets", "token_weights", "token_advantages", "sampling_logprobs"):
            assert getattr(mb, name).shape == (mb.input_ids.shape[0], w)
        for i, rid in enumerate(mb.row_ids.tolist()):
            n = len(rows[rid].tokens)
            assert mb.targets[i, :n].tolist() == list(rows[rid].targets)
            assert batch.op_keys[int(mb.row_op[i])] == rows[rid].op_key
            seen.append(rid)
    assert sorted(seen) == [0, 1, 2, 3]
