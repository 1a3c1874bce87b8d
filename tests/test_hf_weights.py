"""The one random initialiser and the one HF checkpoint writer (model/hf_weights.py, checkpoint.to_hf)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from llm_activations.model import checkpoint, source
from llm_activations.model.config import ModelConfig, load_model_config
from llm_activations.model.hf_weights import params_tensors, random_params, random_tensors, save_hf_checkpoint

# Every optional weight present (q/k/v and o biases, q/k norms), head_dim != hidden / heads, so each
# KEY_TABLE row and each axis of its transform is exercised.
FULL = ModelConfig(architecture="Qwen3ForCausalLM", model_type="qwen3", vocab_size=50, hidden_size=24,
                   intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                   rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False, qkv_bias=True,
                   o_bias=True, qk_norm=True)


@pytest.mark.parametrize("rule", checkpoint.KEY_TABLE, ids=lambda r: r.name)
def test_to_hf_is_the_exact_inverse_of_each_key_table_row(rule):
    hf = np.random.default_rng(0).standard_normal(rule.hf_shape(FULL)).astype(np.float32)
    ours = rule.to_ours(hf, FULL)
    back = checkpoint.to_hf(rule.name, np.ascontiguousarray(ours), FULL)
    assert back.shape == hf.shape and back.flags.c_contiguous
    np.testing.assert_array_equal(back, hf)


def test_fused_params_hold_hf_heads_in_repeat_kv_order():
    # qkv [D, K, G + 2, H]: query head n = kv head n // G (HF's repeat_kv), then that kv head's k and v
    params = random_params(FULL, 1, seed=2)
    tensors = {name: checkpoint.to_hf(name, value, FULL) for name, layer, value in random_tensors(FULL, 1, seed=2)
               if layer == 0}
    qkv, g, h = params["layers"]["qkv"][0], 2, 8
    for n in range(4):
        np.testing.assert_array_equal(qkv[:, n // g, n % g], tensors["q"][n * h:(n + 1) * h].T)
    for kv in range(2):
        np.testing.assert_array_equal(qkv[:, kv, g], tensors["k"][kv * h:(kv + 1) * h].T)
        np.testing.assert_array_equal(qkv[:, kv, g + 1], tensors["v"][kv * h:(kv + 1) * h].T)
        np.testing.assert_array_equal(params["layers"]["qkv_bias"][0][kv, g + 1], tensors["v_bias"][kv * h:(kv + 1) * h])
    np.testing.assert_array_equal(params["layers"]["gate_up"][0][0], tensors["gate"].T)
    np.testing.assert_array_equal(params["layers"]["gate_up"][0][1], tensors["up"].T)


@pytest.mark.parametrize("shard_bytes", [None, 4096], ids=["single", "sharded"])
def test_written_checkpoint_loads_back_as_the_same_params(tmp_path, shard_bytes):
    from llm_activations.model.config import model_config_to_hf
    from llm_activations.model.sharding import make_mesh

    size = save_hf_checkpoint(tmp_path, FULL, random_tensors(FULL, seed=3), model_config_to_hf(FULL),
                              shard_bytes=shard_bytes)
    files = checkpoint.safetensors_files(str(tmp_path))
    assert (len(files) == 1) == (shard_bytes is None)
    assert size == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    config, _ = load_model_config(str(tmp_path))
    assert config == FULL
    loaded = checkpoint.load_params(str(tmp_path), config, 2, make_mesh((1, 1), config, 1, np.float32), np.float32)
    want = random_params(FULL, 2, seed=3)  # blocks 0 and 1: a prefix of the same draw
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), want["embed"])
    assert set(loaded["layers"]) == set(want["layers"])
    for name, stack in want["layers"].items():
        np.testing.assert_array_equal(np.asarray(loaded["layers"][name]), stack, err_msg=name)


def test_params_written_from_a_pytree_round_trip(tmp_path):
    from safetensors.numpy import load_file

    params = random_params(FULL, FULL.num_layers, seed=1)
    save_hf_checkpoint(tmp_path, FULL, params_tensors(params, FULL), {"architectures": ["Qwen3ForCausalLM"]})
    written = load_file(str(tmp_path / source.SINGLE_FILE))
    rules = checkpoint.block_rules(FULL)
    assert len(written) == 1 + FULL.num_layers * len(rules)  # no head keys: the pytree has none
    for rule in rules:  # each HF tensor read back lands exactly on its part of the fused param
        for layer in range(FULL.num_layers):
            np.testing.assert_array_equal(rule.to_ours(written[checkpoint.hf_key(rule, layer)], FULL),
                                          params["layers"][rule.param][layer][checkpoint.part_index(rule, FULL)])


# sha256 of the demo's model.safetensors per demo.DEMO_VERSION: the cache folder is named by the
# version, so a generator that changes these bytes must bump it (and add its hash here).
DEMO_WEIGHTS_SHA256 = {1: "4508339f292043b1df5c21158f2bcd0a37753c23f5276902a17faa6af22c567c"}


def test_demo_weights_are_the_ones_their_version_names(tmp_path, monkeypatch):
    from llm_activations import demo

    monkeypatch.setenv("LLM_ACTIVATIONS_CACHE", str(tmp_path))
    folder = demo.ensure_demo_model()
    assert folder == str(tmp_path / f"demo-qwen2-v{demo.DEMO_VERSION}")
    sha = hashlib.sha256(open(f"{folder}/{source.SINGLE_FILE}", "rb").read()).hexdigest()
    assert DEMO_WEIGHTS_SHA256.get(demo.DEMO_VERSION) == sha
    config = json.loads(open(f"{folder}/config.json").read())
    assert config == dict(demo.DEMO_CONFIG, vocab_size=demo.VOCAB_SIZE, bos_token_id=None, eos_token_id=0, pad_token_id=0)
