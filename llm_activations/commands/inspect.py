"""`python -m llm_activations inspect OUT [--plot FILE.png]`: what is in an activation dataset.

The summary comes from metadata.json (model, hooks, layers, dtype, counts, sizes, stored norm
statistics; from the norm histograms (format/norms.py): the median norm, what the readers deliver
by default and the share of energy in the tokens they drop, and the tokens holding inf or nan) plus
a sample of records read from the shards: activation-norm quantiles per hook and layer, the mean
norm by position in the segment (where attention sinks show), and the first record decoded back to
text with the dataset's tokenizer (when transformers can load it; else the token ids and the
reason). --plot writes, per hook and layer, the norm distribution of all tokens (the histogram,
with the default threshold) and the sampled norm by position (matplotlib, Agg backend, so no
display is needed).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from llm_activations.errors import UsageError
from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import norms as nm
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


def sample_norms(root: str, meta: dict, max_records: int, with_positions: bool = False) -> dict:
    """{(hook, layer): L2 norms of the sampled tokens' activation vectors (float32)}; with_positions:
    {(hook, layer): (norms, the position id the model gave each token)}."""
    dt = numpy_dtype(meta["dtype"])
    norms = {}
    for hook, layer in md.entries(meta):
        w = md.hook_width(meta, hook)
        sample = sample_records(root, meta, layer, max_records, hook)
        rows = [records.decode_activations(ex, dt, w).astype(np.float32) for ex in sample]
        n = np.linalg.norm(np.concatenate(rows), axis=1) if rows else np.zeros(0, np.float32)
        pos = np.concatenate([np.asarray(ex["position"], np.int64) for ex in sample]) if rows else np.zeros(0, np.int64)
        norms[(hook, layer)] = (n, pos) if with_positions else n
    return norms


def norm_by_position(norms: np.ndarray, positions: np.ndarray, first: int = 4) -> list[tuple[str, float, int]]:
    """[(label, mean norm, tokens)] at positions 0..first-1 and beyond: the sink, if any, is the
    first position's outsized mean."""
    out = []
    for p in range(first + 1):
        sel = positions == p if p < first else positions >= first
        if sel.any():
            out.append((str(p) if p < first else f">={first}", float(np.mean(norms[sel])), int(sel.sum())))
    return out


def _col(value, width: int, fmt: str) -> str:
    """value right-aligned in width with at least one space before it; falls back to 4 significant
    digits where fmt would fill the column (norms of 1e5 and more ran into the next column) or
    round a nonzero value to 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    else:
        text = format(value, fmt)
        if len(text) >= width or (value and fmt[-1] == "f" and not float(text.replace(",", "").rstrip("%"))):
            text = format(value, ".4g")
    return " " + text.rjust(width - 1)


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


def histogram(stats: dict) -> nm.NormHistogram | None:
    try:
        return nm.NormHistogram.from_json(stats["norms"]) if "norms" in stats else None
    except ValueError:
        return None


def summary(root: str, meta: dict, sampled: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]) -> str:
    """The text inspect prints; sampled = sample_norms(..., with_positions=True)."""
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
        "sampled: tokens        p5       p50       p95       max",
    ]
    for hook, layer in keys:
        st, n = stats.get(hk.key(hook, layer), {}), sampled.get((hook, layer), (np.zeros(0),))[0]
        finite = n[np.isfinite(n)]
        q = np.percentile(finite, [5, 50, 95, 100]) if finite.size else [math.nan] * 4
        lines.append(f"             {hk.key(hook, layer):>{label}} " + _col(st.get("mean_norm", math.nan), 13, ".3f")
                     + _col(st.get("scaling_factor"), 14, ".4f") + " | " + _col(n.size, 15, ",")
                     + "".join(_col(float(v), 10, ".2f") for v in q))
    lines.extend(_delivered_lines(keys, stats, label))
    if sampled:
        lines.append(f"by position  {'layer' if len(hooks) == 1 else 'hook/layer':>{label}}   sampled mean norm at "
                     "position (tokens): the first position's sink, if any")
        for key in keys:
            n, pos = sampled.get(key, (np.zeros(0), np.zeros(0, np.int64)))
            cells = [f"{lab}: {_col(v, 10, '.2f').strip()} ({c:,})" for lab, v, c in norm_by_position(n, pos)]
            lines.append(f"             {hk.key(*key):>{label}}   " + "; ".join(cells))
    return "\n".join(lines)


def _delivered_lines(keys, stats: dict, label: int) -> list[str]:
    """What the readers deliver by default, from each (hook, layer)'s norm histogram; and a loud line
    for tokens holding inf or nan."""
    hists = {key: histogram(stats.get(hk.key(*key), {})) for key in keys}
    if not any(h is not None for h in hists.values()):
        return ["delivered    (no norm histograms in this metadata: written before they existed)"]
    lines = [f"delivered    {'':>{label}}  median norm  threshold  dropped    share  energy dropped  delivered mean"
             f"  scale factor  inf/nan  top 1% energy   (max_norm_ratio {nm.DEFAULT_MAX_NORM_RATIO:g}, the readers' default)"]
    bad = []
    for key, h in hists.items():
        if h is None:
            lines.append(f"             {hk.key(*key):>{label}}   (no histogram)")
            continue
        st = stats[hk.key(*key)]
        p = nm.policy(h, nm.DEFAULT_MAX_NORM_RATIO)
        total = p.count + p.dropped
        lines.append(f"             {hk.key(*key):>{label}} " + _col(h.median(), 12, ".3f") + _col(p.threshold, 11, ".2f")
                     + _col(p.dropped, 9, ",") + _col(p.dropped / total if total else 0.0, 9, ".2%")
                     + _col(p.energy_share_dropped, 16, ".1%") + _col(p.mean_norm, 16, ".3f")
                     + _col(p.scaling_factor(len(st.get("mean", ())) or 1), 14, ".4f") + _col(h.nonfinite, 9, ",")
                     + _col(p.top1_energy_share, 15, ".1%"))
        if h.nonfinite:
            bad.append(f"{hk.key(*key)}: {h.nonfinite:,}")
    if bad:
        lines.append("WARNING      tokens holding inf or nan (float16 overflow? re-extract with --dtype bfloat16): "
                     + ", ".join(bad))
    return lines + _ratio_lines({k: h for k, h in hists.items() if h is not None}, label)


TRADE_OFF_RATIOS = (4.0, 6.0, 8.0, nm.DEFAULT_MAX_NORM_RATIO, None)
CONCENTRATED = 0.15  # top 1% of the delivered tokens holding more than this: a few tokens dominate


def _ratio_lines(hists: dict, label: int) -> list[str]:
    """Per (hook, layer), what other max_norm_ratio values would deliver: the share of tokens kept and
    the share of their energy the top 1% hold. Massive activations a few times the median (early
    layers: SmolLM2-135M's layer 3 holds ~2% of its tokens at 6-11x) pass the default; this table is
    where a user sees it and picks a ratio for that layer (every reader takes max_norm_ratio)."""
    if not hists:
        return []
    names = " | ".join("none" if r is None else f"{r:g}" for r in TRADE_OFF_RATIOS)
    lines = [f"by ratio     {'':>{label}}   kept / top 1% energy at max_norm_ratio {names}"]
    loud = []
    for key, h in hists.items():
        cells = []
        for r in TRADE_OFF_RATIOS:
            p = nm.policy(h, r)
            cells.append(f"{p.count / h.count if h.count else 0.0:.1%} / {p.top1_energy_share:.1%}")
            if r == nm.DEFAULT_MAX_NORM_RATIO and p.top1_energy_share > CONCENTRATED:
                loud.append(f"{hk.key(*key)} ({p.top1_energy_share:.0%})")
        lines.append(f"             {hk.key(*key):>{label}}   " + " | ".join(cells))
    if loud:
        lines.append(f"NOTE         the top 1% of delivered tokens hold more than {CONCENTRATED:.0%} of the energy at "
                     + ", ".join(loud) + ": heavy tokens below the default threshold; a smaller max_norm_ratio "
                     "for those layers (table above) drops them")
    return lines


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


def plot_norms(meta: dict, positions: dict, path: str, title: str) -> None:
    """Per (hook, layer): the norm distribution of every stored token (its histogram, log x, with the
    readers' default threshold) and the sampled mean and max norm by position (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(positions)
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 2.4 * len(keys) + 0.6), squeeze=False)
    for (left, right), key in zip(axes, keys):
        name = f"layer {key[1]}" if key[0] == hk.DEFAULT else f"{key[0]} {key[1]}"
        h = histogram(meta.get("stats", {}).get(hk.key(*key), {}))
        n, pos = positions[key]
        if h is not None and h.count:
            used = np.flatnonzero(h.counts)
            lo, hi = used[0], used[-1] + 1
            edges = [max(nm.lower_edge(i), 10 ** (nm.LOG10_MIN - 1)) for i in range(lo, hi)] + [nm.upper_edge(hi - 1)]
            if not math.isfinite(edges[-1]):
                edges[-1] = edges[-2] * 10
            left.stairs(h.counts[lo:hi], edges, fill=True, color="tab:blue")
            p = nm.policy(h, nm.DEFAULT_MAX_NORM_RATIO)
            left.axvline(p.threshold, color="tab:red", lw=1,
                         label=f"{nm.DEFAULT_MAX_NORM_RATIO:g}x median: {p.dropped:,} dropped, {p.energy_share_dropped:.0%} of energy")
            left.set_xscale("log")
            left.set_yscale("log")
            left.legend(fontsize=7)
        else:
            left.hist(n[np.isfinite(n)], bins=60, color="tab:blue")
        left.set_ylabel(name)
        if n.size:
            top = int(min(pos.max(), 255))
            at = np.arange(top + 1)
            mean = np.array([n[pos == q].mean() if (pos == q).any() else np.nan for q in at])
            peak = np.array([n[pos == q].max() if (pos == q).any() else np.nan for q in at])
            right.plot(at, peak, ".", ms=2, color="tab:orange", label="max")
            right.plot(at, mean, "-", color="tab:blue", label="mean")
            right.set_yscale("log")
            right.legend(fontsize=7)
    axes[-1, 0].set_xlabel("token L2 norm (every stored token)")
    axes[-1, 1].set_xlabel("position in the segment (sampled tokens)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def check_plot_path(path: str) -> None:
    """--plot's folder must exist before minutes of sampling are spent (a missing one was a traceback)."""
    folder = os.path.dirname(path) or "."
    if not fileio.is_url(path) and not os.path.isdir(folder):
        raise UsageError(f"--plot {path}: folder {folder} does not exist")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="dataset folder")
    parser.add_argument("--plot", metavar="FILE.png", help="write per-layer activation-norm histograms")
    parser.add_argument("--sample-records", type=int, default=64, help="records per hook and layer sampled for norms (1 or more)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the one in metadata.json)")
    parser.add_argument("--allow-download", action="store_true", help="let transformers download the tokenizer")


def run(args: argparse.Namespace) -> int:
    if args.sample_records < 1:
        raise UsageError(f"--sample-records {args.sample_records}: must be 1 or more")
    if args.plot:
        check_plot_path(args.plot)
    meta = md.read_metadata(args.out)
    positions = sample_norms(args.out, meta, args.sample_records, with_positions=True)
    print(summary(args.out, meta, positions))
    print(record_text(args.out, meta, tokenizer=args.tokenizer, allow_download=args.allow_download))
    if args.plot:
        try:
            plot_norms(meta, positions, args.plot, f"{meta.get('model', {}).get('name_or_path')}: activation norms")
        except OSError as e:
            raise UsageError(f"--plot {args.plot}: cannot write it ({e.strerror or e})") from None
        print(f"plot         {args.plot}")
    return 0
