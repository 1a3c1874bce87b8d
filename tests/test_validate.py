"""validate: passes a good dataset, names each damaged file, refuses escaping paths."""

import json

import pytest
from synthetic import make_dataset

from llm_activations.cli import main

SHARD = "layer_00/part-00001-of-00002.tfrecord"


@pytest.fixture
def root(tmp_path):
    make_dataset(str(tmp_path), layers=(0, 2), hidden_size=8, num_docs=30, seq_len=32, num_shards=2)
    return tmp_path


def validate(root, capsys):
    code = main(["validate", str(root)])
    out = capsys.readouterr()
    return code, out.out, out.err


def edit_metadata(root, fn):
    path = root / "metadata.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def bad_lines(out):
    return [line for line in out.splitlines() if line.startswith("BAD")]


def test_good_dataset_passes(root, capsys):
    code, out, _ = validate(root, capsys)
    assert code == 0
    assert "4 files" in out and "all good" in out and not bad_lines(out)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_flipped_byte_names_file_and_record(tmp_path, capsys, compression):
    meta = make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=30, seq_len=32, compression=compression)
    rel = meta["files"]["0"][1]
    path = tmp_path / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    code, out, _ = validate(tmp_path, capsys)
    assert code == 1
    (line,) = bad_lines(out)
    assert line.startswith(f"BAD {rel}:") and "sha256 mismatch" in line
    if compression == "none":
        assert "record " in line and "CRC mismatch" in line


def test_truncated_file(root, capsys):
    path = root / SHARD
    path.write_bytes(path.read_bytes()[:-10])
    code, out, _ = validate(root, capsys)
    assert code == 1
    (line,) = bad_lines(out)
    assert line.startswith(f"BAD {SHARD}:") and "truncated record" in line and "bytes: metadata says" in line


def test_missing_file(root, capsys):
    (root / SHARD).unlink()
    code, out, _ = validate(root, capsys)
    assert code == 1
    assert bad_lines(out) == [f"BAD {SHARD}: missing file"]


def test_wrong_counts(root, capsys):
    def wrong(meta):
        entry = next(s for s in meta["shards"] if s["path"] == SHARD)
        entry["records"] += 1
        entry["tokens"] -= 3

    edit_metadata(root, wrong)
    code, out, _ = validate(root, capsys)
    assert code == 1
    (line,) = bad_lines(out)
    assert line.startswith(f"BAD {SHARD}:") and "records: metadata says" in line and "tokens: metadata says" in line


def test_wrong_dataset_totals(root, capsys):
    edit_metadata(root, lambda m: m["counts"].update(tokens=m["counts"]["tokens"] + 1))
    code, out, _ = validate(root, capsys)
    assert code == 1
    assert any("counts.tokens says" in line for line in bad_lines(out))


def test_wrong_hidden_size_is_undecodable(root, capsys):
    edit_metadata(root, lambda m: m.update(hidden_size=7))
    code, out, _ = validate(root, capsys)
    assert code == 1
    assert len(bad_lines(out)) == 4 and all("record 0: undecodable" in line for line in bad_lines(out))


def test_escaping_path_is_refused(root, capsys):
    def escape(meta):
        meta["shards"][0]["path"] = "../outside.tfrecord"
        meta["files"]["0"][0] = "../outside.tfrecord"

    edit_metadata(root, escape)
    code, out, err = validate(root, capsys)
    assert code == 2
    assert "escapes the dataset folder" in err and len(err.strip().splitlines()) == 1


def test_not_a_dataset(tmp_path, capsys):
    code, _, err = validate(tmp_path, capsys)
    assert code == 2 and "no metadata.json" in err
