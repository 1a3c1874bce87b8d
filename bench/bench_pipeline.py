"""Pipeline efficiency: end-to-end `extract` tokens/s against the bare jitted forward step.

Same model, shapes and tokens, measured in one run (one process, DirectRunner):
  * bare step: the Extractor's dispatch/result loop over exactly the batches `extract` builds for
    the corpus (no Beam, no tokenizing, no encoding, no I/O), timed before and after the pipeline
    runs, to bracket load from other processes on a shared machine;
  * extract: `llm_activations.pipeline.run_extract` on the whole corpus, and on its first
    --small-docs documents; (tokens_full - tokens_small) / (wall_full - wall_small) is the
    pipeline's marginal throughput, i.e. with the one-time costs (Beam start, model load and
    compile, metadata) taken out; the whole-command figure is printed too.
Also prints the XLA compilations of the step over the whole run (docs/FORMAT.md: one per worker) on a corpus
with a spread of document lengths and a final partial batch.

    .venv/bin/python bench/bench_pipeline.py                        # demo model + demo corpus
    .venv/bin/python bench/bench_pipeline.py --repeat 3 --compute-dtype float32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import common  # noqa: F401  (environment first)
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the demo model)")
    p.add_argument("--corpus", help="JSONL corpus (default: the demo corpus)")
    p.add_argument("--repeat", type=int, default=1, help="concatenate the corpus this many times (longer run)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--dtype", default="bfloat16", help="storage dtype")
    p.add_argument("--layers", type=int, nargs="+", help="default: the middle layer")
    p.add_argument("--small-docs", type=int, default=16, help="documents of the run that measures fixed costs")
    args = p.parse_args(argv)

    from llm_activations.model.config import load_model_config
    from llm_activations.model.extractor import Extractor

    common.header("bench_pipeline: extract end to end vs the bare forward step")
    model = args.model or common.demo_model()
    config, _ = load_model_config(model)
    layers = tuple(args.layers or (config.num_layers // 2,))
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        corpus = args.corpus or common.demo_corpus()
        if args.repeat > 1:
            lines = open(corpus).read().splitlines() * args.repeat
            corpus = os.path.join(tmp, "corpus.jsonl")
            open(corpus, "w").write("\n".join(lines) + "\n")
        lengths = common.token_lengths(corpus, model)
        print(f"corpus: {len(lengths):,} documents, {lengths.sum():,} tokens; tokens per document "
              f"min {lengths.min()} / median {int(np.median(lengths))} / p90 {int(np.percentile(lengths, 90))} / "
              f"max {lengths.max()}; {int((lengths > args.seq_len).sum())} longer than seq_len {args.seq_len}")
        print(f"model: {config.architecture} hidden {config.hidden_size}, {config.num_layers} layers; "
              f"layers {list(layers)}; batch {args.batch_size} x seq {args.seq_len}; compute {args.compute_dtype}, "
              f"storage {args.dtype}")

        batches = common.unit_batches(model, corpus, seq_len=args.seq_len, batch_size=args.batch_size)
        fills = sorted({int(b.real_tokens) for b in batches})
        print(f"batches: {len(batches)}, {len(fills)} distinct fills (last {batches[-1].real_tokens} of "
              f"{args.batch_size * args.seq_len} slots)")
        with common.Timer() as setup:
            ex = Extractor(model, layers=layers, batch_size=args.batch_size, seq_len=args.seq_len,
                           compute_dtype=args.compute_dtype, storage_dtype=args.dtype)
        bare_before, real = common.bare_step(ex, batches)

        opts = dict(layers=layers, seq_len=args.seq_len, batch_size=args.batch_size,
                    compute_dtype=args.compute_dtype, dtype=args.dtype)
        small_meta, small_wall = common.run_extract(model, [corpus], os.path.join(tmp, "small"),
                                                    max_docs=args.small_docs, **opts)
        meta, wall = common.run_extract(model, [corpus], os.path.join(tmp, "full"), **opts)
        bare_after, _ = common.bare_step(ex, batches)
        del ex

    tokens, small_tokens = meta["counts"]["tokens"], small_meta["counts"]["tokens"]
    assert tokens == real, (tokens, real)  # the same tokens went through both
    bare = 2 * real / (bare_before + bare_after)
    marginal = (tokens - small_tokens) / (wall - small_wall)
    run = meta["run"]
    rows = [
        {"measure": "bare step (before pipeline)", "tokens/s": real / bare_before, "vs bare": (real / bare_before) / bare},
        {"measure": "bare step (after pipeline)", "tokens/s": real / bare_after, "vs bare": (real / bare_after) / bare},
        {"measure": f"bare step incl. setup (load + compile {setup.seconds:.1f} s)", "tokens/s": real / (setup.seconds + bare_before),
         "vs bare": real / (setup.seconds + bare_before) / bare},
        {"measure": f"extract, whole call ({wall:.1f} s)", "tokens/s": tokens / wall, "vs bare": tokens / wall / bare},
        {"measure": "extract, metadata run.tokens_per_second", "tokens/s": float(run["tokens_per_second"]),
         "vs bare": float(run["tokens_per_second"]) / bare},
        {"measure": f"extract, marginal (full - {args.small_docs}-doc run: {small_wall:.1f} s fixed)", "tokens/s": marginal,
         "vs bare": marginal / bare},
    ]
    common.table(rows)
    print(f"tokens {tokens:,} (padding {meta['counts']['padding_tokens']:,}), batches {meta['counts']['batches']}, "
          f"workers {run['workers']}, compilations {run['compilations']} (goal: 1 per worker: "
          f"{'met' if run['compilations'] == run['workers'] else 'NOT met'})")
    print(f"pipeline efficiency (marginal / bare) = {marginal / bare:.2f} (goal >= 0.9: "
          f"{'met' if marginal / bare >= 0.9 else 'not met'}); whole call / bare = {tokens / wall / bare:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
