"""The bundled demo: a small Qwen2-architecture checkpoint and a sample corpus of real text.

The corpus (data/demo_corpus.jsonl, ~400 KB) is shipped: docstrings of the Python standard library.
The checkpoint is generated on first use into a cache folder - deterministic random weights in
Hugging Face format (config.json + model.safetensors) and a byte-level BPE tokenizer trained on the
corpus with `tokenizers` - so no model file is kept in git and nothing is downloaded. It is a real
Qwen2ForCausalLM checkpoint: `transformers` loads it and the extractor reads it through the same
code path as Qwen2.5-7B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DEMO_VERSION = 1
CORPUS = Path(__file__).parent / "data" / "demo_corpus.jsonl"
DEMO_OUTPUT = "activations_demo"

# A Qwen2 with grouped-query attention, q/k/v bias and untied embeddings, ~3M parameters.
DEMO_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "use_sliding_window": False,
}
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    root = os.environ.get("LLM_ACTIVATIONS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm_activations")
    return Path(root)


def corpus_texts() -> list[str]:
    with open(CORPUS) as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(texts: list[str], vocab_size: int, folder: str | os.PathLike) -> None:
    """Train a byte-level BPE tokenizer (Qwen's family) and save it in HF format into folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(folder))


def random_qwen2_weights(config: dict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random weights under the Hugging Face Qwen2 key names."""
    rng = np.random.default_rng(seed)
    h, f = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = h // nh

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab_size, h, scale=1.0), "model.norm.weight": np.ones(h, np.float32),
               "lm_head.weight": w(vocab_size, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": 1 + w(h, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(h, scale=0.1),
            p + "self_attn.q_proj.weight": w(nh * hd, h, scale=h**-0.5),
            p + "self_attn.q_proj.bias": w(nh * hd),
            p + "self_attn.k_proj.weight": w(nkv * hd, h, scale=h**-0.5),
            p + "self_attn.k_proj.bias": w(nkv * hd),
            p + "self_attn.v_proj.weight": w(nkv * hd, h, scale=h**-0.5),
            p + "self_attn.v_proj.bias": w(nkv * hd),
            p + "self_attn.o_proj.weight": w(h, nh * hd, scale=(nh * hd) ** -0.5),
            p + "mlp.gate_proj.weight": w(f, h, scale=h**-0.5),
            p + "mlp.up_proj.weight": w(f, h, scale=h**-0.5),
            p + "mlp.down_proj.weight": w(h, f, scale=f**-0.5),
        })
    return weights


def ensure_demo_model() -> str:
    """Path of the demo checkpoint, generating it on first use (a few seconds)."""
    folder = cache_dir() / f"demo-qwen2-v{DEMO_VERSION}"
    if (folder / "model.safetensors").exists():
        return str(folder)
    from safetensors.numpy import save_file

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus_texts(), VOCAB_SIZE, tmp)
    config = dict(DEMO_CONFIG, vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_file(random_qwen2_weights(config, VOCAB_SIZE), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        os.replace(tmp, folder)  # atomic: concurrent first runs never see half a checkpoint
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return str(folder)
