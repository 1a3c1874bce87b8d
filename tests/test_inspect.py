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
