"""format/hooks.py: hook names, widths, keys and folders; metadata versions 1 and 2; validate per hook."""

import json
import os

import numpy as np
import pytest
from synthetic import make_dataset

from llm_activations.cli import main
from llm_activations.commands.validate import validate
from llm_activations.errors import DatasetError, UsageError
from llm_activations.format import hooks as hk
from llm_activations.format import manifests
from llm_activations.format import metadata as md
from llm_activations.format import records
from llm_activations.format.stats import Moments


def test_check_hooks_orders_and_refuses_in_one_line():
    assert hk.check_hooks(["resid_post", "z", "resid_pre"]) == ("resid_pre", "z", "resid_post")
    with pytest.raises(UsageError) as e:
        hk.check_hooks(["resid_post", "hook_z"])
    assert str(e.value) == ("--hooks 'hook_z': unknown hook; valid hooks are "
                            "resid_pre, attn_out, z, resid_mid, mlp_in, mlp_out, resid_post")
    with pytest.raises(UsageError, match="listed twice"):
        hk.check_hooks(["z", "z"])
    with pytest.raises(UsageError, match="at least one hook"):
        hk.check_hooks([])


def test_keys_folders_widths_and_versions():
    assert [hk.key(h, 7) for h in ("resid_post", "mlp_out")] == ["7", "mlp_out/7"]
    assert all(hk.parse_key(hk.key(h, 12)) == (h, 12) for h in hk.HOOKS)
    assert records.shard_relpath(3, 0, 4) == "layer_03/part-00000-of-00004.tfrecord"
    assert records.shard_relpath(3, 1, 4, "gzip", hook="z") == "z/layer_03/part-00001-of-00004.tfrecord.gz"
    assert hk.width("z", 1024, 16, 128) == 2048 and hk.width("mlp_in", 1024, 16, 128) == 1024
    assert hk.format_version(["resid_post"]) == 1 and hk.format_version(["resid_post", "z"]) == 2
    assert hk.format_version(["mlp_out"]) == 2
    assert hk.shard_fields("resid_post", 3, ["resid_post"]) == {"layer": 3}
    assert hk.shard_fields("resid_post", 3, ["z", "resid_post"]) == {"hook": "resid_post", "layer": 3}


def _base(extraction, **kw):
    return dict(model={}, tokenizer={}, input={}, extraction=extraction, dtype="float32", hidden_size=4,
                compression="none", counts={}, stats={}, run={}, **kw)


def test_build_metadata_versions():
    shard = lambda h, layer: {"path": records.shard_relpath(layer, 0, 1, hook=h), **hk.shard_fields(h, layer, hooks), "records": 0}
    hooks = ("resid_post",)
    v1 = md.build_metadata(**_base({"layers": [2], **hk.extraction_fields(hooks)}), shards=[shard("resid_post", 2)])
    assert v1["format_version"] == 1 and "hook_widths" not in v1 and v1["extraction"]["hook"] == "resid_post"
    assert v1["files"] == {"2": ["layer_02/part-00000-of-00001.tfrecord"]}
    hooks = ("z", "resid_post")
    shards = [shard(h, 2) for h in hooks]
    v2 = md.build_metadata(**_base({"layers": [2], **hk.extraction_fields(hooks)}), shards=shards, hook_widths={"z": 6})
    assert v2["format_version"] == 2 and v2["hook_widths"] == {"z": 6, "resid_post": 4}
    assert v2["files"] == {"z/2": ["z/layer_02/part-00000-of-00001.tfrecord"], "2": ["layer_02/part-00000-of-00001.tfrecord"]}
    assert md.hooks_of(v2) == hooks and md.hook_width(v2, "z") == 6 and md.hook_width(v1) == 4
    with pytest.raises(ValueError, match="z's width"):
        md.build_metadata(**_base({"layers": [2], **hk.extraction_fields(hooks)}), shards=shards)
    with pytest.raises(ValueError, match=r"\('mlp_in', 2\)"):
        md.build_metadata(**_base({"layers": [2], **hk.extraction_fields(hooks)}), shards=shards + [shard("mlp_in", 2)],
                          hook_widths={"z": 6})


def test_readers_take_versions_1_and_2_and_refuse_others(tmp_path):
    v2 = make_dataset(str(tmp_path), layers=(0,), hidden_size=4, num_docs=5, hooks=("attn_out",))
    assert v2["format_version"] == 2 and md.read_metadata(str(tmp_path))["files"] == {"attn_out/0": v2["files"]["attn_out/0"]}
    meta = dict(v2, format_version=3)
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="it reads versions 1, 2\\); upgrade the package"):
        md.read_metadata(str(tmp_path))


def test_validate_checks_each_hook_at_its_own_width(tmp_path, capsys):
    root = str(tmp_path)
    make_dataset(root, layers=(1, 2), hidden_size=8, num_docs=20, hooks=("z", "mlp_out", "resid_post"))
    reports, problems = validate(root)
    assert not problems and all(r.ok for r in reports) and len(reports) == 3 * 2 * 2
    assert {(r.hook, r.layer) for r in reports} == {(h, l) for h in ("z", "mlp_out", "resid_post") for l in (1, 2)}
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["hook_widths"]["z"] = 8  # z is 16 wide: every z record now has the wrong size
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    assert main(["validate", root]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 4 and all(line.startswith("BAD z/layer_0") and "expected" in line for line in bad)


def test_summarize_keeps_per_hook_moments_and_widths():
    class Unit:
        index, start, stop = 0, 0, 10

        def input_fingerprint(self):
            return "inputs"

    rng = np.random.default_rng(0)
    z, post = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    moments = {("z", 3): Moments.of(z), ("resid_post", 3): Moments.of(post)}
    shards = [{"path": "layer_03/p", "hook": "resid_post", "layer": 3}, {"path": "z/layer_03/p", "hook": "z", "layer": 3}]
    m = manifests.unit_manifest(Unit(), "fp", {}, shards, moments, None)
    assert sorted(m["moments"]) == ["3", "z/3"]
    s = manifests.summarize([m], [3], 4, ("z", "resid_post"), {"z": 6})
    assert [x["hook"] for x in s["shards"]] == ["z", "resid_post"]  # block order
    np.testing.assert_allclose(s["stats"]["z/3"]["mean"], z.mean(0))
    np.testing.assert_allclose(s["stats"]["3"]["var"], post.var(0))
    assert s["stats"]["z/3"]["scaling_factor"] == pytest.approx(np.sqrt(6) / np.linalg.norm(z, axis=1).mean())


def test_extract_prepares_hook_folders(tmp_path):
    """--overwrite removes a previous dataset's hook folders too (nothing stale survives a rerun)."""
    from llm_activations.options import ExtractConfig
    from llm_activations.output_folder import ResumePlan, list_output, prepare_output

    for d in ("layer_01", "z/layer_01", "mlp_out/layer_01", "notes"):
        os.makedirs(tmp_path / d)
    cfg = ExtractConfig(model="m", inputs=("x",), output=str(tmp_path), overwrite=True)
    prepare_output(cfg, list_output(cfg.output), ResumePlan(), num_units=0)
    assert sorted(os.listdir(tmp_path)) == ["notes"]
