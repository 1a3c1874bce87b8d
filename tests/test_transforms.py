"""Each pipeline step on its own with Beam's TestPipeline and assert_that."""

from __future__ import annotations

import os
import threading

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from llm_activations import inputs
from llm_activations import packing
from llm_activations import transforms as T
from llm_activations import units as U
from pipeline_fixtures import tiny_model_with_tokenizer, write_jsonl


def test_prepare_units_emits_every_unit_once_in_order_one_unit_ahead(tmp_path):
    folder, _ = tiny_model_with_tokenizer()
    lines = [{"text": f"doc {i} " + "word " * (i % 40)} for i in range(60)] + ["{bad"]
    path = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    sources = inputs.plan_sources([path], "text")
    units = inputs.plan_units(sources, start=0, stop=len(lines), num_units=4)
    spec = U.PrepareSpec("text", folder, 16, "pack")
    tok = U.load_tokenizer(folder)
    expected = [U.prepare_unit(u, spec, tok) for u in units]
    with TestPipeline() as p:
        out = p | beam.Create(units) | beam.ParDo(T.PrepareUnits(spec))
        got = out | beam.Map(lambda d: (d.unit.index, dict(d.counts), len(d.rows), [s.tokens.tolist() for s in d.segments]))
        assert_that(got, equal_to([(d.unit.index, dict(d.counts), len(d.rows), [s.tokens.tolist() for s in d.segments])
                                   for d in expected]))
    assert sum(d.counts["rejected"] for d in expected) == 1 and sum(d.counts["documents"] for d in expected) == 60


def test_prepare_units_looks_one_unit_ahead(tmp_path):
    # Driven by hand, as a runner does: unit k is emitted while unit k+1 is prepared.
    folder, _ = tiny_model_with_tokenizer()
    path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": f"doc {i}"} for i in range(9)])
    units = inputs.plan_units(inputs.plan_sources([path], "text"), start=0, stop=9, num_units=3)
    fn = T.PrepareUnits(U.PrepareSpec("text", folder, 16, "pack"))
    fn.setup()
    fn.start_bundle()
    emitted = [[d.unit.index for d in fn.process(u)] for u in units]
    last = [v.value.unit.index for v in fn.finish_bundle()]
    fn.teardown()
    assert emitted == [[], [0], [1]] and last == [2]


def test_segment_pack_batch_fill_fixed_shapes():
    lengths = [150, 10, 64, 3, 40, 1]
    data = U.UnitData(inputs.WorkUnit(7, 0, len(lengths), ()),
                      tokens=[(d, np.arange(1, n + 1, dtype=np.int32)) for d, n in enumerate(lengths)])
    with TestPipeline() as p:
        out = (p | beam.Create([data]) | beam.Map(U.segment_unit, 64) | beam.Map(U.pack_unit, 64, "pack")
               | beam.ParDo(T.Batch(2, 64)))
        shapes = out | "Shapes" >> beam.Map(lambda b: "end" if isinstance(b, U.UnitEnd) else b.tokens.shape)
        # 150 -> 64+64+22: segments 64,64,64,40,22,10,3,1 fill 5 rows, 3 batches of 2 rows
        assert_that(shapes, equal_to([(2, 64), (2, 64), (2, 64), "end"]), label="shapes")
        counts = out | "Counts" >> beam.FlatMap(lambda b: [b.counts] if isinstance(b, U.UnitEnd) else [])
        total = sum(lengths)
        assert_that(counts, equal_to([{"segments": 8, "batches": 3, "sequences": 5, "tokens": total,
                                       "padding_tokens": 3 * 2 * 64 - total}]), label="counts")


def test_batch_rows_rebuild_every_segment():
    segs = [packing.Segment(d, 0, np.full(n, d + 1, np.int32)) for d, n in enumerate([5, 3, 7, 2])]
    rows = packing.pack_rows([5, 3, 7, 2], 8, "pack")
    batches = list(packing.make_batches(segs, rows, 2, 8))
    seen = {}
    for b in batches:
        for r in range(2):
            n = int(b.lengths[r])
            assert (b.segment_ids[r, n:] == 0).all() and (b.segment_ids[r, :n] > 0).all()
            for d in np.unique(b.doc_index[r, :n]):
                sel = (b.doc_index[r, :n] == d)
                seen[int(d)] = b.tokens[r, :n][sel].tolist()
                np.testing.assert_array_equal(b.positions[r, :n][sel], np.arange(sel.sum()))
    assert seen == {d: [d + 1] * n for d, n in enumerate([5, 3, 7, 2])}


def test_pad_mode_one_segment_per_row():
    assert packing.pack_rows([5, 3, 7], 8, "pad") == [[0], [1], [2]]


def _batch(lengths, seq_len=4, unit=0):
    """A packing.Batch whose real tokens are numbered 1.. in row order (one document per row)."""
    B = len(lengths)
    real = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    tokens = np.where(real, np.arange(1, B * seq_len + 1).reshape(B, seq_len), 0).astype(np.int32)
    positions = np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32)
    doc = np.where(real, np.arange(B)[:, None], 0)
    return packing.Batch(tokens, real.astype(np.int32), positions, doc, positions.astype(np.int64),
                         np.asarray(lengths, np.int64), unit)


def test_write_shards_writes_each_layer_in_row_order(tmp_path):
    from llm_activations.format import records

    layers = (2, 5)
    batches = [_batch([4, 0, 2]), _batch([3, 1, 0])]  # empty rows write no record
    acts = [{("resid_post", l): np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2) + 100 * b + l for l in layers}
            for b in range(2)]
    end = U.UnitEnd(inputs.WorkUnit(0, 0, 6, ()), {"tokens": 10}, [])
    with TestPipeline() as p:
        _ = (p | beam.Create([U.Extracted(b, a) for b, a in zip(batches, acts)] + [end])
             | beam.ParDo(T.WriteShards(str(tmp_path), layers, 1, "none", "fp")))
    for l in layers:
        got = [records.decode_example(d) for d in records.read_shard(str(tmp_path / records.shard_relpath(l, 0, 1)))]
        want = [(b, r) for b in range(2) for r in range(3) if batches[b].lengths[r]]
        assert len(got) == len(want) == 4
        for ex, (b, r) in zip(got, want):
            n = int(batches[b].lengths[r])
            assert ex["token_ids"].tolist() == batches[b].tokens[r, :n].tolist()
            np.testing.assert_array_equal(records.decode_activations(ex, np.float32, 2), acts[b][("resid_post", l)][r, :n])


def test_write_shards_gives_each_hook_and_layer_its_own_writer_and_file(tmp_path):
    from llm_activations.format import records

    hooks, layers = ("z", "resid_post"), (1, 2)
    batch = _batch([3, 2])
    # each output's activations differ (and z is wider), so a mixed-up file would show
    acts = {(h, l): np.full((2, 4, 6 if h == "z" else 2), 10 * i + 1, np.float32)
            for i, (h, l) in enumerate((h, l) for h in hooks for l in layers)}
    end = U.UnitEnd(inputs.WorkUnit(0, 0, 2, ()), {"tokens": 5}, [])
    fn = T.WriteShards(str(tmp_path), layers, 1, "none", "fp", hooks)
    fn.start_bundle()
    threads = {t.name for t in threading.enumerate()}
    assert {"write-z-1", "write-z-2", "write-resid_post-1", "write-resid_post-2"} <= threads
    list(fn.process(U.Extracted(batch, acts)))
    (manifest,) = list(fn.process(end))
    fn.finish_bundle()
    assert [(s["path"], s["hook"], s["layer"], s["records"], s["tokens"]) for s in manifest["shards"]] == [
        ("z/layer_01/part-00000-of-00001.tfrecord", "z", 1, 2, 5), ("z/layer_02/part-00000-of-00001.tfrecord", "z", 2, 2, 5),
        ("layer_01/part-00000-of-00001.tfrecord", "resid_post", 1, 2, 5),
        ("layer_02/part-00000-of-00001.tfrecord", "resid_post", 2, 2, 5)]
    for (h, l), a in acts.items():
        rows = [records.decode_example(d) for d in records.read_shard(str(tmp_path / records.shard_relpath(l, 0, 1, hook=h)))]
        for r, ex in enumerate(rows):
            n = int(batch.lengths[r])
            np.testing.assert_array_equal(records.decode_activations(ex, np.float32, a.shape[-1]), a[r, :n])


def test_write_shards_closes_files_at_unit_end(tmp_path):
    from llm_activations.format import records

    acts = {("resid_post", 0): np.ones((2, 4, 4), np.float32)}
    units = [inputs.WorkUnit(i, i * 5, i * 5 + 5, ()) for i in range(2)]
    ends = [U.UnitEnd(units[0], {"tokens": 4}, []), U.UnitEnd(units[1], {"rejected": 1}, ['{"doc_index": 7}'])]
    with TestPipeline() as p:
        infos = (p | beam.Create([U.Extracted(_batch([2, 0]), acts), U.Extracted(_batch([0, 2]), acts), *ends])
                 | beam.ParDo(T.WriteShards(str(tmp_path), (0,), 2, "none", "fp"))
                 | beam.Map(lambda m: (m["unit"], [(s["path"], s["records"], s["tokens"]) for s in m["shards"]],
                                       m["counts"]["tokens"], m["rejected_file"])))
        assert_that(infos, equal_to([(0, [("layer_00/part-00000-of-00002.tfrecord", 2, 4)], 4, None),
                                     (1, [("layer_00/part-00001-of-00002.tfrecord", 0, 0)], 0,
                                      "rejected/part-00001-of-00002.jsonl")]))
    assert len(list(records.read_shard(str(tmp_path / "layer_00/part-00000-of-00002.tfrecord")))) == 2
    assert (tmp_path / "rejected/part-00001-of-00002.jsonl").read_text() == '{"doc_index": 7}\n'
    assert sorted(os.listdir(tmp_path / "_units")) == ["unit-00000-of-00002.json", "unit-00001-of-00002.json"]


class _RecordingExtractor:
    """Extractor stand-in that logs dispatches and collections (for ExtractActivations' order)."""

    def __init__(self, spec, log):
        from types import SimpleNamespace

        self.outputs, self.log = [(h, l) for h in spec.hooks for l in spec.layers], log
        self.mesh = SimpleNamespace(shape={"data": 1, "model": 1})
        self.compile_stats = SimpleNamespace(seconds=0.0, cache_hit=False)

    def dispatch(self, tokens, segment_ids, positions):
        from types import SimpleNamespace

        from llm_activations.format.stats import Moments

        i = int(tokens[0, 0])
        self.log.append(("dispatch", i))
        acts = {k: np.full(tokens.shape + (2,), i, np.float32) for k in self.outputs}
        moments = {k: Moments.of(np.full((int((segment_ids > 0).sum()), 2), float(i))) for k in self.outputs}
        return SimpleNamespace(result=lambda: self.log.append(("collect", i)) or SimpleNamespace(activations=acts, moments=moments))


class _RecordingFactory:
    def __init__(self):
        self.log = []

    def __call__(self, spec):
        return _RecordingExtractor(spec, self.log)


def test_extract_keeps_two_batches_in_flight_and_units_in_order():
    factory = _RecordingFactory()
    spec = U.ModelSpec("unused", (3,), 2, 4, "float32", "float32", None)
    fn = T.ExtractActivations(spec, factory)
    fn.setup()
    fn.start_bundle()
    unit = inputs.WorkUnit(0, 0, 5, ())
    out = []
    for i in range(1, 6):
        b = _batch([4, 1])
        b.tokens[0, 0] = i  # the batch's number, read back by the stand-in
        out += list(fn.process(b))
    out += list(fn.process(U.UnitEnd(unit, {"tokens": 25}, [])))
    out += [v.value for v in fn.finish_bundle() if not isinstance(v, beam.pvalue.TaggedOutput)]
    fn.teardown()
    log = factory.log
    for i in range(1, 4):  # batch i is collected only when i+1 and i+2 have been dispatched
        assert log.index(("dispatch", i + 2)) < log.index(("collect", i))
    assert [e.batch.tokens[0, 0] for e in out if isinstance(e, U.Extracted)] == [1, 2, 3, 4, 5]
    assert isinstance(out[-1], U.UnitEnd) and out[-1].moments[("resid_post", 3)].count == 25
    assert out[-1].moments[("resid_post", 3)].mean[0] == pytest.approx(3.0)  # (1+2+3+4+5) * 5 tokens / 25


def test_a_failed_layer_writer_fails_the_bundle_and_leaves_no_shard(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the output 'folder' is a file: creating layer_00/ inside it fails
    fn = T.WriteShards(str(blocker), (0,), 1, "none", "fp")
    fn.start_bundle()
    list(fn.process(U.Extracted(_batch([2, 1]), {("resid_post", 0): np.ones((2, 4, 3), np.float32)})))
    # the writer thread's error reaches the bundle's thread: raised by put() (RuntimeError) or,
    # if it came later, through the unit's close (the original error)
    with pytest.raises((NotADirectoryError, RuntimeError), match="Not a directory|writing resid_post layer 0 failed"):
        list(fn.process(U.UnitEnd(inputs.WorkUnit(0, 0, 2, ()), {}, [])))
    # the failing bundle stopped its writers itself: a retry runs on another instance, and a
    # runner need not call teardown on this one
    assert not [t for t in threading.enumerate() if t.name.startswith("write-resid_post-0")]
    fn.teardown()
    assert blocker.read_text() == "" and not os.path.exists(tmp_path / "_units")


def test_a_failing_bundle_aborts_its_open_shards_at_once(tmp_path):
    fn = T.WriteShards(str(tmp_path), (0,), 1, "none", "fp")
    fn.start_bundle()
    list(fn.process(U.Extracted(_batch([2, 1]), {("resid_post", 0): np.ones((2, 4, 3), np.float32)})))
    with pytest.raises(KeyError):  # a batch without this output's activations: the bundle fails
        list(fn.process(U.Extracted(_batch([2, 1]), {})))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []  # the unit's unfinished file was aborted, not left for the run's cleanup
