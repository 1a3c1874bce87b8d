"""Where a `--model` comes from, by one rule for every caller (extract's launcher checks, the
Extractor, config and checkpoint loading):

* an existing folder is the checkpoint;
* any other existing path (a file) is refused;
* ORG/NAME is a Hugging Face hub id, downloaded into the hub cache (huggingface_hub);
* anything else is refused.

Each refusal is one UsageError line naming the --model. No JAX or Beam here: `plan` and the
launcher use it before anything heavy is imported.
"""

from __future__ import annotations

import json
import os

from llm_activations.errors import UsageError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# What a checkpoint needs from the hub: the config and tokenizer JSON, the safetensors weights,
# and the vocabulary files of tokenizers that have no tokenizer.json (merges.txt, *.model, *.tiktoken).
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")


def is_hub_id(text: str) -> bool:
    """ORG/NAME: one slash between two non-empty names, not a relative or absolute path."""
    org, _, name = text.partition("/")
    return bool(org and name) and "/" not in name and not text.startswith((".", "/", "~"))


def resolve(path_or_id: str, files: tuple[str, ...] = HUB_FILES) -> str:
    """The local checkpoint folder for `path_or_id` (module doc). A hub id fetches only the
    `files` patterns (config loading asks for config.json alone)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise UsageError(f"--model {path_or_id} is a file; give the checkpoint folder or a hub id (ORG/NAME)")
    if not is_hub_id(path_or_id):
        raise UsageError(f"--model {path_or_id!r}: no such checkpoint folder, and not a hub id (ORG/NAME)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=list(files))
    except Exception as e:  # offline, unknown repo, gated model...: all mean "cannot use this --model"
        raise UsageError(f"--model {path_or_id!r}: no such checkpoint folder, and the Hugging Face hub did not serve it "
                         f"({type(e).__name__}); download it first and pass the folder") from None


def config_path(folder: str) -> str:
    """The folder's config.json."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--model {folder} has no {CONFIG_FILE}")
    return path


def weight_files(folder: str) -> list[str]:
    """The checkpoint's weight files: those its index names, or the single model.safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"--model {folder}: {INDEX_FILE} is unreadable ({e})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not os.path.isfile(os.path.join(folder, name)):
                raise UsageError(f"--model {folder}: {INDEX_FILE} names {name}, which is missing")
        return [os.path.join(folder, n) for n in names]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise UsageError(f"--model {folder} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")


def check_folder(folder: str) -> None:
    """Everything extract needs is in the folder: config.json, the weights and tokenizer files."""
    config_path(folder)
    weight_files(folder)
    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise UsageError(f"--model {folder} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
