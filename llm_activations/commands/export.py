"""`python -m llm_activations export saelens SRC DEST --layer L`: a SAELens activation cache.

SAELens (6.x) trains from a cache when `use_cached_activations=True` and
`cached_activations_path=DEST`: it calls `datasets.load_from_disk(DEST)`, takes the column named
after the TransformerLens hook (`cfg.hook_name`), an `Array2D(context_size, d_in)` per row, and
`token_ids` (int32 [context_size]) if present, and reads rows in order. This writes that folder:

* rows are `--context-size` consecutive stored tokens of the layer (default: the extraction's
  seq_len), in file order, so a row is mostly one packed sequence; the last partial row is left out;
* the rows are then shuffled globally (a uniform permutation, with bounded memory: pass 1 deals
  each row to a random bucket file of at most ~256 MiB, pass 2 maps each bucket, permutes it and
  writes it as one Arrow file of the folder, ~64 MiB record batch by record batch, two buckets at
  once on two threads). Buckets hold the stored dtype where it is narrower than --dtype (bf16
  shards, float32 cache: half the temporary bytes; pass 1 reads the shards without widening them,
  pass 2 widens exactly). Pass 1's bucket writes run on a helper thread while the next batch is
  read, and `datasets` is imported in the background meanwhile;
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
import functools
import json
import math
import os
import shutil
import uuid

import numpy as np

from llm_activations import argtypes
from llm_activations.errors import UsageError
from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import norms
from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype

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
BUCKET_BYTES = 256 << 20  # rows of one temporary bucket file (pass 2 maps one at a time)
BATCH_BYTES = 64 << 20  # float32 rows per reader batch (pass 1), output rows per Arrow record batch (pass 2)
ROW_BY_ROW_BYTES = 1 << 20  # rows at least this big are converted one by one in pass 2 (see _gather)
IOV_MAX = 1024  # buffers per writev: Linux's limit
PASS2_WRITERS = 2  # buckets written at once in pass 2 (this machine has 2 cores)


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
    p.add_argument("--max-norm-ratio", type=argtypes.norm_ratio, default=str(norms.DEFAULT_MAX_NORM_RATIO),
                   help="drop tokens above this x the median norm, as the readers do; 'none' keeps every token")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    spec = layer_spec(args.src, args.layer, hook=args.hook)  # a missing layer or hook: one line listing those there are
    meta = md.read_metadata(args.src)
    context = args.context_size or int(meta["extraction"]["seq_len"])
    check_dest(args.dest, args.overwrite)
    summary = export_saelens(spec, args.dest, context_size=context, dtype=args.dtype, max_norm_ratio=args.max_norm_ratio,
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


def _import_in_background(module: str) -> None:
    """Start importing module on a daemon thread. Why: `datasets` takes ~1 s to import and is needed
    only in pass 2, so the import overlaps pass 1 (an import error surfaces at the real import)."""
    import importlib
    import threading

    def work():
        try:
            importlib.import_module(module)
        except Exception:  # the caller's own import raises it, in its thread
            pass

    threading.Thread(target=work, daemon=True, name=f"import-{module}").start()


def _write(spec, folder: str, context: int, dtype: np.dtype, max_norm_ratio, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    from llm_activations.reader import Batches, ReaderOptions, pass_over

    _import_in_background("datasets")
    width = spec.hidden_size
    stored = numpy_dtype(spec.dtype)
    held = bucket_dtype(stored, dtype)
    row_bytes = context * (width * held.itemsize + 4)
    rows_per_bucket = max(1, BUCKET_BYTES // row_bytes)
    num_buckets = max(1, math.ceil(max(1, spec.tokens // context) / rows_per_bucket))
    rng = np.random.default_rng([seed, 1])
    buckets = [_Bucket(os.path.join(folder, f"bucket-{b:05d}")) for b in range(num_buckets)]
    rows_per_read = max(1, BATCH_BYTES // (context * width * 4))
    # The buckets hold the stored dtype: the reader delivers it as stored (widening to float32 to
    # narrow right back cost ~0.3-0.5 CPU s/GiB). Else (float16 output) two reused buffers: one
    # being narrowed while the other's rows are written (fresh pages cost more than copies).
    as_stored = held == stored
    narrowed = None if as_stored or held == np.float32 else [np.empty((rows_per_read, context * width), held)
                                                              for _ in range(2)]
    # Every batch but the last holds whole rows (batch_size is a multiple of context); the last one's
    # partial row is left out (counted in the summary).
    opts = ReaderOptions(rows_per_read * context, hook=spec.hook, shuffle_buffer=0, with_metadata=True,
                         drop_remainder=False, max_norm_ratio=max_norm_ratio, cycle_length=1)
    batches = Batches(*pass_over((spec,), opts, widen=not as_stored), lambda b: b)
    bar = tqdm(total=spec.tokens, unit="tok", unit_scale=True, desc="export pass 1/2 (deal rows)", disable=not progress)
    try:
        with _OneInFlight() as writes:
            for i, batch in enumerate(batches):
                acts, ids = batch[records.ACTIVATIONS], batch["token_ids"]
                bar.update(len(acts))
                n = len(acts) // context
                if n:
                    acts = acts[: n * context].reshape(n, context * width)
                    if narrowed is not None:
                        acts = _convert(acts, narrowed[i % 2][:n])
                    ids = ids[: n * context].astype(np.int32).reshape(n, context)
                    writes.submit(_deal, buckets, acts, ids, rng.integers(num_buckets, size=n))
                del batch, acts, ids
    finally:
        bar.close()
    stats = batches.stats
    total_rows = sum(b.rows for b in buckets)
    if not total_rows:
        raise UsageError(f"{spec.root}: {spec.hook} at layer {spec.layer} has {stats.delivered_tokens} tokens to export, "
                         f"fewer than one row of --context-size {context}")
    column = tl_name(spec.hook, spec.layer)
    files = _write_buckets(folder, buckets, context, width, held, dtype, column, rng, progress)
    _write_dataset_files(folder, files, context, width, dtype, column)
    return {"rows": total_rows, "context_size": context, "d_in": width, "dtype": dtype.name,
            "stored_tokens": stats.stored_tokens, "dropped_tokens": stats.dropped_tokens,
            "exported_tokens": total_rows * context, "tokens_left_out": stats.delivered_tokens - total_rows * context,
            "files": len(files)}


def _deal(buckets: list, acts: np.ndarray, ids: np.ndarray, assign: np.ndarray) -> None:
    """Append row r of the batch to bucket assign[r]: one writev per bucket that got rows."""
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(len(buckets) + 1))
    for b in np.flatnonzero(np.diff(bounds)):
        buckets[b].append(acts, ids, order[bounds[b]:bounds[b + 1]])


class _OneInFlight:
    """Runs the writes on one helper thread, at most one at a time, while the caller prepares the
    next batch into the other of two buffers (file writes, NumPy and Arrow release the GIL, so reading,
    converting and writing overlap on two cores). submit() waits for the previous write first, so a
    buffer is reused only after its write finished; leaving the block waits for the last one, and a
    write's error is raised in the caller."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool, self._pending = ThreadPoolExecutor(1, thread_name_prefix="export-write"), None
        return self

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def bucket_dtype(stored: np.dtype, out: np.dtype) -> np.dtype:
    """The dtype rows wait in between the two passes: the stored one where it is narrower than the
    output's (every value the reader delivers is exact in it, so widening at the end gives the same
    numbers, and the bucket files are half the bytes), else the output's (narrowed once, in pass 1)."""
    return stored if stored.itemsize < out.itemsize else out


def _convert(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = src in out's dtype. bfloat16 -> float32 is ml_dtypes' cast, the reader's own (exact;
    measured 0.12 CPU s/GiB stored against 0.22 for a uint16 -> uint32 copy and shift)."""
    np.copyto(out, src, casting="unsafe")
    return out


class _Bucket:
    """One temporary bucket of pass 1: its rows' activations and token ids, appended to two files.

    Files are opened per reader batch, not held open: a large export has thousands of buckets, more
    than a process may hold open. A batch's rows of a bucket go in one writev of row views (a row
    is contiguous, so there is no gather copy and no Python call per row)."""

    def __init__(self, prefix: str):
        self.paths = (f"{prefix}.acts", f"{prefix}.ids")
        self.rows = 0

    def append(self, acts: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        for path, data in zip(self.paths, (acts, ids)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # as open(): the umask decides (the file may become an Arrow file)
            try:
                raw = data.view(np.uint8)  # bytes: bfloat16 has no buffer-protocol format
                views = [memoryview(raw[r]) for r in rows]
                for i in range(0, len(views), IOV_MAX):
                    _writev_all(fd, views[i:i + IOV_MAX])
            finally:
                os.close(fd)
        self.rows += len(rows)

    def open(self, row_elems: int, dtype: np.dtype, context: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's rows, mapped (pass 2 gathers straight from the page cache: no read copy)."""
        acts = np.memmap(self.paths[0], dtype=dtype, mode="r", shape=(self.rows, row_elems))
        ids = np.fromfile(self.paths[1], dtype=np.int32).reshape(-1, context)
        if len(ids) != self.rows:
            raise OSError(f"{self.paths[1]}: bucket file holds {len(ids)} rows, {self.rows} were written to it")
        return acts, ids

    def remove(self) -> None:
        for path in self.paths:
            if os.path.exists(path):
                os.unlink(path)


def _writev_all(fd: int, views: list) -> None:
    """writev until every byte of views is written (a writev may write less than asked)."""
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views[0] = views[0][n:]


def _write_buckets(folder: str, buckets: list, context: int, width: int, held: np.dtype, dtype: np.dtype, column: str,
                   rng, progress: bool) -> list[str]:
    """Pass 2: each bucket's rows in a uniformly random order, as one Arrow file of the dataset.

    The bucket is mapped and gathered in permuted order, a record batch (~64 MiB) at a time, into
    buffers reused for every batch (fresh pages cost more than the copies), widened to the output
    dtype on the way where it was held narrower, and written as one Arrow IPC record batch.
    PASS2_WRITERS buckets are written at once, each by its own thread: one bucket at a time kept
    about one core busy (the page-cache writes of the float32 output are most of pass 2). The
    permutations are drawn in bucket order first, so the files do not depend on the threads."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    full = [b for b in buckets if b.rows]
    perms = [rng.permutation(b.rows) for b in full]
    names = [f"data-{i:05d}-of-{len(full):05d}.arrow" for i in range(len(full))]
    bar = tqdm(total=sum(b.rows for b in full), unit="row", desc="export pass 2/2 (shuffle, write)", disable=not progress)
    todo = iter(range(len(full)))  # shared by the writers: next() on a range iterator is atomic under the GIL
    failed: list = []
    write = functools.partial(_write_some, folder, full, perms, names, todo, failed, bar, context, width, held, dtype,
                              column)
    try:
        with ThreadPoolExecutor(PASS2_WRITERS, thread_name_prefix="export-pass2") as ex:
            futures = [ex.submit(write) for _ in range(min(PASS2_WRITERS, len(full)))]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # an error or Ctrl-C: the other writers stop after their current bucket
                failed.append(True)
                raise
    finally:
        bar.close()
    for b in buckets:  # buckets that stayed empty
        b.remove()
    return names


def _write_some(folder: str, full: list, perms: list, names: list, todo, failed: list, bar, context: int, width: int,
                held: np.dtype, dtype: np.dtype, column: str) -> None:
    """One pass-2 writer: buckets from todo until none is left (or another writer failed), each as
    its Arrow file, with this writer's own reused buffers."""
    import pyarrow as pa

    schema = _features(context, width, dtype, column).arrow_schema
    row_elems = context * width
    chunk = max(1, BATCH_BYTES // (row_elems * dtype.itemsize))
    # one of each: the other writer keeps the second core busy (two per writer were 2x the fresh
    # pages, which cost more than the overlap gained)
    out = np.empty((chunk, row_elems), dtype)
    staged = np.empty((chunk, row_elems), held) if held != dtype and row_elems * dtype.itemsize < ROW_BY_ROW_BYTES else None
    ids = np.empty((chunk, context), np.int32)
    inner_offsets = pa.array(np.arange(0, chunk * context + 1, dtype=np.int32) * width)
    outer_offsets = pa.array(np.arange(0, chunk + 1, dtype=np.int32) * context)
    spent = None  # the activations file of this writer's last bucket: its next Arrow file is written over it
    try:
        for i in todo:
            if failed:
                return
            b = full[i]
            src_acts, src_ids = b.open(row_elems, held, context)
            perm = perms[i]
            path = os.path.join(folder, names[i])
            # Overwriting a spent bucket's pages costs ~0.3 s/GiB of system time where new tmpfs or page-cache
            # pages cost ~0.55 (and freeing them ~0.15): rename it, write from offset 0, cut off the rest.
            if spent:
                os.rename(spent, path)
            # the Arrow IPC stream that datasets' ArrowWriter writes and load_from_disk maps (schema with features);
            # PythonFile hands the batch buffers to the file object without copying them
            with open(path, "r+b" if spent else "wb") as f:
                sink = pa.PythonFile(f, mode="w")
                with pa.ipc.new_stream(sink, schema) as writer:
                    for start in range(0, b.rows, chunk):
                        take = perm[start:start + chunk]
                        n, acts, tok = len(take), out[: len(take)], ids[: len(take)]
                        _gather(src_acts, take, acts, staged)
                        np.take(src_ids, take, axis=0, out=tok, mode="clip")
                        inner = pa.ListArray.from_arrays(inner_offsets[: n * context + 1], pa.array(acts.reshape(-1)))
                        outer = pa.ListArray.from_arrays(outer_offsets[: n + 1], inner)
                        writer.write_batch(pa.RecordBatch.from_arrays(
                            [pa.ExtensionArray.from_storage(schema.field(column).type, outer),
                             pa.FixedSizeListArray.from_arrays(pa.array(tok.reshape(-1)), context)], schema=schema))
                        bar.update(n)
                f.truncate(f.tell())
                sink.close()
            del src_acts, src_ids
            spent = b.paths[0]
            os.unlink(b.paths[1])
    except BaseException:
        failed.append(True)
        raise
    finally:
        if spent:
            os.unlink(spent)


def _features(context: int, width: int, dtype: np.dtype, column: str):
    from datasets import Array2D, Features, Sequence, Value

    return Features({column: Array2D(shape=(context, width), dtype=dtype.name),
                     "token_ids": Sequence(Value("int32"), length=context)})


def _gather(src: np.ndarray, take: np.ndarray, out: np.ndarray, staged: np.ndarray | None) -> None:
    """out[k] = src[take[k]], converted to out's dtype where it differs (staged: a buffer in src's dtype)."""
    if src.dtype == out.dtype:
        np.take(src, take, axis=0, out=out, mode="clip")  # "raise" would buffer a whole extra copy
    elif out[0].nbytes >= ROW_BY_ROW_BYTES:
        for k, r in enumerate(take):  # straight from the mapped bucket: half the memory traffic of a staged take
            _convert(src[r], out[k])
    else:  # small rows: one vectorised take, then one conversion (a Python call per row would dominate)
        _convert(np.take(src, take, axis=0, out=staged[: len(take)], mode="clip"), out)


def _write_dataset_files(folder: str, files: list[str], context: int, width: int, dtype: np.dtype, column: str) -> None:
    """state.json and dataset_info.json, as Dataset.save_to_disk writes them (what load_from_disk reads)."""
    from datasets import DatasetInfo

    DatasetInfo(features=_features(context, width, dtype, column)).write_to_directory(folder)
    state = {"_data_files": [{"filename": f} for f in files], "_fingerprint": uuid.uuid4().hex[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
