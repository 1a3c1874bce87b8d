"""`python -m llm_activations extract`: build and run the Beam pipeline (configuration and its
checks live in options.py).

    PlanUnits -> Reshuffle -> ReadDocuments -> Tokenize -> Segment -> Pack -> Batch
              -> Extract -> WriteShards            (transforms.ExtractUnits)
    unit manifests (shards, counts, rejected, Moments) + run stats -> metadata.json (last)

Every configuration error is found on the launcher (options.check_config) before a model is loaded
or a worker is started, and raised as a UsageError (exit 2, one line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

from llm_activations import __version__, inputs
from llm_activations.errors import AcceleratorBusy, UsageError
from llm_activations.format import fileio, manifests
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format.manifests import MANIFEST_DIR
from llm_activations.format.metadata import FORMAT, METADATA_FILE, join, read_metadata, write_metadata
# add_arguments is this command's parser (cli.COMMANDS): it lives with the config it builds.
from llm_activations.options import ExtractConfig, add_arguments, check_config, config_from_args, parse_beam_options  # noqa: F401

# ----------------------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    meta = run_extract(cfg)
    print_summary(cfg, meta)
    return 0


# ----------------------------------------------------------------------------- output folder


def prepare_output(cfg: ExtractConfig) -> None:
    """Refuse a non-empty output folder unless --overwrite; then remove the previous dataset."""
    root = cfg.output.rstrip("/")
    if not fileio.is_url(root) and os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--output {root} exists and is not a folder")
    existing = fileio.entries(root)
    if cfg.resume:  # keep finished units; the old metadata.json (if any) is rewritten at the end
        fileio.delete([p for p in existing if os.path.basename(p) == METADATA_FILE])
        return
    if existing and not cfg.overwrite:
        raise UsageError(f"--output {root} is not empty; pass --overwrite to replace its contents, or choose another folder")
    # Only what a previous extraction wrote; metadata.json first, so that from here on the folder
    # no longer claims to be a finished dataset.
    ours = [p for p in existing if os.path.basename(p) == METADATA_FILE]
    ours += [p for p in existing if os.path.basename(p) in ("rejected", MANIFEST_DIR, *hk.HOOKS) or os.path.basename(p).startswith("layer_")]
    fileio.delete(ours)


# ----------------------------------------------------------------------------- the pipeline


def plan(cfg: ExtractConfig):
    """Sources, this host's doc_index range, and the work units."""
    sources = inputs.plan_sources(list(cfg.inputs), cfg.text_field)
    if sources[0].kind == "hf":
        stop = cfg.max_docs if cfg.max_docs else -1
        return sources, (0, stop), [inputs.WorkUnit(0, 0, stop, ((sources[0], 0, stop),))]
    total = sum(s.num_records for s in sources)
    if cfg.max_docs:
        total = min(total, cfg.max_docs)
    start, stop = inputs.host_range(total, cfg.num_hosts, cfg.host_index)
    num_units = cfg.num_shards or inputs.auto_num_units(stop - start, cfg.docs_per_unit)
    return sources, (start, stop), inputs.plan_units(sources, start=start, stop=stop, num_units=num_units)


def unit_settings(cfg: ExtractConfig, hf: dict, sources, num_units: int, host_docs) -> dict:
    """Everything that determines the records of a unit: its manifest's fingerprint covers it."""
    keys = ("model", "text_field", "layers", "seq_len", "batch_size", "mode", "dtype", "compute_dtype", "compression")
    settings = {**{k: getattr(cfg, k) for k in keys}, "config": hf, "num_units": num_units, "host_docs": list(host_docs),
                "num_hosts": cfg.num_hosts, "sources": [(s.path, s.num_records) for s in sources]}
    if tuple(cfg.hooks) != hk.DEFAULT_HOOKS:  # resid_post alone keeps its fingerprint: older runs stay resumable
        settings["hooks"] = list(cfg.hooks)
    return settings


def build_pipeline(p, cfg: ExtractConfig, units, fingerprint: str, metadata_base: dict, resumed: list):
    """Attach the extraction to Beam pipeline p. The whole job reads as this one screen."""
    import apache_beam as beam
    from apache_beam.pvalue import AsList, AsSingleton

    from llm_activations import transforms as T

    spec = T.ModelSpec(cfg.model, tuple(cfg.layers), cfg.batch_size, cfg.seq_len, cfg.compute_dtype, cfg.dtype, cfg.mesh,
                       tuple(cfg.hooks), cfg.compilation_cache)
    out = (
        p
        | "PlanUnits" >> beam.Create(units)
        | "Distribute" >> beam.Reshuffle()
        | "ExtractUnits" >> T.ExtractUnits(cfg, metadata_base["extraction"]["num_units"], spec, fingerprint)
    )
    run_stats = out[T.RUN] | "MergeRunStats" >> beam.CombineGlobally(T.MergeRun())
    return (
        p
        | "Finalize" >> beam.Create([metadata_base])
        | "WriteMetadata" >> beam.Map(finalize_metadata, output=cfg.output, manifests=AsList(out["manifests"]),
                                      run=AsSingleton(run_stats), resumed=resumed)
    )


def run_extract(cfg: ExtractConfig) -> dict:
    """Check, plan, run the pipeline to completion; returns the written metadata."""
    import apache_beam as beam

    from llm_activations.transforms import MergeRun

    options = parse_beam_options(cfg.beam_args)
    cfg, model_cfg, hf = check_config(cfg)
    sources, host_docs, units = plan(cfg)
    fp = manifests.fingerprint(unit_settings(cfg, hf, sources, len(units), host_docs))
    done = manifests.read_manifests(cfg.output, fp) if cfg.resume else {}  # before anything is deleted
    prepare_output(cfg)
    todo = [u for u in units if u.index not in done]
    base = metadata_base(cfg, model_cfg, hf, sources, host_docs, options, len(units))
    if not todo:  # everything was finished before: only the metadata is missing
        nothing = MergeRun()
        finalize_metadata(base, cfg.output, [], nothing.extract_output(nothing.create_accumulator()), list(done.values()))
        return read_metadata(cfg.output)
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, cfg, todo, fp, base, list(done.values()))
        result = p.run()
        result.wait_until_finish()
        print_counters(result)
    except Exception as e:  # runners wrap worker errors; surface the accelerator diagnosis alone
        text = str(e)
        if AcceleratorBusy.MARK in text:
            raise AcceleratorBusy(text[text.index(AcceleratorBusy.MARK):].splitlines()[0]) from None
        raise
    return read_metadata(cfg.output)


# ----------------------------------------------------------------------------- metadata


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"llm_activations": __version__, "python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "apache-beam", "transformers", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _tokenizer_info(folder: str) -> dict:
    info = {"name_or_path": folder}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        info["vocab_size"] = len(tok)
        info["special_token_ids"] = {f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    except Exception as e:  # the metadata should still be written; workers load the tokenizer themselves
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def metadata_base(cfg: ExtractConfig, model_cfg, hf: dict, sources, host_docs, options, num_units: int) -> dict:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return {
        "format": FORMAT,
        "format_version": hk.format_version(cfg.hooks),
        "model": {"name_or_path": cfg.model, "architecture": model_cfg.architecture, "model_type": model_cfg.model_type,
                  "hidden_size": model_cfg.hidden_size, "num_layers": model_cfg.num_layers, "config": hf},
        "tokenizer": _tokenizer_info(cfg.model),
        "input": {"patterns": list(cfg.inputs), "files": [s.path for s in sources], "text_field": cfg.text_field,
                  "max_docs": cfg.max_docs, "num_hosts": cfg.num_hosts, "host_index": cfg.host_index,
                  "doc_index_range": list(host_docs)},
        "extraction": {"layers": list(cfg.layers), **hk.extraction_fields(cfg.hooks), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                       "mode": cfg.mode, "compute_dtype": cfg.compute_dtype,
                       "mesh": {"data": cfg.mesh[0], "model": cfg.mesh[1]} if cfg.mesh else "auto",
                       "num_shards": cfg.num_shards, "num_units": num_units},
        "dtype": cfg.dtype,
        "hidden_size": model_cfg.hidden_size,
        **hook_widths(cfg.hooks, model_cfg),
        "compression": cfg.compression,
        "run": {"runner": str(runner), "direct_num_workers": options.view_as(DirectOptions).direct_num_workers,
                "start_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "start_unix": time.time(), "versions": _versions()},
    }


def hook_widths(hooks, model_cfg) -> dict:
    """{"hook_widths": {hook: values per token}} for a version-2 dataset; nothing for version 1."""
    if hk.format_version(hooks) == 1:
        return {}
    return {"hook_widths": {h: hk.width(h, model_cfg.hidden_size, model_cfg.num_heads, model_cfg.head_dim) for h in hooks}}


def finalize_metadata(base: dict, output: str, manifests: list, run: dict, resumed: list) -> dict:
    """Assemble metadata.json from the unit manifests and run statistics and write it - the last step."""
    from llm_activations.format import manifests as mf

    meta = json.loads(json.dumps(base))
    layers, hooks = meta["extraction"]["layers"], md.hooks_of(meta)
    summary = mf.summarize(list(manifests) + list(resumed), layers, meta["hidden_size"], hooks, meta.get("hook_widths"))
    meta["files"] = md.files_index(summary["shards"], hooks, layers)
    meta["shards"] = summary["shards"]
    meta["counts"] = summary["counts"]
    meta["stats"] = summary["stats"]
    if run["mesh"]:  # the shape the workers actually used (the automatic choice, when not given)
        meta["extraction"]["mesh"] = run["mesh"]
    end = time.time()
    wall = end - meta["run"].pop("start_unix")
    meta["run"].update({
        "workers": len(run["workers"]),
        "compilations": run["compilations"],
        # seconds each worker spent compiling (or loading) its step, summed; True when the
        # persistent compilation cache served every one of them
        "compile_seconds": round(run["compile_seconds"], 3),
        "compile_cache_hit": run["compile_cache_hit"],
        "end_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 3),
        # what this run extracted (units finished by an earlier, resumed run are not counted)
        "tokens_per_second": round(run["tokens"] / wall, 1) if wall > 0 else None,
        "extract_seconds": round(run["extract_seconds"], 3),
        "resumed_units": sorted(m["unit"] for m in resumed),
        "rejected_files": summary["rejected_files"],
    })
    remove_partial_shards(output)
    write_metadata(output, meta)
    return meta


def remove_partial_shards(output: str) -> None:
    """Delete temporary files that failed or retried writers left behind."""
    folders = ("layer_*", "rejected", MANIFEST_DIR, *(f"{h}/layer_*" for h in hk.HOOKS))
    fileio.delete(fileio.match([join(output, d, "*.inprogress-*") for d in folders]))


def print_counters(result) -> None:
    """The run's Beam metrics counters, one line (runners that do not report metrics print nothing)."""
    from apache_beam.metrics.metric import MetricsFilter

    from llm_activations.transforms import NAMESPACE

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # not every runner implements metrics queries
        return
    totals: dict = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    if totals:
        print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())), file=sys.stderr)


def print_summary(cfg: ExtractConfig, meta: dict) -> None:
    c, r = meta["counts"], meta["run"]
    files = sum(len(v) for v in meta["files"].values())
    size = sum(s["bytes"] for s in meta["shards"])
    print(
        f"done: {c['documents']} documents ({c['rejected']} rejected), {c['tokens']} tokens x {len(meta['files'])} "
        f"{'layer(s)' if meta['format_version'] == 1 else '(hook, layer) pair(s)'}, "
        f"{r['tokens_per_second']:.0f} tokens/s, {files} files ({size / 2**20:.1f} MiB), "
        f"padding {c['padding_tokens'] / max(1, c['tokens'] + c['padding_tokens']):.1%}, compilations {r['compilations']}\n"
        f"      -> {os.path.abspath(cfg.output) if '://' not in cfg.output else cfg.output}/{METADATA_FILE}"
    )
