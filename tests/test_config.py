"""ModelConfig: HF config.json names translated and validated in one place."""

import dataclasses
import json

import pytest

from llm_activations.model.config import ModelConfig, check_layers, load_model_config, model_config_from_hf, model_config_to_hf
from llm_activations.errors import UsageError
from tiny_models import VARIANTS, build_model

QWEN25_7B = {  # config.json of Qwen/Qwen2.5-7B (transformers 4.x style: top-level rope_theta)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}


def _hf(variant):
    return json.loads(build_model(variant).config.to_json_string())


def test_qwen25_7b():
    c = model_config_from_hf(QWEN25_7B)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (3584, 28, 28, 4, 128)
    assert (c.rope_theta, c.qkv_bias, c.o_bias, c.qk_norm, c.group_size) == (1e6, True, False, False, 7)
    # Qwen2.5-7B has 7,615,616,512 parameters; we hold all but lm_head [V, D] and the final norm [D]
    assert c.param_count() == 7_615_616_512 - 152064 * 3584 - 3584


def test_tiny_variants_from_transformers_configs():
    q2, q3, ll = (model_config_from_hf(_hf(v)) for v in ("qwen2", "qwen3", "llama"))
    assert (q2.model_type, q2.qkv_bias, q2.o_bias, q2.qk_norm, q2.head_dim, q2.rope_theta) == ("qwen2", True, False, False, 8, 1e4)
    # Qwen3: explicit head_dim (32 * 8 heads != hidden 64), q/k norms, no bias
    assert (q3.model_type, q3.qkv_bias, q3.qk_norm, q3.head_dim, q3.q_size, q3.rope_theta) == ("qwen3", False, True, 32, 256, 1e6)
    assert (ll.architecture, ll.qkv_bias, ll.o_bias, ll.qk_norm) == ("LlamaForCausalLM", False, False, False)
    assert model_config_from_hf(_hf("qwen2_tied")).tie_word_embeddings


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_to_hf_is_the_exact_inverse(variant):
    c = model_config_from_hf(_hf(variant))
    assert model_config_from_hf(model_config_to_hf(c)) == c


def test_attention_bias_for_qwen3():
    c = model_config_from_hf({**_hf("qwen3"), "attention_bias": True})
    assert c.qkv_bias and c.o_bias
    assert model_config_from_hf(model_config_to_hf(c)) == c


def test_frozen():
    c = model_config_from_hf(QWEN25_7B)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1
    assert isinstance(c, ModelConfig)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]}, r"^unsupported architecture MistralForCausalLM; supported: Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM$"),
    ({"architectures": None, "model_type": "gpt2"}, r"unsupported model_type 'gpt2'"),
    ({"hidden_size": None}, r"config.json has no 'hidden_size'"),
    ({"num_key_value_heads": 5}, r"num_attention_heads=28 is not a multiple of num_key_value_heads=5"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"unsupported RoPE type 'yarn'"),
    ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'"),
    ({"use_sliding_window": True}, r"sliding-window attention is not implemented"),
    ({"vocab_size": "many"}, r"vocab_size='many' is not a valid int"),
])
def test_invalid_configs(change, message):
    with pytest.raises(UsageError, match=message):
        model_config_from_hf({**QWEN25_7B, **change})


def test_model_type_alone_is_enough():
    hf = {k: v for k, v in QWEN25_7B.items() if k != "architectures"}
    assert model_config_from_hf(hf) == model_config_from_hf(QWEN25_7B)


def test_load_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    config, raw = load_model_config(str(tmp_path))
    assert raw == QWEN25_7B and config.vocab_size == 152064
    with pytest.raises(UsageError, match="has no config.json"):
        load_model_config(str(tmp_path / ".."))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        load_model_config(str(tmp_path))


def test_check_layers_is_the_one_layer_rule():
    c = model_config_from_hf(QWEN25_7B)  # 28 layers
    assert check_layers(c, [27, 0, 14]) == (0, 14, 27)
    for layers, message in (([28], "--layers 28: out of range; this model has layers 0..27"),
                            ([3, -1], "--layers -1: out of range; this model has layers 0..27"),
                            ([5, 2, 5], "--layers 5 2 5: a layer is listed twice"),
                            ([], "--layers needs at least one layer")):
        with pytest.raises(UsageError) as e:
            check_layers(c, layers)
        assert str(e.value) == message
