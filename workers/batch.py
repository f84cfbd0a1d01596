"""Rows of a fused train batch and the collator that orders them adapter-major."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.workers.multilora.layout import BatchLayout


@dataclass(frozen=True)
class TrainRow:
    """One sequence (prompt + completion) of one adapter.

    `loss_mask[i] = 1` marks token i as trained (its prediction from the prefix is scored);
    `old_logprobs[i]` is the rollout policy's logprob of token i (position 0 unused). Without
    old logprobs the step is on-policy (ratio 1).
    """

    adapter: str
    input_ids: Sequence[int]
    loss_mask: Sequence[int]
    advantage: float = 0.0
    old_logprobs: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) < 2 or len(self.loss_mask) != len(self.input_ids):
            raise ValueError("a row needs >= 2 tokens and one loss_mask entry per token")
        if self.old_logprobs is not None and len(self.old_logprobs) != len(self.input_ids):
            raise ValueError("old_logprobs needs one entry per token")


@dataclass(frozen=True)
class ClientRow:
    """One client (Tinker) datum as a row: position i of `tokens` predicts `targets[i]`.

    Tinker datums arrive pre-shifted (`model_input` and `target_tokens` of equal length), so
    nothing is shifted here. `weights` feed cross_entropy (None: all 1); `advantages` and
    `sampling_logprobs` (the sampler's logprob of targets[i]) feed importance_sampling/ppo.
    """

    adapter: str
    op_key: str
    tokens: Sequence[int]
    targets: Sequence[int]
    weights: Sequence[float] | None = None
    advantages: Sequence[float] | None = None
    sampling_logprobs: Sequence[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 1 or len(self.targets) != n:
            raise ValueError(f"op {self.op_key}: a datum needs >= 1 token and one target per "
                             f"token (got {n} tokens, {len(self.targets)} targets)")
        for name in ("weights", "advantages", "sampling_logprobs"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"op {self.op_key}: {name} has {len(v)} entries, the datum "
                                 f"has {n} tokens")


@dataclass
class FusedBatch:
    layout: BatchLayout
    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T-1) float: 1 where target token t+1 is trained
    advantages: torch.Tensor  # (B,) float
    old_logprobs: torch.Tensor | None  # (B, T-1) float, aligned with targets
    # client (Tinker) batches only: explicit per-position targets and loss inputs, all (B, T)
    # and aligned with input_ids (position t predicts targets[:, t]); zero in padding
    targets: torch.Tensor | None = None  # (B, T) long
    token_weights: torch.Tensor | None = None  # (B, T) float (1 where a datum had none)
    token_advantages: torch.Tensor | None = None  # (B, T) float
    sampling_logprobs: torch.Tensor | None = None  # (B, T) float
    row_op: torch.Tensor | None = None  # (B,) long: index into op_keys
    row_ids: torch.Tensor | None = None  # (B,) long: index of the row in the collator's input
    op_keys: tuple[str, ...] = ()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> FusedBatch:
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, dtype)

        def i(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return FusedBatch(
            self.layout,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device, dtype),
            self.advantages.to(device, dtype),
            f(self.old_logprobs),
            i(self.targets), f(self.token_weights), f(self.token_advantages),
            f(self.sampling_logprobs), i(self.row_op), i(self.row_ids), self.op_keys,
        )


def collate(
    rows: Sequence[TrainRow],
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    adapter_order: Sequence[str] | None = None,
) -> FusedBatch:
    """Order rows adapter-major (adapters by name unless `adapter_order` is given, rows of one
    adapter in their given order) and right-pad. Right padding keeps every real token's
    position id, so padding changes nothing for real tokens."""
    if not rows:
        raise ValueError("empty batch")
    rank = {a: i for i, a in enumerate(adapter_order or sorted({r.adapter for r in rows}))}
    rows = sorted(rows, key=lambda r: rank[r.adapter])  # stable: keeps each adapter's row order
    width = max(len(r.input_ids) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=dtype)
    old = torch.zeros((b, width), dtype=dtype)
    has_old = [r.old_logprobs is not None for r in rows]
    if any(has_old) and not all(has_old):
        raise ValueError("either every row carries old_logprobs or none does")
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(r.loss_mask, dtype=dtype)
        if r.old_logprobs is not None:
            old[i, :n] = torch.tensor(r.old_logprobs, dtype=dtype)
    return FusedBatch(
        layout=BatchLayout.from_row_adapters([r.adapter for r in rows]),
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask[:, 1:],  # token 0 is never predicted
        advantages=torch.tensor([r.advantage for r in rows], dtype=dtype),
        old_logprobs=old[:, 1:] if all(has_old) else None,
    )


def collate_client(
    rows: Sequence[ClientRow],
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    adapter_order: Sequence[str] | None = None,
) -> FusedBatch:
    """Client rows -> one fused batch: adapter-major (as `collate`), right-padded, each row
    tagged with its op (`row_op` indexes `op_keys`, ops in first-seen order) and its index in
    `rows` (`row_ids`), so results map back to each op's datums in their given order."""
    if not rows:
        raise ValueError("empty batch")
    rank = {a: i for i, a in enumerate(adapter_order or sorted({r.adapter for r in rows}))}
    order = sorted(range(len(rows)), key=lambda i: rank[rows[i].adapter])  # stable
    op_keys = tuple(dict.fromkeys(r.op_key for r in rows))
    op_index = {k: i for i, k in enumerate(op_keys)}
    width = max(len(r.tokens) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    weights = torch.zeros((b, width), dtype=dtype)
    adv = torch.zeros((b, width), dtype=dtype)
    sampled = torch.zeros((b, width), dtype=dtype)
    for i, j in enumerate(order):
        r, n = rows[j], len(rows[j].tokens)
        input_ids[i, :n] = torch.tensor(list(r.tokens), dtype=torch.long)
        targets[i, :n] = torch.tensor(list(r.targets), dtype=torch.long)
        attention[i, :n] = 1
        weights[i, :n] = 1.0 if r.weights is None else torch.tensor(list(r.weights), dtype=dtype)
        if r.advantages is not None:
            adv[i, :n] = torch.tensor(list(r.advantages), dtype=dtype)
        if r.sampling_logprobs is not None:
            sampled[i, :n] = torch.tensor(list(r.sampling_logprobs), dtype=dtype)
    return FusedBatch(
        layout=BatchLayout.from_row_adapters([rows[j].adapter for j in order]),
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=attention[:, 1:].to(dtype),  # unused by client losses (they use attention)
        advantages=torch.zeros(b, dtype=dtype),
        old_logprobs=None,
        targets=targets,
        token_weights=weights,
        token_advantages=adv,
        sampling_logprobs=sampled,
        row_op=torch.tensor([op_index[rows[j].op_key] for j in order], dtype=torch.long),
        row_ids=torch.tensor(order, dtype=torch.long),
        op_keys=op_keys,
    )


def micro_batches(batch: FusedBatch, max_tokens: int | None) -> list[FusedBatch]:
    """Split a fused batch into micro-batches of at most `max_tokens` tokens each, counted as
    rows x padded width of the micro-batch (a single longer row is a micro-batch of its own).

    Rows are packed longest first, so rows of similar length share a micro-batch and each
    micro-batch is trimmed to its own longest row (right padding: trimming changes nothing for
    real tokens). Within a micro-batch rows keep their batch order, which is adapter-major, so
    every micro-batch gets its own layout; one adapter's rows may span several micro-batches.
    Rows without an adapter train nothing and are dropped. `max_tokens=None`: one micro-batch.
    """
    row_adapter, lengths = row_adapters(batch.layout), row_lengths(batch)
    return [take_rows(batch, group, row_adapter, lengths)
            for group in micro_batch_groups(batch, max_tokens, row_adapter, lengths)]


def row_adapters(layout: BatchLayout) -> list[str | None]:
    """(B,) the adapter of each row."""
    out: list[str | None] = [None] * layout.num_rows
    for seg in layout.segments:
        out[seg.start:seg.end] = [seg.adapter] * seg.size
    return out


def row_lengths(batch: FusedBatch) -> list[int]:
    """(B,) real tokens per row; checks that the rows are right-padded."""
    lengths_t = batch.attention_mask.sum(dim=1)  # (B,) real tokens per row
    positions = torch.arange(batch.attention_mask.shape[1], device=lengths_t.device)  # (T,)
    if not torch.equal(positions[None, :] < lengths_t[:, None], batch.attention_mask.bool()):
        raise ValueError("micro-batching needs right-padded rows (as `collate` makes them)")
    return lengths_t.tolist()


def micro_batch_groups(batch: FusedBatch, max_tokens: int | None,
                       row_adapter: Sequence[str | None] | None = None,
                       lengths: Sequence[int] | None = None) -> list[list[int]]:
    """`micro_batches`' plan: the batch rows of each micro-batch, in batch order."""
    row_adapter = row_adapters(batch.layout) if row_adapter is None else row_adapter
    lengths = row_lengths(batch) if lengths is None else lengths
    rows = [i for i in range(len(lengths)) if row_adapter[i] is not None]
    groups: list[list[int]] = []
    for i in sorted(rows, key=lambda i: -lengths[i]):  # stable: ties keep batch order
        width = lengths[groups[-1][0]] if groups else 0  # the group's first row is its longest
        if groups and (max_tokens is None or (len(groups[-1]) + 1) * width <= max_tokens):
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        group.sort()  # back to batch order: adapter-major, each adapter one contiguous block
    return groups


def take_rows(batch: FusedBatch, group: Sequence[int], row_adapter: Sequence[str | None],
              lengths: Sequence[int]) -> FusedBatch:
    """The micro-batch of `batch`'s rows `group` (in batch order), trimmed to its longest row."""
    idx = torch.tensor(list(group), device=batch.input_ids.device)
    w = max(lengths[i] for i in group)  # trim padding to this micro-batch's longest row

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[idx, :w]  # (b, w): client tensors, aligned with ids

    return FusedBatch(
        layout=BatchLayout.from_row_adapters([row_adapter[i] for i in group]),
        input_ids=batch.input_ids[idx, :w],  # (b, w)
        attention_mask=batch.attention_mask[idx, :w],  # (b, w)
        loss_mask=batch.loss_mask[idx, :w - 1],  # (b, w-1)
        advantages=batch.advantages[idx],  # (b,)
        old_logprobs=None if batch.old_logprobs is None else batch.old_logprobs[idx, :w - 1],
        targets=cut(batch.targets),
        token_weights=cut(batch.token_weights),
        token_advantages=cut(batch.token_advantages),
        sampling_logprobs=cut(batch.sampling_logprobs),
        row_op=None if batch.row_op is None else batch.row_op[idx],
        row_ids=None if batch.row_ids is None else batch.row_ids[idx],
        op_keys=batch.op_keys,
    )


def planned_micro_batches(batch: FusedBatch, max_tokens: int | None,
                          chunk_tokens: int) -> tuple[list[FusedBatch], dict[str, dict]]:
    """`micro_batches`, and per adapter the shapes its rows ran in (`step_layouts`)."""
    row_adapter, lengths = row_adapters(batch.layout), row_lengths(batch)
    groups = micro_batch_groups(batch, max_tokens, row_adapter, lengths)
    return ([take_rows(batch, g, row_adapter, lengths) for g in groups],
            step_layouts(batch, groups, chunk_tokens, row_adapter, lengths))


def step_layouts(batch: FusedBatch, groups: Sequence[Sequence[int]], chunk_tokens: int,
                 row_adapter: Sequence[str | None], lengths: Sequence[int]) -> dict[str, dict]:
    """Per adapter, the shapes its rows ran in: what a replay needs to redo its arithmetic bit
    for bit (workers/replay.py). An adapter's float results depend on its micro-batches' widths,
    on its rows' places in them (the GEMM kernels round the last M % 4 rows of a matrix their own
    way; logprob chunks start at fixed flat positions), on whether any row is padded (the
    attention mask is skipped when none is) and on how its rows were split; never on the other
    rows' values. Each micro-batch: [rows, width, offset of the adapter's first row, padded 0/1,
    the adapter's rows in it as indices into its own rows]."""
    out: dict[str, dict] = {}
    for group in groups:
        width = max(lengths[i] for i in group)
        padded = int(any(lengths[i] < width for i in group))
        for seg in BatchLayout.from_row_adapters([row_adapter[i] for i in group]).segments:
            if seg.adapter is None:
                continue
            first = batch.layout.rows_of(seg.adapter).start
            rows = [group[j] - first for j in range(seg.start, seg.end)]
            entry = out.setdefault(seg.adapter, {"chunk": chunk_tokens, "micro_batches": []})
            entry["micro_batches"].append([len(group), width, seg.start, padded, rows])
    return out
