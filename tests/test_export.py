"""export saelens: the folder SAELens' cached-activations loader reads, every stored token once, rows shuffled."""

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from synthetic import make_dataset, read_all_rows

from llm_activations import cli
from llm_activations.commands import export

CONTEXT = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exp_src"))
    make_dataset(root, layers=(1,), hidden_size=16, num_docs=60, seq_len=64, num_shards=3, hooks=("mlp_in", "resid_post"),
                 dtype="float32")
    return root


def _rows_of(root, layer, hook, context):
    """The stored token stream in file order, cut into rows of context tokens (what export deals)."""
    ref = read_all_rows(root, layer, hook)
    n = len(ref["token_ids"]) // context
    return ref["activations"][: n * context].reshape(n, context, -1), ref["token_ids"][: n * context].reshape(n, context)


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("exp_out") / "cache")
    # ~8 rows a bucket: many files, of sizes varied enough that some Arrow file is written over a longer spent bucket
    export.BUCKET_BYTES, saved = 8 * CONTEXT * (16 * 4 + 4), export.BUCKET_BYTES
    try:
        assert cli.main(["export", "saelens", dataset, dest, "--layer", "1", "--hook", "mlp_in",
                         "--context-size", str(CONTEXT), "--no-progress"]) == 0
    finally:
        export.BUCKET_BYTES = saved
    return dest


def test_saelens_loader_reads_every_row_once_shuffled(dataset, exported):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sae_lens")
    from sae_lens.training.activations_store import ActivationsStore

    rows, ids = _rows_of(dataset, 1, "mlp_in", CONTEXT)
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name="blocks.1.ln2.hook_normalized", hook_head_index=None,
        context_size=CONTEXT, d_in=16, n_batches_in_buffer=2, total_training_tokens=10_000, store_batch_size_prompts=1,
        train_batch_size_tokens=64, prepend_bos=False, normalize_activations="none", device=torch.device("cpu"),
        dtype="float32", cached_activations_path=exported,
    )
    got_acts, got_ids = [], []
    for _ in range(len(rows)):  # SAELens' own reader, one row (store_batch_size_prompts) at a time
        acts, tok = store.get_raw_llm_batch(raise_on_epoch_end=True)
        got_acts.append(acts.numpy().reshape(CONTEXT, 16))
        got_ids.append(tok.numpy())
    with pytest.raises(StopIteration):  # exactly len(rows) rows
        store.get_raw_llm_batch(raise_on_epoch_end=True)
    got_acts, got_ids = np.stack(got_acts), np.stack(got_ids)
    # each exported row is one stored row, bit for bit (float32), with its token ids; each stored row once
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    order = np.array([index[r.tobytes()] for r in got_acts])
    np.testing.assert_array_equal(np.sort(order), np.arange(len(rows)))
    np.testing.assert_array_equal(got_ids, ids[order])
    assert np.mean(order != np.arange(len(rows))) > 0.9  # shuffled, across the bucket files too
    assert len([f for f in os.listdir(exported) if f.endswith(".arrow")]) > 2


def test_folder_is_a_datasets_save_to_disk_folder(exported):
    """What the loader relies on, checked with datasets alone: column names, Array2D shape and dtype, int32 ids."""
    import datasets

    ds = datasets.load_from_disk(exported)
    assert ds.column_names == ["blocks.1.ln2.hook_normalized", "token_ids"]
    feat = ds.features["blocks.1.ln2.hook_normalized"]
    assert isinstance(feat, datasets.Array2D) and feat.shape == (CONTEXT, 16) and feat.dtype == "float32"
    assert ds.features["token_ids"].feature.dtype == "int32" and ds.features["token_ids"].length == CONTEXT
    assert sorted(os.listdir(exported)) == sorted(["dataset_info.json", "state.json",
                                                   *[f["filename"] for f in json.load(open(f"{exported}/state.json"))["_data_files"]]])
    for name in (f for f in os.listdir(exported) if f.endswith(".arrow")):
        # each file is exactly one Arrow IPC stream, nothing after it (Arrow files are written over spent buckets)
        with pa.memory_map(os.path.join(exported, name)) as mm:
            batches = list(pa.ipc.open_stream(mm))
        again = pa.BufferOutputStream()
        with pa.ipc.new_stream(again, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        assert os.path.getsize(os.path.join(exported, name)) == again.getvalue().size
    modes = {os.stat(os.path.join(exported, name)).st_mode & 0o777 for name in os.listdir(exported)}
    assert modes == {0o666 & ~_umask()}  # Arrow files written over bucket files get the usual permissions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_float16_and_the_default_context(dataset, tmp_path):
    import datasets

    dest = str(tmp_path / "half")
    assert cli.main(["export", "saelens", dataset, dest, "--layer", "1", "--dtype", "float16", "--no-progress"]) == 0
    ds = datasets.load_from_disk(dest).with_format("numpy")
    rows, _ = _rows_of(dataset, 1, "resid_post", 64)  # default: the extraction's seq_len
    got = ds["blocks.1.hook_resid_post"][:]
    assert ds.features["blocks.1.hook_resid_post"].dtype == "float16" and got.shape == rows.shape
    assert str(ds.data.column("blocks.1.hook_resid_post").type.storage_type) == "list<item: list<item: halffloat>>"
    np.testing.assert_array_equal(np.sort(got.reshape(-1, 16).astype(np.float32), axis=0),
                                  np.sort(rows.reshape(-1, 16).astype(np.float16).astype(np.float32), axis=0))


def test_bad_input_is_one_line_and_exit_2(dataset, exported, tmp_path, capsys):
    def _cli(*args):
        code = cli.main(["export", *args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    cases = {
        ("--layer", "2"): "hook resid_post at layer 2 is not in this dataset; it has (hook layer): mlp_in 1, resid_post 1",
        ("--layer", "1", "--hook", "z"): "hook z at layer 1 is not in this dataset; it has (hook layer): mlp_in 1, resid_post 1",
        ("--layer", "1", "--hook", "nope"): "--hook 'nope': unknown hook",
        ("--layer", "1", "--max-norm-ratio", "1"): "max_norm_ratio must be a number above 1",
        ("--layer", "1", "--context-size", "0"): "--context-size must be >= 1",
    }
    r = _cli("saelens", dataset, "gs://bucket/cache", "--layer", "1")
    assert r.returncode == 2 and "is a URL; export writes a local folder" in r.stderr
    for extra, message in cases.items():
        r = _cli("saelens", dataset, str(tmp_path / "new"), *extra)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
    before = sorted(os.listdir(exported))
    r = _cli("saelens", dataset, exported, "--layer", "1")
    assert r.returncode == 2 and "is not empty; give --overwrite" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(os.listdir(exported)) == before
    assert not os.path.exists(tmp_path / "new")


def test_overwrite_replaces_atomically(dataset, tmp_path):
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    assert cli.main(["export", "saelens", dataset, str(dest), "--layer", "1", "--overwrite", "--no-progress",
                     "--context-size", "32"]) == 0
    assert not (dest / "old.txt").exists() and (dest / "state.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no temporary sibling left behind


@pytest.mark.parametrize("out_dtype,row_by_row", [("float32", False), ("float32", True), ("float16", False)])
def test_bfloat16_source_round_trips_exactly(tmp_path, out_dtype, row_by_row):
    """bf16 shards wait in bf16 buckets (float32 out: widened at the end) or in float16 ones: each row
    must be the stored row, bit for bit in float32, and float16 as NumPy rounds the float32 value."""
    import datasets

    src = str(tmp_path / "src")
    make_dataset(src, layers=(2,), hidden_size=8, num_docs=30, seq_len=32, num_shards=2, dtype="bfloat16")
    rows, ids = _rows_of(src, 2, "resid_post", CONTEXT)
    saved = export.BUCKET_BYTES, export.BATCH_BYTES, export.ROW_BY_ROW_BYTES
    # ~10 rows a bucket, 3 rows a reader batch and a record batch: both passes reuse their two buffers;
    # row_by_row: pass 2 widens each row from the mapped bucket (what real rows of >= 1 MiB take)
    export.BUCKET_BYTES, export.BATCH_BYTES = 10 * CONTEXT * (8 * 2 + 4), 3 * CONTEXT * 8 * 4
    export.ROW_BY_ROW_BYTES = 0 if row_by_row else saved[2]
    try:
        dest = str(tmp_path / "cache")
        assert cli.main(["export", "saelens", src, dest, "--layer", "2", "--context-size", str(CONTEXT),
                         "--dtype", out_dtype, "--no-progress"]) == 0
    finally:
        export.BUCKET_BYTES, export.BATCH_BYTES, export.ROW_BY_ROW_BYTES = saved
    ds = datasets.load_from_disk(dest).with_format("numpy")
    got, got_ids = ds["blocks.2.hook_resid_post"][:], ds["token_ids"][:]
    assert ds.features["blocks.2.hook_resid_post"].dtype == out_dtype and got.shape == rows.shape
    storage = {"float32": "float", "float16": "halffloat"}[out_dtype]  # datasets hands float16 back as float32
    assert str(ds.data.column("blocks.2.hook_resid_post").type.storage_type) == f"list<item: list<item: {storage}>>"
    want = rows.astype(out_dtype).astype(got.dtype)
    index = {r.tobytes(): i for i, r in enumerate(want)}
    order = np.array([index[r.tobytes()] for r in got])
    np.testing.assert_array_equal(np.sort(order), np.arange(len(rows)))
    np.testing.assert_array_equal(got_ids, ids[order])
    assert np.mean(order != np.arange(len(rows))) > 0.9
    assert len(ds.cache_files) > 2


def test_a_failing_pass2_writer_stops_the_export_and_leaves_nothing(dataset, tmp_path, monkeypatch):
    """Pass 2 writes buckets on several threads: one bucket that cannot be read must fail the export
    with that error, leave no DEST and no temporary sibling, and stop the other writers."""
    import threading

    from llm_activations.reader import layer_spec

    opened = []
    real_open = export._Bucket.open

    def open_or_fail(self, *a):
        opened.append(self)
        if len(opened) == 2:
            raise OSError("bucket unreadable (test)")
        return real_open(self, *a)

    monkeypatch.setattr(export, "BUCKET_BYTES", 4 * CONTEXT * (16 * 4 + 4))
    monkeypatch.setattr(export._Bucket, "open", open_or_fail)
    dest = tmp_path / "cache"
    with pytest.raises(OSError, match="bucket unreadable"):
        export.export_saelens(layer_spec(dataset, 1, hook="mlp_in"), str(dest), context_size=CONTEXT, progress=False)
    assert os.listdir(tmp_path) == []
    assert 2 <= len(opened) < 10  # of 45 buckets: the other writer stopped after its current one
    assert not [t for t in threading.enumerate() if t.name.startswith("export-pass2")]
