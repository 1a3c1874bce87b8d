"""The Beam transforms and DoFns of the extraction pipeline.

Elements are *work units* (contiguous doc_index ranges, see inputs.py) until `Batch` turns each unit
into fixed-shape model batches followed by a UnitEnd marker. There is no GroupByKey on the data
path: every step after the initial Reshuffle of unit descriptors fuses into one streaming stage,
so a worker holds one unit's tokens and a couple of batches of activations at a time, whatever the
corpus size. Each unit is written to its own shard file per layer by the worker that processed it,
in row order, so files depend only on input and configuration, and a retried bundle rewrites the
same bytes under the same names.

When a unit's files are complete the writer records a *unit manifest* (manifests.py): the unit's
shards, counts, rejected records and per-layer Moments. metadata.json is built from the manifests
alone, and `--resume` skips the units that already have one.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from dataclasses import dataclass, field, replace

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.transforms.window import GlobalWindow

from llm_activations import inputs
from llm_activations.format import hooks as hk
from llm_activations.format import manifests
from llm_activations import packing
from llm_activations.format import records

NAMESPACE = "llm_activations"
RUN = "run"


# ----------------------------------------------------------------------------- elements


@dataclass
class UnitData:
    """A work unit on its way through read -> tokenize -> segment -> pack."""

    unit: inputs.WorkUnit
    docs: list = field(default_factory=list)  # [Document]
    tokens: list = field(default_factory=list)  # [(doc_index, int32 array)]
    segments: list = field(default_factory=list)  # [packing.Segment]
    rows: list = field(default_factory=list)  # [[segment position, ...]]
    counts: collections.Counter = field(default_factory=collections.Counter)
    rejected: list = field(default_factory=list)  # JSON lines for rejected/


@dataclass(frozen=True)
class UnitEnd:
    """Follows the last batch of a unit: its files can be closed and its manifest written.

    Batch fills in counts and rejected records; Extract adds the unit's per-layer Moments.
    """

    unit: inputs.WorkUnit
    counts: dict
    rejected: list
    moments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its Extractor (plain data, cheap to pickle)."""

    model: str
    layers: tuple
    batch_size: int
    seq_len: int
    compute_dtype: str
    storage_dtype: str
    mesh_shape: tuple | None
    hooks: tuple = hk.DEFAULT_HOOKS
    compilation_cache: str | None = None  # folder, "none", or None for the default


def _counter(name: str):
    return beam.metrics.Metrics.counter(NAMESPACE, name)


# ----------------------------------------------------------------------------- read


class ReadDocuments(beam.DoFn):
    """WorkUnit -> UnitData with its documents; unusable records are kept with their reason."""

    def __init__(self, text_field: str, num_hosts: int = 1, host_index: int = 0):
        self._text_field, self._num_hosts, self._host_index = text_field, num_hosts, host_index
        self._documents, self._rejected = _counter("documents_read"), _counter("rejected")

    def process(self, unit: inputs.WorkUnit):
        data = UnitData(unit)
        for item in inputs.read_unit(unit, self._text_field, self._num_hosts, self._host_index):
            if isinstance(item, inputs.Rejected):
                data.counts["rejected"] += 1
                data.rejected.append(item.to_json())
                self._rejected.inc()
            else:
                data.docs.append(item)
                self._documents.inc()
        yield data


# ----------------------------------------------------------------------------- tokenize


_TOKENIZERS = shared.Shared()


class _Holder:
    """Weak-referenceable box: apache_beam.utils.shared caches objects by weak reference."""

    def __init__(self, value):
        self.value = value


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


class Tokenize(beam.DoFn):
    """Tokenizes a unit's documents in one batched call: exactly tokenizer(text)["input_ids"]."""

    BATCH = 256  # documents per tokenizer call: big enough for the Rust tokenizer's threads

    def __init__(self, model: str):
        self._model = model
        self._tokens = _counter("tokens_read")

    def setup(self):
        # One tokenizer per worker process, shared by its threads.
        self._tokenizer = _TOKENIZERS.acquire(lambda: _Holder(load_tokenizer(self._model)), tag=self._model).value

    def process(self, data: UnitData):
        docs = data.docs
        for i in range(0, len(docs), self.BATCH):
            chunk = docs[i : i + self.BATCH]
            ids = self._tokenizer([d.text for d in chunk])["input_ids"]
            for doc, tok in zip(chunk, ids):
                if not tok:  # text that encodes to no token cannot be extracted
                    data.counts["rejected"] += 1
                    data.rejected.append(inputs.Rejected(
                        doc.doc_index, "", "text encodes to zero tokens", doc.text[: inputs.EXCERPT]).to_json())
                    continue
                data.tokens.append((doc.doc_index, np.asarray(tok, dtype=np.int32)))
                data.counts["documents"] += 1
                self._tokens.inc(len(tok))
        data.docs = []  # the texts are no longer needed: keep a unit's memory to its tokens
        yield data


# ----------------------------------------------------------------------------- segment, pack, batch


def segment_unit(data: UnitData, seq_len: int) -> UnitData:
    """Split every document into consecutive segments of at most seq_len tokens."""
    segments = [s for doc_index, tok in data.tokens for s in packing.split_document(doc_index, tok, seq_len)]
    data.counts["segments"] += len(segments)
    return replace(data, tokens=[], segments=segments)


def pack_unit(data: UnitData, seq_len: int, mode: str) -> UnitData:
    """Place the unit's segments into rows (best-fit decreasing in pack mode, one per row in pad)."""
    rows = packing.pack_rows([len(s.tokens) for s in data.segments], seq_len, mode)
    return replace(data, rows=rows)


class Batch(beam.DoFn):
    """UnitData -> fixed-shape packing.Batch elements, then a UnitEnd carrying the unit's counts."""

    def __init__(self, batch_size: int, seq_len: int):
        self._batch_size, self._seq_len = batch_size, seq_len
        self._padding = _counter("padding_tokens")

    def process(self, data: UnitData):
        counts = data.counts
        for batch in packing.make_batches(data.segments, data.rows, self._batch_size, self._seq_len, data.unit.index):
            counts["batches"] += 1
            counts["sequences"] += int((batch.lengths > 0).sum())
            counts["tokens"] += batch.real_tokens
            counts["padding_tokens"] += batch.tokens.size - batch.real_tokens
            self._padding.inc(batch.tokens.size - batch.real_tokens)
            yield batch
        yield UnitEnd(data.unit, dict(counts), data.rejected)


# ----------------------------------------------------------------------------- extract


_MODELS = shared.Shared()


def load_extractor(spec: ModelSpec):
    from llm_activations.model.extractor import Extractor

    return Extractor(spec.model, layers=spec.layers, batch_size=spec.batch_size, seq_len=spec.seq_len,
                     compute_dtype=spec.compute_dtype, storage_dtype=spec.storage_dtype, mesh_shape=spec.mesh_shape,
                     hooks=spec.hooks, compilation_cache=spec.compilation_cache)


def encode_rows(batch: packing.Batch, activations: dict) -> list:
    """((hook, layer), unit, Example bytes, tokens) for every non-empty row of a finished batch."""
    out = []
    for r in np.flatnonzero(batch.lengths):
        n = int(batch.lengths[r])
        ints = {"token_ids": batch.tokens[r, :n], "doc_index": batch.doc_index[r, :n],
                "token_index": batch.token_index[r, :n], "position": batch.positions[r, :n]}
        for key, acts in activations.items():
            out.append((key, batch.unit, records.encode_example(acts[r, :n], **ints), n))
    return out


class ExtractActivations(beam.DoFn):
    """Runs the model on each batch and emits per-layer records; keeps the device busy.

    The Extractor (weights on the device mesh, step compiled once) is built once per worker
    process in setup() and shared by its threads. JAX dispatch is asynchronous: batch i+1 is
    dispatched before blocking on batch i's results, so encoding and writing batch i overlaps with
    the device computing batch i+1. Each UnitEnd leaves with the unit's per-layer Moments; at
    bundle end the DoFn reports its tokens and its process's one compile of the step (keyed by
    worker, so MergeRun counts each once) on the 'run' output.
    """

    def __init__(self, spec: ModelSpec):
        self._spec = spec
        self._tokens_counter, self._rows_counter = _counter("tokens"), _counter("rows")
        self._batches_counter = _counter("batches")

    def setup(self):
        try:
            self._extractor = _MODELS.acquire(lambda: load_extractor(self._spec), tag=repr(self._spec))
        except Exception as e:
            from llm_activations.model.devices import explain_busy_accelerator
            from llm_activations.errors import AcceleratorBusy

            why = explain_busy_accelerator(e)
            if why:
                raise AcceleratorBusy(f"{AcceleratorBusy.MARK} {why}") from e
            raise
        self._progress = _progress_bar()
        self._fail_hook = _FailOnce.from_env()

    def start_bundle(self):
        self._queue = collections.deque()  # (batch, pending) and UnitEnd, in arrival order
        self._pending_batches = 0
        self._moments: dict = {}  # unit index -> {(hook, layer): Moments}
        self._tokens = 0
        self._busy = 0.0

    def process(self, element):
        if isinstance(element, UnitEnd):
            self._queue.append(element)
        else:
            if self._fail_hook:
                self._fail_hook.tick()
            self._queue.append((element, self._extractor.dispatch(element.tokens, element.segment_ids, element.positions)))
            self._pending_batches += 1
        yield from self._drain(keep_newest=True)

    def finish_bundle(self):
        for value in self._drain(keep_newest=False):
            yield WindowedValue(value, 0, [GlobalWindow()])
        worker = f"{socket.gethostname()}:{os.getpid()}"
        stats = self._extractor.compile_stats
        run = {"compiles": {worker: (stats.seconds, stats.cache_hit)}, "tokens": self._tokens,
               "extract_seconds": self._busy, "mesh": {str(k): int(v) for k, v in self._extractor.mesh.shape.items()},
               "workers": {worker}}
        yield beam.pvalue.TaggedOutput(RUN, WindowedValue(run, 0, [GlobalWindow()]))

    def teardown(self):
        if getattr(self, "_progress", None) is not None:
            self._progress.close()

    def _drain(self, keep_newest: bool):
        while self._queue:
            head = self._queue[0]
            if isinstance(head, UnitEnd):
                self._queue.popleft()
                yield replace(head, moments=self._moments.pop(head.unit.index, {}))
                continue
            if keep_newest and self._pending_batches == 1:
                return  # the newest batch is still computing; leave it in flight
            batch, pending = self._queue.popleft()
            self._pending_batches -= 1
            t0 = time.perf_counter()
            result = pending.result()
            yield from encode_rows(batch, result.activations)
            self._account(batch, result.moments)
            self._busy += time.perf_counter() - t0

    def _account(self, batch: packing.Batch, moments: dict) -> None:
        unit = self._moments.setdefault(batch.unit, {})
        for key, m in moments.items():
            unit[key] = unit[key].merge(m) if key in unit else m
        n = batch.real_tokens
        self._tokens += n
        self._tokens_counter.inc(n)
        self._rows_counter.inc(int((batch.lengths > 0).sum()))
        self._batches_counter.inc()
        if self._progress is not None:
            self._progress.update(n)



class _FailOnce:
    """Test hook for retry tests: LLM_ACTIVATIONS_TEST_FAIL_ONCE="N:MARKER" makes the DoFn raise
    once, at its N-th batch, in the first process that creates the MARKER file."""

    def __init__(self, after: int, marker: str):
        self._left, self._marker = after, marker

    @staticmethod
    def from_env():
        value = os.environ.get("LLM_ACTIVATIONS_TEST_FAIL_ONCE")
        if not value:
            return None
        after, marker = value.split(":", 1)
        return _FailOnce(int(after), marker)

    def tick(self):
        self._left -= 1
        if self._left < 0 and not os.path.exists(self._marker):
            open(self._marker, "w").close()
            raise RuntimeError("injected failure (LLM_ACTIVATIONS_TEST_FAIL_ONCE test hook)")


def _progress_bar():
    """A tokens/s progress line on stderr for local runs (one per worker process)."""
    if os.environ.get("LLM_ACTIVATIONS_NO_PROGRESS"):
        return None
    from tqdm import tqdm

    return tqdm(unit=" tok", unit_scale=True, desc="extract", mininterval=1.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------- write


class WriteShards(beam.DoFn):
    """Appends each record to its unit's shard file for its hook and layer; at UnitEnd closes the
    files and writes the unit's rejected records and manifest.

    Unit u is shard u of every hook and layer (part-0000u-of-N). A unit whose documents were all
    rejected still gets its (empty) files, so a dataset always has N files per hook and layer.
    Emits the manifest.
    """

    def __init__(self, output: str, layers: tuple, num_units: int, compression: str, fingerprint: str,
                 hooks: tuple = hk.DEFAULT_HOOKS):
        self._output, self._layers, self._num_units = output, layers, num_units
        self._compression, self._fingerprint, self._hooks = compression, fingerprint, hooks

    def start_bundle(self):
        self._writers: dict = {}

    def _writer(self, hook_layer: tuple, unit: int) -> records.ShardWriter:
        key = (hook_layer, unit)
        if key not in self._writers:
            hook, layer = hook_layer
            rel = records.shard_relpath(layer, unit, self._num_units, self._compression, hook=hook)
            self._writers[key] = (rel, records.ShardWriter(f"{self._output.rstrip('/')}/{rel}", self._compression))
        return self._writers[key][1]

    def process(self, element):
        if isinstance(element, UnitEnd):
            yield self._finish_unit(element)
            return
        hook_layer, unit, example, n = element
        self._writer(hook_layer, unit).write(example, n)

    def _finish_unit(self, end: UnitEnd) -> dict:
        u = end.unit.index
        shards = []
        for hook in self._hooks:
            for layer in self._layers:
                self._writer((hook, layer), u)  # a unit without records still gets its (empty) file
                rel, writer = self._writers.pop(((hook, layer), u))
                shards.append({"path": rel, **hk.shard_fields(hook, layer, self._hooks), **writer.close()})
        manifest = manifests.unit_manifest(end.unit, self._fingerprint, end.counts, shards, end.moments,
                                           rejected_file=None)
        if end.rejected:
            manifest["rejected_file"] = manifests.write_rejected(self._output, u, self._num_units, end.rejected)
        manifests.write_manifest(self._output, manifest, self._num_units)  # last: the unit is complete only now
        return manifest

    def finish_bundle(self):
        if self._writers:  # cannot happen: every unit ends with a UnitEnd in the same bundle
            raise RuntimeError(f"shards left open at bundle end: {sorted(self._writers)}")


# ----------------------------------------------------------------------------- run statistics


class MergeRun(beam.CombineFn):
    """Sums tokens and extract time over bundles, unions worker ids and their compiles (one per
    worker process: the Extractor compiles its step once, ahead of time)."""

    def create_accumulator(self):
        return {"compiles": {}, "tokens": 0, "extract_seconds": 0.0, "workers": set(), "mesh": None}

    def add_input(self, acc, run):
        acc["compiles"].update(run["compiles"])
        acc["tokens"] += run["tokens"]
        acc["extract_seconds"] += run["extract_seconds"]
        acc["workers"] |= set(run["workers"])
        acc["mesh"] = acc["mesh"] or run["mesh"]  # every worker builds the same mesh from one spec
        return acc

    def merge_accumulators(self, accs):
        total = self.create_accumulator()
        for a in accs:
            self.add_input(total, a)
        return total

    def extract_output(self, acc):
        compiles = acc["compiles"].values()
        return {**acc, "compilations": len(compiles), "compile_seconds": sum(s for s, _ in compiles),
                "compile_cache_hit": bool(compiles) and all(hit for _, hit in compiles)}


# ----------------------------------------------------------------------------- composite transforms


class ExtractUnits(beam.PTransform):
    """Work units -> unit manifests (shards, counts, rejected, Moments), plus the 'run' side output."""

    def __init__(self, cfg, num_units: int, spec: ModelSpec, fingerprint: str):
        super().__init__()
        self._cfg, self._num_units, self._spec, self._fingerprint = cfg, num_units, spec, fingerprint

    def expand(self, units):
        cfg = self._cfg
        extracted = (
            units
            | "ReadDocuments" >> beam.ParDo(ReadDocuments(cfg.text_field, cfg.num_hosts, cfg.host_index))
            | "Tokenize" >> beam.ParDo(Tokenize(cfg.model))
            | "Segment" >> beam.Map(segment_unit, cfg.seq_len)
            | "Pack" >> beam.Map(pack_unit, cfg.seq_len, cfg.mode)
            | "Batch" >> beam.ParDo(Batch(cfg.batch_size, cfg.seq_len))
            | "Extract" >> beam.ParDo(ExtractActivations(self._spec)).with_outputs(RUN, main="records")
        )
        manifests_out = extracted.records | "WriteShards" >> beam.ParDo(
            WriteShards(cfg.output, tuple(cfg.layers), self._num_units, cfg.compression, self._fingerprint,
                        tuple(cfg.hooks)))
        return {"manifests": manifests_out, RUN: extracted[RUN]}
