"""Shared fixtures for pipeline tests: a tiny Qwen2 checkpoint with a tokenizer, and small corpora."""

from __future__ import annotations

import json
import os

import numpy as np

from llm_activations import demo
from tiny_models import cached_checkpoint

_READY: dict = {}


def corpus_texts(n: int = 40, seed: int = 0) -> list[str]:
    """n real-text documents of varied length (some longer than a 64-token row)."""
    texts = demo.corpus_texts()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), n, replace=False)
    return [texts[i][: int(rng.integers(20, 900))] for i in picked]


def tiny_model_with_tokenizer(variant: str = "qwen2") -> tuple[str, object]:
    """(folder, torch model): tiny random checkpoint plus a BPE tokenizer trained on the demo corpus."""
    if variant not in _READY:
        folder, model = cached_checkpoint(variant)
        demo.train_tokenizer(demo.corpus_texts()[:300], 512, folder)
        _READY[variant] = (folder, model)
    return _READY[variant]


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def extract_args(model: str, inputs: list[str], output: str, *extra: str) -> list[str]:
    """CLI arguments for a fast test run: one device, float32 compute, short rows."""
    return ["extract", "--model", model, "--input", *inputs, "--output", output, "--seq-len", "64",
            "--batch-size", "4", "--compute-dtype", "float32", "--mesh", "1,1", *extra]


os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")
