"""Each pipeline step on its own with Beam's TestPipeline and assert_that."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from llm_activations import inputs
from llm_activations import packing
from llm_activations import transforms as T
from pipeline_fixtures import tiny_model_with_tokenizer, write_jsonl


def _unit(tmp_path, lines):
    path = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    sources = inputs.plan_sources([path], "text")
    return inputs.plan_units(sources, start=0, stop=sources[0].num_records, num_units=1)[0]


def test_read_documents_splits_good_and_rejected(tmp_path):
    unit = _unit(tmp_path, [{"text": "alpha"}, "{not json", {"text": None}, [1, 2], {"text": "beta"}, {"body": "x"}])
    with TestPipeline() as p:
        out = p | beam.Create([unit]) | beam.ParDo(T.ReadDocuments("text"))
        docs = out | "Docs" >> beam.FlatMap(lambda d: [(doc.doc_index, doc.text) for doc in d.docs])
        assert_that(docs, equal_to([(0, "alpha"), (4, "beta")]), label="docs")
        reasons = out | "Rejected" >> beam.FlatMap(
            lambda d: [(json.loads(r)["doc_index"], json.loads(r)["reason"].split(" (")[0]) for r in d.rejected])
        assert_that(reasons, equal_to([(1, "malformed JSON"), (2, "field 'text' is null"),
                                       (3, "record is a JSON list, not an object"), (5, "record has no field 'text'")]),
                    label="rejected")


def test_tokenize_gives_exactly_the_tokenizers_ids(tmp_path):
    folder, _ = tiny_model_with_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [f"Document number {i}: " + "words " * i for i in range(1, 300)]  # > one tokenizer batch
    data = T.UnitData(inputs.WorkUnit(0, 0, len(texts), ()), docs=[inputs.Document(i, t) for i, t in enumerate(texts)])
    with TestPipeline() as p:
        out = p | beam.Create([data]) | beam.ParDo(T.Tokenize(folder))
        got = out | beam.FlatMap(lambda d: [(i, t.tolist()) for i, t in d.tokens])
        assert_that(got, equal_to([(i, tok(t)["input_ids"]) for i, t in enumerate(texts)]))


def test_segment_pack_batch_fill_fixed_shapes():
    lengths = [150, 10, 64, 3, 40, 1]
    data = T.UnitData(inputs.WorkUnit(7, 0, len(lengths), ()),
                      tokens=[(d, np.arange(1, n + 1, dtype=np.int32)) for d, n in enumerate(lengths)])
    with TestPipeline() as p:
        out = (p | beam.Create([data]) | beam.Map(T.segment_unit, 64) | beam.Map(T.pack_unit, 64, "pack")
               | beam.ParDo(T.Batch(2, 64)))
        shapes = out | "Shapes" >> beam.Map(lambda b: "end" if isinstance(b, T.UnitEnd) else b.tokens.shape)
        # 150 -> 64+64+22: segments 64,64,64,40,22,10,3,1 fill 5 rows, 3 batches of 2 rows
        assert_that(shapes, equal_to([(2, 64), (2, 64), (2, 64), "end"]), label="shapes")
        counts = out | "Counts" >> beam.FlatMap(lambda b: [b.counts] if isinstance(b, T.UnitEnd) else [])
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


def test_write_shards_closes_files_at_unit_end(tmp_path):
    from llm_activations.format import records

    ex = records.encode_example(np.ones((2, 4), np.float32), token_ids=np.array([1, 2]), doc_index=np.array([0, 0]),
                                token_index=np.array([0, 1]), position=np.array([0, 1]))
    units = [inputs.WorkUnit(i, i * 5, i * 5 + 5, ()) for i in range(2)]
    ends = [T.UnitEnd(units[0], {"tokens": 4}, []), T.UnitEnd(units[1], {"rejected": 1}, ['{"doc_index": 7}'])]
    with TestPipeline() as p:
        infos = (p | beam.Create([(("resid_post", 0), 0, ex, 2), (("resid_post", 0), 0, ex, 2), *ends])
                 | beam.ParDo(T.WriteShards(str(tmp_path), (0,), 2, "none", "fp"))
                 | beam.Map(lambda m: (m["unit"], [(s["path"], s["records"], s["tokens"]) for s in m["shards"]],
                                       m["counts"]["tokens"], m["rejected_file"])))
        assert_that(infos, equal_to([(0, [("layer_00/part-00000-of-00002.tfrecord", 2, 4)], 4, None),
                                     (1, [("layer_00/part-00001-of-00002.tfrecord", 0, 0)], 0,
                                      "rejected/part-00001-of-00002.jsonl")]))
    assert len(list(records.read_shard(str(tmp_path / "layer_00/part-00000-of-00002.tfrecord")))) == 2
    assert (tmp_path / "rejected/part-00001-of-00002.jsonl").read_text() == '{"doc_index": 7}\n'
    assert sorted(os.listdir(tmp_path / "_units")) == ["unit-00000-of-00002.json", "unit-00001-of-00002.json"]
