"""ModelConfig: the decoder's hyperparameters, translated from a Hugging Face config.json in one place.

`model_config_from_hf` is the only function that reads HF names; everything else in the package
uses ModelConfig fields. `model_config_to_hf` is its inverse (used to write test/bench checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llm_activations.errors import UsageError
from llm_activations.model import source

# architecture -> model_type. Qwen2 and Qwen3 are the target; Llama is the same decoder without
# q/k/v bias or q/k norms, so it comes for free.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: q/k/v projections carry a bias, o_proj does not
    o_bias: bool  # Llama/Qwen3 with attention_bias=True: o_proj has one too
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def layer_param_count(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        n = 2 * d + d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f
        n += (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        n += d if self.o_bias else 0
        n += 2 * self.head_dim if self.qk_norm else 0
        return n

    def param_count(self, num_layers: int | None = None) -> int:
        """Parameters the extractor holds: embedding + the first num_layers blocks (no lm_head)."""
        layers = self.num_layers if num_layers is None else num_layers
        return self.vocab_size * self.hidden_size + layers * self.layer_param_count()


def check_layers(config: ModelConfig, layers) -> tuple[int, ...]:
    """The requested 0-based decoder blocks, sorted; the one check of --layers for extract, plan and
    the Extractor, each refusal one UsageError line: no layer, a layer out of range, a layer twice."""
    layers = [int(layer) for layer in layers]
    if not layers:
        raise UsageError("--layers needs at least one layer")
    for layer in layers:
        if not 0 <= layer < config.num_layers:
            raise UsageError(f"--layers {layer}: out of range; this model has layers 0..{config.num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise UsageError(f"--layers {' '.join(map(str, layers))}: a layer is listed twice")
    return tuple(sorted(layers))


def _require(hf: dict, key: str, kind=int):
    if key not in hf or hf[key] is None:
        raise UsageError(f"config.json has no {key!r}; is this a complete Hugging Face model config?")
    try:
        value = kind(hf[key])
    except (TypeError, ValueError):
        raise UsageError(f"config.json {key}={hf[key]!r} is not a valid {kind.__name__}") from None
    if kind is int and value <= 0:
        raise UsageError(f"config.json {key}={value} must be positive")
    return value


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not archs:  # some hand-written configs only carry model_type
        by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
        raise UsageError(f"unsupported model_type {hf.get('model_type')!r} (no 'architectures'); supported: {supported}")
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"unsupported architecture {', '.join(map(str, archs))}; supported: {supported}")
    return archs[0]


def _rope_theta(hf: dict) -> float:
    # transformers >= 5 writes rope_parameters={"rope_theta", "rope_type"}; older configs write a
    # top-level rope_theta and an optional rope_scaling.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UsageError(f"unsupported RoPE type {rope_type!r} in config.json; only 'default' RoPE is implemented")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Translate and validate a Hugging Face config.json dict. Raises UsageError naming the bad value."""
    arch = _architecture(hf)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UsageError(f"unsupported hidden_act {act!r}; the SwiGLU MLP needs 'silu'")
    if hf.get("use_sliding_window"):
        raise UsageError("config.json has use_sliding_window=true; sliding-window attention is not implemented")
    if hf.get("mlp_bias"):
        raise UsageError("config.json has mlp_bias=true; MLP biases are not implemented")
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UsageError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise UsageError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} and no head_dim is given")
        head_dim = hidden // heads
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size"),
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias (transformers hard-codes bias=True) and never an o_proj bias.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        qk_norm=model_type == "qwen3",
    )


def model_config_to_hf(config: ModelConfig) -> dict:
    """The config.json dict that model_config_from_hf maps back to `config` (exact inverse)."""
    hf = {
        "architectures": [config.architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
    }
    if config.model_type == "qwen2":
        if not config.qkv_bias or config.o_bias or config.qk_norm:
            raise ValueError("a qwen2 config has q/k/v bias, no o_proj bias and no q/k norm")
    else:
        if config.qkv_bias != config.o_bias or config.qk_norm != (config.model_type == "qwen3"):
            raise ValueError(f"{config.model_type} ties q/k/v and o_proj bias together (attention_bias)")
        hf["attention_bias"] = config.qkv_bias
    return hf


def load_model_config(path_or_id: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) for a folder or hub id (model/source.py); cheap: a hub id
    fetches config.json alone, and no weights are read."""
    path = source.config_path(source.resolve(path_or_id, files=(source.CONFIG_FILE,)))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return model_config_from_hf(raw), raw
