"""Bad input, configuration errors, retries, interrupted runs, determinism, security (issue 5)."""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm_activations.model import devices
from llm_activations.format import records
from llm_activations.cli import main
from llm_activations.errors import DatasetError
from llm_activations.format.metadata import read_metadata
from pipeline_fixtures import FailOnce, corpus_texts, extract_args, run_extract_cli, shard_hashes, tiny_model_with_tokenizer, write_jsonl


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_set(out: str, layer: int) -> list:
    meta = read_metadata(out)
    seen = []
    for rel in meta["files"][str(layer)]:
        for data in records.read_shard(os.path.join(out, rel)):
            ex = records.decode_example(data)
            seen += list(zip(ex["doc_index"].tolist(), ex["token_index"].tolist(), ex["token_ids"].tolist()))
    return seen


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_tokenizer()[0]


def test_bad_records_are_rejected_and_good_tokens_written_once(model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    long_text = " ".join(corpus_texts(400, seed=5)) * 3
    assert len(tok(long_text)["input_ids"]) >= 100_000
    good = ["first good document", long_text, "last good one"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": good[0]}).encode(),  # 0
        b'{"text": "unterminated',  # 1 malformed JSON
        b'["not", "an", "object"]',  # 2
        b'{"title": "no text"}',  # 3 missing field
        b'{"text": null}',  # 4
        b'{"text": 42}',  # 5 non-string
        b'{"text": "   "}',  # 6 empty text
        b'{"text": "bad \xff byte"}',  # 7 invalid UTF-8
        json.dumps({"text": good[1]}).encode(),  # 8: 100k+ tokens
    ]) + b"\n")
    (data / "b.txt").write_bytes(b"\x7fELF\x00\x00binary")  # 9 binary file
    (data / "c.jsonl").write_text("")  # empty file
    (data / "d.jsonl").write_text(json.dumps({"text": good[2]}) + "\n")  # 10
    out = str(tmp_path / "out")
    assert main(extract_args(model, [str(data / "*")], out, "--layers", "2")) == 0
    meta = read_metadata(out)
    rejected = [json.loads(line) for f in glob.glob(f"{out}/rejected/*.jsonl") for line in open(f)]
    assert sorted(r["doc_index"] for r in rejected if r["doc_index"] is not None) == [1, 2, 3, 4, 5, 6, 7, 9]
    assert [r["reason"] for r in rejected if r["doc_index"] is None] == ["empty file"]
    assert all(r["source"] and "reason" in r and "excerpt" in r for r in rejected)
    assert meta["counts"]["rejected"] == len(rejected) == 9
    assert meta["counts"]["documents"] == 3
    expected = {(d, i, t) for d, text in zip((0, 8, 10), good) for i, t in enumerate(tok(text)["input_ids"])}
    seen = token_set(out, 2)
    assert len(seen) == len(set(seen)) and set(seen) == expected  # nothing truncated, nothing twice


# ----------------------------------------------------------------------------- 2. configuration errors


def _checkpoint_variant(src: str, dst: Path, drop=(), config_update=None) -> str:
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(dst / name)
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("case,needle", [
    ("missing_model", "no such checkpoint folder"),
    ("missing_weights", "no model.safetensors"),
    ("unsupported_arch", "GPT2LMHeadModel"),
    ("layer_out_of_range", "--layers 99"),
    ("seq_len_too_long", "max_position_embeddings"),
    ("batch_not_divisible", "batch size 6 is not divisible by data=4"),
    ("no_input_match", "matches no file"),
    ("parquet_without_text", "no column 'text'"),
    ("unknown_dtype", "invalid choice: 'float8'"),
    ("unknown_mode", "invalid choice: 'zip'"),
    ("output_not_empty", "is not empty; pass --overwrite"),
])
def test_configuration_errors_exit_2_with_one_line(model, small_corpus, tmp_path, capsys, case, needle):
    out = str(tmp_path / "out")
    m, inp, extra = model, [small_corpus], []
    if case == "missing_model":
        m = str(tmp_path / "nope")
    elif case == "missing_weights":
        m = _checkpoint_variant(model, tmp_path / "ckpt", drop=["model.safetensors"])
    elif case == "unsupported_arch":
        m = _checkpoint_variant(model, tmp_path / "ckpt", config_update={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    elif case == "layer_out_of_range":
        extra = ["--layers", "99"]
    elif case == "seq_len_too_long":
        extra = ["--seq-len", "4096"]
    elif case == "batch_not_divisible":
        extra = ["--batch-size", "6", "--mesh", "4,1"]
    elif case == "no_input_match":
        inp = [str(tmp_path / "missing-*.jsonl")]
    elif case == "parquet_without_text":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
        inp = [str(tmp_path / "t.parquet")]
    elif case == "unknown_dtype":
        extra = ["--dtype", "float8"]
    elif case == "unknown_mode":
        extra = ["--mode", "zip"]
    elif case == "output_not_empty":
        os.makedirs(out)
        Path(out, "keep.txt").write_text("precious")
    assert main(extract_args(m, inp, out, *extra)) == 2  # later options override extract_args' defaults
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    if case == "output_not_empty":
        assert Path(out, "keep.txt").read_text() == "precious" and os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(os.path.join(out, "metadata.json"))


# ----------------------------------------------------------------------------- 3-5. retries, interruption, determinism


def test_rerun_is_byte_identical(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "again")
    assert main(extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")) == 0
    assert shard_hashes(out) == shard_hashes(baseline) and len(shard_hashes(out)) == 2
    assert [s["sha256"] for s in read_metadata(out)["shards"]] == [s["sha256"] for s in read_metadata(baseline)["shards"]]


def test_bundle_repeat_gives_no_duplicates(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "repeat")
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0", "--direct_runner_bundle_repeat=2")
    assert main(args) == 0
    assert shard_hashes(out) == shard_hashes(baseline)
    assert read_metadata(out)["counts"] == read_metadata(baseline)["counts"]


def test_runner_retry_after_failure_gives_no_duplicates(model, small_corpus, baseline, tmp_path):
    # Beam's bundle-based DirectRunner retries a failed bundle, as Dataflow does. The failure is
    # in the writing stage, after the unit's first rows were written: the retry rewrites them,
    # and they must not appear twice. (A failure while collecting in Extract would be retried
    # before anything reaches the writers: this runner passes on a bundle's outputs only once it
    # has succeeded.)
    out = str(tmp_path / "retry")
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0", "--runner", "BundleBasedDirectRunner")
    run_extract_cli(args, FailOnce(2, str(tmp_path / "failed"), where="write"))
    assert (tmp_path / "failed").exists()  # the failure really happened
    assert shard_hashes(out) == shard_hashes(baseline)
    assert read_metadata(out)["counts"] == read_metadata(baseline)["counts"]
    assert not glob.glob(f"{out}/layer_*/*.inprogress-*")


def test_interrupted_run_leaves_a_refused_folder_and_rerun_recovers(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "killed")
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")
    with pytest.raises(Exception, match="injected failure"):
        run_extract_cli(args, FailOnce(1, str(tmp_path / "failed")))
    assert not os.path.exists(os.path.join(out, "metadata.json"))
    with pytest.raises(DatasetError, match="not a finished"):
        read_metadata(out)
    assert main(["validate", out]) == 2
    assert main(args + ["--overwrite"]) == 0  # the real model this time
    assert shard_hashes(out) == shard_hashes(baseline)


# ----------------------------------------------------------------------------- 7. security


def test_inputs_are_only_read(model, small_corpus, baseline):
    before = (sha(small_corpus), os.stat(small_corpus).st_mtime_ns)
    assert json.loads(Path(baseline, "metadata.json").read_text())["input"]["files"] == [small_corpus]
    assert (sha(small_corpus), os.stat(small_corpus).st_mtime_ns) == before


def test_reader_and_tools_never_unpickle():
    package = Path(__file__).parent.parent / "llm_activations"
    for name in (*(f"reader/{f.name}" for f in (package / "reader").glob("*.py")), "commands/validate.py", "commands/inspect.py", "commands/merge.py", "commands/plan.py",
                 *(f"format/{f.name}" for f in (package / "format").glob("*.py"))):
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for m in mods), name
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, name


# ----------------------------------------------------------------------------- 8. TPU lock


def test_busy_tpu_message_names_the_holder_or_the_stale_lock(tmp_path):
    proc = tmp_path / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "cmdline").write_bytes(b"python\0train.py\0")
    os.symlink("/dev/accel0", proc / "4242" / "fd" / "7")
    err = RuntimeError("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process with pid 4242.")
    msg = devices.explain_busy_accelerator(err, lockfile=str(tmp_path / "lock"), proc=str(proc))
    assert "pid 4242 (python train.py)" in msg and "\n" not in msg
    shutil.rmtree(proc / "4242")
    (tmp_path / "lock").write_text("")
    msg = devices.explain_busy_accelerator(err, lockfile=str(tmp_path / "lock"), proc=str(proc))
    assert "stale lock" in msg and "rm " in msg and "lsof" in msg
    assert devices.explain_busy_accelerator(ValueError("shape mismatch")) is None


def test_resume_finishes_only_the_missing_units_exactly(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "resumed")
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")
    base_meta = read_metadata(baseline)
    per_unit = [json.loads(p.read_text())["counts"]["batches"] for p in sorted(Path(baseline, "_units").iterdir())]
    assert len(per_unit) == 2 and min(per_unit) >= 2
    # Units run in any order: failing after max+1 batches lands inside whichever unit runs second.
    with pytest.raises(Exception, match="injected failure"):
        run_extract_cli(args, FailOnce(max(per_unit) + 1, str(tmp_path / "failed")))
    finished = sorted(os.listdir(os.path.join(out, "_units")))
    assert len(finished) == 1  # one unit completed before the failure
    assert main(args + ["--resume"]) == 0
    meta = read_metadata(out)
    assert meta["run"]["resumed_units"] == [int(finished[0].split("-")[1])]
    assert shard_hashes(out) == shard_hashes(baseline)
    assert meta["counts"] == base_meta["counts"]
    for layer, stats in base_meta["stats"].items():
        assert meta["stats"][layer]["mean"] == pytest.approx(stats["mean"], rel=1e-12, abs=1e-12)
        assert meta["stats"][layer]["mean_norm"] == pytest.approx(stats["mean_norm"], rel=1e-12)
    # a finished dataset resumes to the same metadata without extracting anything
    assert main(args + ["--resume"]) == 0
    assert read_metadata(out)["run"]["resumed_units"] == [0, 1]
    # resuming with other options would mix two extractions: refused in one line, folder untouched
    before = shard_hashes(out)
    assert main(args + ["--resume", "--seq-len", "32"]) == 2
    assert shard_hashes(out) == before and read_metadata(out)["run"]["resumed_units"] == [0, 1]


def test_misspelled_option_is_a_usage_error_not_silently_dropped(model, small_corpus, tmp_path, capsys):
    assert main(extract_args(model, [small_corpus], str(tmp_path / "o"), "--seqlen", "32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seqlen" in err[0]


# ----------------------------------------------------------------------------- issue 12: stale, doubled, deleted too early


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_resume_extracts_again_a_unit_whose_input_changed_in_place(model, small_corpus, tmp_path):
    # Two files, one unit each; an input's fingerprint is its whole file's content (inputs.content_digest).
    lines = Path(small_corpus).read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:8]) + "\n")
    b.write_text("\n".join(lines[8:]) + "\n")
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    args = extract_args(model, [str(tmp_path / "*.jsonl")], out, "--num-shards", "2", "--layers", "0")
    assert main(args) == 0
    stat = os.stat(b)
    edited = lines[8:]
    edited[4] = json.dumps({"text": "an entirely different document, same line count"})
    b.write_text("\n".join(edited) + "\n")
    assert main(args + ["--resume"]) == 0
    assert main(extract_args(model, [str(tmp_path / "*.jsonl")], fresh, "--num-shards", "2", "--layers", "0")) == 0
    meta = read_metadata(out)
    assert meta["run"]["resumed_units"] == [0]  # unit 0 read none of the changed bytes
    assert shard_hashes(out) == shard_hashes(fresh) and meta["counts"] == read_metadata(fresh)["counts"]
    # the same holds for an edit that keeps the file's size and modification time
    edited[5] = edited[5].replace('"text": "', '"text": "X', 1)[:-2] + '"}'
    b.write_text("\n".join(edited) + "\n")
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(args + ["--resume"]) == 0
    assert read_metadata(out)["run"]["resumed_units"] == [0]
    assert main(extract_args(model, [str(tmp_path / "*.jsonl")], fresh, "--num-shards", "2", "--layers", "0", "--overwrite")) == 0
    assert shard_hashes(out) == shard_hashes(fresh)


def test_resume_extracts_again_units_whose_files_are_missing_or_changed(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")
    shards = sorted(glob.glob(f"{out}/layer_00/*"))
    os.remove(shards[0])
    assert main(args + ["--resume"]) == 0
    assert read_metadata(out)["run"]["resumed_units"] == [1] and shard_hashes(out) == shard_hashes(baseline)
    data = bytearray(Path(shards[1]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shards[1]).write_bytes(bytes(data))
    assert main(args + ["--resume"]) == 0
    assert read_metadata(out)["run"]["resumed_units"] == [0] and shard_hashes(out) == shard_hashes(baseline)
    assert main(["validate", out]) == 0


def test_resume_of_a_finished_run_keeps_its_mesh_and_compilations(model, small_corpus, baseline, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)
    os.remove(os.path.join(out, "metadata.json"))  # killed after the last unit, before the metadata
    assert main(extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0", "--resume")) == 0
    meta, makers = read_metadata(out), [json.loads(p.read_text())["run"] for p in Path(out, "_units").iterdir()]
    assert meta["run"]["resumed_units"] == [0, 1]
    assert meta["extraction"]["mesh"] == read_metadata(baseline)["extraction"]["mesh"] == {"data": 1, "model": 1}
    assert meta["run"]["compilations"] == max(m["compilations"] for m in makers) >= 1
    assert meta["run"]["workers"] == len({m["worker"] for m in makers}) >= 1


def _truncated_checkpoint(src, dst):
    path = Path(_checkpoint_variant(src, dst)) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return str(dst)


@pytest.mark.parametrize("case,needle", [
    ("mesh_needs_more_devices", "--mesh 16,1 needs 16 devices; this host has 8"),
    ("truncated_weights", "model.safetensors is unreadable or truncated"),
    ("config_names_more_layers", "has no model.layers.4.input_layernorm.weight"),
    ("hf_split_missing", "cannot read this split"),
    ("stray_argument", "unexpected argument 'stray'"),
    ("abbreviated_option", "unknown option(s) --ov"),
])
def test_overwrite_deletes_nothing_when_a_launcher_check_fails(model, small_corpus, baseline, tmp_path, capsys, case, needle):
    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)
    m, inp, extra = model, [small_corpus], ["--overwrite"]
    if case == "mesh_needs_more_devices":
        extra += ["--mesh", "16,1", "--batch-size", "16"]
    elif case == "truncated_weights":
        m = _truncated_checkpoint(model, tmp_path / "ckpt")
    elif case == "config_names_more_layers":
        m = _checkpoint_variant(model, tmp_path / "ckpt", config_update={"num_hidden_layers": 8})
        extra += ["--layers", "6"]
    elif case == "hf_split_missing":
        (tmp_path / "ds").mkdir()
        write_jsonl(str(tmp_path / "ds" / "train.jsonl"), [{"text": "x"}])
        inp = [f"hf://{tmp_path / 'ds'}:validation"]
    elif case == "stray_argument":
        extra += ["stray"]
    elif case == "abbreviated_option":
        extra = ["--ov"]
    capsys.readouterr()
    assert main(extract_args(m, inp, out, *extra)) == 2
    _one_line(capsys, needle)
    assert shard_hashes(out) == shard_hashes(baseline) and read_metadata(out) == read_metadata(baseline)


def test_unwritable_output_is_one_line_before_the_model_runs(model, small_corpus, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(extract_args(model, [small_corpus], str(tmp_path / "a_file" / "out"))) == 2
    _one_line(capsys, "is not writable")


def test_a_run_that_accepts_no_document_exits_2_naming_the_reason(model, tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "blank.jsonl"), [{"text": "   "}, {"text": ""}, {"text": None}, {"text": "\n"}])
    out = str(tmp_path / "out")
    assert main(extract_args(model, [corpus], out)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the run's counters line, then the error
    line = err[-1]
    assert "Traceback" not in "".join(err) and len([e for e in err if "error:" in e]) == 1
    assert "no document was accepted: all 4 records were rejected, 3 of them for: empty text" in line
    assert "rejected" in line and not os.path.exists(os.path.join(out, "metadata.json"))
    assert len(glob.glob(f"{out}/rejected/*.jsonl")) == 1  # the reasons stay for the user to read


def test_second_run_into_a_folder_is_refused_and_a_dead_runs_lock_is_taken_over(model, small_corpus, baseline, tmp_path, capsys):
    import socket
    import subprocess

    out = str(tmp_path / "out")
    os.makedirs(out)
    args = extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")
    other = subprocess.Popen(["sleep", "60"])  # a live process of this host holds the folder
    try:
        Path(out, "_lock.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "t0"}))
        assert main(args) == 2
        _one_line(capsys, f"is in use by another extract (pid {other.pid} on {socket.gethostname()}, since t0)")
    finally:
        other.kill()
        other.wait()
    assert main(args) == 0  # that pid is gone now: its lock is stale
    assert f"taking over the lock of pid {other.pid}" in capsys.readouterr().err
    assert shard_hashes(out) == shard_hashes(baseline) and not os.path.exists(os.path.join(out, "_lock.json"))


def test_resume_into_an_unrelated_folder_is_refused(model, small_corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(extract_args(model, [small_corpus], str(out), "--resume")) == 2
    _one_line(capsys, "--resume: " + str(out) + " holds files that no extraction wrote (thesis.tex)")
    assert os.listdir(out) == ["thesis.tex"]


def test_hf_input_records_the_one_file_it_writes(model, tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    write_jsonl(str(tmp_path / "ds" / "train.jsonl"), [{"text": t} for t in corpus_texts(6, seed=1)])
    spec = f"hf://{tmp_path / 'ds'}:train"
    assert main(extract_args(model, [spec], str(tmp_path / "o"), "--num-shards", "4")) == 2
    _one_line(capsys, "--num-shards 4: an hf:// split is read as one stream")
    assert main(extract_args(model, [spec], str(tmp_path / "o"), "--layers", "0")) == 0
    meta = read_metadata(str(tmp_path / "o"))
    assert meta["extraction"]["num_shards"] == len(meta["files"]["0"]) == 1 and meta["counts"]["documents"] == 6


@pytest.mark.parametrize("command", ["validate", "merge"])
def test_tools_on_something_that_is_not_a_dataset_say_resume_or_overwrite(baseline, small_corpus, tmp_path, capsys, command):
    def run(target):
        argv = ["validate", target] if command == "validate" else ["merge", "--output", str(tmp_path / "m"), target]
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    assert "is a file" in run(small_corpus)
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(baseline, interrupted)
    os.remove(os.path.join(interrupted, "metadata.json"))
    line = run(interrupted)
    assert len(line.splitlines()) == 1 and "--resume" in line and "--overwrite" in line
    (tmp_path / "empty").mkdir()
    line = run(str(tmp_path / "empty"))
    assert "not a finished" in line and "--resume" not in line


def test_options_are_never_abbreviated(baseline, capsys):
    assert main(["validate", baseline, "--work", "2"]) == 2
    _one_line(capsys, "--work")


def test_corrupt_shard_error_names_the_file(baseline, tmp_path):
    from llm_activations import reader

    out = str(tmp_path / "out")
    shutil.copytree(baseline, out)
    shard = sorted(glob.glob(f"{out}/layer_00/*"))[1]
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(os.path.basename(shard)) + ".*CRC mismatch"):
        for _ in reader.iter_numpy_batches(out, 0, 16):
            pass


def test_train_sae_with_a_layer_not_in_the_dataset_is_one_line(baseline, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_sae", Path(__file__).parent.parent / "examples" / "train_sae.py")
    train_sae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_sae)
    assert train_sae.main([baseline, "--layer", "3", "--steps", "1"]) == 2
    _one_line(capsys, "layer 3 is not in this dataset; it has layers [0]")


def test_ctrl_c_exits_130_with_one_line_and_no_partial_files(model, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), [{"text": t} for t in corpus_texts(300, seed=1)] * 10)
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "llm_activations",
                             *extract_args(model, [corpus], out, "--num-shards", "4", "--layers", "0")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    deadline = time.time() + 240
    while not glob.glob(f"{out}/layer_00/*.inprogress-*") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # wait until a shard is being written
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["llm_activations extract: interrupted"]
    left = glob.glob(f"{out}/**/*.inprogress-*", recursive=True) + glob.glob(f"{out}/_lock.json")
    assert left == [] and not os.path.exists(os.path.join(out, "metadata.json"))


# ----------------------------------------------------------------------------- issue 12: documentation


README = Path(__file__).parent.parent / "README.md"


@pytest.mark.parametrize("dtype,compression", [("float32", "gzip"), ("bfloat16", "none")])
def test_readme_plain_tf_data_snippet_reads_any_dataset(tmp_path, dtype, compression):
    """The README's no-package snippet follows metadata's dtype and compression (a float32 dataset
    read as bfloat16 gives twice the tokens, as NaNs)."""
    from synthetic import make_dataset

    from llm_activations import reader

    text = README.read_text()
    snippet = text.split("**Reading the output with plain tf.data**")[1].split("```python\n")[1].split("```")[0]
    root = str(tmp_path / "ds")
    make_dataset(root, layers=(1,), hidden_size=16, dtype=dtype, compression=compression, num_docs=30)
    scope: dict = {}
    exec(snippet.replace('"activations_demo"', repr(root)), scope)
    got = np.concatenate([b.numpy() for b in scope["ds"]])
    want = np.concatenate(list(reader.iter_numpy_batches(root, 1, 64, drop_remainder=False)))
    assert got.shape == want.shape == (read_metadata(root)["counts"]["tokens"], 16)
    np.testing.assert_allclose(np.sort(got.sum(axis=1)), np.sort(want.sum(axis=1)), rtol=1e-6)


def test_readme_describes_the_demo_command_the_makefile_runs():
    makefile = (README.parent / "Makefile").read_text()
    recipe = makefile.split("\ndemo:")[1].split("\n")[1].strip()
    command = recipe.replace("$(PY)", "python")
    assert command == "python -m llm_activations extract --overwrite"
    assert f"`make demo` runs `{command}`" in README.read_text()
