"""What the launcher and the workers read, against what the work needs (issue 25).

  1. resume:   bytes a `--resume` of a finished dataset (metadata.json lost) reads / shard bytes
  2. inputs:   bytes the workers read / input bytes, for JSONL, .jsonl.gz, parquet and an hf://
               folder of parquet files split over 2 hosts, and parquet whose row groups are larger than
               a unit (planner's units, 3 hosts, --num-shards 48); all units of every host, as extract plans them
  3. launcher: seconds to plan 1,000 small local JSONL files (first run, then a rerun)

Bytes are counted where they are read: every stream fileio.open_read hands out (shards, manifests,
input files); for hf://, which `datasets` reads through its own files, the process's read
syscalls (/proc/self/io rchar). Runs on the CPU with a simulated device (bench/common.SimulatedDevice).

    PYTHONPATH=$PWD python bench/bench_scale.py [--docs 20000] [--only inputs]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


class Counting:
    """Counts bytes read through fileio.open_read, by path."""

    def __init__(self):
        from llm_activations.format import fileio

        self.fileio, self.real, self.read = fileio, fileio.open_read, {}

    def __enter__(self):
        counter = self

        class Stream:
            def __init__(self, raw, path):
                self._raw, self._path = raw, path

            def __getattr__(self, name):
                return getattr(self._raw, name)

            def _count(self, data):
                counter.read[self._path] = counter.read.get(self._path, 0) + len(data)
                return data

            def read(self, *a):
                return self._count(self._raw.read(*a))

            def read1(self, *a):
                return self._count(self._raw.read1(*a))

            def readline(self, *a):
                return self._count(self._raw.readline(*a))

            def readinto(self, b):
                n = self._raw.readinto(b)
                counter.read[self._path] = counter.read.get(self._path, 0) + (n or 0)
                return n

            def __iter__(self):
                return iter(self.readline, b"")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._raw.close()

        self.fileio.open_read = lambda p: Stream(self.real(p), p)
        return self

    def __exit__(self, *exc):
        self.fileio.open_read = self.real

    def total(self, keep=lambda p: True) -> int:
        return sum(n for p, n in self.read.items() if keep(p))


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


# ----------------------------------------------------------------------------- 1. resume


def bench_resume(root: str, docs: int) -> dict:
    from llm_activations.format.metadata import read_metadata

    model = common.write_qwen2_checkpoint(os.path.join(root, "model"), hidden=64, layers=2)
    corpus = common.write_corpus(os.path.join(root, "resume.jsonl"), common.lognormal_lengths(200, 200, seed=1, hi=2000),
                                 model)
    device = common.SimulatedDevice("scale", 0.0, 1024)  # wide activations: shards of realistic size per token
    out = os.path.join(root, "resume-out")
    opts = dict(layers=(0,), seq_len=256, batch_size=8, dtype="float32", compute_dtype="float32", num_shards=8,
                mesh=(1, 1))
    common.run_extract(model, [corpus], out, extractor_factory=device, **opts)
    shard_bytes = sum(s["bytes"] for s in read_metadata(out)["shards"])
    os.remove(os.path.join(out, "metadata.json"))  # killed after the last unit, before the metadata
    from llm_activations.options import ExtractConfig
    from llm_activations.pipeline import run_extract

    cfg = ExtractConfig(model=model, inputs=(corpus,), output=out, resume=True, **opts)
    with Counting() as c:
        t0 = time.perf_counter()
        run_extract(cfg, extractor_factory=device)
        seconds = time.perf_counter() - t0
    read = c.total(lambda p: os.path.abspath(p).startswith(os.path.abspath(out)))
    return {"case": "resume of a finished dataset (8 units x 1 layer)", "shard MiB": round(shard_bytes / 2**20, 1),
            "read MiB": round(read / 2**20, 2), "read / shard bytes": round(read / shard_bytes, 4),
            "seconds": round(seconds, 2)}


# ----------------------------------------------------------------------------- 2. inputs


def _plan(inputs_, num_hosts=1, host_index=0, docs_per_unit=None, num_shards=0):
    from llm_activations import options, run_plan

    cfg = options.ExtractConfig(model="unused", inputs=tuple(inputs_), output="/nonexistent", num_hosts=num_hosts,
                                host_index=host_index, num_shards=num_shards,
                                docs_per_unit=docs_per_unit or options.DOCS_PER_UNIT)
    return run_plan.plan(cfg)[2]


def _read_units(units, num_hosts=1, host_index=0) -> int:
    from llm_activations import inputs

    return sum(1 for u in units for _ in inputs.read_unit(u, "text", num_hosts, host_index))


def bench_inputs(root: str, docs: int) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import numpy as np

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(k))) for k in rng.integers(2, 10, 5000)]
    # random words: compresses about as real text does, so gzip and parquet sizes are realistic
    texts = [f"document {i}: " + " ".join(rng.choice(words, int(n))) for i, n in enumerate(rng.integers(50, 400, docs))]
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    jsonl = os.path.join(root, "one.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(lines)
    gz = os.path.join(root, "gz")
    os.makedirs(gz)
    parts = 8
    for k in range(parts):
        with gzip.open(os.path.join(gz, f"part-{k}.jsonl.gz"), "wt") as f:
            f.writelines(lines[k * docs // parts:(k + 1) * docs // parts])
    parquet = os.path.join(root, "one.parquet")  # row groups smaller than half a unit
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=200)
    parquet_big = os.path.join(root, "big_groups.parquet")  # row groups larger than a unit
    pq.write_table(pa.table({"text": texts}), parquet_big, row_group_size=1000)
    hf = os.path.join(root, "hf", "data")
    os.makedirs(hf)
    for k in range(parts):
        pq.write_table(pa.table({"text": texts[k * docs // parts:(k + 1) * docs // parts]}),
                       os.path.join(hf, f"train-{k:05d}-of-{parts:05d}.parquet"), row_group_size=1000)
    rows = []
    unit_docs = max(1, docs // 48)  # ~48 units, as in the 113 MB / 49-unit file
    for name, pattern, size, hosts, shards in [
        ("JSONL, 1 file", jsonl, os.path.getsize(jsonl), 1, 0),
        (f".jsonl.gz, {parts} files", os.path.join(gz, "*.jsonl.gz"),
         sum(os.path.getsize(os.path.join(gz, n)) for n in os.listdir(gz)), 1, 0),
        ("parquet, 1 file, row groups of 200", parquet, os.path.getsize(parquet), 1, 0),
        ("parquet, 1 file, row groups of 1,000", parquet_big, os.path.getsize(parquet_big), 1, 0),
        ("parquet, row groups of 1,000, 3 hosts", parquet_big, os.path.getsize(parquet_big), 3, 0),
        ("parquet, row groups of 1,000, --num-shards 48", parquet_big, os.path.getsize(parquet_big), 1, 48),
    ]:
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # the planner's notes
            units = [u for host in range(hosts)  # every host's units, as each host plans them
                     for u in _plan([pattern], num_hosts=hosts, host_index=host, docs_per_unit=unit_docs, num_shards=shards)]
        with Counting() as c:  # the workers' reads only (the launcher's scan is not counted)
            t0 = time.perf_counter()
            n = _read_units(units)
        rows.append({"input": name, "units": len(units), "records": n, "input MiB": round(size / 2**20, 1),
                     "read / input bytes": round(c.total() / size, 3), "read seconds": round(time.perf_counter() - t0, 2)})
    spec = f"hf://{os.path.dirname(hf)}:train"
    size = sum(os.path.getsize(os.path.join(hf, n)) for n in os.listdir(hf))
    _read_units(_plan([spec], num_hosts=2, host_index=0)[:1], 2, 0)  # warm: datasets' imports read files too
    read, n, units_total, t0 = 0, 0, 0, time.perf_counter()
    for host in range(2):
        units = _plan([spec], num_hosts=2, host_index=host)
        before = rchar()
        n += _read_units(units, 2, host)
        read += rchar() - before
        units_total += len(units)
    rows.append({"input": f"hf:// parquet folder ({parts} files), 2 hosts", "units": units_total, "records": n,
                 "input MiB": round(size / 2**20, 1), "read / input bytes": round(read / size, 3),
                 "read seconds": round(time.perf_counter() - t0, 2)})
    return rows


# ----------------------------------------------------------------------------- 3. launcher


def bench_launcher(root: str, files: int = 1000) -> list[dict]:
    folder = os.path.join(root, "many")
    os.makedirs(folder)
    for k in range(files):
        with open(os.path.join(folder, f"f{k:04d}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": f"file {k} doc {i} " + "x " * (i % 50)}) + "\n" for i in range(20))
    rows = []
    for run in ("first run", "rerun, inputs unchanged"):
        t0 = time.perf_counter()
        units = _plan([folder])
        rows.append({"launcher": f"plan {files} small local files: {run}", "units": len(units),
                     "seconds": round(time.perf_counter() - t0, 2)})
    big = os.path.join(root, "big.jsonl")
    shutil.copy(os.path.join(root, "one.jsonl"), big)  # bench_inputs' file, as a file no scan has seen
    for run in ("first run", "rerun, input unchanged"):
        with Counting() as c:
            t0 = time.perf_counter()
            units = _plan([big])
            seconds = time.perf_counter() - t0
        rows.append({"launcher": f"plan one {os.path.getsize(big) / 2**20:.0f} MiB JSONL: {run}", "units": len(units),
                     "seconds": round(seconds, 2), "MiB read": round(c.total() / 2**20, 2)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents of the input corpora")
    p.add_argument("--only", choices=("resume", "inputs", "launcher"), help="measure one part alone")
    args = p.parse_args()
    os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")
    root = tempfile.mkdtemp(prefix="bench_scale_")
    os.environ["XDG_CACHE_HOME"] = os.path.join(root, "cache")  # a cold scan cache, this run's own
    try:
        common.header("bench_scale: bytes read against the work's bytes (issue 25)")
        if args.only in (None, "resume"):
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                resume = bench_resume(root, args.docs)
            common.table([resume])
        if args.only in (None, "inputs", "launcher"):  # the launcher part re-plans the inputs' JSONL file
            rows = bench_inputs(root, args.docs)
            if args.only != "launcher":
                common.table(rows)
        if args.only in (None, "launcher"):
            common.table(bench_launcher(root), ["launcher", "units", "seconds", "MiB read"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
