"""Hook points: what can be captured inside a decoder block, and how each is named on disk.

The names are TransformerLens's (`blocks.L.hook_<name>`), which SAE and transcoder code uses:

    resid_pre   the block's input (the embeddings at layer 0)                [hidden]
    attn_out    attention output after o_proj, before the residual add        [hidden]
    z           per-head attention output before o_proj, head-major           [heads x head_dim]
    resid_mid   resid_pre + attn_out                                          [hidden]
    mlp_in      the normalised MLP input (post_attention_layernorm output)    [hidden]
    mlp_out     the MLP output, before the residual add                       [hidden]
    resid_post  the block's output                                            [hidden]

One place for every naming rule (folders, metadata keys, format version), shared by the writer,
readers and tools. A dataset holding only resid_post keeps the format_version 1 layout exactly
(`layer_LL/` folders, `files`/`stats` keyed "<layer>"); any other hook makes it version 2, whose
other hooks live in `<hook>/layer_LL/` and are keyed "<hook>/<layer>".
"""

from __future__ import annotations

from typing import Iterable

from llm_activations.errors import UsageError
from llm_activations.format.names import layer_folder

# In the order they occur in a block (also the order hooks are listed in metadata).
HOOKS = ("resid_pre", "attn_out", "z", "resid_mid", "mlp_in", "mlp_out", "resid_post")
DEFAULT = "resid_post"
DEFAULT_HOOKS = (DEFAULT,)


def check_hooks(names: Iterable[str], option: str = "--hooks") -> tuple[str, ...]:
    """Requested hook names in block order; UsageError (one line, listing the valid ones) otherwise."""
    names = list(names)
    if not names:
        raise UsageError(f"{option}: name at least one hook ({', '.join(HOOKS)})")
    for name in names:
        if name not in HOOKS:
            raise UsageError(f"{option} {name!r}: unknown hook; valid hooks are {', '.join(HOOKS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{option} {' '.join(names)}: a hook is listed twice")
    return tuple(h for h in HOOKS if h in names)


def width(hook: str, hidden_size: int, num_heads: int, head_dim: int) -> int:
    """Values per token of a hook: heads x head_dim for z (Qwen3's can differ from hidden), else hidden."""
    return num_heads * head_dim if hook == "z" else hidden_size


def format_version(hooks: Iterable[str]) -> int:
    """1 for resid_post alone (today's layout, byte for byte), 2 as soon as any other hook is stored:
    a version-1 reader would otherwise ignore or misread the other hooks' files and keys."""
    return 1 if tuple(hooks) == DEFAULT_HOOKS else 2


def key(hook: str, layer: int) -> str:
    """The `files` / `stats` / manifest-moments key: "7" for resid_post, "mlp_out/7" otherwise."""
    return str(layer) if hook == DEFAULT else f"{hook}/{layer}"


def parse_key(k: str) -> tuple[str, int]:
    """Inverse of key: (hook, layer)."""
    hook, _, layer = k.rpartition("/")
    return (hook or DEFAULT), int(layer)


def dirname(hook: str, layer: int) -> str:
    """Folder of one hook's shards at one layer, relative to the dataset: layer_03 or z/layer_03."""
    folder = layer_folder(layer)
    return folder if hook == DEFAULT else f"{hook}/{folder}"


def shard_fields(hook: str, layer: int, hooks: Iterable[str]) -> dict:
    """The hook/layer fields of a `shards` entry: version 1 entries carry only "layer" (as today)."""
    return {"layer": layer} if format_version(hooks) == 1 else {"hook": hook, "layer": layer}


def extraction_fields(hooks: Iterable[str]) -> dict:
    """The hook entry of metadata `extraction`: {"hook": "resid_post"} in version 1 (as today),
    {"hooks": [...]} (block order) in version 2."""
    hooks = tuple(hooks)
    return {"hook": DEFAULT} if format_version(hooks) == 1 else {"hooks": list(hooks)}
