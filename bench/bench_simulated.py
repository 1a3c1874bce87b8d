"""Duty cycle of a simulated accelerator: does the host path keep the device busy?

Runs the real `extract` (pipeline.run_extract, DirectRunner in this process: reading, tokenizing,
packing, Beam, encoding, hashing, writing, manifests, metadata) with the model replaced by
common.SimulatedDevice, passed in as run_extract's extractor_factory: a device that takes a fixed
time per batch, asynchronous and serial like an accelerator, returning activations of the real
shape and dtype. For each case it prints, as soon as the case is measured:

  * duty cycle = device busy time / (last result - first dispatch);
  * tok/s over that window, and the whole call's wall time;
  * the host ceiling: tok/s of the same run with a zero-time step (the host path alone);
  * CPU s/batch: user + sys seconds of the process (all threads) per batch inside the window.
    On a shared machine the duty cycle suffers from other jobs; CPU s/batch does not (much): if
    it is well below the step time, the goal is reachable on a quiet host.

Shapes are those of the H200 runs of issue 16 (16 x 2048 rows, bf16); the checkpoints are configs
only (hidden 896 / 3584, no weights are read) with the demo tokenizer; the corpus is lognormal
(median 600 tokens, like FineWeb-Edu) split into --units work units, written to --output-root
(tmpfs by default, so storage is not the bound). Finished shard files are deleted while the run
goes on, so tmpfs holds at most a few units.

    .venv/bin/python bench/bench_simulated.py                       # the table's six cases
    .venv/bin/python bench/bench_simulated.py --cases 3584:860:1 --batches 20
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import threading

import common
import numpy as np

DEFAULT_CASES = ["896:100:1", "896:300:1", "3584:860:1", "896:100:3", "896:300:3", "3584:860:3"]
COLUMNS = ["hidden", "ms/batch", "layers", "batches", "duty cycle", "tok/s", "host ceiling tok/s",
           "CPU s/batch", "ceiling CPU s/batch", "max in flight", "wall s"]


def write_checkpoint(folder: str, hidden: int, layers: int) -> str:
    """A Qwen2 config of the given width with the demo tokenizer; the weights file is a stub (the
    simulated device never reads it; `extract` only checks that it exists)."""
    from safetensors.numpy import save_file

    from llm_activations import demo

    common.copy_demo_tokenizer(folder)
    config = dict(demo.DEMO_CONFIG, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  num_key_value_heads=2, vocab_size=demo.VOCAB_SIZE, max_position_embeddings=32768)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({"stub": np.zeros(1, np.float32)}, os.path.join(folder, "model.safetensors"))
    return folder


class Janitor:
    """Deletes finished shard files (final names only) while a run writes more, keeping tmpfs small."""

    def __init__(self, root: str):
        self._root, self._stop = root, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self):
        while not self._stop.wait(0.2):
            for path in glob.glob(os.path.join(self._root, "layer_*", "part-*.tfrecord")):
                try:
                    os.remove(path)
                except OSError:
                    pass


def run_case(name: str, model: str, corpus: str, out: str, step_ms: float, hidden: int, layers: tuple,
             max_docs: int, units: int, args) -> dict:
    device = common.SimulatedDevice(name, step_ms / 1000, hidden)
    with Janitor(out), contextlib.redirect_stderr(io.StringIO()):  # the run's counters line: not a result
        meta, wall = common.run_extract(model, [corpus], out, extractor_factory=device, layers=layers,
                                        seq_len=args.seq_len, batch_size=args.batch_size, max_docs=max_docs,
                                        num_shards=units)
    shutil.rmtree(out, ignore_errors=True)
    stats = common.SIMULATED.pop(name)
    assert stats.tokens == meta["counts"]["tokens"], (stats.tokens, meta["counts"]["tokens"])
    return {"stats": stats, "wall": wall, "tok/s": stats.tokens / stats.window}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="HIDDEN:MS_PER_BATCH:LAYERS ...")
    p.add_argument("--batches", type=int, default=0,
                   help="batches per case (default: 30 at hidden <= 1024, 12 above: about 3-10 s of device time)")
    p.add_argument("--units", type=int, default=3, help="work units (files per layer) per case")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the shards go (default: /dev/shm, tmpfs)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the zero-time runs")
    args = p.parse_args(argv)

    cases = [tuple(float(x) if i == 1 else int(x) for i, x in enumerate(c.split(":"))) for c in args.cases]
    common.header("bench_simulated: duty cycle of a simulated accelerator behind the real extract")
    slots = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench_sim_out_", dir=args.output_root) as out_root:
        want = max(args.batches or (30 if h <= 1024 else 12) for h, _, _ in cases)
        lengths = common.lognormal_lengths(int(want * slots / 900) + 50, 600, 1.0, seed=1, lo=16, hi=20_000)
        corpus = common.write_corpus(os.path.join(tmp, "corpus.jsonl"), lengths)
        cum = np.cumsum(common.token_lengths(corpus))
        print(f"corpus: {len(cum):,} documents, {int(cum[-1]):,} tokens (lognormal, median 600); batch "
              f"{args.batch_size} x {args.seq_len}; bf16; {args.units} work units per case; output under {out_root}")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
        ceilings: dict = {}
        # A first short run pays the process's one-time costs (imports, tokenizer load, first
        # allocations), which would otherwise land on whichever case runs first.
        warm = write_checkpoint(os.path.join(tmp, "model_warm"), cases[0][0], 4)
        run_case("warm-up", warm, corpus, os.path.join(out_root, "warm-up"), 0.0, cases[0][0], (0,),
                 int(np.searchsorted(cum, 2 * slots)) + 1, 1, args)
        for i, (hidden, step_ms, nlayers) in enumerate(cases):
            batches = args.batches or (30 if hidden <= 1024 else 12)
            max_docs = int(np.searchsorted(cum, batches * slots * 0.99)) + 1
            if max_docs > len(cum):
                raise SystemExit(f"corpus too small for {batches} batches")
            model = write_checkpoint(os.path.join(tmp, f"model_{hidden}"), hidden, max(4, nlayers))
            layers = tuple(range(nlayers))
            run = lambda name, ms: run_case(name, model, corpus, os.path.join(out_root, name), ms, hidden, layers,
                                            max_docs, args.units, args)
            if not args.no_ceiling and (hidden, nlayers) not in ceilings:
                ceilings[(hidden, nlayers)] = run(f"ceiling_{hidden}_{nlayers}", 0.0)
            r = run(f"case_{i}", step_ms)
            s, c = r["stats"], ceilings.get((hidden, nlayers))
            row = [hidden, f"{step_ms:.0f}", nlayers, s.batches, f"{s.duty_cycle:.2f}", f"{r['tok/s']:,.0f}",
                   f"{c['tok/s']:,.0f}" if c else "-", f"{s.cpu_per_batch:.3f}",
                   f"{c['stats'].cpu_per_batch:.3f}" if c else "-", s.max_in_flight, f"{r['wall']:.1f}"]
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    print("duty cycle = device busy / (last result - first dispatch); CPU s/batch = process user+sys per batch in "
          "that window; host ceiling = the same run with a zero-time step; max in flight = most batches dispatched "
          "and not yet collected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
