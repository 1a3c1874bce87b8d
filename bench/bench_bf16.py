"""How far the default --compute-dtype bfloat16 is from float32, on the demo model and corpus.

Runs extract twice over the same documents (--num-shards 1, so rows come in the same order), both
stored as float32, and compares every token's activation vector:
relative error = |bf16 - f32| / |f32| (L2 norms over hidden), reported as mean / 99th pct / max, plus
the largest elementwise error relative to the layer's RMS value.

    .venv/bin/python bench/bench_bf16.py                 # first 300 demo documents, every layer
    .venv/bin/python bench/bench_bf16.py --max-docs 1500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # noqa: F401  (environment first)
import numpy as np

from llm_activations.cli import main
from llm_activations.format import records
from llm_activations.format.metadata import read_metadata


def layer_arrays(out: str, layer: int) -> np.ndarray:
    meta = read_metadata(out)
    rows = [records.decode_activations(records.decode_example(d), np.float32, meta["hidden_size"])
            for rel in meta["files"][str(layer)] for d in records.read_shard(os.path.join(out, rel))]
    return np.concatenate(rows)


def run(max_docs: int) -> None:
    tmp = tempfile.mkdtemp()
    outs = {}
    for compute in ("float32", "bfloat16"):
        outs[compute] = os.path.join(tmp, compute)
        t0, c0 = time.time(), os.times()
        assert main(["extract", "--output", outs[compute], "--max-docs", str(max_docs), "--num-shards", "1",
                     "--layers", "0", "1", "2", "3", "--dtype", "float32", "--compute-dtype", compute]) == 0
        c1 = os.times()
        print(f"{compute}: {time.time() - t0:.1f}s wall, {c1.user - c0.user + c1.system - c0.system:.1f}s cpu")
    meta = read_metadata(outs["float32"])
    print(f"{meta['counts']['tokens']} tokens of {meta['counts']['documents']} demo documents")
    print("layer  mean rel err  p99 rel err  max rel err  max |elem err| / rms")
    for layer in meta["extraction"]["layers"]:
        f32, bf16 = layer_arrays(outs["float32"], layer), layer_arrays(outs["bfloat16"], layer)
        rel = np.linalg.norm(bf16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
        rms = np.sqrt(np.mean(f32 ** 2))
        print(f"{layer:>5}  {rel.mean():12.4%}  {np.percentile(rel, 99):11.4%}  {rel.max():11.4%}  "
              f"{np.abs(bf16 - f32).max() / rms:20.4f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-docs", type=int, default=300)
    run(p.parse_args().max_docs)
