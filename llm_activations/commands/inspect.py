"""`python -m llm_activations inspect OUT [--plot FILE.png]`: what is in an activation dataset.

The summary comes from metadata.json (model, hooks, layers, dtype, counts, sizes, stored norm
statistics) plus a sample of records read from the shards: activation-norm quantiles per hook and
layer, and the first
record decoded back to text with the dataset's tokenizer (when transformers can load it; else the
token ids and the reason). --plot writes per-layer histograms of the sampled norms (matplotlib,
Agg backend, so no display is needed).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype


def sample_records(root: str, meta: dict, layer: int, max_records: int, hook: str = hk.DEFAULT) -> list[dict]:
    """Up to max_records decoded records of a hook at a layer, taken from the start of every file in turn."""
    files = md.layer_files(meta, layer, hook)
    per_file = max(1, math.ceil(max_records / max(1, len(files))))
    out = []
    for rel in files:
        for i, data in enumerate(records.read_shard(md.shard_path(root, rel))):
            if i >= per_file or len(out) >= max_records:
                break
            out.append(records.decode_example(data))
    return out


def sample_norms(root: str, meta: dict, max_records: int) -> dict[tuple[str, int], np.ndarray]:
    """{(hook, layer): L2 norms of the sampled tokens' activation vectors (float32)}."""
    dt = numpy_dtype(meta["dtype"])
    norms = {}
    for hook, layer in md.entries(meta):
        w = md.hook_width(meta, hook)
        rows = [records.decode_activations(ex, dt, w).astype(np.float32)
                for ex in sample_records(root, meta, layer, max_records, hook)]
        norms[(hook, layer)] = np.linalg.norm(np.concatenate(rows), axis=1) if rows else np.zeros(0, np.float32)
    return norms


def decode_text(
    meta: dict, token_ids: np.ndarray, tokenizer: str | None = None, allow_download: bool = False
) -> tuple[str | None, str]:
    """(text, "") with the dataset's tokenizer, or (None, why it could not be loaded).

    Only local folders and the local Hugging Face cache are used unless allow_download: an
    inspection should not stall on network retries.
    """
    name = tokenizer or (meta.get("tokenizer") or {}).get("name_or_path") or (meta.get("model") or {}).get("name_or_path")
    if not name:
        return None, "metadata names no tokenizer"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, local_files_only=not allow_download)
        return tok.decode([int(t) for t in token_ids]), ""
    except Exception as e:  # offline, unknown name, missing files: all mean "show ids instead"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "" if allow_download else "; pass --tokenizer PATH or --allow-download"
        return None, f"tokenizer {name!r} could not be loaded ({type(e).__name__}: {first[:160]}){hint}"


def _segments(ex: dict) -> list[str]:
    doc, tok, pos = ex["doc_index"], ex["token_index"], ex["position"]
    starts = np.flatnonzero(np.r_[True, (doc[1:] != doc[:-1]) | (tok[1:] != tok[:-1] + 1)])
    ends = np.r_[starts[1:], len(doc)]
    return [f"doc {doc[s]} tokens {tok[s]}..{tok[e - 1]} (positions {pos[s]}..{pos[e - 1]})" for s, e in zip(starts, ends)]


def summary(root: str, meta: dict, norms: dict[tuple[str, int], np.ndarray]) -> str:
    counts, stats = meta.get("counts", {}), meta.get("stats", {})
    keys = md.entries(meta)
    layers = sorted({layer for _, layer in keys})
    hooks = md.hooks_of(meta)
    label = max([5 if len(hooks) == 1 else 10] + [len(hk.key(h, layer)) for h, layer in keys])
    h, itemsize = int(meta["hidden_size"]), numpy_dtype(meta["dtype"]).itemsize
    tokens, padding = int(counts.get("tokens", 0)), int(counts.get("padding_tokens", 0))
    disk = sum(int(s.get("bytes", 0)) for s in meta.get("shards", []))
    model, ext = meta.get("model", {}), meta.get("extraction", {})
    lines = [
        f"dataset      {root} ({meta['format']} v{meta['format_version']})",
        f"model        {model.get('name_or_path')} ({model.get('architecture')}, hidden {h}, {model.get('num_layers')} layers)",
        f"layers       {layers} hook{'s' if len(hooks) > 1 else ''} {', '.join(hooks)}, seq_len {ext.get('seq_len')}, mode {ext.get('mode')}, "
        f"compute {ext.get('compute_dtype')}",
        f"dtype        {meta['dtype']} ({h * itemsize:,} B per token per layer), compression {meta.get('compression', 'none')}",
        f"documents    {counts.get('documents', '?'):,} used, {counts.get('rejected', 0):,} rejected; "
        f"{counts.get('sequences', '?'):,} rows",
        *(["widths       " + ", ".join(f"{hook} {md.hook_width(meta, hook)} ({md.hook_width(meta, hook) * itemsize:,} B)"
                                       for hook in hooks) + " per token"] if meta["format_version"] > 1 else []),
        f"tokens       {tokens:,} per layer; padding {padding:,} "
        f"({padding / (tokens + padding):.1%} of computed tokens)" if tokens + padding else f"tokens       {tokens:,}",
        f"on disk      {disk / 2**20:,.1f} MiB in {len(meta.get('shards', []))} files; "
        + (f"{disk / (tokens * len(keys)):,.1f} B per token per {'layer' if len(hooks) == 1 else 'hook and layer'}"
           if tokens and keys else ""),
        # rows are labelled by their metadata key: "3" (resid_post), "mlp_out/3"
        f"norms        {'layer' if len(hooks) == 1 else 'hook/layer':>{label}}   stored mean  scale factor | "
        "sampled: tokens      p5     p50     p95     max",
    ]
    for hook, layer in keys:
        st, n = stats.get(hk.key(hook, layer), {}), norms.get((hook, layer), np.zeros(0))
        q = np.percentile(n, [5, 50, 95, 100]) if n.size else [math.nan] * 4
        scale = st.get("scaling_factor")
        lines.append(
            f"             {hk.key(hook, layer):>{label}}  {st.get('mean_norm', math.nan):>12.3f}  {scale if scale is not None else math.nan:>12.4f} | "
            f"{n.size:>15,}" + "".join(f"{v:>8.2f}" for v in q)
        )
    return "\n".join(lines)


def record_text(root: str, meta: dict, max_tokens: int = 200, tokenizer: str | None = None, allow_download: bool = False) -> str:
    hook, layer = min(md.entries(meta), key=lambda e: (e[1], hk.HOOKS.index(e[0])))
    sample = sample_records(root, meta, layer, 1, hook)
    if not sample:
        return "record       (no records)"
    ex = sample[0]
    ids = ex["token_ids"]
    lines = [f"record 0     {md.layer_files(meta, layer, hook)[0]}: {len(ids)} tokens; " + "; ".join(_segments(ex)[:6])]
    text, why = decode_text(meta, ids[:max_tokens], tokenizer, allow_download)
    cut = " ..." if len(ids) > max_tokens else ""
    if text is not None:
        lines.append(f"text         {text!r}{cut}")
    else:
        lines.append(f"token ids    {ids[:64].tolist()}{' ...' if len(ids) > 64 else ''}")
        lines.append(f"             (no text: {why})")
    return "\n".join(lines)


def plot_norms(norms: dict[tuple[str, int], np.ndarray], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(norms)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys) + 0.6), squeeze=False)
    for ax, (hook, layer) in zip(axes[:, 0], keys):
        ax.hist(norms[(hook, layer)], bins=60, color="tab:blue")
        ax.set_ylabel(f"layer {layer}" if hook == hk.DEFAULT else f"{hook} {layer}")
    axes[-1, 0].set_xlabel("activation L2 norm (sampled tokens)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="dataset folder")
    parser.add_argument("--plot", metavar="FILE.png", help="write per-layer activation-norm histograms")
    parser.add_argument("--sample-records", type=int, default=64, help="records per hook and layer sampled for norms")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the one in metadata.json)")
    parser.add_argument("--allow-download", action="store_true", help="let transformers download the tokenizer")


def run(args: argparse.Namespace) -> int:
    meta = md.read_metadata(args.out)
    norms = sample_norms(args.out, meta, args.sample_records)
    print(summary(args.out, meta, norms))
    print(record_text(args.out, meta, tokenizer=args.tokenizer, allow_download=args.allow_download))
    if args.plot:
        plot_norms(norms, args.plot, f"{meta.get('model', {}).get('name_or_path')}: activation norms")
        print(f"plot         {args.plot}")
    return 0
