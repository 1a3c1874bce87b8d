"""Reader throughput: GiB/s of activation bytes and tokens/s delivered to Python.

    python bench/bench_reader.py                      # writes ~1 GiB (hidden 3584, bf16) to a temp dir
    python bench/bench_reader.py --dataset OUT --layer 3
    python bench/bench_reader.py --hidden 64 --tokens 2000000

Columns: wall-clock GiB/s and tokens/s of the fastest pass, and the CPU seconds it used (all
threads), which stays meaningful when other work shares the machine.
"Activation bytes" are the stored bytes (tokens x hidden x dtype size) that reach Python as float32
batches; the float32 bytes delivered are also printed. Shard files are read once before timing, so
this measures the reader (decode, shuffle, batch), not the disk: on a cold cache or gs:// the
storage bandwidth is an extra bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GIB = float(1 << 30)


def _warm_cache(spec) -> int:
    total = 0
    for f in spec.files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total


def _time(make_iter, bytes_per_token: int, hidden: int):
    start, cpu = time.perf_counter(), time.process_time()
    tokens = batches = 0
    first = None
    for batch in make_iter():
        if first is None:
            first = time.perf_counter() - start
        tokens += batch.shape[0]
        batches += 1
        assert batch.shape[1] == hidden
    secs = time.perf_counter() - start
    return tokens, secs, first or 0.0, time.process_time() - cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="existing dataset folder (default: write a synthetic one)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=150_000, help="approximate tokens to write (synthetic)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--shuffle-buffer", type=int, nargs="+", default=[0, 1 << 16])
    p.add_argument("--readers", nargs="+", default=["tf", "numpy"], choices=["tf", "numpy"])
    p.add_argument("--repeats", type=int, default=3, help="passes per configuration; the fastest is reported "
                   "(the first pass in a process also pays for first-touch page faults of its buffers)")
    args = p.parse_args(argv)

    from llm_activations import reader

    tmp = None
    path, layer = args.dataset, args.layer
    if path is None:
        from synthetic import make_dataset

        tmp = tempfile.TemporaryDirectory(prefix="bench_reader_")
        path, layer = tmp.name, 0
        start = time.perf_counter()
        docs = max(1, int(args.tokens / (0.75 * args.seq_len)))
        make_dataset(
            path, layers=(0,), hidden_size=args.hidden, dtype=args.dtype, num_docs=docs, seq_len=args.seq_len,
            num_shards=args.num_shards, signal="noise",
        )
        print(f"wrote synthetic dataset in {time.perf_counter() - start:.1f}s: {path}")
    spec = reader.layer_spec(path, layer if layer is not None else 0)
    on_disk = _warm_cache(spec)
    print(
        f"layer {spec.layer}: {spec.tokens:,} tokens x hidden {spec.hidden_size} {spec.dtype} "
        f"({spec.bytes_per_token} B/token), {len(spec.files)} files, {on_disk / GIB:.2f} GiB on disk; "
        f"batch {args.batch_size}; {os.cpu_count()} CPU cores"
    )
    print(
        f"{'reader':8} {'shuffle':>8} {'GiB/s stored':>13} {'GiB/s f32':>10} {'tokens/s':>12} {'first batch':>12}"
        f" {'CPU s':>6} {'stored GiB/CPU-s':>17}"
    )
    for shuffle in args.shuffle_buffer:
        for kind in args.readers:
            if kind == "tf":
                def make_iter():
                    ds = reader.activation_dataset(path, spec.layer, args.batch_size, shuffle_buffer=shuffle, seed=0)
                    return ds.as_numpy_iterator()
            else:
                def make_iter():
                    return reader.iter_numpy_batches(path, spec.layer, args.batch_size, shuffle_buffer=shuffle, seed=0)
            best = None
            for _ in range(args.repeats):
                run = _time(make_iter, spec.bytes_per_token, spec.hidden_size)
                if best is None or run[1] < best[1]:
                    best = run
            tokens, secs, first, cpu = best
            print(
                f"{kind:8} {shuffle:>8} {tokens * spec.bytes_per_token / secs / GIB:>13.2f} "
                f"{tokens * spec.hidden_size * 4 / secs / GIB:>10.2f} {tokens / secs:>12,.0f} {first:>11.2f}s"
                f" {cpu:>6.2f} {tokens * spec.bytes_per_token / cpu / GIB:>17.2f}",
                flush=True,
            )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
