"""Scale-out on real Beam runners: several workers, independent hosts + merge, a mesh in the DoFn."""

from __future__ import annotations

import os

import numpy as np
import pytest

from llm_activations.format import records
from llm_activations.cli import main
from llm_activations.format.dtypes import numpy_dtype
from llm_activations.format.metadata import read_metadata
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl


def rows_by_key(out: str, layer: int) -> dict:
    """{(doc_index, token_index) of a row's first token: (token ids, activations float32)}."""
    meta = read_metadata(out)
    rows = {}
    for rel in meta["files"][str(layer)]:
        for data in records.read_shard(os.path.join(out, rel)):
            ex = records.decode_example(data)
            acts = records.decode_activations(ex, numpy_dtype(meta["dtype"]), meta["hidden_size"])
            key = (int(ex["doc_index"][0]), int(ex["token_index"][0]))
            assert key not in rows
            rows[key] = (ex["token_ids"].tolist(), ex["doc_index"].tolist(), acts.astype(np.float32))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model_with_tokenizer()[0]
    root = tmp_path_factory.mktemp("scale")
    corpus = write_jsonl(str(root / "docs.jsonl"), [{"text": t} for t in corpus_texts(30, seed=7)])
    single = str(root / "single")
    assert main(extract_args(model, [corpus], single, "--num-shards", "4", "--layers", "1", "--dtype", "float32")) == 0
    return model, corpus, single


def test_two_worker_processes_write_the_records_of_one(setup, tmp_path):
    model, corpus, single = setup
    out = str(tmp_path / "two")
    args = extract_args(model, [corpus], out, "--num-shards", "4", "--layers", "1", "--dtype", "float32",
                        "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")
    assert main(args) == 0
    a, b = read_metadata(single), read_metadata(out)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # same bytes, file for file
    assert a["counts"] == b["counts"]
    assert b["run"]["compilations"] == b["run"]["workers"] >= 1  # one compile per worker process, summed


def test_hosts_plus_merge_equal_one_run(setup, tmp_path):
    model, corpus, single = setup
    merged = tmp_path / "merged"
    for i in range(2):
        host = str(merged / f"host-{i}")
        assert main(extract_args(model, [corpus], host, "--num-shards", "2", "--layers", "1", "--dtype", "float32",
                                 "--num-hosts", "2", "--host-index", str(i))) == 0
    assert main(["merge", "--output", str(merged), str(merged / "host-0"), str(merged / "host-1")]) == 0
    one, both = read_metadata(single), read_metadata(str(merged))
    r1, r2 = rows_by_key(single, 1), rows_by_key(str(merged), 1)
    flat1 = {(d, t) for ids, docs, _ in r1.values() for d, t in zip(docs, ids)}
    flat2 = {(d, t) for ids, docs, _ in r2.values() for d, t in zip(docs, ids)}
    assert flat1 == flat2
    for k in ("documents", "tokens", "segments", "rejected"):
        assert both["counts"][k] == one["counts"][k], k
    s1, s2 = one["stats"]["1"], both["stats"]["1"]
    assert s1["count"] == s2["count"]
    np.testing.assert_allclose(s2["mean"], s1["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2["var"], s1["var"], rtol=1e-4, atol=1e-6)
    assert s2["mean_norm"] == pytest.approx(s1["mean_norm"], rel=1e-5)
    assert main(["validate", str(merged)]) == 0


def test_mesh_in_the_dofn_matches_one_device(setup, tmp_path):
    model, corpus, single = setup
    out = str(tmp_path / "mesh")
    args = extract_args(model, [corpus], out, "--num-shards", "4", "--layers", "1", "--dtype", "float32")
    args[args.index("--mesh") + 1] = "2,4"
    assert main(args) == 0
    r1, r2 = rows_by_key(single, 1), rows_by_key(out, 1)
    assert r1.keys() == r2.keys()
    for key in r1:
        assert r1[key][0] == r2[key][0]
        np.testing.assert_allclose(r2[key][2], r1[key][2], rtol=1e-4, atol=1e-4 * np.abs(r1[key][2]).max())
    assert read_metadata(out)["extraction"]["mesh"] == {"data": 2, "model": 4}
