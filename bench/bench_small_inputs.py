"""Padding of small inputs: how many computed token slots hold no token, as metadata counts them.

Each work unit ends with one partly filled batch (the model's shape is fixed: --batch-size rows of
--seq-len tokens), so a unit wastes on average about half a batch. On a large corpus that is noise;
on a small one, or one split into many units by --num-shards, it is most of the work. Real extract
runs of the demo model over demo documents:

    .venv/bin/python bench/bench_small_inputs.py
"""

from __future__ import annotations

import json
import os
import tempfile

import common  # noqa: F401  (environment first)

from llm_activations import demo
from llm_activations.cli import main
from llm_activations.format.metadata import read_metadata


def padding(inputs: list, *extra: str) -> tuple:
    out = tempfile.mkdtemp()
    assert main(["extract", "--model", demo.ensure_demo_model(), "--input", *inputs, "--output", out, "--overwrite",
                 "--layers", "2", *extra]) == 0
    c = read_metadata(out)["counts"]
    return c["tokens"], c["padding_tokens"], c["padding_tokens"] / (c["tokens"] + c["padding_tokens"]), len(read_metadata(out)["files"]["2"])


def main_() -> None:
    tmp = tempfile.mkdtemp()
    texts = demo.corpus_texts()
    small = os.path.join(tmp, "150.jsonl")
    with open(small, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:150])
    for i in range(5):
        with open(os.path.join(tmp, f"doc{i}.txt"), "w") as f:
            f.write(texts[i])
    cases = [
        ("demo corpus, seq 1024 x batch 8, automatic units", [str(demo.CORPUS)], ()),
        ("150 documents, automatic units", [small], ()),
        ("150 documents, --num-shards 4", [small], ("--num-shards", "4")),
        ("150 documents, --num-shards 4 --batch-size 2", [small], ("--num-shards", "4", "--batch-size", "2")),
        ("5 .txt files", [os.path.join(tmp, "*.txt")], ()),
        ("5 .txt files, --batch-size 1", [os.path.join(tmp, "*.txt")], ("--batch-size", "1")),
    ]
    print(f"{'case':<48} {'files':>5} {'tokens':>8} {'padding':>8} {'padding %':>9}")
    for name, inputs, extra in cases:
        tokens, pad, share, files = padding(inputs, *extra)
        print(f"{name:<48} {files:>5} {tokens:>8} {pad:>8} {share:>9.1%}")


if __name__ == "__main__":
    main_()
