"""Synthetic activation datasets, written exactly as the extraction pipeline writes them.

The downstream tools (reader, validate, inspect, the SAE example) are built and tested against
these folders while the real pipeline is developed beside them. Shards are written with the real
records.ShardWriter / records.encode_example and metadata.json follows docs/FORMAT.md, with stats
computed by stats.Moments over the *stored* (rounded) values.

Activations have structure an SAE can learn: each token is a sparse non-negative combination of
`k_active` atoms from a per-layer dictionary, plus a per-layer mean offset and a little noise.
Documents have random lengths, are split into segments of at most seq_len tokens and packed
greedily (several segments per row in "pack" mode, one per row in "pad" mode).
"""

from __future__ import annotations

import math

import numpy as np

from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format.dtypes import numpy_dtype
from llm_activations.format import records
from llm_activations.format.stats import Moments

VOCAB_SIZE = 1000


def _segments(doc_lengths: np.ndarray, seq_len: int):
    """(doc_index, first token_index, length) of every segment, in document order."""
    for d, n in enumerate(doc_lengths):
        for start in range(0, int(n), seq_len):
            yield d, start, min(seq_len, int(n) - start)


def _rows(doc_lengths: np.ndarray, seq_len: int, mode: str) -> list[list[tuple[int, int, int]]]:
    rows, row, used = [], [], 0
    for seg in _segments(doc_lengths, seq_len):
        if row and (mode == "pad" or used + seg[2] > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(seg)
        used += seg[2]
    if row:
        rows.append(row)
    return rows


def make_dataset(
    root: str,
    *,
    layers=(1, 3),
    hidden_size: int = 16,
    dtype: str = "bfloat16",
    num_docs: int = 40,
    seq_len: int = 64,
    compression: str = "none",
    num_shards: int = 2,
    seed: int = 0,
    mode: str = "pack",
    mean_doc_len: int | None = None,
    num_atoms: int | None = None,
    k_active: int = 4,
    noise: float = 0.05,
    signal: str = "sparse",
    tokenizer: str = "synthetic-tokenizer",
    hooks=hk.DEFAULT_HOOKS,
    z_width: int | None = None,
    pairs: tuple = (),
    scale: float = 1.0,
) -> dict:
    """Write a finished dataset folder at root and return its metadata dict.

    signal="sparse": sparse dictionary structure (learnable); "noise": i.i.d. Gaussian (fast, for
    benchmarks at large hidden sizes). hooks: hook points written at every layer (each its own
    data; z is z_width wide, default 2 x hidden_size); any hook besides resid_post makes a
    format_version 2 dataset. pairs: (source, target) hooks where target = tanh(source @ W) with a
    fixed W per layer (a learnable map, as a transcoder's MLP). scale multiplies every value before
    the cast (e.g. past float16's 65504, as an overflowing model would).
    """
    rng = np.random.default_rng(seed)
    np_dtype = numpy_dtype(dtype)
    mean_doc_len = mean_doc_len or max(2, (3 * seq_len) // 4)
    doc_lengths = rng.integers(1, 2 * mean_doc_len, size=num_docs)
    doc_tokens = [rng.integers(0, VOCAB_SIZE, size=int(n)) for n in doc_lengths]
    rows = _rows(doc_lengths, seq_len, mode)
    num_shards = max(1, min(num_shards, len(rows)))
    bounds = np.linspace(0, len(rows), num_shards + 1).round().astype(int)

    num_atoms = num_atoms or 4 * hidden_size
    hooks = hk.check_hooks(hooks)
    widths = {h: (z_width or 2 * hidden_size) if h == "z" else hidden_size for h in hooks}
    keys = [(h, layer) for h in hooks for layer in layers]
    targets = {t: s for s, t in pairs}
    dictionaries, offsets, maps = {}, {}, {}
    for i, (hook, layer) in enumerate(keys):
        # resid_post keeps the seeds it always had (datasets of other tests stay the same)
        lrng = np.random.default_rng([seed, layer] if hook == hk.DEFAULT else [seed, layer, 1 + i])
        atoms = lrng.standard_normal((num_atoms, widths[hook])).astype(np.float32)
        dictionaries[(hook, layer)] = atoms / np.linalg.norm(atoms, axis=1, keepdims=True) * math.sqrt(widths[hook])
        offsets[(hook, layer)] = lrng.standard_normal(widths[hook]).astype(np.float32) * 0.5
        maps[(hook, layer)] = lrng.standard_normal((hidden_size, widths[hook])).astype(np.float32) / math.sqrt(hidden_size)

    files = {hk.key(*k): [] for k in keys}
    shards, moments = [], {k: Moments.empty(widths[k[0]]) for k in keys}
    total_tokens = 0
    for s in range(num_shards):
        writers = {}
        for hook, layer in keys:
            rel = records.shard_relpath(layer, s, num_shards, compression, hook=hook)
            files[hk.key(hook, layer)].append(rel)
            writers[(hook, layer)] = records.ShardWriter(fileio.join(root, rel), compression)
        for row in rows[bounds[s] : bounds[s + 1]]:
            ints = {
                "doc_index": np.concatenate([np.full(n, d) for d, _, n in row]),
                "token_index": np.concatenate([np.arange(t, t + n) for _, t, n in row]),
                "position": np.concatenate([np.arange(n) for _, _, n in row]),
            }
            ints["token_ids"] = np.concatenate([doc_tokens[d][t : t + n] for d, t, n in row])
            n = len(ints["token_ids"])
            total_tokens += n
            row_values = {}
            for hook, layer in sorted(keys, key=lambda k: k[0] in targets):  # sources before their targets
                w = widths[hook]
                if hook in targets:
                    source = row_values[(targets[hook], layer)].astype(np.float32)
                    x = np.tanh(source @ maps[(hook, layer)]) * math.sqrt(w) / 2
                elif signal == "sparse":
                    idx = rng.integers(0, num_atoms, size=(n, k_active))
                    mags = rng.exponential(1.0, size=(n, k_active)).astype(np.float32)
                    x = np.einsum("nk,nkh->nh", mags, dictionaries[(hook, layer)][idx]) + offsets[(hook, layer)]
                    x += noise * rng.standard_normal((n, w), dtype=np.float32)
                else:
                    x = rng.standard_normal((n, w), dtype=np.float32)
                stored = row_values[(hook, layer)] = (x * scale).astype(np_dtype)
                moments[(hook, layer)] = moments[(hook, layer)].merge(Moments.of(stored.astype(np.float32)))
                writers[(hook, layer)].write(records.encode_example(stored, **ints), n)
        for hook, layer in keys:
            desc = writers[(hook, layer)].close()
            shards.append({"path": files[hk.key(hook, layer)][s], **hk.shard_fields(hook, layer, hooks), **desc})
    tokens_per_layer = total_tokens
    num_segments = sum(len(r) for r in rows)

    meta = md.build_metadata(
        model={
            "name_or_path": "synthetic/model",
            "architecture": "Qwen2ForCausalLM",
            "model_type": "qwen2",
            "hidden_size": hidden_size,
            "num_layers": max(layers) + 1 if layers else 1,
            "config": {"hidden_size": hidden_size, "num_hidden_layers": max(layers) + 1 if layers else 1},
        },
        tokenizer={
            "name_or_path": tokenizer,
            "vocab_size": VOCAB_SIZE,
            "special_token_ids": {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0},
        },
        input={"patterns": ["synthetic"], "text_field": "text", "max_docs": None, "num_hosts": 1, "host_index": 0},
        extraction={
            "layers": list(layers),
            **hk.extraction_fields(hooks),
            "seq_len": seq_len,
            "batch_size": 8,
            "mode": mode,
            "compute_dtype": "bfloat16",
            "mesh": {"data": 1, "model": 1},
            "num_shards": num_shards,
        },
        dtype=dtype,
        hidden_size=hidden_size,
        compression=compression,
        shards=shards,
        counts={
            "documents": num_docs,
            "rejected": 0,
            "segments": num_segments,
            "sequences": len(rows),
            "batches": math.ceil(len(rows) / 8),
            "tokens": tokens_per_layer,
            "padding_tokens": len(rows) * seq_len - tokens_per_layer,
        },
        stats={hk.key(*k): moments[k].to_json() for k in keys},
        hook_widths=widths,
        run={
            "runner": "synthetic",
            "workers": 1,
            "compilations": 0,
            "wall_seconds": 0.0,
            "tokens_per_second": 0.0,
            "start_time": "2026-11-27T22:00:00Z",
            "end_time": "2026-11-27T22:00:00Z",
            "versions": {"llm_activations": "0.1.0"},
        },
    )
    assert meta["files"] == files
    md.write_metadata(root, meta)
    return meta


def read_all_rows(root: str, layer: int, hook: str = hk.DEFAULT) -> dict[str, np.ndarray]:
    """Every token of a hook at a layer straight from the shards (records.read_shard): the reference."""
    meta = md.read_metadata(root)
    dt, h = numpy_dtype(meta["dtype"]), md.hook_width(meta, hook)
    out = {k: [] for k in ("activations", *records.INT_FEATURES)}
    for rel in md.layer_files(meta, layer, hook):
        for data in records.read_shard(md.shard_path(root, rel)):
            ex = records.decode_example(data)
            out["activations"].append(records.decode_activations(ex, dt, h).astype(np.float32))
            for k in records.INT_FEATURES:
                out[k].append(ex[k])
    return {k: np.concatenate(v) for k, v in out.items()}
