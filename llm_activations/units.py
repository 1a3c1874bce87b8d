"""The host's work on one work unit, with no Beam: read -> tokenize -> segment -> pack -> batches.

transforms.py wraps these functions in DoFns; benchmarks and tests call them directly, so the
batches a benchmark feeds the model are the ones `extract` feeds it. The element types that flow
between the pipeline's steps live here too (plain data, cheap to pickle), and so do the two
things a worker loads once: the tokenizer and the extractor.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from llm_activations import inputs
from llm_activations import packing
from llm_activations.format import hooks as hk


# ----------------------------------------------------------------------------- elements


@dataclass
class UnitData:
    """A work unit on its way through read -> tokenize -> segment -> pack."""

    unit: inputs.WorkUnit
    docs: list = field(default_factory=list)  # [Document]
    tokens: list = field(default_factory=list)  # [(doc_index, int32 array)]
    segments: list = field(default_factory=list)  # [packing.Segment]
    rows: list = field(default_factory=list)  # [[segment position, ...]]
    counts: collections.Counter = field(default_factory=collections.Counter)
    rejected: list = field(default_factory=list)  # JSON lines for rejected/
    metrics: collections.Counter = field(default_factory=collections.Counter)  # Beam counters to add


@dataclass(frozen=True)
class UnitEnd:
    """Follows the last batch of a unit: its files can be closed and its manifest written.

    Batch fills in counts and rejected records; Extract adds the unit's per-(hook, layer) Moments.
    """

    unit: inputs.WorkUnit
    counts: dict
    rejected: list
    moments: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # the worker that made it (manifest "run"; see finalize_metadata)


@dataclass(frozen=True)
class Extracted:
    """A finished batch: its inputs and, per (hook, layer), the activations [B, T, width] in the
    storage dtype."""

    batch: packing.Batch
    activations: dict


@dataclass(frozen=True)
class PrepareSpec:
    """How a unit is read, tokenized and packed (plain data, cheap to pickle)."""

    text_field: str
    model: str
    seq_len: int
    mode: str
    num_hosts: int = 1
    host_index: int = 0
    prepend: int | None = None  # token id before every segment (--prepend), never stored


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its Extractor (plain data, cheap to pickle)."""

    model: str
    layers: tuple
    batch_size: int
    seq_len: int
    compute_dtype: str
    storage_dtype: str
    mesh_shape: tuple | None
    hooks: tuple = hk.DEFAULT_HOOKS
    compilation_cache: str | None = None  # folder, "none", or None for the default
    prepend: bool = False  # rows start each segment with a token that is not stored (--prepend)

    @classmethod
    def of(cls, cfg) -> "ModelSpec":
        """The worker's view of an ExtractConfig (the one place its fields are picked)."""
        return cls(cfg.model, tuple(cfg.layers), cfg.batch_size, cfg.seq_len, cfg.compute_dtype, cfg.dtype, cfg.mesh,
                   hooks=tuple(cfg.hooks), compilation_cache=cfg.compilation_cache,
                   prepend=cfg.prepend_token_id is not None)


# ----------------------------------------------------------------------------- read, tokenize, segment, pack


def read_documents(unit: inputs.WorkUnit, text_field: str, num_hosts: int = 1, host_index: int = 0) -> UnitData:
    """WorkUnit -> UnitData with its documents; unusable records are kept with their reason."""
    data = UnitData(unit)
    for item in inputs.read_unit(unit, text_field, num_hosts, host_index):
        if isinstance(item, inputs.Rejected):
            _reject(data, item)
        else:
            data.docs.append(item)
            data.metrics["documents_read"] += 1
    return data


TOKENIZER_BATCH = 256  # documents per tokenizer call: big enough for the Rust tokenizer's threads


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def encode(tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """tokenizer(text)["input_ids"] of each text, in batched calls of TOKENIZER_BATCH.

    A batched call runs the Rust tokenizer's encode_batch, which spreads the documents over the
    host's cores (unless TOKENIZERS_PARALLELISM=false) and releases the GIL meanwhile.
    """
    for i in range(0, len(texts), TOKENIZER_BATCH):
        yield from tokenizer(texts[i : i + TOKENIZER_BATCH])["input_ids"]


def _reject(data: UnitData, item) -> None:
    """Count and keep one unusable record: metadata counts and the Beam counter say the same."""
    data.counts["rejected"] += 1
    data.metrics["rejected"] += 1
    data.rejected.append(item.to_json())


def tokenize_unit(data: UnitData, tokenizer) -> UnitData:
    """Tokenizes a unit's documents: exactly tokenizer(text)["input_ids"] each. A document whose
    text encodes to no token is rejected (nothing to extract)."""
    docs = data.docs
    for doc, tok in zip(docs, encode(tokenizer, [d.text for d in docs])):
        if not tok:
            _reject(data, inputs.Rejected(doc.doc_index, "", "text encodes to zero tokens", doc.text[: inputs.EXCERPT]))
            continue
        data.tokens.append((doc.doc_index, np.asarray(tok, dtype=np.int32)))
        data.counts["documents"] += 1
        data.metrics["tokens_read"] += len(tok)
    data.docs = []  # the texts are no longer needed: keep a unit's memory to its tokens
    return data


def segment_unit(data: UnitData, seq_len: int, prepend: int | None = None) -> UnitData:
    """Split every document into consecutive segments of at most seq_len tokens (with prepend, each
    segment gets that token before it and holds seq_len - 1)."""
    segments = [s for doc_index, tok in data.tokens for s in packing.split_document(doc_index, tok, seq_len, prepend)]
    data.counts["segments"] += len(segments)
    return replace(data, tokens=[], segments=segments)


def pack_unit(data: UnitData, seq_len: int, mode: str) -> UnitData:
    """Place the unit's segments into rows (best-fit decreasing in pack mode, one per row in pad)."""
    rows = packing.pack_rows([s.row_length for s in data.segments], seq_len, mode)
    return replace(data, rows=rows)


def prepare_unit(unit: inputs.WorkUnit, spec: PrepareSpec, tokenizer) -> UnitData:
    """read -> tokenize -> segment -> pack: a unit ready to be cut into batches."""
    data = read_documents(unit, spec.text_field, spec.num_hosts, spec.host_index)
    return pack_unit(segment_unit(tokenize_unit(data, tokenizer), spec.seq_len, spec.prepend), spec.seq_len, spec.mode)


def unit_batches(data: UnitData, batch_size: int, seq_len: int) -> Iterator[packing.Batch]:
    """A packed unit's fixed-shape model batches, in row order; adds them to data.counts."""
    counts = data.counts
    for batch in packing.make_batches(data.segments, data.rows, batch_size, seq_len, data.unit.index):
        counts["batches"] += 1
        counts["sequences"] += int((batch.lengths > 0).sum())
        counts["tokens"] += batch.real_tokens
        counts["padding_tokens"] += batch.tokens.size - batch.real_tokens  # prepended tokens count here too
        yield batch


# ----------------------------------------------------------------------------- per-worker state


def load_extractor(spec: ModelSpec, factory=None):
    """The checkpoint's Extractor, or factory(spec) (a stand-in device: pipeline.run_extract's seam)."""
    if factory is not None:
        return factory(spec)
    from llm_activations.model.extractor import Extractor

    return Extractor(spec.model, layers=spec.layers, batch_size=spec.batch_size, seq_len=spec.seq_len,
                     compute_dtype=spec.compute_dtype, storage_dtype=spec.storage_dtype, mesh_shape=spec.mesh_shape,
                     hooks=spec.hooks, compilation_cache=spec.compilation_cache, prepend=spec.prepend)


def progress_bar():
    """A tokens/s progress line on stderr for local runs (one per worker process)."""
    if os.environ.get("LLM_ACTIVATIONS_NO_PROGRESS"):
        return None
    from tqdm import tqdm

    return tqdm(unit=" tok", unit_scale=True, desc="extract", mininterval=1.0, dynamic_ncols=True)
