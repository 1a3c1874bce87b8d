"""Stop-at-layer: extracting layer k of N costs about (k+1)/N of a full forward.

Builds a random Qwen2 checkpoint with --num-layers blocks, then for several k an Extractor with
layers=[k] (its step runs blocks 0..k only) and times its dispatch/result loop on the same batch.
Rounds over k are interleaved and the best round is kept, so load from other processes on a
shared machine hits every k alike. The "full" reference is k = N-1.

    .venv/bin/python bench/bench_stop_layer.py
    .venv/bin/python bench/bench_stop_layer.py --num-layers 12 --hidden 256 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import common
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_shape_args(p)
    p.add_argument("--ks", type=int, nargs="+", help="layers to time (default: 0, N/4, N/2, 3N/4, N-1)")
    p.add_argument("--steps", type=int, default=4, help="steps per timing")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from llm_activations.model.extractor import Extractor

    n = args.num_layers
    ks = sorted(set(args.ks or [0, n // 4, n // 2, 3 * n // 4, n - 1]))
    common.header("bench_stop_layer: step time for layer k of N")
    with tempfile.TemporaryDirectory(prefix="bench_stop_layer_") as folder:
        common.write_shape_checkpoint(folder, args)
        extractors = {k: Extractor(folder, layers=[k], batch_size=args.batch_size, seq_len=args.seq_len,
                                   compute_dtype=args.compute_dtype, storage_dtype="bfloat16") for k in ks}
        rng = np.random.default_rng(0)
        shape = (args.batch_size, args.seq_len)
        tokens = rng.integers(0, extractors[ks[0]].config.vocab_size, shape, dtype=np.int32)
        # Packed rows of ~256-token segments, as the pipeline feeds them.
        segs = np.broadcast_to(1 + np.arange(args.seq_len) // 256, shape).astype(np.int32)
        pos = np.broadcast_to(np.arange(args.seq_len) % 256, shape).astype(np.int32)

        class B:  # the fields bare_step reads
            pass
        batch = B()
        batch.tokens, batch.segment_ids, batch.positions = tokens, segs, pos
        batch.real_tokens = tokens.size
        best = {k: float("inf") for k in ks}
        for _ in range(args.rounds):
            for k in ks:
                seconds, _ = common.bare_step(extractors[k], [batch], repeat=args.steps)
                best[k] = min(best[k], seconds / args.steps)
    full = best[n - 1] if n - 1 in best else max(best.values())
    rows = [{"k": k, "blocks run": k + 1, "step ms": best[k] * 1e3, "measured / full": best[k] / full,
             "(k+1)/N": (k + 1) / n, "tokens/s": args.batch_size * args.seq_len / best[k]} for k in ks]
    common.table(rows)
    worst = max(abs(r["measured / full"] - r["(k+1)/N"]) for r in rows)
    print(f"largest gap between measured/full and (k+1)/N: {worst:.3f} (embedding lookup, moments and "
          f"host transfer are a fixed cost per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
