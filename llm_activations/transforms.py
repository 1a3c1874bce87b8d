"""The Beam transforms and DoFns of the extraction pipeline.

Elements are *work units* (contiguous doc_index ranges, see inputs.py) until `Batch` turns each unit
into fixed-shape model batches followed by a UnitEnd marker. There is no GroupByKey on the data
path: every step after the initial Reshuffle of unit descriptors fuses into one streaming stage,
so a worker holds one unit's tokens and a couple of batches of activations at a time, whatever the
corpus size. Each unit is written to its own shard file per hook and layer by the worker that
processed it, in row order, so files depend only on input and configuration, and a retried bundle
rewrites the same bytes under the same names.

This module is the Beam layer only: the host work on a unit (read, tokenize, segment, pack, cut
into batches), the element types and the loaders live in units.py, which imports no Beam.

When a unit's files are complete the writer records a *unit manifest* (manifests.py): the unit's
shards, counts, rejected records and per-(hook, layer) Moments. metadata.json is built from the
manifests alone, and `--resume` skips the units that already have one.

The host keeps the accelerator busy by overlapping everything with the device's work:
PrepareUnits reads, tokenizes and packs the next unit on a background thread while the current
unit's batches compute; ExtractActivations keeps IN_FLIGHT batches dispatched while it collects
one; WriteShards hands each batch to one writer thread per (hook, layer) output, which frame the
records around the activation bytes (never copied before the write) while a thread per open file
hashes them. Every queue is bounded, so a worker's memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.transforms.window import GlobalWindow

from llm_activations import inputs, packing
from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import manifests
from llm_activations.format import records
from llm_activations import units
from llm_activations.units import Extracted, ModelSpec, PrepareSpec, UnitData, UnitEnd

NAMESPACE = "llm_activations"
RUN = "run"


_TOKENIZERS = shared.Shared()


class _Holder:
    """Weak-referenceable box: apache_beam.utils.shared caches objects by weak reference."""

    def __init__(self, value):
        self.value = value


def _counter(name: str):
    return beam.metrics.Metrics.counter(NAMESPACE, name)


# ----------------------------------------------------------------------------- prepare (units.prepare_unit, a unit ahead)


class PrepareUnits(beam.DoFn):
    """WorkUnit -> packed UnitData, one unit ahead of the device.

    Packing is best-fit over a whole unit, so a unit must be read and tokenized whole before its
    first batch exists. process(unit k) therefore starts preparing unit k on a background thread
    and emits unit k-1, prepared while unit k-2's batches computed; the last unit of a bundle
    leaves in finish_bundle. At most two units are held (the one being batched, the one being
    prepared), whatever the corpus size. Beam counters are incremented here, on the bundle's
    thread, from what the background thread counted.
    """

    def __init__(self, spec: PrepareSpec):
        self._spec = spec
        self._counters = {name: _counter(name) for name in ("documents_read", "rejected", "tokens_read")}

    def setup(self):
        # One tokenizer per worker process, shared by its threads.
        self._tokenizer = _TOKENIZERS.acquire(lambda: _Holder(units.load_tokenizer(self._spec.model)), tag=self._spec.model).value
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")

    def start_bundle(self):
        self._ahead: Future | None = None

    def process(self, unit: inputs.WorkUnit):
        following = self._pool.submit(units.prepare_unit, unit, self._spec, self._tokenizer)
        if self._ahead is not None:
            yield self._emit(self._ahead)
        self._ahead = following

    def finish_bundle(self):
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            yield WindowedValue(self._emit(ahead), 0, [GlobalWindow()])

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _emit(self, prepared: Future) -> UnitData:
        data = prepared.result()
        for name, n in data.metrics.items():
            self._counters[name].inc(n)
        return data


# ----------------------------------------------------------------------------- batch


class Batch(beam.DoFn):
    """UnitData -> fixed-shape packing.Batch elements, then a UnitEnd carrying the unit's counts."""

    def __init__(self, batch_size: int, seq_len: int):
        self._batch_size, self._seq_len = batch_size, seq_len
        self._padding = _counter("padding_tokens")

    def process(self, data: UnitData):
        for batch in units.unit_batches(data, self._batch_size, self._seq_len):
            self._padding.inc(batch.tokens.size - batch.real_tokens)
            yield batch
        yield UnitEnd(data.unit, dict(data.counts), data.rejected)


# ----------------------------------------------------------------------------- extract


_MODELS = shared.Shared()


IN_FLIGHT = 2  # batches left computing on the device while the host collects an earlier one


class ExtractActivations(beam.DoFn):
    """Runs the model on each batch and emits an Extracted per batch; keeps the device busy.

    The Extractor (weights on the device mesh, step compiled once) is built once per worker
    process in setup() and shared by its threads. Dispatch is asynchronous: the DoFn collects
    batch i only once batches i+1..i+IN_FLIGHT are dispatched, so the device always has work
    queued while the host collects, hands off and writes batch i. Each UnitEnd leaves with the
    unit's per-(hook, layer) Moments; at bundle end the DoFn reports its tokens and its process's
    one compile of the step (keyed by worker, so MergeRun counts each once) on the 'run' output.
    """

    def __init__(self, spec: ModelSpec, factory=None):
        self._spec, self._factory = spec, factory  # factory: pipeline.run_extract's stand-in device, or None
        self._tokens_counter, self._rows_counter = _counter("tokens"), _counter("rows")
        self._batches_counter = _counter("batches")

    def setup(self):
        try:
            self._extractor = _MODELS.acquire(lambda: units.load_extractor(self._spec, self._factory),
                                              tag=repr((self._spec, self._factory)))
        except Exception as e:
            from llm_activations.model.devices import explain_busy_accelerator
            from llm_activations.errors import AcceleratorBusy

            why = explain_busy_accelerator(e)
            if why:
                raise AcceleratorBusy(f"{AcceleratorBusy.MARK} {why}") from e
            raise
        self._progress = units.progress_bar()

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
            self._queue.append((element, self._extractor.dispatch(*element.inputs)))
            self._pending_batches += 1
        yield from self._drain(keep=IN_FLIGHT)

    def finish_bundle(self):
        for value in self._drain(keep=0):
            yield WindowedValue(value, 0, [GlobalWindow()])
        stats = self._extractor.compile_stats
        run = {"compiles": {_worker(): (stats.seconds, stats.cache_hit)}, "tokens": self._tokens,
               "extract_seconds": self._busy, "mesh": _mesh(self._extractor), "workers": {_worker()}}
        yield beam.pvalue.TaggedOutput(RUN, WindowedValue(run, 0, [GlobalWindow()]))

    def teardown(self):
        if getattr(self, "_progress", None) is not None:
            self._progress.close()

    def _drain(self, keep: int):
        """Collect finished batches (and pass UnitEnds on in order) until `keep` are in flight."""
        while self._queue:
            head = self._queue[0]
            if isinstance(head, UnitEnd):
                self._queue.popleft()
                yield replace(head, moments=self._moments.pop(head.unit.index, {}), run={
                    "worker": _worker(), "compilations": 1, "mesh": _mesh(self._extractor)})  # one AOT compile per process
                continue
            if self._pending_batches <= keep:
                return  # the newest batches are still computing; leave them in flight
            batch, pending = self._queue.popleft()
            self._pending_batches -= 1
            t0 = time.perf_counter()
            result = pending.result()
            self._account(batch, result.moments)
            self._busy += time.perf_counter() - t0
            yield Extracted(batch, result.activations)

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


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _mesh(extractor) -> dict:
    return {str(k): int(v) for k, v in extractor.mesh.shape.items()}


# ----------------------------------------------------------------------------- write


class WriteShards(beam.DoFn):
    """Appends each batch's rows to its unit's shard file for each hook and layer; at UnitEnd closes
    the files and writes the unit's rejected records and manifest.

    Unit u is shard u of every hook and layer (part-0000u-of-N). A unit whose documents were all
    rejected still gets its (empty) files, so a dataset always has N files per hook and layer.
    Emits the manifest.

    Each (hook, layer) output has a writer thread of its own (OutputWriter), fed through a bounded
    queue: the bundle's thread only encodes the rows' int64 features (once for all outputs) and
    goes back to the device. At UnitEnd it waits for the outputs' files to be complete, so a unit's
    manifest is written, and emitted, only after its shards; meanwhile the device computes the
    next unit.
    """

    QUEUE = 2  # batches waiting per output writer (beyond the one being written)

    def __init__(self, output: str, layers: tuple, num_units: int, compression: str, fingerprint: str,
                 hooks: tuple = hk.DEFAULT_HOOKS):
        self._output, self._layers, self._num_units = output, layers, num_units
        self._compression, self._fingerprint, self._hooks = compression, fingerprint, hooks
        self._writers: dict = {}

    def start_bundle(self):
        self._stop_writers()  # left over only if the previous bundle failed
        # Hook-major order, as the manifest lists the shards.
        self._writers = {(hook, layer): OutputWriter(self._output, hook, layer, self._hooks, self._num_units,
                                                     self._compression, self.QUEUE)
                         for hook in self._hooks for layer in self._layers}

    def process(self, element):
        try:
            if isinstance(element, UnitEnd):
                yield self._finish_unit(element)
                return
            batch = element.batch
            tails = records.int_features_tails(batch.lengths, token_ids=batch.tokens, doc_index=batch.doc_index,
                                               token_index=batch.token_index, position=batch.positions)
            for key, writer in self._writers.items():
                writer.put(batch.unit, batch.lengths, tails, element.activations[key])
        except BaseException:
            # A failed bundle is retried on another DoFn instance, and runners need not tear this
            # one down: stop its writers now, so their unfinished files are aborted at once.
            self._stop_writers()
            raise

    def _finish_unit(self, end: UnitEnd) -> dict:
        u = end.unit.index
        closing = [writer.close_unit(u) for writer in self._writers.values()]  # all outputs close at once
        shards = [f.result() for f in closing]
        manifest = manifests.unit_manifest(end.unit, self._fingerprint, end.counts, shards, end.moments,
                                           rejected_file=None, run=end.run)
        if end.rejected:
            manifest["rejected_file"] = manifests.write_rejected(self._output, u, self._num_units, end.rejected)
        manifests.write_manifest(self._output, manifest, self._num_units)  # last: the unit is complete only now
        return manifest

    def finish_bundle(self):
        abandoned = self._stop_writers()
        if abandoned:  # cannot happen: every unit ends with a UnitEnd in the same bundle
            raise RuntimeError(f"shards left open at bundle end: units {abandoned}")

    def teardown(self):
        self._stop_writers()

    def _stop_writers(self) -> list:
        """Stop the writer threads; returns the units whose files were still open (abandoned)."""
        writers, self._writers = self._writers, {}
        return sorted({u for w in writers.values() for u in w.stop()})


class OutputWriter:
    """One (hook, layer)'s shard files, written in arrival order by a thread of its own.

    put() queues a batch's rows (blocking while QUEUE batches wait: memory stays bounded and the
    bundle's thread slows to the writer's pace); close_unit() queues the closing of a unit's file
    and returns a Future of its shard description. Each row is framed around a view of the
    activations (records.example_parts / frame_parts): the activation bytes go from the device's
    result to the file without a copy, hashed on the ShardWriter's own thread as they are written.
    A failure is raised on the bundle's thread at its next put() or close_unit().
    """

    def __init__(self, output: str, hook: str, layer: int, hooks: tuple, num_units: int, compression: str, depth: int):
        self._output, self._num_units, self._compression = output, num_units, compression
        self._hook, self._layer = hook, layer
        self._fields = hk.shard_fields(hook, layer, hooks)  # what the manifest's shards entry says it is
        self._queue: queue.Queue = queue.Queue(depth)
        self._files: dict = {}  # unit -> (relative path, ShardWriter)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"write-{hook}-{layer}", daemon=True)
        self._thread.start()

    def put(self, unit: int, lengths: np.ndarray, tails: list, activations: np.ndarray) -> None:
        self._raise_failure()
        self._queue.put(("rows", unit, lengths, tails, activations))

    def close_unit(self, unit: int) -> Future:
        self._raise_failure()
        done: Future = Future()
        self._queue.put(("close", unit, done))
        return done

    def stop(self) -> list:
        """Finish what is queued, then end the thread; returns the units of files left open, which
        are aborted (ShardWriter.abort: nothing appears under their final names)."""
        self._queue.put(None)
        self._thread.join()
        abandoned = sorted(self._files)
        for _, writer in self._files.values():
            writer.abort()
        self._files.clear()
        return abandoned

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self._hook} layer {self._layer} failed: {self._error!r}") from self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:  # keep draining so that put() never blocks forever
                if item[0] == "close":
                    item[2].set_exception(self._error)
                continue
            try:
                if item[0] == "rows":
                    self._write_rows(*item[1:])
                else:
                    item[2].set_result(self._close(item[1]))
            except BaseException as e:  # noqa: BLE001 - handed to the bundle's thread
                self._error = e
                if item[0] == "close":
                    item[2].set_exception(e)

    def _file(self, unit: int) -> records.ShardWriter:
        if unit not in self._files:
            rel = records.shard_relpath(self._layer, unit, self._num_units, self._compression, hook=self._hook)
            path = fileio.join(self._output, rel)
            self._files[unit] = (rel, records.ShardWriter(path, self._compression, hash_in_background=True))
        return self._files[unit][1]

    def _write_rows(self, unit: int, lengths: np.ndarray, tails: list, activations: np.ndarray) -> None:
        writer = self._file(unit)
        for r in np.flatnonzero(lengths).tolist():
            n = int(lengths[r])
            parts = records.frame_parts(*records.example_parts(activations[r, :n], tails[r]))
            writer.write_parts(parts, n)

    def _close(self, unit: int) -> dict:
        self._file(unit)  # a unit without records still gets its (empty) file
        rel, writer = self._files.pop(unit)
        return {"path": rel, **self._fields, **writer.close()}


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

    def __init__(self, plan, extractor_factory=None):
        """plan: the run's RunPlan (run_plan.py); extractor_factory: see pipeline.run_extract."""
        super().__init__()
        self._plan, self._factory = plan, extractor_factory

    def expand(self, units):
        cfg = self._plan.cfg
        extracted = (
            units
            | "ReadTokenizePack" >> beam.ParDo(PrepareUnits(PrepareSpec(cfg.text_field, cfg.model, cfg.seq_len, cfg.mode,
                                                                       cfg.num_hosts, cfg.host_index,
                                                                       cfg.prepend_token_id)))
            | "Batch" >> beam.ParDo(Batch(cfg.batch_size, cfg.seq_len))
            | "Extract" >> beam.ParDo(ExtractActivations(ModelSpec.of(cfg), self._factory)).with_outputs(RUN, main="records")
        )
        manifests_out = extracted.records | "WriteShards" >> beam.ParDo(
            WriteShards(cfg.output, tuple(cfg.layers), self._plan.num_units, cfg.compression, self._plan.fingerprint,
                        tuple(cfg.hooks)))
        return {"manifests": manifests_out, RUN: extracted[RUN]}
