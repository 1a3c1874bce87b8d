"""Tokens -> segments -> rows -> fixed-shape batches. Pure NumPy, no Beam, no JAX.

docs/FORMAT.md ("Tokens, segments and rows"): a document longer than seq_len is split into
consecutive segments of at most seq_len tokens; every segment is an independent context
(positions restart at 0, attention never crosses segments).
`pack` mode places segments into rows by best-fit decreasing over a whole work unit, which leaves
very little padding without cutting any segment at a row boundary; `pad` mode gives each segment a
row of its own. Rows are grouped into batches of exactly batch_size rows; the last batch of a unit
is completed with empty rows, so the model sees one shape only.

With `--prepend`, every segment (a long document's continuation segments included) starts with a
context token the model sees at position 0 but that is never stored: a segment then holds at most
seq_len - 1 document tokens. A Batch keeps two layouts of its rows: `model_inputs`, what the model
runs on (prepended tokens in place), and its own arrays, the stored tokens only, a prefix of each
row, which the extractor's outputs follow (model/extractor.py compacts them the same way).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Segment:
    doc_index: int
    start: int  # index of the first token in the document's token list
    tokens: np.ndarray  # int32 [n], the stored tokens; n + (prepend is not None) <= seq_len
    prepend: int | None = None  # context token id the model sees first (position 0), never stored

    @property
    def row_length(self) -> int:
        """Row positions the segment takes: its tokens plus its prepended token."""
        return len(self.tokens) + (self.prepend is not None)


@dataclass(frozen=True)
class Batch:
    """One fixed-shape model step. All arrays [batch_size, seq_len] int32 unless noted; they describe
    the stored tokens (a prefix of each row), and model_inputs what the model runs on."""

    tokens: np.ndarray
    segment_ids: np.ndarray  # 1.. per segment within a row; 0 = padding
    positions: np.ndarray  # the position id the model gave each stored token
    doc_index: np.ndarray  # int64
    token_index: np.ndarray  # int64
    lengths: np.ndarray  # [batch_size] real tokens per row (a prefix of the row)
    unit: int = 0
    index: int = 0  # batch number within the unit
    # (tokens, segment_ids, positions) with the prepended tokens in place; None: the arrays above
    model_inputs: tuple | None = None

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def inputs(self) -> tuple:
        """(tokens, segment_ids, positions) for Extractor.dispatch."""
        return self.model_inputs if self.model_inputs is not None else (self.tokens, self.segment_ids, self.positions)


def split_document(doc_index: int, tokens: np.ndarray, seq_len: int, prepend: int | None = None) -> list[Segment]:
    """Consecutive segments of at most seq_len tokens (seq_len - 1 and the prepended token each,
    with prepend); nothing is dropped."""
    step = seq_len - (prepend is not None)
    return [Segment(doc_index, s, tokens[s : s + step], prepend) for s in range(0, len(tokens), step)]


def pack_rows(lengths: list[int], seq_len: int, mode: str) -> list[list[int]]:
    """Assign segments (by position in `lengths`) to rows; returns each row's segment indices.

    pack: best-fit decreasing - longest segment first, each into the fullest row it still fits,
    a new row when none fits. Deterministic: ties break by segment order.
    """
    if mode == "pad":
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free slots, row id)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    for row in rows:  # within a row keep document order: easier to read back
        row.sort()
    return rows


def make_batches(segments: list[Segment], rows: list[list[int]], batch_size: int, seq_len: int,
                 unit: int = 0) -> Iterator[Batch]:
    """Fixed-shape batches from packed rows; the last one is filled with empty rows."""
    for b, first in enumerate(range(0, len(rows), batch_size)):
        shape = (batch_size, seq_len)
        tokens = np.zeros(shape, np.int32)
        seg_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        doc_index = np.zeros(shape, np.int64)
        token_index = np.zeros(shape, np.int64)
        lengths = np.zeros(batch_size, np.int64)
        batch_rows = rows[first : first + batch_size]
        prepends = any(segments[i].prepend is not None for row in batch_rows for i in row)
        model = tuple(np.zeros(shape, np.int32) for _ in range(3)) if prepends else None
        for r, row in enumerate(batch_rows):
            at = m = 0  # next stored column, next model column
            for sid, i in enumerate(row, start=1):
                seg = segments[i]
                n, first_pos = len(seg.tokens), int(seg.prepend is not None)
                sl = slice(at, at + n)
                tokens[r, sl] = seg.tokens
                seg_ids[r, sl] = sid
                positions[r, sl] = np.arange(first_pos, first_pos + n)
                doc_index[r, sl] = seg.doc_index
                token_index[r, sl] = np.arange(seg.start, seg.start + n)
                at += n
                if model is not None:
                    ml = slice(m, m + seg.row_length)
                    if first_pos:
                        model[0][r, m] = seg.prepend
                    model[0][r, m + first_pos : m + seg.row_length] = seg.tokens
                    model[1][r, ml] = sid
                    model[2][r, ml] = np.arange(seg.row_length)
                    m += seg.row_length
            lengths[r] = at
        yield Batch(tokens, seg_ids, positions, doc_index, token_index, lengths, unit, b, model)
