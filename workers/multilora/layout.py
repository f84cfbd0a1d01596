"""Which rows of a batch belong to which adapter.

A fused batch is ordered adapter-major once, by the collator: every adapter owns one contiguous
block of rows (sequences), and rows with no adapter run the base model only. Every
`MultiLoRALinear` of a model reads the active layout from one shared `LayoutSlot`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    adapter: str | None  # None: base model only
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BatchLayout:
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        pos = 0
        seen: set[str] = set()
        for seg in self.segments:
            if seg.start != pos or seg.end < seg.start:
                raise ValueError(f"segments must tile the batch in order; got {self.segments}")
            if seg.adapter is not None:
                if seg.adapter in seen:
                    raise ValueError(f"adapter {seg.adapter!r} owns two blocks of rows")
                seen.add(seg.adapter)
            pos = seg.end

    @classmethod
    def from_row_adapters(cls, row_adapters: Sequence[str | None]) -> BatchLayout:
        """Build from one adapter name per row; each adapter's rows must already be contiguous."""
        segments: list[Segment] = []
        start = 0
        for i in range(1, len(row_adapters) + 1):
            if i == len(row_adapters) or row_adapters[i] != row_adapters[start]:
                segments.append(Segment(row_adapters[start], start, i))
                start = i
        return cls(tuple(segments))

    @classmethod
    def from_sizes(cls, sizes: Sequence[tuple[str | None, int]]) -> BatchLayout:
        segments, pos = [], 0
        for name, n in sizes:
            segments.append(Segment(name, pos, pos + n))
            pos += n
        return cls(tuple(segments))

    @property
    def num_rows(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def adapters(self) -> list[str]:
        return [s.adapter for s in self.segments if s.adapter is not None and s.size > 0]

    def rows_of(self, adapter: str) -> slice:
        for seg in self.segments:
            if seg.adapter == adapter:
                return slice(seg.start, seg.end)
        raise KeyError(adapter)


class LayoutSlot:
    """The active layout of one model, shared by all of its `MultiLoRALinear` layers.

    A plain attribute on a shared object rather than a contextvar or thread-local: autograd runs
    backward, and the re-forward of activation checkpointing, on threads of its own, and the
    layout must still be visible there. Keep the `use` block open until backward has finished.
    """

    def __init__(self) -> None:
        self.layout: BatchLayout | None = None

    @contextmanager
    def use(self, layout: BatchLayout | None) -> Iterator[None]:
        previous, self.layout = self.layout, layout
        try:
            yield
        finally:
            self.layout = previous
