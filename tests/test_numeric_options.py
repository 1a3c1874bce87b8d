"""Every numeric option of extract, validate and merge is checked where it comes in: one line, exit 2,
before any work (issue 22 item 11: `validate --workers -3` used to run)."""

from __future__ import annotations

import pytest

from llm_activations.cli import main
from pipeline_fixtures import extract_args, tiny_model_with_tokenizer
from synthetic import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds") / "acts")
    make_dataset(root, num_docs=8)
    return root


@pytest.mark.parametrize("workers, message", [("-3", "-3 must be at least 1"), ("0", "0 must be at least 1"),
                                              ("two", "'two' is not a whole number")])
def test_validate_workers_must_be_positive(dataset, capsys, workers, message):
    assert main(["validate", dataset, "--workers", workers]) == 2
    err = capsys.readouterr()
    assert err.out == ""  # refused before a file was checked
    lines = err.err.strip().splitlines()
    assert lines == [f"llm_activations validate: error: argument --workers: {message}"]
    assert main(["validate", dataset, "--workers", "1"]) == 0


@pytest.mark.parametrize("option, value, message", [
    ("--seq-len", "0", "0 must be at least 1"),
    ("--batch-size", "-4", "-4 must be at least 1"),
    ("--num-shards", "-1", "-1 must be at least 0"),
    ("--max-docs", "0", "0 must be at least 1"),
    ("--num-hosts", "0", "0 must be at least 1"),
    ("--host-index", "-1", "-1 must be at least 0"),
    ("--docs-per-unit", "0", "0 must be at least 1"),  # was a ZeroDivisionError traceback
    ("--seq-len", "1e3", "'1e3' is not a whole number"),
])
def test_extract_numeric_options_are_one_line(tmp_path, capsys, option, value, message):
    folder, _ = tiny_model_with_tokenizer()
    capsys.readouterr()  # the model's first creation prints progress
    out = tmp_path / "out"
    assert main(extract_args(folder, [str(tmp_path / "none.jsonl")], str(out), option, value)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"llm_activations extract: error: argument {option}: {message}"]
    assert not out.exists()
