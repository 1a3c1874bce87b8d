"""metadata.json: the dataset's schema and table of contents, shared by writer, reader and tools.

A folder is a finished dataset only when metadata.json exists (it is written last). Every tool
reads it through read_metadata, which refuses unknown formats in one line, and resolves shard
paths through shard_path, which refuses paths that escape the dataset folder.
"""

from __future__ import annotations

import json
import posixpath

from llm_activations.format import fileio
from llm_activations.format.fileio import join  # noqa: F401 (also md.join, for callers of the dataset API)
from llm_activations.format import hooks as hk
from llm_activations.errors import DatasetError
from llm_activations.format.names import METADATA_FILE, started_extraction

FORMAT = "llm-activations"
FORMAT_VERSION = 1  # a dataset of resid_post alone; other hooks make it version 2 (hooks.format_version)
FORMAT_VERSIONS = (1, 2)  # what this package reads


def read_metadata(root: str, read_text=None) -> dict:
    """The parsed metadata.json of a dataset folder, validated; DatasetError otherwise.

    read_text(path) -> str | None (None: no such file) replaces the default reader (local files and
    Beam filesystems), e.g. with tf.io.gfile in processes that read through TensorFlow.
    """
    text = (read_text or fileio.read_text)(join(root, METADATA_FILE))
    if text is None:
        if fileio.exists(root):
            raise DatasetError(f"{root} is a file; give an llm-activations dataset folder (it has {METADATA_FILE})")
        # what an extraction writes before metadata.json
        if not any(started_extraction(posixpath.basename(p.rstrip("/"))) for p in fileio.entries(root)):
            raise DatasetError(f"{root} has no {METADATA_FILE}: it is not a finished llm-activations dataset "
                               "(nor the folder of an interrupted extraction)")
        raise DatasetError(
            f"{root} has no {METADATA_FILE}: it is not a finished llm-activations dataset (its extraction did not "
            "complete: run the same extract command again with --resume to finish it, or with --overwrite to start over)"
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{join(root, METADATA_FILE)} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{root}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise DatasetError(
            f"{root}: format_version {meta.get('format_version')!r} is not supported by this version of "
            f"llm_activations (it reads versions {', '.join(map(str, FORMAT_VERSIONS))}); upgrade the package"
        )
    for shard in meta.get("shards", []):
        shard_path(root, shard["path"])  # refuse escaping paths before any tool opens one
    return meta


def shard_path(root: str, relpath: str) -> str:
    """Absolute path of a shard listed in metadata; refuses paths that leave the dataset folder."""
    norm = posixpath.normpath(relpath)
    if fileio.is_url(relpath) or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise DatasetError(f"metadata lists {relpath!r}, which escapes the dataset folder {root}; refusing it")
    return join(root, norm)


def hooks_of(meta: dict) -> tuple[str, ...]:
    """The hooks a dataset holds: extraction.hooks (version 2) or extraction.hook (version 1)."""
    ext = meta.get("extraction", {})
    return tuple(ext.get("hooks") or (ext.get("hook") or hk.DEFAULT,))


def shard_hook(shard: dict) -> str:
    """The hook of a `shards` entry (version 1 entries have no "hook": they are resid_post)."""
    return shard.get("hook", hk.DEFAULT)


def hook_width(meta: dict, hook: str = hk.DEFAULT) -> int:
    """Values per token of a hook's activations: hook_widths[hook] (version 2), else hidden_size."""
    return int(meta.get("hook_widths", {}).get(hook, meta["hidden_size"]))


def entries(meta: dict) -> list[tuple[str, int]]:
    """Every (hook, layer) with files in the dataset, in `files` order."""
    return [hk.parse_key(k) for k in meta["files"]]


def layer_files(meta: dict, layer: int, hook: str = hk.DEFAULT) -> list[str]:
    files = meta["files"].get(hk.key(hook, layer))
    if files is None:
        if hooks_of(meta) == (hk.DEFAULT,) and hook == hk.DEFAULT:  # a resid_post dataset: speak of layers only
            raise DatasetError(f"layer {layer} is not in this dataset; it has layers {sorted(l for _, l in entries(meta))}")
        have = ", ".join(f"{h} {l}" for h, l in entries(meta))
        raise DatasetError(f"hook {hook} at layer {layer} is not in this dataset; it has (hook layer): {have}")
    return files


def files_index(shards: list[dict], hooks, layers) -> dict:
    """`files`: {key(hook, layer): [shard paths in `shards` order]} for every hook and layer."""
    return {hk.key(h, layer): [s["path"] for s in shards if shard_hook(s) == h and s["layer"] == layer]
            for h in hooks for layer in layers}


def build_metadata(*, model: dict, tokenizer: dict, input: dict, extraction: dict, dtype: str, hidden_size: int,
                   compression: str, shards: list[dict], counts: dict, stats: dict, run: dict,
                   hook_widths: dict | None = None, format_version: int | None = None, **extra) -> dict:
    """metadata.json as a dict, in its one key order: the only place a dataset's metadata is assembled
    (extract, merge and the tests' synthetic datasets all call it).

    `files` ({key(hook, layer): [paths]}) is derived from `shards` (one dict per file: path, [hook,]
    layer, records, tokens, bytes, sha256), in their order, for every hook of extraction["hooks"]
    (or ["hook"]) and layer of extraction["layers"]. format_version follows from the hooks
    (hooks.format_version) unless given; version 2 adds `hook_widths` ({hook: values per token}).
    `extra` keys (e.g. merge's "merge" section) follow "run".
    """
    layers = extraction["layers"]
    hooks = hooks_of({"extraction": extraction})
    unknown = {(shard_hook(s), s["layer"]) for s in shards} - {(h, layer) for h in hooks for layer in layers}
    if unknown:
        raise ValueError(f"shards of (hook, layer) {sorted(unknown)} are not in extraction hooks {list(hooks)} x layers {layers}")
    version = hk.format_version(hooks) if format_version is None else format_version
    widths = {}
    if hk.format_version(hooks) == 2:
        if "z" in hooks and "z" not in (hook_widths or {}):  # heads x head_dim: only the model knows it
            raise ValueError("hook_widths must give z's width (num_heads x head_dim)")
        widths = {"hook_widths": {h: int((hook_widths or {}).get(h, hidden_size)) for h in hooks}}
    return {
        "format": FORMAT,
        "format_version": version,
        "model": model,
        "tokenizer": tokenizer,
        "input": input,
        "extraction": extraction,
        "dtype": dtype,
        "hidden_size": hidden_size,
        **widths,
        "compression": compression,
        "files": files_index(shards, hooks, layers),
        "shards": shards,
        "counts": counts,
        "stats": stats,
        "run": run,
        **extra,
    }


def write_metadata(root: str, meta: dict) -> str:
    """Write metadata.json atomically: a reader never sees half a file."""
    path = join(root, METADATA_FILE)
    fileio.write_text_atomic(path, json.dumps(meta, indent=1, sort_keys=False))
    return path


def assemble(base: dict, manifests: list, resumed: list, run: dict, end_unix: float) -> dict:
    """The metadata of a finished extraction: build_metadata over `base` (pipeline.metadata_base:
    what was known before the run), the unit manifests of this run and those kept by --resume
    (`resumed`), and this run's statistics (`run`: transforms.MergeRun's output)."""
    import datetime as dt

    from llm_activations.format import manifests as mf

    parts = json.loads(json.dumps(base))  # a copy: in-process reruns reuse the base
    extraction, info = parts["extraction"], parts["run"]
    layers, hooks = extraction["layers"], hooks_of(parts)
    summary = mf.summarize(list(manifests) + list(resumed), layers, parts["hidden_size"], hooks, parts["hook_widths"])
    # Units kept by --resume were made by an earlier run's workers: their manifests say how, so a
    # dataset keeps its mesh and compilation count however many runs it took (in-process reruns
    # share one worker id and one compiled extractor, so they are not counted twice).
    earlier: dict = {}
    for m in resumed:
        maker = m.get("run") or {}
        if maker.get("worker") and maker["worker"] not in run["workers"]:
            earlier[maker["worker"]] = max(earlier.get(maker["worker"], 0), int(maker.get("compilations", 0)))
    mesh = run["mesh"] or next((m["run"]["mesh"] for m in resumed if (m.get("run") or {}).get("mesh")), None)
    if mesh:  # the shape the workers actually used (the automatic choice, when not given)
        extraction["mesh"] = mesh
    wall = end_unix - info.pop("start_unix")
    info.update({
        "workers": len(run["workers"]) + len(earlier),
        "compilations": run["compilations"] + sum(earlier.values()),
        # seconds this run's workers spent compiling (or loading) their step, summed; True when the
        # persistent compilation cache served every one of them
        "compile_seconds": round(run["compile_seconds"], 3),
        "compile_cache_hit": run["compile_cache_hit"],
        "end_time": dt.datetime.fromtimestamp(end_unix, dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 3),
        # what this run extracted (units finished by an earlier, resumed run are not counted)
        "tokens_per_second": round(run["tokens"] / wall, 1) if wall > 0 else None,
        "extract_seconds": round(run["extract_seconds"], 3),
        "resumed_units": sorted(m["unit"] for m in resumed),
        "rejected_files": summary["rejected_files"],
    })
    meta = build_metadata(**parts, shards=summary["shards"], counts=summary["counts"], stats=summary["stats"])
    return meta
