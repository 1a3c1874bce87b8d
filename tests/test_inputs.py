"""Input planning and reading: doc_index across files, formats, hf:// through `datasets`, rejections."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_activations import inputs
from llm_activations.errors import UsageError


def _read_all(patterns, text_field="text", num_units=3):
    sources = inputs.plan_sources(patterns, text_field)
    total = sum(s.num_records for s in sources)
    units = inputs.plan_units(sources, start=0, stop=total, num_units=num_units)
    return [item for u in units for item in inputs.read_unit(u, text_field)]


@pytest.fixture
def mixed(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "b0"}\n\n{"text": "b2"}')  # blank line, no final newline
    pq.write_table(pa.table({"text": ["p0", None, "p2"], "other": [1, 2, 3]}), tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "c.txt").write_text("a whole file is one document")
    (tmp_path / "d.json").write_bytes(b'{"text": "caf\xc3\xa9"}\n{"text": "bad \xff utf8"}\n')
    return tmp_path


def test_doc_index_counts_on_across_sorted_files(mixed):
    items = _read_all([str(mixed / "*.jsonl"), str(mixed / "*.parquet"), str(mixed / "c.txt"), str(mixed / "d.json")])
    docs = [(d.doc_index, d.text) for d in items if isinstance(d, inputs.Document)]
    # a.parquet rows 0-2, b.jsonl lines 3-5 (4 blank), c.txt 6, d.json 7-8
    assert docs == [(0, "p0"), (2, "p2"), (3, "b0"), (5, "b2"), (6, "a whole file is one document"), (7, "café")]
    rejected = {(r.doc_index, r.reason.split(" (")[0]) for r in items if isinstance(r, inputs.Rejected)}
    assert rejected == {(1, "field 'text' is null"), (8, "invalid UTF-8")}


def test_units_partition_the_index_range(mixed):
    files = [str(mixed / "*")]
    for n in (1, 2, 4, 9):
        items = _read_all(files, num_units=n)
        idx = [i.doc_index for i in items]
        assert idx == sorted(idx) and len(idx) == len(set(idx)) == 8


def test_host_ranges_are_disjoint_and_cover():
    spans = [inputs.host_range(103, 4, i) for i in range(4)]
    assert spans[0][0] == 0 and spans[-1][1] == 103
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_binary_and_empty_files_are_rejected(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "ok.jsonl").write_text('{"text": "fine"}\n')
    items = _read_all([str(tmp_path / "*")], num_units=1)
    reasons = sorted(i.reason.split(" (")[0] for i in items if isinstance(i, inputs.Rejected))
    assert reasons == ["binary file", "empty file"]
    assert [i.text for i in items if isinstance(i, inputs.Document)] == ["fine"]


def test_hf_dataset_path_reads_local_files_through_datasets(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    spec = f"hf://{folder}:train"
    assert inputs.parse_hf(spec) == (str(folder), None, "train")
    assert inputs.parse_hf("hf://HuggingFaceFW/fineweb-edu/sample-10BT:train") == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    sources = inputs.plan_sources([spec], "text")
    unit = inputs.WorkUnit(0, 0, -1, ((sources[0], 0, -1),))
    assert [(d.doc_index, d.text) for d in inputs.read_unit(unit, "text")] == [(i, f"doc {i}") for i in range(5)]
    # independent hosts split an hf:// stream by index modulo the host count
    host1 = [d.doc_index for d in inputs.read_unit(unit, "text", num_hosts=2, host_index=1)]
    assert host1 == [1, 3]


def test_configuration_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="matches no file"):
        inputs.plan_sources([str(tmp_path / "nothing*.jsonl")], "text")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(UsageError, match="no column 'text'"):
        inputs.plan_sources([str(tmp_path / "t.parquet")], "text")
    with pytest.raises(UsageError, match="cannot be combined"):
        inputs.plan_sources(["hf://a/b:train", str(tmp_path / "t.parquet")], "text")
