"""The host work on a unit without Beam (units.py): read, tokenize, segment, pack, batches."""

from __future__ import annotations

import json

import numpy as np

from llm_activations import inputs
from llm_activations import units as U
from pipeline_fixtures import tiny_model_with_tokenizer, write_jsonl


def _unit(tmp_path, lines):
    path = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    sources = inputs.plan_sources([path], "text")
    return inputs.plan_units(sources, start=0, stop=sources[0].num_records, num_units=1)[0]


def test_read_documents_splits_good_and_rejected(tmp_path):
    unit = _unit(tmp_path, [{"text": "alpha"}, "{not json", {"text": None}, [1, 2], {"text": "beta"}, {"body": "x"}])
    d = U.read_documents(unit, "text")
    assert [(doc.doc_index, doc.text) for doc in d.docs] == [(0, "alpha"), (4, "beta")]
    assert [(json.loads(r)["doc_index"], json.loads(r)["reason"].split(" (")[0]) for r in d.rejected] == [
        (1, "malformed JSON"), (2, "field 'text' is null"), (3, "record is a JSON list, not an object"),
        (5, "record has no field 'text'")]
    assert d.counts == {"rejected": 4} and d.metrics == {"rejected": 4, "documents_read": 2}


def test_tokenize_gives_exactly_the_tokenizers_ids(tmp_path):
    folder, _ = tiny_model_with_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [f"Document number {i}: " + "words " * i for i in range(1, 300)]  # > one tokenizer batch
    data = U.UnitData(inputs.WorkUnit(0, 0, len(texts), ()), docs=[inputs.Document(i, t) for i, t in enumerate(texts)])
    got = U.tokenize_unit(data, U.load_tokenizer(folder))
    expected = [tok(t)["input_ids"] for t in texts]
    assert [(i, t.tolist()) for i, t in got.tokens] == list(enumerate(expected))
    assert got.metrics["tokens_read"] == sum(map(len, expected)) and got.counts["documents"] == len(texts)


def test_unit_batches_count_what_they_cut():
    lengths = [150, 10, 64, 3, 40, 1]
    data = U.UnitData(inputs.WorkUnit(7, 0, len(lengths), ()),
                      tokens=[(d, np.arange(1, n + 1, dtype=np.int32)) for d, n in enumerate(lengths)])
    data = U.pack_unit(U.segment_unit(data, 64), 64, "pack")
    batches = list(U.unit_batches(data, 2, 64))
    # 150 -> 64+64+22: segments 64,64,64,40,22,10,3,1 fill 5 rows, 3 batches of 2 rows
    assert [b.tokens.shape for b in batches] == [(2, 64)] * 3 and {b.unit for b in batches} == {7}
    real = [b.tokens[b.segment_ids > 0] for b in batches]
    assert sum(len(r) for r in real) == sum(lengths) and all((r > 0).all() for r in real)
    assert dict(data.counts) == {"segments": 8, "batches": 3, "sequences": 5, "tokens": sum(lengths),
                                 "padding_tokens": 3 * 2 * 64 - sum(lengths)}
