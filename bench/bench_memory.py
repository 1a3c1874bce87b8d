"""Bounded memory: peak RSS of an `extract` run does not grow with corpus size.

Writes a corpus of short documents (lognormal, median --median tokens), then runs
`python -m llm_activations extract` in a fresh subprocess on its first 1,000 and on all 20,000
documents (defaults) with the options a user would pass, and reads each child's peak RSS
(ru_maxrss from os.wait4 on that child alone). The demo model keeps the run short; work units
(default 4,096 documents each) bound what a worker holds at once.

    .venv/bin/python bench/bench_memory.py
    .venv/bin/python bench/bench_memory.py --docs 1000 20000 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common


def run_child(argv: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, last stdout line) of one extract subprocess."""
    import time

    env = {**os.environ, "PYTHONPATH": str(common.REPO)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llm_activations", "extract", *argv], cwd=str(common.REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"extract failed ({proc.returncode}): {err[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t, out.strip().splitlines()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--median", type=float, default=60, help="median tokens per document")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more extract options, e.g. --num-shards 4")
    args = p.parse_args(argv)

    common.header("bench_memory: peak RSS of extract vs corpus size")
    model = common.demo_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        corpus = common.write_corpus(os.path.join(tmp, "corpus.jsonl"),
                                     common.lognormal_lengths(max(args.docs), args.median, 0.8, lo=2, hi=2000))
        print(f"corpus: {max(args.docs):,} documents, median ~{args.median:.0f} tokens; demo model; "
              f"seq {args.seq_len}, batch {args.batch_size}")
        for n in sorted(args.docs):
            out = os.path.join(tmp, f"out_{n}")
            peak, seconds, summary = run_child(["--model", model, "--input", corpus, "--output", out,
                                                "--max-docs", str(n), "--seq-len", str(args.seq_len),
                                                "--batch-size", str(args.batch_size), *args.extra])
            meta = json.load(open(os.path.join(out, "metadata.json")))
            size = sum(s["bytes"] for s in meta["shards"])
            rows.append({"documents": n, "tokens": meta["counts"]["tokens"], "shards": len(meta["shards"]),
                         "output MiB": size / 2**20, "peak RSS MiB": peak / 2**20, "seconds": seconds,
                         "compilations": meta["run"]["compilations"]})
    common.table(rows)
    growth = rows[-1]["peak RSS MiB"] / rows[0]["peak RSS MiB"]
    print(f"peak RSS {rows[-1]['documents']:,} docs / {rows[0]['documents']:,} docs = {growth:.2f} for "
          f"{rows[-1]['tokens'] / rows[0]['tokens']:.1f}x the tokens and {rows[-1]['output MiB'] / rows[0]['output MiB']:.1f}x "
          f"the output (goal: flat; {'met' if growth < 1.25 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
