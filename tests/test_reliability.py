"""Bad input, configuration errors, retries, interrupted runs, determinism, security (issue 5)."""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from llm_activations.model import devices
from llm_activations.format import records
from llm_activations.cli import main
from llm_activations.errors import DatasetError
from llm_activations.format.metadata import read_metadata
from pipeline_fixtures import FailOnce, corpus_texts, extract_args, run_extract_cli, tiny_model_with_tokenizer, write_jsonl


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_hashes(out: str) -> dict:
    return {os.path.relpath(p, out): sha(p) for p in sorted(glob.glob(f"{out}/layer_*/*"))}


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


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("c") / "docs.jsonl"), [{"text": t} for t in corpus_texts(16, seed=3)])


@pytest.fixture(scope="module")
def baseline(model, small_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "out")
    assert main(extract_args(model, [small_corpus], out, "--num-shards", "2", "--layers", "0")) == 0
    return out


# ----------------------------------------------------------------------------- 1. bad records


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
    for name in ("reader.py", "commands/validate.py", "commands/inspect.py", "commands/merge.py", "commands/plan.py",
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
