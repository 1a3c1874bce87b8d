"""`python -m llm_activations export saelens SRC DEST --layer L`: a SAELens activation cache.

SAELens (6.x) trains from a cache when `use_cached_activations=True` and
`cached_activations_path=DEST`: it calls `datasets.load_from_disk(DEST)`, takes the column named
after the TransformerLens hook (`cfg.hook_name`), an `Array2D(context_size, d_in)` per row, and
`token_ids` (int32 [context_size]) if present, and reads rows in order. This writes that folder:

* rows are `--context-size` consecutive stored tokens of the layer (default: the extraction's
  seq_len), in file order, so a row is mostly one packed sequence; the last partial row is left out;
* the rows are then shuffled globally (a uniform permutation, with bounded memory: pass 1 deals
  each row to a random bucket file of at most ~256 MiB, pass 2 permutes each bucket in memory
  and writes it as one Arrow file of the folder);
* the reader's token filter applies (`--max-norm-ratio`, default the readers' 10; `none` keeps
  every token), so the cache holds what `iter_numpy_batches` would deliver;
* the folder appears at DEST only when complete: it is written into a hidden sibling
  `.DEST.tmp-<pid>-<random>` and renamed (with `--overwrite`, the old DEST is removed after the
  rename succeeded). An error or Ctrl-C removes the sibling; a killed process (SIGKILL) leaves it,
  to be deleted by hand. DEST is a local folder (a URL exits 2).

TransformerLens names (the column): resid_pre -> blocks.L.hook_resid_pre, attn_out -> hook_attn_out,
z -> blocks.L.attn.hook_z (flattened head-major, as SAELens flattens hook_z), resid_mid ->
hook_resid_mid, mlp_out -> hook_mlp_out, resid_post -> hook_resid_post, and mlp_in ->
blocks.L.ln2.hook_normalized: TransformerLens' own `hook_mlp_in` is the MLP block's input before
ln2 (resid_mid), while ours is the normalised input, RMSNorm weight applied (TransformerLens folds
that weight into W_in by default, so its hook_normalized differs from ours by that per-dimension scale).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid

import numpy as np

from llm_activations.errors import UsageError
from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import norms
from llm_activations.format import records

TL_NAMES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "z": "blocks.{layer}.attn.hook_z",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
DTYPES = {"float32": np.float32, "float16": np.float16}
BUCKET_BYTES = 256 << 20  # rows held in memory at once by pass 2 (about one bucket)


def tl_name(hook: str, layer: int) -> str:
    """The TransformerLens hook name SAELens calls the column: blocks.L.hook_<name> (module doc)."""
    return TL_NAMES[hook].format(layer=layer)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["saelens"], help="what to write: saelens (a SAELens cached-activations folder)")
    p.add_argument("src", metavar="SRC", help="llm-activations dataset folder")
    p.add_argument("dest", metavar="DEST", help="output folder (created; must be empty or absent unless --overwrite)")
    p.add_argument("--layer", type=int, required=True, help="layer to export")
    p.add_argument("--hook", default=hk.DEFAULT, help=f"hook point to export ({', '.join(hk.HOOKS)}); default resid_post")
    p.add_argument("--context-size", type=int, default=None, help="tokens per row (default: the extraction's seq_len)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the cached activations")
    p.add_argument("--max-norm-ratio", default=str(norms.DEFAULT_MAX_NORM_RATIO),
                   help="drop tokens above this x the median norm, as the readers do; 'none' keeps every token")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ratio(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--max-norm-ratio {text!r}: give a number above 1, or none") from None
    try:
        norms.check_ratio(value)
    except ValueError as e:
        raise UsageError(f"--max-norm-ratio: {e}") from None
    return value


def check_dest(dest: str, overwrite: bool) -> None:
    if fileio.is_url(dest):  # datasets' load_from_disk of a cache wants a local folder; so does the atomic rename
        raise UsageError(f"DEST {dest} is a URL; export writes a local folder (copy it to the bucket afterwards)")
    if os.path.isfile(dest):
        raise UsageError(f"DEST {dest} is a file; give a folder")
    if os.path.isdir(dest) and os.listdir(dest) and not overwrite:
        raise UsageError(f"DEST {dest} is not empty; give --overwrite to replace it, or another folder")


def run(args: argparse.Namespace) -> int:
    from llm_activations.reader import layer_spec

    hk.check_hooks([args.hook], option="--hook")
    if args.context_size is not None and args.context_size < 1:
        raise UsageError(f"--context-size must be >= 1 token, got {args.context_size}")
    ratio = _ratio(args.max_norm_ratio)
    spec = layer_spec(args.src, args.layer, hook=args.hook)  # a missing layer or hook: one line listing those there are
    meta = md.read_metadata(args.src)
    context = args.context_size or int(meta["extraction"]["seq_len"])
    check_dest(args.dest, args.overwrite)
    summary = export_saelens(spec, args.dest, context_size=context, dtype=args.dtype, max_norm_ratio=ratio,
                             seed=args.seed, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def export_saelens(spec, dest: str, *, context_size: int, dtype: str = "float32", max_norm_ratio=norms.DEFAULT_MAX_NORM_RATIO,
                   seed: int = 0, progress: bool = True) -> dict:
    """Write the SAELens cache of one (hook, layer) at dest (module doc); returns counts for the log line."""
    parent = os.path.dirname(os.path.abspath(dest)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(dest))}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        summary = _write(spec, tmp, context_size, np.dtype(DTYPES[dtype]), max_norm_ratio, seed, progress)
        _commit(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dest": dest, "column": tl_name(spec.hook, spec.layer), **summary}


def _commit(tmp: str, dest: str) -> None:
    """Put the finished folder at dest: a rename, so dest is the old folder or the new one, never half."""
    old = None
    if os.path.lexists(dest):
        old = f"{tmp}.old"
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write(spec, folder: str, context: int, dtype: np.dtype, max_norm_ratio, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    from llm_activations.reader import iter_numpy_batches

    width = spec.hidden_size
    row_bytes = context * (width * dtype.itemsize + 4)
    rows_per_bucket = max(1, BUCKET_BYTES // row_bytes)
    num_buckets = max(1, math.ceil(max(1, spec.tokens // context) / rows_per_bucket))
    rng = np.random.default_rng([seed, 1])
    buckets = [_Bucket(os.path.join(folder, f"bucket-{b:05d}")) for b in range(num_buckets)]
    rows_per_read = max(1, (64 << 20) // row_bytes)  # ~64 MiB of rows per reader batch
    # Every batch but the last holds whole rows (batch_size is a multiple of context); the last one's
    # partial row is left out (counted in the summary).
    batches = iter_numpy_batches(spec.root, spec.layer, rows_per_read * context, hook=spec.hook, shuffle_buffer=0,
                                 with_metadata=True, drop_remainder=False, max_norm_ratio=max_norm_ratio, cycle_length=1)
    bar = tqdm(total=spec.tokens, unit="tok", unit_scale=True, desc="export pass 1/2 (deal rows)", disable=not progress)
    try:
        for batch in batches:
            acts, ids = batch[records.ACTIVATIONS], batch["token_ids"]
            bar.update(len(acts))
            n = len(acts) // context
            if n:
                acts = acts[: n * context].reshape(n, context * width)
                if acts.dtype != dtype:
                    acts = acts.astype(dtype)
                ids = ids[: n * context].astype(np.int32).reshape(n, context)
                assign = rng.integers(num_buckets, size=n)
                for b in np.unique(assign):
                    buckets[b].append(acts, ids, np.flatnonzero(assign == b))
            del batch, acts, ids
    finally:
        bar.close()
    stats = batches.stats
    total_rows = sum(b.rows for b in buckets)
    if not total_rows:
        raise UsageError(f"{spec.root}: {spec.hook} at layer {spec.layer} has {stats.delivered_tokens} tokens to export, "
                         f"fewer than one row of --context-size {context}")
    column = tl_name(spec.hook, spec.layer)
    files = _write_buckets(folder, buckets, context, width, dtype, column, rng, progress)
    _write_dataset_files(folder, files, context, width, dtype, column)
    return {"rows": total_rows, "context_size": context, "d_in": width, "dtype": dtype.name,
            "stored_tokens": stats.stored_tokens, "dropped_tokens": stats.dropped_tokens,
            "exported_tokens": total_rows * context, "tokens_left_out": stats.delivered_tokens - total_rows * context,
            "files": len(files)}


class _Bucket:
    """One temporary bucket of pass 1: its rows' activations and token ids, appended to two files.

    Files are opened per reader batch, not held open: a large export has thousands of buckets, more
    than a process may hold open. Rows are written one by one from the reader's batch (a row is a
    contiguous view, so there is no gather copy)."""

    def __init__(self, prefix: str):
        self.paths = (f"{prefix}.acts", f"{prefix}.ids")
        self.rows = 0

    def append(self, acts: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        for path, data in zip(self.paths, (acts, ids)):
            with open(path, "ab") as f:
                for r in rows:
                    f.write(memoryview(data[r]))
        self.rows += len(rows)

    def read_into(self, acts: np.ndarray, ids: np.ndarray) -> None:
        """Fill [rows, ...] arrays with the bucket's rows, then delete its files."""
        for path, out in zip(self.paths, (acts, ids)):
            with open(path, "rb", buffering=0) as f:
                view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError(f"{path}: bucket file shorter than the rows written to it")
                    got += n
            os.unlink(path)


def _write_buckets(folder: str, buckets: list, context: int, width: int, dtype: np.dtype, column: str, rng,
                   progress: bool) -> list[str]:
    """Pass 2: each bucket's rows in a uniformly random order, as one Arrow file of the dataset.

    Two buffers of the largest bucket's size serve every bucket (read, then gathered in permuted
    order): fresh arrays per bucket were fresh zero-filled pages, which cost more than the copies."""
    import pyarrow as pa
    from tqdm import tqdm

    features = _features(context, width, dtype, column)
    schema = features.arrow_schema
    most = max(b.rows for b in buckets)
    raw_acts, acts = np.empty((most, context * width), dtype), np.empty((most, context * width), dtype)
    raw_ids, ids = np.empty((most, context), np.int32), np.empty((most, context), np.int32)
    full = [b for b in buckets if b.rows]
    names = []
    bar = tqdm(total=sum(b.rows for b in full), unit="row", desc="export pass 2/2 (shuffle, write)", disable=not progress)
    for i, b in enumerate(full):
        n = b.rows
        b.read_into(raw_acts[:n], raw_ids[:n])
        perm = rng.permutation(n)
        np.take(raw_acts[:n], perm, axis=0, out=acts[:n], mode="clip")  # "raise" would buffer a whole extra copy
        np.take(raw_ids[:n], perm, axis=0, out=ids[:n], mode="clip")
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * context + 1, dtype=np.int32) * width),
                                         pa.array(acts[:n].reshape(-1)))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, dtype=np.int32) * context), inner)
        table = pa.Table.from_arrays([pa.ExtensionArray.from_storage(schema.field(column).type, outer),
                                      pa.FixedSizeListArray.from_arrays(pa.array(ids[:n].reshape(-1)), context)],
                                     schema=schema)
        name = f"data-{i:05d}-of-{len(full):05d}.arrow"
        # the Arrow IPC stream that datasets' ArrowWriter writes and load_from_disk maps (schema with features)
        with pa.OSFile(os.path.join(folder, name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table, max_chunksize=max(1, (64 << 20) // (context * (width * dtype.itemsize + 4))))
        names.append(name)
        bar.update(n)
        del table, inner, outer
    bar.close()
    for b in buckets:  # buckets that stayed empty
        for path in b.paths:
            if os.path.exists(path):
                os.unlink(path)
    return names


def _features(context: int, width: int, dtype: np.dtype, column: str):
    from datasets import Array2D, Features, Sequence, Value

    return Features({column: Array2D(shape=(context, width), dtype=dtype.name),
                     "token_ids": Sequence(Value("int32"), length=context)})


def _write_dataset_files(folder: str, files: list[str], context: int, width: int, dtype: np.dtype, column: str) -> None:
    """state.json and dataset_info.json, as Dataset.save_to_disk writes them (what load_from_disk reads)."""
    from datasets import DatasetInfo

    DatasetInfo(features=_features(context, width, dtype, column)).write_to_directory(folder)
    state = {"_data_files": [{"filename": f} for f in files], "_fingerprint": uuid.uuid4().hex[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
