"""merge: host folders of independent-host mode -> one dataset equal to one run over all the input.

The host folders are built here from one set of token vectors split between two "hosts" (real
shards written with records.ShardWriter, metadata.json per docs/FORMAT.md), so the merged
statistics can be checked against Moments.of(all vectors) and the merged records against the
records that were written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llm_activations import cli
from llm_activations.format import records
from llm_activations.format import metadata as md
from llm_activations.commands.merge import merge_datasets
from llm_activations.commands.validate import check_file
from llm_activations.format.stats import Moments

HIDDEN = 16
LAYERS = (1, 3)
NUM_DOCS = 10


def _corpus(seed: int = 0):
    """NUM_DOCS documents: per doc its token ids and, per layer, activations [n, HIDDEN] float32."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(NUM_DOCS):
        n = int(rng.integers(3, 12))
        # Offset and scale differ per layer so the merge of means and variances is not trivial.
        acts = {layer: (rng.normal(size=(n, HIDDEN)) * (1 + layer) + layer).astype(np.float32) for layer in LAYERS}
        docs.append({"doc_index": d, "token_ids": rng.integers(0, 1000, size=n), "acts": acts})
    return docs


def _write_host(root, docs, *, host_index, num_hosts, doc_range, num_shards=2, compression="none", **overrides):
    """A finished host dataset folder: one row per document, rows dealt round-robin to the shards."""
    layers = overrides.get("layers", LAYERS)
    dtype = overrides.get("dtype", "float32")
    files, shards, stats = {}, [], {}
    for layer in layers:
        writers = [
            records.ShardWriter(os.path.join(root, records.shard_relpath(layer, s, num_shards, compression)), compression)
            for s in range(num_shards)
        ]
        for i, doc in enumerate(docs):
            n = len(doc["token_ids"])
            ex = records.encode_example(
                doc["acts"][layer].astype(dtype),
                token_ids=doc["token_ids"],
                doc_index=np.full(n, doc["doc_index"]),
                token_index=np.arange(n),
                position=np.arange(n),
            )
            writers[i % num_shards].write(ex, n)
        files[str(layer)] = []
        for s, w in enumerate(writers):
            rel = records.shard_relpath(layer, s, num_shards, compression)
            shards.append({"path": rel, "layer": layer, **w.close()})
            files[str(layer)].append(rel)
        vectors = np.concatenate([d["acts"][layer] for d in docs]) if docs else np.zeros((0, HIDDEN))
        stats[str(layer)] = Moments.of(vectors.astype(dtype)).to_json()
    tokens = sum(len(d["token_ids"]) for d in docs)
    meta = md.build_metadata(
        format_version=overrides.get("format_version", md.FORMAT_VERSION),
        model={
            "name_or_path": overrides.get("model", "tiny-qwen2"),
            "architecture": "Qwen2ForCausalLM",
            "model_type": "qwen2",
            "hidden_size": HIDDEN,
            "num_layers": 4,
            "config": {"hidden_size": HIDDEN, "num_hidden_layers": 4, "vocab_size": 1000},
        },
        tokenizer={"name_or_path": "tiny-qwen2", "vocab_size": 1000, "special_token_ids": {"eos_token_id": 2}},
        input={
            "patterns": ["corpus/*.jsonl"],
            "text_field": "text",
            "max_docs": None,
            "num_hosts": num_hosts,
            "host_index": host_index,
            "doc_index_range": list(doc_range),
        },
        extraction={
            "layers": list(layers),
            "hook": "resid_post",
            "seq_len": 16,
            "batch_size": 2,
            "mode": "pack",
            "compute_dtype": "float32",
            "mesh": {"data": 1, "model": 1},
            "num_shards": num_shards,
        },
        dtype=dtype,
        hidden_size=HIDDEN,
        compression=compression,
        shards=shards,
        counts={
            "documents": len(docs),
            "rejected": 1,
            "segments": len(docs),
            "sequences": len(docs),
            "batches": (len(docs) + 1) // 2,
            "tokens": tokens,
            "padding_tokens": 16 * len(docs) - tokens,
        },
        stats=stats,
        run={
            "runner": "DirectRunner",
            "workers": 1,
            "compilations": 1,
            "wall_seconds": 10.0 + host_index,
            "tokens_per_second": tokens / (10.0 + host_index),
            "start_time": f"2026-11-27T22:00:0{host_index}Z",
            "end_time": f"2026-11-27T22:00:1{host_index}Z",
            "versions": {"llm_activations": "0.1.0"},
        },
    )
    assert meta["files"] == files
    os.makedirs(os.path.join(root, "rejected"), exist_ok=True)
    with open(os.path.join(root, "rejected", "part-00000.jsonl"), "w") as f:
        f.write(json.dumps({"doc_index": doc_range[0], "reason": "empty text"}) + "\n")
    md.write_metadata(str(root), meta)
    return meta


SPLIT = 6  # host 0 gets documents [0, 6), host 1 gets [6, 10)


def _two_hosts(base, docs, **overrides):
    """Two host folders base/host-0 and base/host-1; overrides apply to host 1 only."""
    h0 = os.path.join(base, "host-0")
    h1 = os.path.join(base, "host-1")
    _write_host(h0, docs[:SPLIT], host_index=0, num_hosts=2, doc_range=(0, SPLIT))
    _write_host(h1, docs[SPLIT:], host_index=1, num_hosts=2, doc_range=(SPLIT, NUM_DOCS), **overrides)
    return h0, h1


def _read_dataset(root):
    """{(layer, first doc_index, first token_index): (token_ids, activations)} of every record (row),
    found through metadata paths only."""
    meta = md.read_metadata(str(root))
    out = {}
    for layer_key, paths in meta["files"].items():
        for rel in paths:
            for data in records.read_shard(md.shard_path(str(root), rel)):
                ex = records.decode_example(data)
                acts = records.decode_activations(ex, np.dtype(meta["dtype"]), meta["hidden_size"])
                key = (int(layer_key), int(ex["doc_index"][0]), int(ex["token_index"][0]))
                assert key not in out, f"record {key} appears twice"
                out[key] = (ex["token_ids"].tolist(), acts.copy())
    return meta, out


def _check_merged(meta, docs):
    all_tokens = sum(len(d["token_ids"]) for d in docs)
    assert meta["counts"] == {
        "documents": NUM_DOCS,
        "rejected": 2,
        "segments": NUM_DOCS,
        "sequences": NUM_DOCS,
        "batches": 3 + 2,
        "tokens": all_tokens,
        "padding_tokens": 16 * NUM_DOCS - all_tokens,
    }
    for layer in LAYERS:
        want = Moments.of(np.concatenate([d["acts"][layer] for d in docs]))
        got = meta["stats"][str(layer)]
        assert got["count"] == want.count == all_tokens
        np.testing.assert_allclose(got["mean"], want.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["var"], want.var, rtol=1e-12, atol=1e-12)
        assert got["norm_sum"] == pytest.approx(want.norm_sum, rel=1e-12)
        assert got["mean_norm"] == pytest.approx(want.mean_norm, rel=1e-12)
        assert got["scaling_factor"] == pytest.approx(np.sqrt(HIDDEN) / want.mean_norm, rel=1e-12)
        # the norm histograms merge exactly (counts added), and what readers deliver follows from them
        assert got["norms"]["counts"] == want.norms.counts.tolist() and sum(got["norms"]["counts"]) == all_tokens
        np.testing.assert_allclose(got["norms"]["sumsq"], want.norms.sumsq, rtol=1e-12)
        assert got["median_norm"] == pytest.approx(want.norms.median(), rel=1e-12)
        assert got["delivered"]["count"] + got["delivered"]["dropped"] == all_tokens
        # The parallel merge is not a no-op: per-host stats differ from the whole.
        assert not np.allclose(Moments.of(docs[0]["acts"][layer]).mean, want.mean)
    run = meta["run"]
    assert run["compilations"] == 2 and run["workers"] == 2
    assert run["wall_seconds"] == 11.0
    assert run["tokens_per_second"] == pytest.approx(all_tokens / 11.0, abs=0.05)
    assert run["start_time"] == "2026-11-27T22:00:00Z" and run["end_time"] == "2026-11-27T22:00:11Z"
    assert meta["input"]["doc_index_range"] == [0, NUM_DOCS]
    assert meta["input"]["doc_index_ranges"] == [[0, SPLIT], [SPLIT, NUM_DOCS]]
    assert meta["merge"]["complete"] is True


def _check_records(root, docs):
    meta, got = _read_dataset(root)
    assert set(got) == {(layer, d["doc_index"], 0) for layer in LAYERS for d in docs}
    for d in docs:
        for layer in LAYERS:
            token_ids, acts = got[(layer, d["doc_index"], 0)]
            assert token_ids == d["token_ids"].tolist()
            np.testing.assert_array_equal(acts, d["acts"][layer])
    assert [s["records"] for s in meta["shards"] if s["layer"] == LAYERS[0]] == [3, 3, 2, 2]
    return meta


def test_merge_in_place_equals_one_run(tmp_path):
    docs = _corpus()
    h0, h1 = _two_hosts(tmp_path, docs)
    before = {p: open(p, "rb").read() for p in _all_files(tmp_path)}
    meta = merge_datasets([h1, h0], str(tmp_path))  # input order does not matter
    _check_merged(meta, docs)
    # Referenced in place: relative paths into the host folders, in doc_index order, nothing copied.
    assert meta["files"]["1"] == [
        "host-0/layer_01/part-00000-of-00002.tfrecord",
        "host-0/layer_01/part-00001-of-00002.tfrecord",
        "host-1/layer_01/part-00000-of-00002.tfrecord",
        "host-1/layer_01/part-00001-of-00002.tfrecord",
    ]
    assert meta["merge"]["copied_files"] == 0
    assert sorted(os.listdir(tmp_path)) == ["host-0", "host-1", "metadata.json"]
    assert {p: open(p, "rb").read() for p in before} == before  # host files untouched
    _check_records(tmp_path, docs)
    for shard in meta["shards"]:  # every shard entry still describes its file exactly (size, sha256, counts)
        report = check_file(str(tmp_path), shard, np.float32, HIDDEN)
        assert report.ok, report.problems
        assert (report.records, report.tokens, report.bytes) == (shard["records"], shard["tokens"], shard["bytes"])


def test_merge_copies_outside_folders_and_verifies_sha256(tmp_path):
    docs = _corpus(1)
    h0, h1 = _two_hosts(tmp_path / "hosts", docs)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--output", str(out), h0, h1]) == 0
    meta = _check_records(out, docs)
    _check_merged(meta, docs)
    assert meta["merge"]["copied_files"] == len(meta["shards"]) == 8
    assert meta["files"]["3"][0] == "host-00000/layer_03/part-00000-of-00002.tfrecord"
    for shard in meta["shards"]:
        data = open(md.shard_path(str(out), shard["path"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert os.path.exists(out / "host-00001" / "rejected" / "part-00000.jsonl")
    assert not [p for p in _all_files(out) if p.endswith(".inprogress")]


def test_copy_flag_forces_copies_and_gzip_survives(tmp_path):
    docs = _corpus(2)
    h0 = os.path.join(tmp_path, "host-0")
    h1 = os.path.join(tmp_path, "host-1")
    _write_host(h0, docs[:SPLIT], host_index=0, num_hosts=2, doc_range=(0, SPLIT), compression="gzip")
    _write_host(h1, docs[SPLIT:], host_index=1, num_hosts=2, doc_range=(SPLIT, NUM_DOCS), compression="gzip")
    meta = merge_datasets([h0, h1], str(tmp_path), copy=True)
    assert meta["merge"]["copied_files"] == 8
    assert all(p.startswith("host-0000") and p.endswith(".tfrecord.gz") for p in meta["files"]["1"])
    _check_records(tmp_path, docs)


def test_corrupt_shard_is_refused_when_copying(tmp_path, capsys):
    docs = _corpus(3)
    h0, h1 = _two_hosts(tmp_path / "hosts", docs)
    victim = os.path.join(h1, records.shard_relpath(3, 1, 2))
    data = bytearray(open(victim, "rb").read())
    data[-10] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    out = tmp_path / "merged"
    assert cli.main(["merge", "--output", str(out), h0, h1]) == 1  # damaged data, not a usage error
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match its metadata.json" in err and victim in err
    assert err.startswith("llm_activations merge: error: corrupt data: ")
    assert not os.path.exists(out / "metadata.json")


def test_failed_merge_overwrite_leaves_no_dataset_not_old_metadata_over_new_shards(tmp_path, capsys):
    """issue 22 item 1: a float16 merge in OUT, then merge --overwrite of float32 hosts whose last
    shard is corrupt. Shards are replaced before the corrupt one is reached; the old metadata.json
    must be gone by then, so every reader refuses OUT instead of reading float32 bytes as float16."""
    from llm_activations import reader
    from llm_activations.errors import DatasetError

    docs = _corpus(12)
    old = [os.path.join(tmp_path, "old", f"host-{i}") for i in range(2)]
    _write_host(old[0], docs[:SPLIT], host_index=0, num_hosts=2, doc_range=(0, SPLIT), dtype="float16")
    _write_host(old[1], docs[SPLIT:], host_index=1, num_hosts=2, doc_range=(SPLIT, NUM_DOCS), dtype="float16")
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--output", out, *old]) == 0
    before = {s["path"]: s["sha256"] for s in md.read_metadata(out)["shards"]}
    h0, h1 = _two_hosts(tmp_path / "new", docs)
    victim = os.path.join(h1, records.shard_relpath(3, 1, 2))  # the last file merge copies
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    capsys.readouterr()
    assert cli.main(["merge", "--output", out, "--overwrite", h0, h1]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt data:" in err[0] and victim in err[0], err
    replaced = [p for p, sha in before.items() if records_sha(os.path.join(out, p)) != sha]
    assert len(replaced) == len(before) - 1  # every shard but the corrupt one's was rewritten ...
    assert not os.path.exists(os.path.join(out, "metadata.json"))  # ... and OUT is no dataset
    with pytest.raises(DatasetError, match="no metadata.json"):
        md.read_metadata(out)
    with pytest.raises(DatasetError, match="no metadata.json"):
        next(iter(reader.iter_numpy_batches(out, 1, 8)))
    assert cli.main(["validate", out]) == 2


def records_sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_partial_merge_is_recorded_as_incomplete(tmp_path):
    docs = _corpus(4)
    h0, _ = _two_hosts(tmp_path, docs)
    meta = merge_datasets([h0], str(tmp_path), overwrite=True)  # host-1 is there but not merged
    assert meta["merge"]["complete"] is False
    assert meta["counts"]["documents"] == SPLIT
    assert meta["input"]["doc_index_range"] == [0, SPLIT]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model": "other-model"}, "inputs disagree on model.name_or_path"),
        ({"layers": (1,)}, "inputs disagree on extraction.layers"),
        ({"dtype": "float16"}, "inputs disagree on dtype"),
        ({"compression": "gzip"}, "inputs disagree on compression"),
    ],
)
def test_inconsistent_inputs_are_refused(tmp_path, capsys, override, message):
    docs = _corpus(5)
    h0, h1 = _two_hosts(tmp_path / "hosts", docs, **override)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--output", str(out), h0, h1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("llm_activations merge: error: ") and message in err
    assert h0 in err and h1 in err
    assert not os.path.exists(out)


def test_overlapping_ranges_missing_metadata_and_busy_output_are_refused(tmp_path, capsys):
    docs = _corpus(6)
    h0, h1 = _two_hosts(tmp_path / "hosts", docs)
    out = str(tmp_path / "merged")

    assert cli.main(["merge", "--output", out, h0, h0]) == 2
    assert "inputs share records" in capsys.readouterr().err

    overlapping = str(tmp_path / "hosts" / "host-x")
    _write_host(overlapping, docs[4:], host_index=1, num_hosts=2, doc_range=(4, NUM_DOCS))
    assert cli.main(["merge", "--output", out, h0, overlapping]) == 2
    assert "[0, 6)" in capsys.readouterr().err

    empty = tmp_path / "hosts" / "unfinished"
    empty.mkdir()
    assert cli.main(["merge", "--output", out, h0, str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no metadata.json" in err

    os.makedirs(out)
    open(os.path.join(out, "notes.txt"), "w").write("keep me")
    assert cli.main(["merge", "--output", out, h0, h1]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(["merge", "--output", out, "--overwrite", h0, h1]) == 0
    assert open(os.path.join(out, "notes.txt")).read() == "keep me"

    assert cli.main(["merge", "--output", h0, h0]) == 2
    assert "is the output folder itself" in capsys.readouterr().err


def test_interleaved_split_of_a_streaming_input(tmp_path, capsys):
    """hf:// hosts share one range and take record i when i % num_hosts == host_index."""
    docs = _corpus(8)
    h0 = os.path.join(tmp_path, "host-0")
    h1 = os.path.join(tmp_path, "host-1")
    _write_host(h0, docs[0::2], host_index=0, num_hosts=2, doc_range=(0, -1))
    _write_host(h1, docs[1::2], host_index=1, num_hosts=2, doc_range=(0, -1))
    meta = merge_datasets([h0, h1], str(tmp_path))
    assert meta["input"]["doc_index_range"] == [0, -1] and meta["merge"]["complete"]
    assert meta["counts"]["documents"] == NUM_DOCS
    for layer in LAYERS:
        want = Moments.of(np.concatenate([d["acts"][layer] for d in docs]))
        np.testing.assert_allclose(meta["stats"][str(layer)]["var"], want.var, rtol=1e-12)
    _, got = _read_dataset(tmp_path)
    assert set(got) == {(layer, d["doc_index"], 0) for layer in LAYERS for d in docs}

    twin = os.path.join(tmp_path, "twin")
    _write_host(twin, docs[1::2], host_index=0, num_hosts=2, doc_range=(0, -1))
    assert cli.main(["merge", "--output", str(tmp_path / "m"), h0, twin]) == 2
    assert "same host_index" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    docs = _corpus(7)
    h0, h1 = _two_hosts(tmp_path, docs)
    proc = subprocess.run(
        [sys.executable, "-m", "llm_activations", "merge", "--output", str(tmp_path), h0, h1],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 host folders" in proc.stdout and "8 files (0 copied, 8 in place)" in proc.stdout


def _all_files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_two_hosts_through_the_pipeline_equal_one_run(tmp_path):
    """End to end on the bundled demo: 2 hosts (--num-hosts 2) + merge == one run over all the input.

    With float32 compute and per-host --num-shards that cut the same work units as the single run
    (4 units of 10 documents either way), the rows are packed identically, so the shards must be
    byte-identical and every count and statistic equal.
    """
    pytest.importorskip("llm_activations.pipeline")
    common = ["--max-docs", "40", "--dtype", "float32", "--compute-dtype", "float32", "--layers", "0", "1"]
    one, merged = tmp_path / "one", tmp_path / "merged"
    assert cli.main(["extract", "--output", str(one), "--num-shards", "4", *common]) == 0
    hosts = [str(merged / f"host-{i}") for i in range(2)]
    for i, host in enumerate(hosts):
        argv = ["extract", "--output", host, "--num-shards", "2", "--num-hosts", "2", "--host-index", str(i), *common]
        assert cli.main(argv) == 0
    assert cli.main(["merge", "--output", str(merged), *hosts]) == 0

    a, b = md.read_metadata(str(one)), md.read_metadata(str(merged))
    assert b["counts"] == a["counts"]
    # merge sums the hosts' compilations. (All runs here share one process, which keeps the compiled
    # step cached between runs, so a later run may report 0: it really compiled nothing.)
    host_compiles = [md.read_metadata(h)["run"]["compilations"] for h in hosts]
    assert b["run"]["compilations"] == sum(host_compiles) and all(c <= 1 for c in host_compiles)
    assert b["input"]["doc_index_range"] == a["input"]["doc_index_range"] == [0, 40]
    for layer in ("0", "1"):
        sa, sb = a["stats"][layer], b["stats"][layer]
        assert sb["count"] == sa["count"]
        np.testing.assert_allclose(sb["mean"], sa["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sb["var"], sa["var"], rtol=1e-9, atol=1e-12)
        assert sb["mean_norm"] == pytest.approx(sa["mean_norm"], rel=1e-12)
        assert sb["scaling_factor"] == pytest.approx(sa["scaling_factor"], rel=1e-12)
    # Same files, byte for byte (their names differ: part-i-of-4 vs host-h/part-j-of-2), in doc order.
    for layer in ("0", "1"):
        sha = {s["path"]: s["sha256"] for s in a["shards"]}
        sha_b = {s["path"]: s["sha256"] for s in b["shards"]}
        assert [sha[p] for p in a["files"][layer]] == [sha_b[p] for p in b["files"][layer]]
    _, records_a = _read_dataset(one)
    _, records_b = _read_dataset(merged)
    assert records_a.keys() == records_b.keys()
    for key, (tokens, acts) in records_a.items():
        assert records_b[key][0] == tokens
        np.testing.assert_array_equal(records_b[key][1], acts)


def test_escaping_file_path_is_refused(tmp_path, capsys):
    docs = _corpus(9)
    h0, h1 = _two_hosts(tmp_path / "hosts", docs)
    meta = json.load(open(os.path.join(h1, "metadata.json")))
    meta["files"]["1"][0] = "../../../etc/passwd"
    md.write_metadata(h1, meta)
    assert cli.main(["merge", "--output", str(tmp_path / "m"), h0, h1]) == 2
    assert "escapes the dataset folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m" / "metadata.json")
