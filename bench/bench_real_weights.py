"""Issue 21's figures on the real SmolLM2-135M: what attention sinks and massive activations do to
the stored data, and what the readers' default policy (format/norms.py) delivers.

Extracts (or reuses) two datasets of the first --max-docs demo documents (Python stdlib docstrings),
layers 3, 15 and 27, float32 compute, bfloat16 storage: with --prepend none and --prepend auto.
For each layer it prints, over every stored token ("all", what main delivered) and over the tokens
norms.policy(max_norm_ratio=10) delivers ("delivered"; computed here from the metadata histogram,
so the figures do not depend on the reader's version):
  top1%   share of the squared norm held by the 1% of tokens with the largest norms
  norm/sqrt(d)   mean norm after normalisation by that set's scaling factor, over the same set
  median/sqrt(d) the median token's norm after that normalisation (an ordinary token)
  pos0    share of the energy held by the tokens at the first stored position
  kept    delivered fraction of the stored tokens
then a TopK SAE (examples/train_sae.py) on layer 15, every token (max_norm_ratio none: main's
behaviour) and the delivered ones.

    PYTHONPATH=. .venv/bin/python bench/bench_real_weights.py --max-docs 200 --work /tmp/real
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import common  # noqa: F401  (environment first)
import numpy as np

from llm_activations.cli import main
from llm_activations.format import metadata as md
from llm_activations.format import norms as nm
from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype
from llm_activations.model import smollm2

LAYERS = (3, 15, 27)


def extract(model: str, out: str, prepend: str, max_docs: int, seq_len: int) -> None:
    if os.path.exists(os.path.join(out, md.METADATA_FILE)):
        return
    t0 = time.time()
    assert main(["extract", "--model", model, "--output", out, "--overwrite", "--max-docs", str(max_docs),
                 "--layers", *map(str, LAYERS), "--seq-len", str(seq_len), "--batch-size", "8",
                 "--compute-dtype", "float32", "--prepend", prepend]) == 0
    print(f"extract --prepend {prepend}: {time.time() - t0:.0f}s")


def tokens(out: str, meta: dict, layer: int):
    """(norms [n] float64, positions [n]) of every stored token of a layer."""
    w, dt = meta["hidden_size"], numpy_dtype(meta["dtype"])
    n, p = [], []
    for rel in md.layer_files(meta, layer):
        for data in records.read_shard(md.shard_path(out, rel)):
            ex = records.decode_example(data)
            n.append(np.linalg.norm(records.decode_activations(ex, dt, w).astype(np.float64), axis=1))
            p.append(np.asarray(ex["position"]))
    return np.concatenate(n), np.concatenate(p)


def top_share(norms: np.ndarray, frac: float = 0.01) -> float:
    e = np.sort(norms ** 2)[::-1]
    return float(e[: max(1, int(round(frac * len(e))))].sum() / e.sum())


def report(out: str, label: str) -> None:
    meta = md.read_metadata(out)
    d = meta["hidden_size"]
    print(f"\n{label}: {meta['counts']['tokens']:,} tokens, prepend_token_id {meta['extraction'].get('prepend_token_id')}")
    print("layer  set        tokens   kept   top1%  norm/sqrt(d)  median/sqrt(d)   pos0  mean norm  median norm  threshold")
    for layer in LAYERS:
        norms, pos = tokens(out, meta, layer)
        st = meta["stats"][str(layer)]
        hist = nm.NormHistogram.from_json(st["norms"])
        p = nm.policy(hist, nm.DEFAULT_MAX_NORM_RATIO)
        first = pos == pos.min()
        pos0 = float((norms[first] ** 2).sum() / (norms ** 2).sum())
        for name, keep, scale in (("all", np.ones(len(norms), bool), st["scaling_factor"]),
                                  ("delivered", norms <= p.threshold, p.scaling_factor(d))):
            x = norms[keep]
            print(f"{layer:>5}  {name:<9} {keep.sum():>7,} {keep.mean():6.1%} {top_share(x):6.1%} "
                  f"{x.mean() * scale / np.sqrt(d):13.3f} {np.median(x) * scale / np.sqrt(d):15.3f} "
                  f"{pos0 if name == 'all' else float((x[first[keep]] ** 2).sum() / (x ** 2).sum()):6.1%} "
                  f"{x.mean():10.1f} {np.median(x):12.1f} {p.threshold if name != 'all' else float('nan'):10.1f}")
        assert p.count == int((norms <= p.threshold).sum()), "histogram and shards disagree"


def sae(out: str, label: str, steps: int) -> None:
    spec = importlib.util.spec_from_file_location("train_sae", os.path.join(os.path.dirname(__file__), "..", "examples", "train_sae.py"))
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    for ratio in (None, nm.DEFAULT_MAX_NORM_RATIO):
        r = ts.train(out, 15, latents=2304, k=32, steps=steps, batch_size=512, lr=1e-3, shuffle_buffer=1 << 14,
                     log=lambda _: None, max_norm_ratio=ratio)
        print(f"SAE {label} layer 15, max_norm_ratio {ratio}: explained variance {r['fve']:.3f}, "
              f"dead latents {r['dead_fraction']:.1%} ({steps} steps x 512, {r['seconds']:.0f}s)")


if __name__ == "__main__":
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--max-docs", type=int, default=200)
    a.add_argument("--seq-len", type=int, default=256)
    a.add_argument("--work", default="/tmp/bench_real_weights")
    a.add_argument("--sae-steps", type=int, default=400)
    args = a.parse_args()
    model = smollm2.build()
    for prepend in ("none", "auto"):
        out = os.path.join(args.work, prepend)
        extract(model, out, prepend, args.max_docs, args.seq_len)
        report(out, f"--prepend {prepend}")
    for prepend in ("none", "auto"):
        sae(os.path.join(args.work, prepend), f"--prepend {prepend}", args.sae_steps)
