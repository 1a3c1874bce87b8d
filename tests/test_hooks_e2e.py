"""Hooks end to end through the CLI on the demo model: extract on two hosts with five hooks, then
validate, inspect, the reader's hook=, merge; a resid_post-only run keeps the version-1 dataset."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from llm_activations import demo, reader
from llm_activations.cli import main
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format.stats import Moments
from pipeline_fixtures import corpus_texts, extract_args, write_jsonl
from tiny_models import reference_hooks, rel_error

LAYERS = ("1", "3")
HOOKS = ("resid_post", "attn_out", "z", "mlp_in", "mlp_out")  # as given on the command line
IN_BLOCK_ORDER = ["attn_out", "z", "mlp_in", "mlp_out", "resid_post"]  # as metadata lists them
# The version-1 contract (docs/FORMAT.md): a resid_post-only dataset has exactly these keys (top
# level compared as a set: extract and merge assemble them in different orders).
V1_TOP = ["format", "format_version", "model", "tokenizer", "input", "extraction", "dtype", "hidden_size",
          "compression", "files", "shards", "counts", "stats", "run"]
# prepend_token_id (issue 21) is a key version-1 readers ignore (docs/FORMAT.md: more keys may appear)
V1_EXTRACTION = ["layers", "hook", "seq_len", "batch_size", "mode", "compute_dtype", "prepend_token_id", "mesh",
                 "num_shards", "num_shards_requested", "num_units"]
V1_SHARD = ["path", "layer", "records", "tokens", "bytes", "sha256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-host extractions of one corpus: resid_post alone and five hooks; float32 throughout."""
    root = tmp_path_factory.mktemp("hooks")
    old = os.environ.get("LLM_ACTIVATIONS_CACHE")
    os.environ["LLM_ACTIVATIONS_CACHE"] = str(root / "cache")
    try:
        model = demo.ensure_demo_model()
    finally:
        if old is None:
            os.environ.pop("LLM_ACTIVATIONS_CACHE")
        else:
            os.environ["LLM_ACTIVATIONS_CACHE"] = old
    corpus = write_jsonl(str(root / "docs.jsonl"), [{"text": t} for t in corpus_texts(20, seed=3)])
    out = {}
    for name, hooks in (("v1", ("resid_post",)), ("v2", HOOKS)):
        for host in (0, 1):
            folder = str(root / name / f"host-{host}")
            args = extract_args(model, [corpus], folder, "--layers", *LAYERS, "--hooks", *hooks, "--dtype", "float32",
                                "--num-shards", "2", "--num-hosts", "2", "--host-index", str(host))
            assert main(args) == 0
            out[(name, host)] = folder
    return model, root, out


def test_resid_post_alone_is_the_version_1_dataset(runs):
    _, _, out = runs
    v1, v2 = md.read_metadata(out[("v1", 0)]), md.read_metadata(out[("v2", 0)])
    assert v1["format_version"] == 1 and sorted(v1) == sorted(V1_TOP)
    assert list(v1["extraction"]) == V1_EXTRACTION and v1["extraction"]["hook"] == "resid_post"
    assert all(list(s) == V1_SHARD for s in v1["shards"])
    assert list(v1["files"]) == list(v1["stats"]) == list(LAYERS)
    assert sorted(os.listdir(out[("v1", 0)])) == ["_units", "layer_01", "layer_03", "metadata.json"]
    # resid_post's shards are the same bytes whether or not other hooks are extracted beside them
    want = {s["path"]: s["sha256"] for s in v1["shards"]}
    got = {s["path"]: s["sha256"] for s in v2["shards"] if s["hook"] == "resid_post"}
    assert got == want and len(want) == 4


def test_version_2_layout_and_metadata(runs):
    _, _, out = runs
    meta = md.read_metadata(out[("v2", 0)])
    assert meta["format_version"] == 2 and meta["extraction"]["hooks"] == IN_BLOCK_ORDER and "hook" not in meta["extraction"]
    assert meta["hook_widths"] == {h: 128 for h in HOOKS}  # demo: 4 heads x 32 = hidden 128
    keys = [hk.key(h, int(layer)) for h in IN_BLOCK_ORDER for layer in LAYERS]
    assert list(meta["files"]) == list(meta["stats"]) == keys
    assert meta["files"]["1"] == ["layer_01/part-00000-of-00002.tfrecord", "layer_01/part-00001-of-00002.tfrecord"]
    assert meta["files"]["z/3"] == ["z/layer_03/part-00000-of-00002.tfrecord", "z/layer_03/part-00001-of-00002.tfrecord"]
    for s in meta["shards"]:
        assert s["path"].startswith(hk.dirname(s["hook"], s["layer"]) + "/")
        assert os.path.getsize(os.path.join(out[("v2", 0)], s["path"])) == s["bytes"]
    # every hook and layer holds the same rows: same record and token counts file for file
    per_unit = collections.defaultdict(set)
    for s in meta["shards"]:
        per_unit[s["path"].rsplit("/", 1)[1]].add((s["records"], s["tokens"]))
    assert all(len(v) == 1 for v in per_unit.values())
    assert meta["run"]["compilations"] == 1


def test_every_hook_read_back_matches_transformers(runs):
    import torch
    import transformers

    model, _, out = runs
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager",
                                                                    dtype=torch.float32).eval()
    folder = out[("v2", 1)]
    for hook in HOOKS:
        for layer in map(int, LAYERS):
            rows = list(reader.iter_numpy_batches(folder, layer, 64, shuffle_buffer=0, drop_remainder=False,
                                                  with_metadata=True, hook=hook))
            got = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            n = md.read_metadata(folder)["counts"]["tokens"]
            assert got["activations"].shape == (n, 128)
            # the first few segments against transformers' module hooks, each run alone
            cut = np.flatnonzero((np.diff(got["doc_index"]) != 0) | (np.diff(got["token_index"]) != 1)) + 1
            for s, e in list(zip(np.r_[0, cut], np.r_[cut, n]))[:3]:
                ref = reference_hooks(torch_model, got["token_ids"][s:e], [layer], [hook])[(hook, layer)]
                assert rel_error(got["activations"][s:e], ref) <= 1e-4, (hook, layer)


def test_validate_inspect_and_merge(runs, capsys):
    _, root, out = runs
    for host in (0, 1):
        assert main(["validate", out[("v2", host)]]) == 0
    capsys.readouterr()
    assert main(["inspect", out[("v2", 0)]]) == 0
    text = capsys.readouterr().out
    assert "hooks attn_out, z, mlp_in, mlp_out, resid_post" in text and "(llm-activations v2)" in text
    meta0 = md.read_metadata(out[("v2", 0)])
    assert any(line.split()[:2] == ["mlp_out/3", f"{meta0['stats']['mlp_out/3']['mean_norm']:.3f}"]
               for line in text.splitlines())

    for name in ("v1", "v2"):
        merged = str(root / f"merged-{name}")
        assert main(["merge", "--output", merged, out[(name, 0)], out[(name, 1)]]) == 0
        assert main(["validate", merged]) == 0
        meta = md.read_metadata(merged)
        assert meta["format_version"] == (1 if name == "v1" else 2)
        for hook in md.hooks_of(meta):
            for layer in map(int, LAYERS):
                acts = np.concatenate(list(reader.iter_numpy_batches(merged, layer, 256, shuffle_buffer=0,
                                                                     drop_remainder=False, hook=hook)))
                want = Moments.of(acts)
                got = meta["stats"][hk.key(hook, layer)]
                assert got["count"] == want.count == meta["counts"]["tokens"]
                np.testing.assert_allclose(got["mean"], want.mean, rtol=1e-5, atol=1e-6)
                assert got["mean_norm"] == pytest.approx(want.mean_norm, rel=1e-6)
    assert sorted(md.read_metadata(str(root / "merged-v1"))) == sorted(V1_TOP + ["merge"])


def test_unknown_hook_exits_2_with_the_valid_names(tmp_path, capsys):
    args = extract_args("unused", ["unused"], str(tmp_path / "o"), "--hooks", "resid_post", "attn")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'attn'" in err[0] and ", ".join(hk.HOOKS) in err[0]
