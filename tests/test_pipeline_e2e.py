"""End to end through the CLI: shards read back with plain tf.data, compared with transformers."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from llm_activations.cli import main
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl
from tiny_models import reference_layers, rel_error

LAYERS = (1, 3)


def read_with_tfdata(out: str, meta: dict, layer: int) -> list[dict]:
    """Every record of one layer with plain TensorFlow only (no llm_activations code)."""
    import tensorflow as tf

    tf_dtype = {"bfloat16": tf.bfloat16, "float16": tf.float16, "float32": tf.float32}[meta["dtype"]]
    spec = {"activations": tf.io.FixedLenFeature([], tf.string),
            **{k: tf.io.VarLenFeature(tf.int64) for k in ("token_ids", "doc_index", "token_index", "position")}}
    files = [os.path.join(out, f) for f in meta["files"][str(layer)]]
    rows = []
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.io.parse_single_example(raw, spec)
        row = {k: tf.sparse.to_dense(ex[k]).numpy() for k in ("token_ids", "doc_index", "token_index", "position")}
        acts = tf.io.decode_raw(ex["activations"], tf_dtype)
        row["activations"] = tf.cast(acts, tf.float32).numpy().reshape(len(row["token_ids"]), meta["hidden_size"])
        rows.append(row)
    return rows


def segments_of(rows: list[dict]):
    """Maximal runs of one doc_index with consecutive token_index (docs/FORMAT.md's definition of a segment)."""
    for row in rows:
        d, t = row["doc_index"], row["token_index"]
        cut = np.flatnonzero((np.diff(d) != 0) | (np.diff(t) != 1)) + 1
        for s, e in zip(np.r_[0, cut], np.r_[cut, len(d)]):
            yield {k: v[s:e] for k, v in row.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, torch_model = tiny_model_with_tokenizer()
    texts = corpus_texts(24)
    path = write_jsonl(str(tmp_path_factory.mktemp("corpus") / "docs.jsonl"), [{"text": t} for t in texts])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return folder, torch_model, path, texts, [tok(t)["input_ids"] for t in texts]


# Bounds (max |ours - reference| / max |reference|): float32 compute stored in float32 is exact to
# float32 rounding; bfloat16 storage adds one rounding (2^-9 relative); bfloat16 compute rounds
# every matmul input through 4 blocks (the model parity tests measure ~0.02 for it).
@pytest.mark.parametrize("mode,dtype,compute,bound", [("pack", "float32", "float32", 1e-4),
                                                      ("pad", "bfloat16", "float32", 8e-3),
                                                      ("pack", "bfloat16", "bfloat16", 5e-2)])
def test_extract_matches_transformers_per_segment(corpus, tmp_path, mode, dtype, compute, bound):
    folder, torch_model, path, texts, token_lists = corpus
    out = str(tmp_path / "out")
    args = extract_args(folder, [path], out, "--layers", *map(str, LAYERS), "--mode", mode, "--dtype", dtype,
                        "--compute-dtype", compute)
    assert main(args) == 0
    meta = json.load(open(os.path.join(out, "metadata.json")))
    expected_tokens = sum(len(t) for t in token_lists)

    for layer in LAYERS:
        rows = read_with_tfdata(out, meta, layer)
        seen = collections.Counter()
        worst = 0.0
        for seg in segments_of(rows):
            doc, start = int(seg["doc_index"][0]), int(seg["token_index"][0])
            np.testing.assert_array_equal(seg["token_ids"], token_lists[doc][start:start + len(seg["token_ids"])])
            # docs/FORMAT.md: positions restart at 0 at every segment start; a segment is at most seq_len long.
            np.testing.assert_array_equal(seg["position"], np.arange(len(seg["position"])))
            assert start % 64 == 0 and len(seg["token_ids"]) <= 64
            ref = reference_layers(torch_model, seg["token_ids"], [layer])[layer]
            worst = max(worst, rel_error(seg["activations"], ref))
            seen.update(zip(seg["doc_index"].tolist(), seg["token_index"].tolist()))
        assert worst <= bound, f"layer {layer}: max relative error {worst:.2e} > {bound}"
        # every input token exactly once per layer
        assert set(seen) == {(d, i) for d, toks in enumerate(token_lists) for i in range(len(toks))}
        assert max(seen.values()) == 1
        assert len(rows) == meta["counts"]["sequences"]

    c = meta["counts"]
    assert c["documents"] == len(texts) and c["rejected"] == 0
    assert c["tokens"] == expected_tokens
    assert c["segments"] == sum(-(-len(t) // 64) for t in token_lists)
    assert c["padding_tokens"] == c["batches"] * 4 * 64 - expected_tokens
    if mode == "pad":
        assert c["sequences"] == c["segments"]
    assert meta["run"]["compilations"] == 1
    for shard in meta["shards"]:
        assert os.path.getsize(os.path.join(out, shard["path"])) == shard["bytes"]
    assert sum(s["tokens"] for s in meta["shards"]) == expected_tokens * len(LAYERS)
    stats = meta["stats"][str(LAYERS[0])]
    all_acts = np.concatenate([r["activations"] for r in read_with_tfdata(out, meta, LAYERS[0])]).astype(np.float64)
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(all_acts, axis=1).mean(), rtol=1e-2)
    np.testing.assert_allclose(stats["mean"], all_acts.mean(0), rtol=1e-2, atol=1e-2 * np.abs(all_acts).mean())
    assert stats["scaling_factor"] == pytest.approx(np.sqrt(meta["hidden_size"]) / stats["mean_norm"])


def test_pack_mode_keeps_padding_small(corpus, tmp_path):
    folder, _, _, _, _ = corpus
    texts = corpus_texts(400, seed=1)
    path = write_jsonl(str(tmp_path / "many.jsonl"), [{"text": t} for t in texts])
    out = str(tmp_path / "out")
    assert main(extract_args(folder, [path], out, "--layers", "0", "--compression", "gzip")) == 0
    meta = json.load(open(os.path.join(out, "metadata.json")))
    c = meta["counts"]
    real_share = c["tokens"] / (c["tokens"] + c["padding_tokens"])
    assert real_share >= 0.98, c
    assert all(f.endswith(".tfrecord.gz") for f in meta["files"]["0"])
