"""Shared helpers for the benchmarks in bench/: environment, machine line, corpora, checkpoints,
in-process extract runs and the bare forward-step loop.

Every bench script imports this first (`import common`), which sets the environment a local user
would have (JAX on CPU unless told otherwise; no progress bar, to keep the output readable) before
JAX is imported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")

import numpy as np  # noqa: E402


# ----------------------------------------------------------------------------- reporting


def machine() -> str:
    """'AMD EPYC, 2 cores, no accelerator' style line for BENCHMARKS.md."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"# machine: {machine()}; date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"command: {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}")


def table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print rows as a Markdown table (numbers formatted with thousands separators)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ----------------------------------------------------------------------------- corpora


def demo_model() -> str:
    from llm_activations import demo

    return demo.ensure_demo_model()


def demo_corpus() -> str:
    from llm_activations import demo

    return str(demo.CORPUS)


def lognormal_lengths(n: int, median: float, sigma: float = 1.0, seed: int = 0, lo: int = 1,
                      hi: int = 100_000) -> np.ndarray:
    """Document lengths in tokens, lognormal like web corpora (FineWeb-Edu: median ~600, long tail)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def write_corpus(path: str, lengths: np.ndarray, model: str | None = None, seed: int = 0) -> str:
    """A JSONL corpus of real text whose documents have about `lengths` tokens each.

    Each document is a random window of the demo corpus' token stream, decoded back to text, so
    the tokenizer sees natural text (re-encoding shifts a length by a token or two at most).
    """
    from llm_activations import demo, units

    tok = units.load_tokenizer(model or demo_model())
    stream = np.concatenate([np.asarray(t, np.int64) for t in units.encode(tok, demo.corpus_texts())])
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for n in lengths:
            n = int(min(n, len(stream)))
            start = int(rng.integers(0, len(stream) - n + 1))
            f.write(json.dumps({"text": tok.decode(stream[start:start + n])}) + "\n")
    return path


def token_lengths(corpus: str, model: str | None = None) -> np.ndarray:
    """Tokens per document of a JSONL corpus, with the model's tokenizer."""
    from llm_activations import units

    tok = units.load_tokenizer(model or demo_model())
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    return np.array([len(t) for t in units.encode(tok, texts)], np.int64)


# ----------------------------------------------------------------------------- checkpoints


def copy_demo_tokenizer(folder: str) -> str:
    """Put the demo tokenizer (ids 0..demo.VOCAB_SIZE-1) into a checkpoint folder, so `extract`
    can tokenize text for a benchmark's random checkpoint; the model's vocab must be at least as large."""
    src = Path(demo_model())
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(".txt") or name == "special_tokens_map.json":
            shutil.copy(src / name, Path(folder) / name)
    return folder


def add_model_shape_args(p) -> None:
    """The random Qwen2's shape and the step's batch: the options every model benchmark shares."""
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])


def write_shape_checkpoint(folder: str, args) -> str:
    """write_qwen2_checkpoint for add_model_shape_args' options; prints the shape first."""
    print(f"model: random Qwen2, {args.num_layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"mlp {args.intermediate}; batch {args.batch_size} x seq {args.seq_len}; compute {args.compute_dtype}")
    return write_qwen2_checkpoint(folder, hidden=args.hidden, layers=args.num_layers, heads=args.heads,
                                  kv_heads=args.kv_heads, intermediate=args.intermediate)


def write_qwen2_checkpoint(folder: str, *, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                           intermediate: int = 384, seed: int = 0) -> str:
    """A random Qwen2 checkpoint in HF format with the demo tokenizer (so `extract` can run on it)."""
    from llm_activations import demo
    from llm_activations.model.config import model_config_from_hf
    from llm_activations.model.hf_weights import random_tensors, save_hf_checkpoint

    copy_demo_tokenizer(folder)
    config = dict(demo.DEMO_CONFIG, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=demo.VOCAB_SIZE,
                  bos_token_id=None, eos_token_id=0, pad_token_id=0)
    c = model_config_from_hf(config)
    save_hf_checkpoint(folder, c, random_tensors(c, seed=seed), hf_config=config)
    return folder


# ----------------------------------------------------------------------------- runs


def run_extract(model: str, inputs: list[str], output: str, extractor_factory=None, **options) -> tuple[dict, float]:
    """One `extract` run in this process (DirectRunner), as `python -m llm_activations extract` does it.

    extractor_factory: pipeline.run_extract's (None = the real model; SimulatedDevice = a stand-in).
    Returns (metadata, wall seconds of the whole call: checks, planning, pipeline, metadata).
    """
    from llm_activations.options import ExtractConfig
    from llm_activations.pipeline import run_extract as run

    cfg = ExtractConfig(model=model, inputs=tuple(inputs), output=output, overwrite=True, **options)
    with Timer() as t:
        meta = run(cfg, extractor_factory=extractor_factory)
    return meta, t.seconds


def unit_batches(model: str, corpus: str, *, seq_len: int, batch_size: int, mode: str = "pack",
                 docs_per_unit: int | None = None, max_docs: int | None = None) -> list:
    """The exact packing.Batch list `extract` feeds its model for this corpus, built with the
    pipeline's own read/tokenize/segment/pack/batch functions (units.py, no Beam)."""
    from llm_activations import options
    from llm_activations import run_plan
    from llm_activations import units as U

    cfg = options.ExtractConfig(model=model, inputs=(corpus,), output="/nonexistent", seq_len=seq_len,
                                batch_size=batch_size, mode=mode, max_docs=max_docs,
                                docs_per_unit=docs_per_unit or options.DOCS_PER_UNIT)
    _, _, units = run_plan.plan(cfg)
    spec = U.PrepareSpec(cfg.text_field, model, seq_len, mode)
    tok = U.load_tokenizer(model)
    return [batch for unit in units for batch in U.unit_batches(U.prepare_unit(unit, spec, tok), batch_size, seq_len)]


def bare_step(extractor, batches: list, repeat: int = 1) -> tuple[float, int]:
    """Seconds and real tokens of the Extractor's dispatch/result loop over `batches` (inputs already
    on the host, nothing encoded or written): the ceiling the pipeline is measured against."""
    extractor(batches[0].tokens, batches[0].segment_ids, batches[0].positions)  # warm (compiled at setup)
    tokens = 0
    with Timer() as t:
        pending = None
        for _ in range(repeat):
            for b in batches:
                following = extractor.dispatch(b.tokens, b.segment_ids, b.positions)
                if pending is not None:
                    pending.result()
                pending = following
                tokens += b.real_tokens
        pending.result()
    return t.seconds, tokens


# ----------------------------------------------------------------------------- simulated accelerator


class SimulatedStats:
    """What a simulated device saw: the dispatch window, its busy time and the host's CPU time in it."""

    def __init__(self):
        self.batches = self.tokens = 0
        self.in_flight = self.max_in_flight = 0  # dispatched, result not yet returned
        self.busy = 0.0
        self.first_dispatch = self.last_result = None
        self.cpu_first = self.cpu_last = None

    @property
    def window(self) -> float:
        return self.last_result - self.first_dispatch

    @property
    def duty_cycle(self) -> float:
        return self.busy / self.window if self.window > 0 else float("nan")

    @property
    def cpu_per_batch(self) -> float:
        """user + sys seconds of the whole process (every thread) per batch, inside the window."""
        return (self.cpu_last - self.cpu_first) / max(1, self.batches)


SIMULATED: dict = {}  # run name -> SimulatedStats; the pipeline runs in this process (DirectRunner)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class SimulatedDevice:
    """extractor_factory for pipeline.run_extract: an accelerator that takes `step_seconds` per batch.

    Like a device it is asynchronous and serial: dispatch() returns at once; batch i starts when it
    is dispatched or when batch i-1 ends, whichever is later, and its result() returns step_seconds
    after that start. Activations have the real shape and storage dtype but are one preallocated
    array per (hook, layer) output, hidden_size wide for every hook (z too: the bench's configs have
    heads x 64 = hidden); their content does not matter to the host path. Picklable (Beam pickles the
    DoFn holding it); the statistics go to SIMULATED[name] in this process.
    """

    def __init__(self, name: str, step_seconds: float, hidden_size: int):
        self.name, self.step_seconds, self.hidden_size = name, step_seconds, hidden_size

    def __repr__(self):  # part of the ModelSpec's repr, the per-process cache key of the extractor
        return f"SimulatedDevice({self.name!r}, {self.step_seconds}, {self.hidden_size})"

    def __call__(self, spec):
        return SimulatedExtractor(spec, self.step_seconds, self.hidden_size, SIMULATED.setdefault(self.name, SimulatedStats()))


class SimulatedExtractor:
    """The Extractor interface (dispatch -> Pending.result() -> StepOutput) over a simulated device."""

    def __init__(self, spec, step_seconds: float, hidden_size: int, stats: SimulatedStats):
        from types import SimpleNamespace

        from llm_activations.format import dtypes

        dtype = dtypes.STORAGE[spec.storage_dtype]
        self.step_seconds, self.stats = step_seconds, stats
        self.outputs = [(hook, layer) for hook in spec.hooks for layer in spec.layers]  # StepOutput's keys
        self.mesh = SimpleNamespace(shape={"data": 1, "model": 1})
        self.compile_stats = SimpleNamespace(seconds=0.0, cache_hit=False)  # nothing to compile
        # ones, not zeros: the pages are written once here, never lazily zero-filled during the run
        self._acts = {k: np.ones((spec.batch_size, spec.seq_len, hidden_size), dtype) for k in self.outputs}
        self._zeros = np.zeros(hidden_size, np.float64)
        self._free_at = 0.0

    def dispatch(self, tokens, segment_ids, positions):
        now = time.perf_counter()
        if self.stats.first_dispatch is None:
            self.stats.first_dispatch, self.stats.cpu_first = now, _cpu_seconds()
        start = max(now, self._free_at)
        self._free_at = start + self.step_seconds
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return _SimulatedPending(self, self._free_at, int((np.asarray(segment_ids) > 0).sum()))


class SimulatedOutput(NamedTuple):
    """model.extractor.StepOutput's fields, without importing JAX."""

    activations: dict
    moments: dict


class _SimulatedPending:
    def __init__(self, extractor: SimulatedExtractor, done_at: float, tokens: int):
        self._ex, self._done_at, self._tokens = extractor, done_at, tokens

    def result(self):
        from llm_activations.format.stats import Moments

        left = self._done_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        ex, stats = self._ex, self._ex.stats
        stats.batches += 1
        stats.in_flight -= 1
        stats.tokens += self._tokens
        stats.busy += ex.step_seconds
        stats.last_result, stats.cpu_last = time.perf_counter(), _cpu_seconds()
        moments = {k: Moments(self._tokens, ex._zeros, ex._zeros, 0.0) for k in ex.outputs}
        return SimulatedOutput(dict(ex._acts), moments)
