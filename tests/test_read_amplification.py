"""Every input byte is read once (issue 25): units of an uncompressed JSON lines file seek to their
first line, units never split a compressed file or a parquet row group, and a rerun over
unchanged local inputs does not scan them again."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_activations import inputs
from llm_activations.format import fileio


class ByteCounter:
    """Counts the bytes read through fileio.open_read, per path."""

    def __init__(self, monkeypatch):
        self.read: dict = {}
        real = fileio.open_read

        def counted(path):
            stream = real(path)
            counter = self

            class Counted:
                def __getattr__(self, name):
                    return getattr(stream, name)

                def read(self, n=-1):
                    data = stream.read(n)
                    counter.read[path] = counter.read.get(path, 0) + len(data)
                    return data

                def readline(self, *a):
                    data = stream.readline(*a)
                    counter.read[path] = counter.read.get(path, 0) + len(data)
                    return data

                def __iter__(self):
                    return iter(self.readline, b"")

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

            return Counted()

        monkeypatch.setattr(fileio, "open_read", counted)

    def total(self) -> int:
        return sum(self.read.values())


def _lines(n: int) -> list[dict]:
    return [{"text": f"document {i} " + "word " * (i % 37)} for i in range(n)]


def _read(sources, num_units, start=0, stop=None):
    stop = sum(s.num_records for s in sources) if stop is None else stop
    units = inputs.plan_units(sources, start=start, stop=stop, num_units=num_units)
    return units, [(d.doc_index, getattr(d, "text", None)) for u in units for d in inputs.read_unit(u, "text")]


def test_jsonl_units_seek_to_their_first_line(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    records = _lines(5000)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    sources = inputs.plan_sources([str(path)], "text")
    counter = ByteCounter(monkeypatch)
    units, docs = _read(sources, 40)
    assert docs == [(i, r["text"]) for i, r in enumerate(records)]  # every record once, in order
    assert all(u.stop - u.start == 125 for u in units)  # boundaries unchanged for uncompressed JSON lines
    # each unit reads its own lines plus at most one checkpoint interval and one read-ahead buffer
    assert counter.total() / os.path.getsize(path) < 1.05, counter.total() / os.path.getsize(path)


def test_compressed_files_are_whole_units_and_read_once(tmp_path, monkeypatch):
    records = _lines(3000)
    for k in range(3):
        with gzip.open(tmp_path / f"p{k}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[k * 1000:(k + 1) * 1000])
    sources = inputs.plan_sources([str(tmp_path / "*.jsonl.gz")], "text")
    counter = ByteCounter(monkeypatch)
    units, docs = _read(sources, 7)
    assert docs == [(i, r["text"]) for i, r in enumerate(records)]
    assert sorted({u.start for u in units} | {u.stop for u in units}) == [0, 1000, 2000, 3000]
    for s in sources:  # one pass over each file's bytes
        assert counter.read[s.path] == os.path.getsize(s.path)
    # hosts' shares snap to file edges too: 2 hosts over 3 files read disjoint files
    edges = [inputs.snap(x, sources) for x in inputs.host_range(3000, 2, 0)] + [inputs.snap(inputs.host_range(3000, 2, 1)[1], sources)]
    assert edges == [0, 1000, 3000]


def test_parquet_units_begin_at_row_groups_smaller_than_half_a_unit(tmp_path, monkeypatch):
    records = _lines(1000)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records], "pad": ["x" * 50] * 1000}), path, row_group_size=100)
    sources = inputs.plan_sources([str(path)], "text")
    assert sources[0].row_groups == tuple(range(0, 1000, 100))
    counter = ByteCounter(monkeypatch)
    units, docs = _read(sources, 7)
    meta = pq.read_metadata(path)
    text_bytes = sum(meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups))
    footer = 65536  # pyarrow's first (speculative) read of the footer, once per process
    assert counter.total() <= 1.05 * text_bytes + footer, (counter.total(), text_bytes)
    assert docs == [(i, r["text"]) for i, r in enumerate(records)]
    assert all(u.start % 100 == 0 and u.stop % 100 == 0 for u in units)


def _plan(path, **options_):
    from llm_activations import options, run_plan

    cfg = options.ExtractConfig(model="unused", inputs=(str(path),), output="/nonexistent", **options_)
    return run_plan.plan(cfg)


def _row_group_bytes(path) -> list[int]:
    meta = pq.read_metadata(path)
    return [meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups)]


@pytest.fixture
def big_groups(tmp_path):
    """1,200 records in row groups of 300: each larger than half of a 100-document unit."""
    records = _lines(1200)
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), path, row_group_size=300)
    return path, records


def test_row_groups_larger_than_a_unit_are_read_once_per_run(big_groups, monkeypatch, capsys):
    """The planner's choice (--num-shards 0): fewer, larger units, each beginning at a row group,
    so that no two units read one row group (before: 12 units of 100, each reading its whole row
    group of 300: 3x the bytes)."""
    path, records = big_groups
    _, host_docs, units = _plan(path, docs_per_unit=100)
    assert host_docs == (0, 1200) and [(u.start, u.stop) for u in units] == [(0, 300), (300, 600), (600, 900), (900, 1200)]
    footer_read = 65536  # pyarrow's first (speculative) read of the footer, once per process
    counter = ByteCounter(monkeypatch)
    per_unit = []
    for u in units:
        before = counter.total()
        docs = [(d.doc_index, d.text) for d in inputs.read_unit(u, "text")]
        assert docs == [(i, records[i]["text"]) for i in range(u.start, u.stop)]
        per_unit.append(counter.total() - before)
    groups = _row_group_bytes(path)
    assert per_unit[0] <= groups[0] + footer_read and per_unit[1:] == groups[1:]  # each its own row group, once
    assert "note:" not in capsys.readouterr().err


def test_hosts_shares_begin_at_row_groups(big_groups):
    path, _ = big_groups
    shares = [_plan(path, docs_per_unit=100, num_hosts=3, host_index=h)[1] for h in range(3)]
    assert shares == [(0, 300), (300, 900), (900, 1200)]  # edges 400 and 800 moved to the nearest row group
    # --max-docs ends the run where it says, even inside a row group (or a compressed file)
    assert _plan(path, max_docs=450)[1] == (0, 450)
    assert [_plan(path, max_docs=450, num_hosts=2, host_index=h)[1] for h in range(2)] == [(0, 300), (300, 450)]


def test_num_shards_beyond_the_row_groups_leaves_units_empty_and_says_so(big_groups, monkeypatch, capsys):
    """An explicit --num-shards is kept (N files per layer), but a row group is still read by one
    unit: the units between two row groups hold no records, and one line says how to avoid them."""
    path, records = big_groups
    _, _, units = _plan(path, num_shards=8)
    assert [(u.start, u.stop) for u in units] == [(0, 0), (0, 300), (300, 300), (300, 600), (600, 600),
                                                  (600, 900), (900, 900), (900, 1200)]
    assert all(u.pieces == () for u in units if u.start == u.stop)
    assert "note: 4 of --num-shards 8 units hold no records" in capsys.readouterr().err
    counter = ByteCounter(monkeypatch)
    docs = [(d.doc_index, d.text) for u in units for d in inputs.read_unit(u, "text")]
    assert docs == [(i, r["text"]) for i, r in enumerate(records)]
    assert counter.total() <= sum(_row_group_bytes(path)) + 65536
    # as many as the row groups allow: no empty unit, no note
    assert [(u.start, u.stop) for u in _plan(path, num_shards=4)[2]] == [(0, 300), (300, 600), (600, 900), (900, 1200)]
    assert "note:" not in capsys.readouterr().err


def test_a_rerun_does_not_scan_unchanged_inputs_again(tmp_path, monkeypatch):
    cache = inputs.ScanCache(str(tmp_path / "cache"), min_bytes=0)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _lines(20000)))
    first = inputs.plan_sources([str(path)], "text", cache)
    counter = ByteCounter(monkeypatch)
    again = inputs.plan_sources([str(path)], "text", cache)
    assert again == first and again[0].checkpoints == first[0].checkpoints
    assert counter.total() <= inputs.HEAD < os.path.getsize(path)  # the head alone, for the up-front checks
    # an edit that keeps the size and the modification time is still seen (ctime is in the key)
    stat = os.stat(path)
    data = bytearray(path.read_bytes())
    data[20] = ord("X")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = inputs.plan_sources([str(path)], "text", cache)
    assert edited[0].digest != first[0].digest and edited[0].digest == "sha256:" + fileio.sha256_file(str(path))[0]


def test_an_unwritable_scan_cache_costs_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    cache = inputs.ScanCache(str(blocker / "cache"), min_bytes=0)
    assert inputs.plan_sources([str(path)], "text", cache)[0].num_records == 1


@pytest.mark.parametrize("num_units", [1, 3, 64])
def test_seeking_units_equal_reading_from_the_start(tmp_path, num_units):
    """Blank lines, a BOM, a final line without newline: seeking changes nothing a unit reads."""
    path = tmp_path / "a.jsonl"
    body = "\n".join(json.dumps(r) if i % 7 else "" for i, r in enumerate(_lines(700)))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    sources = inputs.plan_sources([str(path)], "text")
    plain = [inputs.SourceFile(**{**s.__dict__, "checkpoints": ()}) for s in sources]
    assert _read(sources, num_units)[1] == _read(plain, num_units)[1] == _read(plain, 1)[1]


def test_empty_units_end_to_end(tmp_path, capsys):
    """Units that hold no records (--num-shards beyond the row groups, and a host whose share is
    one row group) write empty shards that every tool takes as they are: metadata counts, validate,
    --resume (byte-identical), merge of hosts, and the reader, which delivers exactly the rows of a
    run without empty units."""
    import glob
    import hashlib
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer

    from llm_activations import reader
    from llm_activations.cli import main
    from llm_activations.format import records as rec
    from llm_activations.format.metadata import read_metadata

    model = tiny_model_with_tokenizer()[0]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": corpus_texts(12, seed=5)}), path, row_group_size=4)  # 3 row groups

    def extract(out, *extra):
        assert main(extract_args(model, [str(path)], str(out), "--layers", "0", *extra)) == 0

    def rows(out):
        meta = read_metadata(str(out))
        found = []
        for rel in meta["files"]["0"]:
            for data in rec.read_shard(os.path.join(out, rel)):
                ex = rec.decode_example(data)
                found.append((ex["doc_index"].tolist(), ex["token_ids"].tolist(), bytes(ex["activations"])))
        return sorted(found)

    def delivered(out):  # the reader, which checks every shard it opens
        batches = reader.iter_numpy_batches(str(out), 0, 1, max_norm_ratio=None, shuffle_buffer=0, seed=0)
        return sorted(b.tobytes() for b in batches)

    def hashes(out):
        return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(glob.glob(f"{out}/layer_00/*"))}

    full, sparse = tmp_path / "full", tmp_path / "sparse"
    extract(full, "--num-shards", "3")
    extract(sparse, "--num-shards", "6")  # units (0,0) (0,4) (4,4) (4,8) (8,8) (8,12)
    assert "note: 3 of --num-shards 6 units hold no records" in capsys.readouterr().err
    meta = read_metadata(str(sparse))
    assert meta["counts"] == read_metadata(str(full))["counts"] and meta["counts"]["documents"] == 12
    assert [s["records"] == 0 for s in meta["shards"]] == [True, False] * 3
    assert rows(sparse) == rows(full) and delivered(sparse) == delivered(full)
    assert main(["validate", str(sparse)]) == 0
    before = hashes(sparse)
    os.remove(sparse / "metadata.json")  # as if killed after the last unit
    extract(sparse, "--num-shards", "6", "--resume")
    assert hashes(sparse) == before and len(read_metadata(str(sparse))["run"]["resumed_units"]) == 6
    # two hosts: the share edge 6 moves to row group 4; host 0 then has 2 empty units of 3
    hosts = [str(tmp_path / f"host-{h}") for h in range(2)]
    for h, host in enumerate(hosts):
        extract(host, "--num-shards", "3", "--num-hosts", "2", "--host-index", str(h))
    assert [s["records"] for s in read_metadata(hosts[0])["shards"]][:2] == [0, 0]
    merged = tmp_path / "merged"
    assert main(["merge", "--output", str(merged), *hosts]) == 0
    assert main(["validate", str(merged)]) == 0
    assert read_metadata(str(merged))["counts"] == meta["counts"] and rows(merged) == rows(full)
    assert delivered(merged) == delivered(full)
