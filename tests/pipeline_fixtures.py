"""Shared fixtures for pipeline tests: a tiny Qwen2 checkpoint with a tokenizer, and small corpora."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, replace

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


def shard_hashes(out: str) -> dict:
    """{shard path relative to out: sha256} of every shard of a dataset folder."""
    return {os.path.relpath(p, out): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(f"{out}/layer_*/*"))}


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def extract_args(model: str, inputs: list[str], output: str, *extra: str) -> list[str]:
    """CLI arguments for a fast test run: one device, float32 compute, short rows, and no context
    token (--prepend none: segments as the reference sees them alone; tests/test_prepend.py covers
    the default, auto)."""
    return ["extract", "--model", model, "--input", *inputs, "--output", output, "--seq-len", "64",
            "--batch-size", "4", "--compute-dtype", "float32", "--mesh", "1,1", "--prepend", "none", *extra]


os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")


@dataclass(frozen=True)
class FailOnce:
    """extractor_factory for pipeline.run_extract: the real Extractor, with one injected failure at
    the (after+1)-th batch the process collects, in whichever process first creates `marker`.

    where="collect": collecting that batch raises (in Extract). where="write": that batch's
    activations raise when a shard writer reads its first row (in WriteShards, after the writers
    have written the unit's earlier rows), so a retried or resumed unit must not keep those rows.
    The marker file makes the failure happen once per run, whatever retries, processes or DoFn
    instances follow: a retry finds it and goes through. Counting is per process (the extractor is
    shared by the process's DoFn instances, like the real one).
    """

    after: int
    marker: str  # its repr is part of the per-process cache key of the extractor (with ModelSpec's)
    where: str = "collect"

    def __post_init__(self):
        assert self.where in ("collect", "write"), self.where

    def __call__(self, spec):
        from llm_activations import units

        return _FailingExtractor(units.load_extractor(spec), self)

    def fail(self, what: str) -> None:
        """Raise, unless another attempt (any process) already did."""
        try:
            open(self.marker, "x").close()  # atomic: exactly one attempt wins
        except FileExistsError:
            return
        raise RuntimeError(f"injected failure {what} (tests' FailOnce)")


class _FailingExtractor:
    """Delegates to an Extractor; counts the batches collected through dispatch(...).result()."""

    def __init__(self, inner, fail: FailOnce):
        self._inner, self._fail, self._collected = inner, fail, 0

    def __getattr__(self, name):  # mesh, compilations, ...: the real extractor's
        return getattr(self._inner, name)

    def dispatch(self, *args, **kwargs):
        return _FailingPending(self._inner.dispatch(*args, **kwargs), self)

    def collect(self, pending):
        self._collected += 1
        if self._collected <= self._fail.after:
            return pending.result()
        if self._fail.where == "collect":
            self._fail.fail(f"collecting batch {self._collected}")
            return pending.result()
        out = pending.result()
        poisoned = {k: _FailOnRead(a, self._fail, self._collected) for k, a in out.activations.items()}
        return replace(out, activations=poisoned)


class _FailingPending:
    def __init__(self, pending, extractor: _FailingExtractor):
        self._pending, self._extractor = pending, extractor

    def result(self):
        return self._extractor.collect(self._pending)


class _FailOnRead:
    """A batch's activations [B, T, H] whose first row read fails once (FailOnce "write")."""

    def __init__(self, array, fail: FailOnce, batch: int):
        self.array, self.fail, self.batch = array, fail, batch

    def __getitem__(self, index):
        self.fail.fail(f"writing batch {self.batch}")
        return self.array[index]


def run_extract_cli(argv: list[str], extractor_factory=None) -> dict:
    """`extract` as cli.main(argv) runs it (argv starts with "extract"), with run_extract's
    extractor_factory; returns the metadata. Exceptions propagate (no exit status)."""
    import argparse

    from llm_activations import pipeline

    assert argv[0] == "extract"
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv[1:])
    args.beam_args = beam_args
    return pipeline.run_extract(pipeline.config_from_args(args), extractor_factory=extractor_factory)
