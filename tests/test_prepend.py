"""--prepend: a context token before every segment, computed but never stored (issue 21)."""

from __future__ import annotations

import collections
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from llm_activations import packing
from llm_activations.cli import main
from llm_activations.errors import UsageError
from llm_activations.options import prepend_token_id
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl
from test_pipeline_e2e import read_with_tfdata
from tiny_models import reference_layers, rel_error

SEQ = 64


def test_segments_leave_room_for_the_prepended_token_and_rows_store_only_the_document():
    doc = np.arange(100, 230, dtype=np.int32)  # 130 tokens: 63 + 63 + 4 with prepend
    segs = packing.split_document(7, doc, 64, prepend=5)
    assert [len(s.tokens) for s in segs] == [63, 63, 4] and [s.start for s in segs] == [0, 63, 126]
    assert all(s.prepend == 5 and s.row_length == len(s.tokens) + 1 for s in segs)
    rows = packing.pack_rows([s.row_length for s in segs], 64, "pack")
    (batch,) = packing.make_batches(segs, rows, 4, 64)
    tokens, segment_ids, positions = batch.inputs
    for r, row in enumerate(rows):
        seg = segs[row[0]]
        n = len(seg.tokens)
        # the model sees [prepend] + the segment at positions 0..n; the stored prefix is the segment at 1..n
        assert tokens[r, 0] == 5 and list(tokens[r, 1:n + 1]) == list(seg.tokens)
        assert list(positions[r, :n + 1]) == list(range(n + 1)) and (segment_ids[r, :n + 1] == 1).all()
        assert batch.lengths[r] == n and list(batch.tokens[r, :n]) == list(seg.tokens)
        assert list(batch.positions[r, :n]) == list(range(1, n + 1))
        assert list(batch.token_index[r, :n]) == list(range(seg.start, seg.start + n))
    assert batch.real_tokens == 130
    # without prepend the model inputs are the stored arrays themselves
    (plain,) = packing.make_batches(packing.split_document(7, doc, 64), [[0], [1], [2]], 4, 64)
    assert plain.model_inputs is None and plain.inputs[0] is plain.tokens


def test_auto_is_bos_else_eos_and_a_token_must_be_in_the_vocabulary():
    vocab = {"<s>": 1, "</s>": 2, "hi": 3}
    tok = lambda bos, eos: SimpleNamespace(bos_token_id=bos, eos_token_id=eos, get_vocab=lambda: vocab)
    assert prepend_token_id("auto", tok(1, 2)) == 1
    assert prepend_token_id("auto", tok(None, 2)) == 2
    assert prepend_token_id("hi", tok(None, None)) == 3
    with pytest.raises(UsageError, match=r"neither a BOS nor an EOS.*--prepend none.*--prepend TOKEN"):
        prepend_token_id("auto", tok(None, None))
    with pytest.raises(UsageError, match=r"'<\|nope\|>' is not a token of the tokenizer's vocabulary"):
        prepend_token_id("<|nope|>", tok(1, 2))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, torch_model = tiny_model_with_tokenizer()
    texts = corpus_texts(16, seed=3)
    path = write_jsonl(str(tmp_path_factory.mktemp("corpus") / "docs.jsonl"), [{"text": t} for t in texts])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return folder, torch_model, path, [tok(t)["input_ids"] for t in texts], tok.eos_token_id


def test_extract_with_prepend_matches_transformers_on_prepended_segments(corpus, tmp_path):
    folder, torch_model, path, token_lists, eos = corpus
    out = str(tmp_path / "out")
    assert main(extract_args(folder, [path], out, "--layers", "1", "--prepend", "auto", "--dtype", "float32")) == 0
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["extraction"]["prepend_token_id"] == eos  # the demo tokenizer has no BOS: its EOS
    seen, worst, continuations = collections.Counter(), 0.0, 0
    for row in read_with_tfdata(out, meta, 1):
        starts = np.flatnonzero(row["position"] == 1)  # every stored segment starts at position 1
        for s, e in zip(starts, list(starts[1:]) + [len(row["position"])]):
            doc, start, ids = int(row["doc_index"][s]), int(row["token_index"][s]), row["token_ids"][s:e]
            np.testing.assert_array_equal(ids, token_lists[doc][start:start + len(ids)])
            np.testing.assert_array_equal(row["position"][s:e], np.arange(1, e - s + 1))
            assert len(ids) <= SEQ - 1 and start % (SEQ - 1) == 0
            continuations += start > 0
            ref = reference_layers(torch_model, [eos] + list(ids), [1])[1][1:]
            worst = max(worst, rel_error(row["activations"][s:e], ref))
            seen.update(zip(row["doc_index"][s:e].tolist(), row["token_index"][s:e].tolist()))
    assert continuations > 0  # long documents' later segments got their own prepended token
    assert worst <= 1e-4, worst
    assert set(seen) == {(d, i) for d, t in enumerate(token_lists) for i in range(len(t))} and max(seen.values()) == 1
    assert meta["counts"]["tokens"] == sum(map(len, token_lists)) == meta["stats"]["1"]["count"]
    assert sum(meta["stats"]["1"]["norms"]["counts"]) == meta["stats"]["1"]["count"]  # prepended tokens not counted


def test_prepend_token_not_in_vocabulary_exits_2_with_one_line(corpus, tmp_path, capsys):
    folder, _, path, _, _ = corpus
    code = main(extract_args(folder, [path], str(tmp_path / "o"), "--prepend", "<|nope|>"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prepend '<|nope|>' is not a token" in err[0]
