"""--resume from metadata (issue 25) and its bad inputs (issue 22, item 11).

A resume compares each finished unit's manifest (shard sizes and identities) with one listing of
the output folder and reads no shard back; `--resume --verify` adds the sha256. A manifest that
is truncated or incomplete, and a lock file that is empty, are one line each, never a traceback.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from llm_activations.cli import main
from llm_activations.format import fileio
from llm_activations.format.metadata import read_metadata
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl


def shard_hashes(out: str) -> dict:
    return {os.path.relpath(p, out): hashlib.sha256(Path(p).read_bytes()).hexdigest()
            for p in sorted(glob.glob(f"{out}/layer_*/*"))}


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_tokenizer()[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("c") / "docs.jsonl"), [{"text": t} for t in corpus_texts(16, seed=3)])


@pytest.fixture(scope="module")
def baseline(model, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "out")
    assert main(extract_args(model, [corpus], out, "--num-shards", "2", "--layers", "0")) == 0
    return out


@pytest.fixture
def copy(baseline, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)  # copy2: sizes and modification times as written
    return out


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("counters:")]


def test_resume_reads_no_shard_back(model, corpus, baseline, copy, monkeypatch):
    os.remove(os.path.join(copy, "metadata.json"))  # killed after the last unit, before the metadata
    opened = []
    real = fileio.open_read
    monkeypatch.setattr(fileio, "open_read", lambda p: opened.append(p) or real(p))
    assert main(extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    assert read_metadata(copy)["run"]["resumed_units"] == [0, 1]
    assert opened and not [p for p in opened if "/layer_" in p]  # manifests were read, shards were not
    opened.clear()
    assert main(extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume", "--verify")) == 0
    assert sorted(p for p in opened if "/layer_" in p) == sorted(glob.glob(f"{copy}/layer_00/*"))
    assert shard_hashes(copy) == shard_hashes(baseline)


def test_a_shard_rewritten_with_its_size_is_extracted_again_naming_it(model, corpus, baseline, copy, capsys):
    shard = sorted(glob.glob(f"{copy}/layer_00/*"))[1]
    st = os.stat(shard)
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, another write time
    capsys.readouterr()
    assert main(extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    lines = [x for x in _err_lines(capsys) if x.startswith("--resume")]
    rel = os.path.relpath(shard, copy)
    assert lines == [f"--resume: extracting unit 1 again: {rel} was rewritten since its unit finished "
                     f"(mtime_ns:{st.st_mtime_ns + 1_000_000})"]
    assert read_metadata(copy)["run"]["resumed_units"] == [0] and shard_hashes(copy) == shard_hashes(baseline)


def test_only_verify_sees_a_change_that_keeps_size_and_mtime(model, corpus, baseline, copy, capsys):
    shard = sorted(glob.glob(f"{copy}/layer_00/*"))[0]
    st = os.stat(shard)
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    args = extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")
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
def test_a_truncated_or_incomplete_manifest_is_one_line_and_its_unit_is_redone(model, corpus, baseline, copy, capsys,
                                                                                 text, why):
    manifest = sorted(glob.glob(f"{copy}/_units/*.json"))[0]
    Path(manifest).write_text(text)
    capsys.readouterr()
    assert main(extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    lines = [x for x in _err_lines(capsys) if x.startswith("--resume")]
    assert lines == [f"--resume: extracting the unit of _units/{os.path.basename(manifest)} again: {why}"]
    assert read_metadata(copy)["run"]["resumed_units"] == [1]
    assert shard_hashes(copy) == shard_hashes(baseline)
    assert json.loads(Path(manifest).read_text())["unit"] == 0  # rewritten whole


@pytest.mark.parametrize("text", ["", "{}", '{"pid": 12'])
def test_an_empty_or_half_written_lock_is_one_line_that_says_so(model, corpus, copy, capsys, text):
    Path(copy, "_lock.json").write_text(text)
    capsys.readouterr()
    assert main(extract_args(model, [corpus], copy, "--num-shards", "2", "--layers", "0", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty or unreadable lock" in err[0] and "None" not in err[0], err


def test_verify_without_resume_is_a_usage_error(model, corpus, tmp_path, capsys):
    assert main(extract_args(model, [corpus], str(tmp_path / "o"), "--verify")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--verify" in err[0] and "--resume" in err[0]
