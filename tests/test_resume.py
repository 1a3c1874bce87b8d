"""--resume from metadata (issue 25) and its bad inputs (issue 22, item 11).

A resume compares each finished unit's manifest (shard sizes and identities) with one listing of
the output folder and reads no shard back; `--resume --verify` adds the sha256. A manifest that
is truncated or incomplete, and a lock file that is empty, are one line each, never a traceback.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest

from llm_activations.cli import main
from llm_activations.format import fileio
from llm_activations.format.metadata import read_metadata
from pipeline_fixtures import corpus_texts, extract_args, shard_hashes, tiny_model_with_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_tokenizer()[0]


@pytest.fixture
def copy(baseline, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)  # copy2: sizes and modification times as written
    return out


def _flip_a_middle_byte(shard: str) -> os.stat_result:
    """Change one byte in the middle of a shard, keeping its size; returns its stat from before."""
    st = os.stat(shard)
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    return st


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("counters:")]


def test_resume_reads_no_shard_back(model, small_corpus, baseline, copy, monkeypatch):
    os.remove(os.path.join(copy, "metadata.json"))  # killed after the last unit, before the metadata
    opened = []
    real = fileio.open_read
    monkeypatch.setattr(fileio, "open_read", lambda p: opened.append(p) or real(p))
    assert main(extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    assert read_metadata(copy)["run"]["resumed_units"] == [0, 1]
    assert opened and not [p for p in opened if "/layer_" in p]  # manifests were read, shards were not
    opened.clear()
    assert main(extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume", "--verify")) == 0
    assert sorted(p for p in opened if "/layer_" in p) == sorted(glob.glob(f"{copy}/layer_00/*"))
    assert shard_hashes(copy) == shard_hashes(baseline)


def test_a_shard_rewritten_with_its_size_is_extracted_again_naming_it(model, small_corpus, baseline, copy, capsys):
    shard = sorted(glob.glob(f"{copy}/layer_00/*"))[1]
    st = _flip_a_middle_byte(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, another write time
    capsys.readouterr()
    assert main(extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    lines = [x for x in _err_lines(capsys) if x.startswith("--resume")]
    rel = os.path.relpath(shard, copy)
    assert lines == [f"--resume: extracting unit 1 again: {rel} was rewritten since its unit finished "
                     f"(mtime_ns:{st.st_mtime_ns + 1_000_000})"]
    assert read_metadata(copy)["run"]["resumed_units"] == [0] and shard_hashes(copy) == shard_hashes(baseline)


def test_only_verify_sees_a_change_that_keeps_size_and_mtime(model, small_corpus, baseline, copy, capsys):
    shard = sorted(glob.glob(f"{copy}/layer_00/*"))[0]
    st = _flip_a_middle_byte(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    args = extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")
    assert main(args) == 0  # the listing cannot see it: that is validate's (or --verify's) job
    assert read_metadata(copy)["run"]["resumed_units"] == [0, 1]
    assert main(["validate", copy]) == 1
    capsys.readouterr()
    assert main(args + ["--verify"]) == 0
    assert [x for x in _err_lines(capsys) if x.startswith("--resume")] == [
        f"--resume: extracting unit 0 again: {os.path.relpath(shard, copy)} differs from its manifest (sha256)"]
    assert read_metadata(copy)["run"]["resumed_units"] == [1] and shard_hashes(copy) == shard_hashes(baseline)


@pytest.mark.parametrize("text, why", [
    ('{"unit": 0, "doc_index_range": [0, 8], "fingerp', "it is not valid JSON (truncated?)"),
    ('{"unit": 0}', "it lacks doc_index_range, fingerprint, inputs, counts, shards, rejected_file, moments"),
    ("", "it is not valid JSON (truncated?)"),
])
def test_a_truncated_or_incomplete_manifest_is_one_line_and_its_unit_is_redone(model, small_corpus, baseline, copy, capsys,
                                                                                 text, why):
    manifest = sorted(glob.glob(f"{copy}/_units/*.json"))[0]
    Path(manifest).write_text(text)
    capsys.readouterr()
    assert main(extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    lines = [x for x in _err_lines(capsys) if x.startswith("--resume")]
    assert lines == [f"--resume: extracting the unit of _units/{os.path.basename(manifest)} again: {why}"]
    assert read_metadata(copy)["run"]["resumed_units"] == [1]
    assert shard_hashes(copy) == shard_hashes(baseline)
    assert json.loads(Path(manifest).read_text())["unit"] == 0  # rewritten whole


@pytest.mark.parametrize("text", ["", "{}", '{"pid": 12'])
def test_an_empty_or_half_written_lock_is_one_line_that_says_so(model, small_corpus, copy, capsys, text):
    Path(copy, "_lock.json").write_text(text)
    capsys.readouterr()
    assert main(extract_args(model, [small_corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty or unreadable lock" in err[0] and "None" not in err[0], err


def test_verify_without_resume_is_a_usage_error(model, small_corpus, tmp_path, capsys):
    assert main(extract_args(model, [small_corpus], str(tmp_path / "o"), "--verify")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--verify" in err[0] and "--resume" in err[0]


# ----------------------------------------------------------------------------- hf:// by file shards


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("hf") / "ds"
    (folder / "data").mkdir(parents=True)
    texts = corpus_texts(12, seed=7)
    for k in range(4):
        pq.write_table(pa.table({"text": texts[3 * k:3 * k + 3]}), folder / "data" / f"train-{k:05d}-of-00004.parquet")
    return str(folder), texts


def _doc_indices(out: str) -> set:
    from llm_activations.format import records

    meta = read_metadata(out)
    return {int(d) for rel in meta["files"]["0"] for data in records.read_shard(os.path.join(out, rel))
            for d in records.decode_example(data)["doc_index"].tolist()}


def test_hf_split_is_read_by_file_shards_hosts_disjoint_and_resumable(model, hf_folder, tmp_path, capsys):
    from llm_activations.inputs import HF_SHARD_STRIDE

    folder, texts = hf_folder
    spec = f"hf://{folder}:train"
    hosts = [str(tmp_path / f"host-{i}") for i in range(2)]
    for i, host in enumerate(hosts):
        assert main(extract_args(model, [spec], host, "--layers", "0", "--num-shards", "2",
                                 "--num-hosts", "2", "--host-index", str(i))) == 0
    files = [sorted({d // HF_SHARD_STRIDE for d in _doc_indices(h)}) for h in hosts]
    assert files == [[0, 1], [2, 3]]  # each host read its own two parquet files, one per unit
    metas = [read_metadata(h) for h in hosts]
    assert [m["input"]["doc_index_range"] for m in metas] == [[0, 2 * HF_SHARD_STRIDE], [2 * HF_SHARD_STRIDE, 4 * HF_SHARD_STRIDE]]
    assert sum(m["counts"]["documents"] for m in metas) == len(texts) and all(len(m["files"]["0"]) == 2 for m in metas)
    assert main(["merge", "--output", str(tmp_path), *hosts]) == 0  # contiguous, disjoint host ranges
    assert read_metadata(str(tmp_path))["counts"]["documents"] == len(texts)
    before = shard_hashes(hosts[0])
    os.remove(sorted(glob.glob(f"{hosts[0]}/_units/*.json"))[1])  # unit 1 lost its manifest
    os.remove(os.path.join(hosts[0], "metadata.json"))
    assert main(extract_args(model, [spec], hosts[0], "--layers", "0", "--num-shards", "2",
                             "--num-hosts", "2", "--host-index", "0", "--resume")) == 0
    assert read_metadata(hosts[0])["run"]["resumed_units"] == [0] and shard_hashes(hosts[0]) == before


def test_hf_split_without_file_shards_is_one_unit_with_one_line(model, tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    write_jsonl(str(tmp_path / "ds" / "train.jsonl"), [{"text": t} for t in corpus_texts(6, seed=1)])
    spec = f"hf://{tmp_path / 'ds'}:train"
    capsys.readouterr()
    assert main(extract_args(model, [spec], str(tmp_path / "o"), "--layers", "0")) == 0
    notes = [x for x in _err_lines(capsys) if x.startswith("note:")]
    assert notes == [f"note: {spec} is read as one stream into one unit (the split exposes fewer than 2 file shards); "
                     "each host reads every record and keeps its share"]
    assert read_metadata(str(tmp_path / "o"))["counts"]["documents"] == 6
