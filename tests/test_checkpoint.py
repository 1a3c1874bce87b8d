"""Checkpoint loading: single file vs sharded, bfloat16 files, partial depth, and clear errors."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from llm_activations.model import checkpoint, source
from llm_activations.model.config import load_model_config
from llm_activations.errors import UsageError
from llm_activations.model.sharding import make_mesh
from tiny_models import cached_checkpoint


@pytest.fixture(scope="module")
def single():
    return cached_checkpoint("qwen2")


@pytest.fixture(scope="module")
def mesh(single):
    config, _ = load_model_config(single[0])
    return make_mesh((1, 1), config, 1, np.float32)


def config_of(folder):
    return load_model_config(folder)[0]


def _load(folder, mesh, num_layers=4, dtype=np.float32):
    config, _ = load_model_config(folder)
    return checkpoint.load_params(folder, config, num_layers, mesh, dtype)


def _copy_with(tmp_path, src, edit):
    """Copy a single-file float32 checkpoint, letting edit(tensors: dict) change its weights."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_weights_land_where_the_table_says(single, mesh):
    folder, torch_model = single
    params = _load(folder, mesh)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    q = sd["model.layers.2.self_attn.q_proj.weight"]  # [N*H, D]; qkv [L, D, K, G + 2, H]
    g = config_of(folder).num_heads // config_of(folder).num_kv_heads
    np.testing.assert_array_equal(np.asarray(params["layers"]["qkv"][2])[:, 3 // g, 3 % g], q[3 * 8:4 * 8].T)
    v = sd["model.layers.2.self_attn.v_proj.weight"]  # [K*H, D]
    np.testing.assert_array_equal(np.asarray(params["layers"]["qkv"][2])[:, 1, g + 1], v[8:16].T)
    up = sd["model.layers.3.mlp.up_proj.weight"]  # [F, D]; gate_up [L, 2, D, F]
    np.testing.assert_array_equal(np.asarray(params["layers"]["gate_up"][3])[1], up.T)
    o = sd["model.layers.1.self_attn.o_proj.weight"]  # [D, N*H]
    np.testing.assert_array_equal(np.asarray(params["layers"]["o"][1])[5], o[:, 5 * 8:6 * 8].T)
    np.testing.assert_array_equal(params["layers"]["down"][3], sd["model.layers.3.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["qkv_bias"][0])[:, g].ravel(), sd["model.layers.0.self_attn.k_proj.bias"])
    assert "o_bias" not in params["layers"]  # Qwen2: o_proj has no bias


def test_sharded_checkpoint_equals_single_file(single, mesh):
    sharded, _ = cached_checkpoint("qwen2", sharded=True)
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = _load(single[0], mesh), _load(sharded, mesh)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_checkpoint_loads(mesh):
    folder, torch_model = cached_checkpoint("qwen2", dtype=torch.bfloat16)
    with safe_open(os.path.join(folder, "model.safetensors"), framework="flax") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    params = _load(folder, mesh, dtype=ml_dtypes.bfloat16)
    assert params["embed"].dtype == ml_dtypes.bfloat16
    want = torch_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]).astype(np.float32), want)
    # on CPU the block stacks hold the bf16 bits (transformer.BITS: the scan slices no float32 copy)
    assert params["layers"]["down"].dtype == np.uint16
    down = torch_model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["down"][1]).view(ml_dtypes.bfloat16).astype(np.float32), down.T)
    # bfloat16 file, float32 compute: widening is exact
    wide = _load(folder, mesh, dtype=np.float32)
    np.testing.assert_array_equal(wide["embed"], want)


def test_only_blocks_up_to_the_deepest_layer_are_loaded(single, mesh, tmp_path):
    # Corrupt layer 3's shapes: a load that stops at layer 1 never reads it.
    folder = _copy_with(tmp_path, single[0], lambda t: t.update({"model.layers.3.mlp.up_proj.weight": np.zeros((3, 3), np.float32)}))
    params = _load(folder, mesh, num_layers=2)
    assert all(w.shape[0] == 2 for w in params["layers"].values())  # stacked over blocks 0 and 1
    with pytest.raises(UsageError, match=r"model\.layers\.3\.mlp\.up_proj\.weight has shape \[3, 3\], expected \[128, 64\]"):
        _load(folder, mesh, num_layers=4)


def test_missing_key(single, mesh, tmp_path):
    folder = _copy_with(tmp_path, single[0], lambda t: t.pop("model.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(UsageError, match=r"^checkpoint is missing model\.layers\.1\.self_attn\.v_proj\.bias$"):
        _load(folder, mesh)


def test_wrong_shape(single, mesh, tmp_path):
    folder = _copy_with(tmp_path, single[0], lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(UsageError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[64, 64\], expected \[32, 64\]"):
        _load(folder, mesh)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.rotary_proj.weight", "model.layers.4.mlp.up_proj.weight",
                                 "model.layers.0.self_attn.q_norm.weight"])
def test_unexpected_key(single, mesh, tmp_path, key):
    # an unknown name, a layer beyond config.json, and a Qwen3-only weight in a Qwen2 checkpoint
    folder = _copy_with(tmp_path, single[0], lambda t: t.update({key: np.ones(8, np.float32)}))
    with pytest.raises(UsageError, match=rf"unexpected checkpoint key {key.replace('.', '[.]')}"):
        _load(folder, mesh)


def test_lm_head_and_final_norm_are_ignored(single, mesh):
    folder, torch_model = single
    assert not torch_model.config.tie_word_embeddings  # so lm_head.weight is in the file
    keys = set(load_file(os.path.join(folder, "model.safetensors")))
    assert {"lm_head.weight", "model.norm.weight"} <= keys
    _load(folder, mesh)  # no error


def test_unknown_architecture(single, tmp_path):
    dst = tmp_path / "gpt2"
    shutil.copytree(single[0], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"unsupported architecture GPT2LMHeadModel; supported: Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model_config(str(dst))


def test_folder_without_safetensors(tmp_path):
    with pytest.raises(UsageError, match="no model.safetensors"):
        checkpoint.safetensors_files(str(tmp_path))


def test_unknown_hub_id_offline_is_a_usage_error():
    with pytest.raises(UsageError, match="no-such-org/no-such-model"):
        source.resolve("no-such-org/no-such-model")


def test_truncated_file(single, tmp_path):
    dst = tmp_path / "cut"
    shutil.copytree(single[0], dst)
    path = dst / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    config, _ = load_model_config(str(dst))
    mesh = make_mesh((1, 1), config, 1, np.float32)
    with pytest.raises(UsageError, match=r"model\.safetensors is truncated"):
        checkpoint.load_params(str(dst), config, 4, mesh, np.float32)
