"""Non-finite values are never stored silently (issue 22): float16 overflow fails extract with one
line naming the hook and layer; validate counts inf/nan tokens per file and per (hook, layer)."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from pipeline_fixtures import extract_args, tiny_model_with_tokenizer, write_jsonl, corpus_texts
from synthetic import make_dataset
from tiny_models import build_model, save_model

from llm_activations.cli import main


@pytest.fixture(scope="module")
def loud_model(tmp_path_factory):
    """The tiny qwen2 with its embeddings scaled by 1e6: every residual value is far beyond 65504."""
    folder = str(tmp_path_factory.mktemp("loud"))
    model = build_model("qwen2")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)
    save_model(model, folder)
    tokenizer_folder, _ = tiny_model_with_tokenizer("qwen2")
    for path in glob.glob(os.path.join(tokenizer_folder, "*token*")) + glob.glob(os.path.join(tokenizer_folder, "*.txt")):
        shutil.copy(path, folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(str(tmp_path_factory.mktemp("c") / "c.jsonl"), [{"text": t} for t in corpus_texts(6)])


def test_float16_overflow_is_refused_with_one_line(loud_model, corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    code = main(extract_args(loud_model, [corpus], out, "--layers", "1", "--dtype", "float16"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) >= 1 and "error:" in err[-1]
    line = err[-1]
    assert "resid_post at layer 1" in line and "float16" in line and line.endswith("extract with --dtype bfloat16 (or float32)")
    assert not os.path.exists(os.path.join(out, "metadata.json"))  # nothing a reader would open


def test_the_same_model_in_bfloat16_is_stored_with_finite_stats(loud_model, corpus, tmp_path):
    out = str(tmp_path / "o")
    assert main(extract_args(loud_model, [corpus], out, "--layers", "1", "--dtype", "bfloat16")) == 0
    stats = json.load(open(os.path.join(out, "metadata.json")))["stats"]["1"]
    assert stats["norms"]["nonfinite"] == 0 and stats["median_norm"] > 65504
    assert np.isfinite(stats["mean_norm"]) and sum(stats["norms"]["counts"]) == stats["count"]


def test_validate_counts_nonfinite_tokens_per_file_and_layer(tmp_path, capsys):
    make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=10, seq_len=16, num_shards=2,
                 dtype="float16", scale=3e4)  # some values beyond 65504, not all
    code = main(["validate", str(tmp_path)])
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert code == 1
    assert any("tokens hold inf or nan values (float16 overflow: extract with --dtype bfloat16)" in b for b in bad)
    assert any(b.startswith("BAD resid_post layer 0: ") and "tokens hold inf or nan" in b for b in bad)
    meta = json.load(open(tmp_path / "metadata.json"))
    assert meta["stats"]["0"]["norms"]["nonfinite"] > 0  # stats of the stored values count them too
