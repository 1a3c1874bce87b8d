"""inspect: summary from metadata and sampled records, text decoding, PNG histograms."""

import json

import numpy as np
import pytest
from synthetic import make_dataset

from llm_activations.commands import inspect as inspect_dataset
from llm_activations.cli import main


@pytest.fixture
def word_tokenizer(tmp_path):
    """A real Hugging Face tokenizer folder whose ids 0..999 are the words w0..w999."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    folder = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))
    return str(folder)


def test_summary_text_and_png(tmp_path, capsys, word_tokenizer):
    root = tmp_path / "ds"
    meta = make_dataset(str(root), layers=(1, 3), hidden_size=16, num_docs=30, seq_len=32, tokenizer=word_tokenizer)
    png = tmp_path / "norms.png"
    assert main(["inspect", str(root), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    c = meta["counts"]
    assert "synthetic/model" in out and "layers       [1, 3]" in out and "bfloat16 (32 B per token per layer)" in out
    assert f"{c['tokens']:,} per layer" in out
    assert f"({c['padding_tokens'] / (c['tokens'] + c['padding_tokens']):.1%} of computed tokens)" in out
    mean_norm = meta["stats"]["3"]["mean_norm"]
    assert any(line.split()[:2] == ["3", f"{mean_norm:.3f}"] for line in out.splitlines())
    # the first record of layer 1, decoded with the dataset's tokenizer
    from synthetic import read_all_rows

    first = read_all_rows(str(root), 1)["token_ids"][:5]
    assert "text         '" + " ".join(f"w{t}" for t in first) in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_sampled_norms_match_stats_and_missing_tokenizer(tmp_path, capsys):
    meta = make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=10, seq_len=32, tokenizer=str(tmp_path / "nope"))
    norms = inspect_dataset.sample_norms(str(tmp_path), meta, max_records=10_000)
    assert len(norms[("resid_post", 0)]) == meta["counts"]["tokens"]
    assert np.mean(norms[("resid_post", 0)]) == pytest.approx(meta["stats"]["0"]["mean_norm"], rel=1e-5)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "token ids    [" in out and "could not be loaded" in out


def test_refuses_non_dataset(tmp_path, capsys):
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "other"}))
    assert main(["inspect", str(tmp_path)]) == 2


def test_bad_plot_folder_and_sample_records_are_one_line_exit_2(tmp_path, capsys):
    make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=5, seq_len=16)
    for argv, needle in ((["--plot", "/nonexistent/dir/x.png"], "--plot /nonexistent/dir/x.png: folder /nonexistent/dir does not exist"),
                         (["--sample-records", "-1"], "--sample-records -1: must be 1 or more")):
        assert main(["inspect", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_columns_stay_apart_near_1e5_and_delivered_follows_the_histogram(tmp_path, capsys):
    from llm_activations.format import norms

    meta = make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=20, seq_len=32, dtype="float32", scale=4e4)
    assert main(["inspect", str(tmp_path), "--plot", str(tmp_path / "n.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    (row,) = [line for line in out if line.split()[:1] == ["0"] and "|" in line and " / " not in line]
    fields = row.split()
    assert len(fields) == 9, row  # key, mean, scale, |, tokens, p5, p50, p95, max: none ran together
    assert float(fields[1]) == pytest.approx(meta["stats"]["0"]["mean_norm"], rel=1e-3)
    assert float(fields[2]) == pytest.approx(meta["stats"]["0"]["scaling_factor"], rel=1e-3)  # not 0.0000
    assert float(fields[8]) > 1e5
    (drow,) = [line for line in out if line.split()[:1] == ["0"] and "|" not in line and ":" not in line]
    p = norms.policy(norms.NormHistogram.from_json(meta["stats"]["0"]["norms"]), 10)
    assert drow.split()[3] == f"{p.dropped:,}" and drow.split()[-2] == "0"  # inf/nan
    assert drow.split()[-1] == f"{p.top1_energy_share:.1%}"
    assert any(line.startswith("by position") for line in out)
    (rrow,) = [line for line in out if line.split()[:1] == ["0"] and " / " in line]
    cells = [c.split(" / ") for c in rrow.split(None, 1)[1].split(" | ")]
    assert len(cells) == len(inspect_dataset.TRADE_OFF_RATIOS) and cells[-1][0] == "100.0%"


def test_heavy_tokens_below_the_default_threshold_get_a_note_and_a_ratio_that_drops_them():
    from llm_activations.format import norms

    # 97% ordinary tokens around norm 10, 3% "massive" at 70 (7x the median): the default ratio
    # keeps them and they hold most of the energy; a ratio of 6 drops exactly them
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(9, 11, 9700), rng.uniform(69, 71, 300)])
    hist = norms.NormHistogram.of(x)
    lines = inspect_dataset._ratio_lines({("resid_post", 3): hist}, 5)
    row = lines[1].split(None, 1)[1].split(" | ")
    ratios = list(inspect_dataset.TRADE_OFF_RATIOS)
    kept6, top6 = row[ratios.index(6.0)].split(" / ")
    assert kept6 == "97.0%" and float(top6.rstrip("%")) < 1.3  # like tokens: the top 1% hold ~1%
    kept10, top10 = row[ratios.index(10.0)].split(" / ")
    share = (x[x > 60] ** 2)[:100].sum() / (x ** 2).sum()
    assert kept10 == "100.0%" and float(top10.rstrip("%")) == pytest.approx(100 * share, abs=0.5)
    assert lines[-1].startswith("NOTE") and "3 (" in lines[-1]


def test_nonfinite_tokens_are_shown_loudly(tmp_path, capsys):
    meta = make_dataset(str(tmp_path), layers=(0,), hidden_size=8, num_docs=10, seq_len=16, dtype="float16", scale=3e4)
    bad = meta["stats"]["0"]["norms"]["nonfinite"]
    assert bad > 0
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING      tokens holding inf or nan (float16 overflow? re-extract with --dtype bfloat16): 0: {bad:,}" in out
