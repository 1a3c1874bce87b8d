"""Input planning and reading: doc_index across files, formats, hf:// through `datasets`, rejections."""

from __future__ import annotations

import json
import os
import re

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


# ----------------------------------------------------------------------------- issue 12: what real corpora look like


def _docs(patterns, text_field="text"):
    return [(i.doc_index, i.text) if isinstance(i, inputs.Document) else (i.doc_index, "REJECTED " + i.reason)
            for i in _read_all(patterns, text_field, num_units=2)]


def test_one_file_under_several_spellings_is_read_once(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    os.symlink(tmp_path / "in" / "a.jsonl", tmp_path / "link.jsonl")
    monkeypatch.chdir(tmp_path)
    sources = inputs.plan_sources(["in/a.jsonl", "./in/a.jsonl", str(tmp_path / "in" / "a.jsonl"), "in//a.jsonl",
                                   "link.jsonl", "in/*.jsonl"], "text")
    assert [(s.path, s.num_records) for s in sources] == [(str(tmp_path / "in" / "a.jsonl"), 2)]


def test_a_folder_is_every_file_below_it_with_or_without_slash(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.jsonl").write_text('{"text": "a"}\n')
    (root / "sub" / "b.txt").write_text("b")
    (root / "sub" / "deeper" / "c.jsonl").write_text('{"text": "c"}\n')
    (root / "_SUCCESS").write_text("")  # markers and hidden files are not input
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jsonl").write_text('{"text": "hidden"}\n')
    want = [str(root / "a.jsonl"), str(root / "sub" / "b.txt"), str(root / "sub" / "deeper" / "c.jsonl")]
    assert inputs.expand_patterns([str(root)]) == want
    assert inputs.expand_patterns([str(root) + "/"]) == want
    (root / "sub" / "notes.md").write_text("not a corpus file")
    with pytest.raises(UsageError, match="notes.md: unsupported input type"):
        inputs.expand_patterns([str(root)])


def test_bom_is_not_data(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfwhole file")
    assert _docs([str(tmp_path / "*")]) == [(0, "first"), (1, "second"), (2, "whole file")]


def test_compressed_json_lines_and_ndjson(tmp_path):
    import bz2
    import gzip

    import zstandard

    lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(lines[:-1]))  # no final newline
    (tmp_path / "d.ndjson").write_bytes(lines)
    (tmp_path / "e.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbfcompressed text"))
    (tmp_path / "f.jsonl.bz2").write_bytes(bz2.compress(lines))
    got = _docs([str(tmp_path / "*")])
    assert got == [(f * 3 + i, f"doc {i}") for f in range(4) for i in range(3)] + [(12, "compressed text")] + \
        [(13 + i, f"doc {i}") for i in range(3)]
    assert [s.compression for s in inputs.plan_sources([str(tmp_path / "*")], "text")] == ["gzip", "zstd", "gzip", "", "gzip", "bzip2"]


def test_dotted_text_field_reads_nested_json_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"meta": {"content": "nested"}}) + "\n"
                                      + json.dumps({"meta": {"other": 1}}) + "\n")
    pq.write_table(pa.table({"meta": pa.array([{"content": "row0"}, None, {"content": "row2"}])}), tmp_path / "b.parquet")
    got = _docs([str(tmp_path / "*")], "meta.content")
    assert got == [(0, "nested"), (1, "REJECTED record has no field 'meta.content'"), (2, "row0"),
                   (3, "REJECTED field 'meta.content' is null"), (4, "row2")]
    with pytest.raises(UsageError, match="no column 'meta.nothing'"):
        inputs.plan_sources([str(tmp_path / "b.parquet")], "meta.nothing")


@pytest.mark.parametrize("name,data,needle", [
    ("wrong_field.jsonl", b'{"body": "x"}\n{"body": "y"}\n', "none of its first 2 records has a field 'text' (fields: body)"),
    ("array.json", b'[\n {"text": "a"},\n {"text": "b"}\n]\n', "holds a JSON array, not JSON lines"),
    ("gzipped.jsonl", __import__("gzip").compress(b'{"text": "x"}\n'), "holds gzip-compressed bytes; name it"),
])
def test_files_whose_every_record_would_be_rejected_are_refused_up_front(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UsageError, match=re.escape(needle)):
        inputs.plan_sources([str(tmp_path / name)], "text")


def test_content_digest_changes_with_the_bytes_not_the_line_count(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "old"}\n{"text": "same"}\n')
    before, stat = inputs.plan_sources([str(f)], "text")[0], os.stat(f)
    f.write_text('{"text": "new"}\n{"text": "same"}\n')  # same length, same line count...
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old mtime (cp -p, rsync -t)
    after = inputs.plan_sources([str(f)], "text")[0]
    assert (before.num_records, before.path) == (after.num_records, after.path) and before.digest != after.digest
    unit = lambda s: inputs.plan_units([s], start=0, stop=2, num_units=1)[0]  # noqa: E731
    assert unit(before).input_fingerprint() != unit(after).input_fingerprint()
    assert unit(after).input_fingerprint() == unit(inputs.plan_sources([str(f)], "text")[0]).input_fingerprint()


def test_hf_split_that_does_not_exist_is_one_line(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UsageError, match="cannot read this split") as e:
        inputs.plan_sources([f"hf://{folder}:nosuchsplit"], "text")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="first record has no field 'body'"):
        inputs.plan_sources([f"hf://{folder}:train"], "body")


def test_unreachable_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot read this split") as e:
        inputs.plan_sources(["hf://no-such-org/no-such-dataset:train"], "text")
    assert "\n" not in str(e.value)
