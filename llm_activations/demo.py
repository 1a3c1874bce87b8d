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


# Names the generated checkpoint's bytes (its cache folder is demo-qwen2-v<N>): bump it whenever the
# generator changes them (model.hf_weights.random_tensors, the tokenizer training), or first runs
# would silently reuse an older cached model.
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


def ensure_demo_model() -> str:
    """Path of the demo checkpoint, generating it on first use (a few seconds)."""
    folder = cache_dir() / f"demo-qwen2-v{DEMO_VERSION}"
    if (folder / "model.safetensors").exists():
        return str(folder)
    from llm_activations.model.config import model_config_from_hf
    from llm_activations.model.hf_weights import random_tensors, save_hf_checkpoint

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus_texts(), VOCAB_SIZE, tmp)
    config = dict(DEMO_CONFIG, vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    c = model_config_from_hf(config)
    save_hf_checkpoint(tmp, c, random_tensors(c, seed=0), hf_config=config)
    try:
        os.replace(tmp, folder)  # atomic: concurrent first runs never see half a checkpoint
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return str(folder)
