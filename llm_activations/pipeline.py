"""`python -m llm_activations extract`: configuration, checks, and the Beam pipeline.

    PlanUnits -> Reshuffle -> ReadDocuments -> Tokenize -> Segment -> Pack -> Batch
              -> Extract -> WriteShards            (transforms.ExtractUnits)
    unit manifests (shards, counts, rejected, Moments) + run stats -> metadata.json (last)

Every configuration error is found here, on the launcher, before a model is loaded or a worker is
started, and raised as a UsageError (exit 2, one line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from llm_activations import __version__
from llm_activations import demo
from llm_activations.format import fileio
from llm_activations import inputs
from llm_activations.format import manifests
from llm_activations.format.manifests import MANIFEST_DIR
from llm_activations.errors import AcceleratorBusy, UsageError
from llm_activations.format.metadata import FORMAT, FORMAT_VERSION, METADATA_FILE, join, read_metadata, write_metadata

DTYPES = ("bfloat16", "float16", "float32")
COMPUTE_DTYPES = ("bfloat16", "float32")
MODES = ("pack", "pad")
COMPRESSIONS = ("none", "gzip")
DOCS_PER_UNIT = 4096


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    inputs: tuple
    output: str
    text_field: str = "text"
    layers: tuple = ()
    seq_len: int = 1024
    batch_size: int = 8
    mode: str = "pack"
    dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    num_shards: int = 0
    compression: str = "none"
    overwrite: bool = False
    max_docs: int | None = None
    mesh: tuple | None = None  # (data, model) or None for automatic
    num_hosts: int = 1
    host_index: int = 0
    docs_per_unit: int = DOCS_PER_UNIT
    beam_args: tuple = field(default_factory=tuple)
    is_demo: bool = False
    resume: bool = False


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "Any other --option is passed to Apache Beam as a pipeline option, e.g.\n"
        "  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp\n"
        "  --direct_num_workers 2 --direct_running_mode multi_processing\n"
        "With no --model and no --input the bundled demo runs (tiny Qwen2 + sample corpus)."
    )
    a = p.add_argument
    a("--model", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer) or hub id (default: the bundled demo model)")
    a("--input", nargs="+", dest="inputs", metavar="PATTERN",
      help="files or globs (.jsonl, .json lines, .parquet, .txt = one document per file) or hf://NAME[/CONFIG]:SPLIT (default: the bundled demo corpus)")
    a("--text-field", default="text", help="field holding the text in JSON/parquet/HF records (default: text)")
    a("--output", help=f"output folder, local or a Beam filesystem URL such as gs://... (default for the demo: ./{demo.DEMO_OUTPUT})")
    a("--layers", nargs="+", type=int, metavar="L", help="0-based decoder blocks; stores the residual stream after each (default: the middle layer)")
    a("--seq-len", type=int, default=1024, help="tokens per row, fixed; longer documents are split into segments (default: 1024)")
    a("--batch-size", type=int, default=8, help="rows per model step, fixed; must divide by the mesh 'data' axis (default: 8)")
    a("--mode", default="pack", choices=MODES, help="pack: several segments per row (little padding); pad: one segment per row (default: pack)")
    a("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype of activations (default: bfloat16)")
    a("--compute-dtype", default="bfloat16", choices=COMPUTE_DTYPES, help="dtype the model computes in (default: bfloat16)")
    a("--num-shards", type=int, default=0, help="files per layer; each file is a fixed share of the input, so reruns are byte-identical (0 = one per ~4096 documents)")
    a("--compression", default="none", choices=COMPRESSIONS, help="TFRecord compression (default: none)")
    a("--overwrite", action="store_true", help="allow writing into a non-empty output folder (its previous dataset is removed)")
    a("--resume", action="store_true", help="continue an interrupted run in --output: units already finished by the same configuration are kept, the rest are extracted")
    a("--max-docs", type=int, help="use only the first N input records (default: all)")
    a("--mesh", help="device mesh DATA,MODEL, e.g. 4,1 or 2,4 (default: automatic: enough 'model' to fit the weights, the rest 'data')")
    a("--num-hosts", type=int, default=1, help="independent-host mode: number of hosts sharing the input (default: 1)")
    a("--host-index", type=int, default=0, help="independent-host mode: this host's index, 0..num-hosts-1 (default: 0)")
    a("--docs-per-unit", type=int, default=DOCS_PER_UNIT, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    is_demo = args.model is None and args.inputs is None
    output = args.output or (demo.DEMO_OUTPUT if is_demo else None)
    if output is None:
        raise UsageError("--output is required (a folder for the activation dataset)")
    return ExtractConfig(
        model=args.model or demo.ensure_demo_model(),
        inputs=tuple(args.inputs or [str(demo.CORPUS)]),
        output=output,
        text_field=args.text_field,
        layers=tuple(args.layers or ()),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        mode=args.mode,
        dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        num_shards=args.num_shards,
        compression=args.compression,
        overwrite=args.overwrite,
        max_docs=args.max_docs,
        mesh=parse_mesh(args.mesh),
        num_hosts=args.num_hosts,
        host_index=args.host_index,
        docs_per_unit=args.docs_per_unit,
        beam_args=tuple(getattr(args, "beam_args", ()) or ()),
        is_demo=is_demo,
        resume=args.resume,
    )


def parse_mesh(text: str | None) -> tuple | None:
    if text is None:
        return None
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--mesh {text!r}: expected DATA,MODEL, e.g. 4,1") from None
    if data < 1 or model < 1:
        raise UsageError(f"--mesh {text!r}: both axes must be at least 1")
    return data, model


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    meta = run_extract(cfg)
    print_summary(cfg, meta)
    return 0


# ----------------------------------------------------------------------------- checks


def resolve_model(model: str) -> str:
    """A local checkpoint folder for `model` (a folder, or a hub id fetched with huggingface_hub)."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/")) or model.count("/") != 1:
        raise UsageError(f"--model {model!r}: no such checkpoint folder (expected config.json, *.safetensors and tokenizer files)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # offline, unknown repo, gated model...
        raise UsageError(f"--model {model!r}: could not fetch it from the Hugging Face hub ({type(e).__name__}); "
                         "download it first and pass the folder") from None


def check_model_folder(folder: str) -> None:
    files = set(os.listdir(folder))
    if "config.json" not in files:
        raise UsageError(f"--model {folder}: no config.json in the folder")
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        raise UsageError(f"--model {folder}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)")
    if not files & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}:
        raise UsageError(f"--model {folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def check_config(cfg: ExtractConfig):
    """All cheap checks; returns (resolved cfg, model config, raw HF config dict)."""
    from llm_activations.model.config import load_model_config

    if cfg.seq_len < 1 or cfg.batch_size < 1:
        raise UsageError(f"--seq-len and --batch-size must be positive (got {cfg.seq_len}, {cfg.batch_size})")
    if cfg.num_shards < 0:
        raise UsageError(f"--num-shards {cfg.num_shards}: must be 0 (automatic) or positive")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise UsageError(f"--max-docs {cfg.max_docs}: must be positive")
    if not (cfg.num_hosts >= 1 and 0 <= cfg.host_index < cfg.num_hosts):
        raise UsageError(f"--host-index {cfg.host_index} must be in 0..{cfg.num_hosts - 1} (--num-hosts {cfg.num_hosts})")
    folder = resolve_model(cfg.model)
    check_model_folder(folder)
    model_cfg, hf = load_model_config(folder)
    layers = cfg.layers or (model_cfg.num_layers // 2,)
    for layer in layers:
        if not 0 <= layer < model_cfg.num_layers:
            raise UsageError(f"--layers {layer}: out of range; this model has layers 0..{model_cfg.num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise UsageError(f"--layers {' '.join(map(str, layers))}: a layer is listed twice")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model_cfg.max_position_embeddings})")
    if cfg.mesh is not None:  # the device count is checked where the devices are: on the workers
        from llm_activations.model.sharding import check_mesh_shape

        check_mesh_shape(cfg.mesh, model_cfg, cfg.batch_size, num_devices=cfg.mesh[0] * cfg.mesh[1])
    return ExtractConfig(**{**asdict(cfg), "model": folder, "layers": tuple(sorted(layers))}), model_cfg, hf


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
    ours += [p for p in existing if os.path.basename(p) in ("rejected", MANIFEST_DIR) or os.path.basename(p).startswith("layer_")]
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


def parse_beam_options(args: tuple):
    """Beam PipelineOptions from the options extract does not know; a typo is a usage error
    (Beam itself would only log that it discarded the option and run without it)."""
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        options = PipelineOptions(list(args))
        beam_log = logging.getLogger("apache_beam.options.pipeline_options")
        level, beam_log.level = beam_log.level, logging.ERROR  # we report unknown options ourselves
        try:
            unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
        finally:
            beam_log.level = level
    except (SystemExit, ValueError) as e:
        raise UsageError(f"bad Beam pipeline option in {' '.join(args)} ({e})") from None
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join('--' + u for u in sorted(unknown))}: neither an extract "
                         "option (see --help) nor an Apache Beam pipeline option")
    return options


def unit_settings(cfg: ExtractConfig, hf: dict, sources, num_units: int, host_docs) -> dict:
    """Everything that determines the records of a unit: its manifest's fingerprint covers it."""
    keys = ("model", "text_field", "layers", "seq_len", "batch_size", "mode", "dtype", "compute_dtype", "compression")
    return {**{k: getattr(cfg, k) for k in keys}, "config": hf, "num_units": num_units, "host_docs": list(host_docs),
            "num_hosts": cfg.num_hosts, "sources": [(s.path, s.num_records) for s in sources]}


def build_pipeline(p, cfg: ExtractConfig, units, fingerprint: str, metadata_base: dict, resumed: list):
    """Attach the extraction to Beam pipeline p. The whole job reads as this one screen."""
    import apache_beam as beam
    from apache_beam.pvalue import AsList, AsSingleton

    from llm_activations import transforms as T

    spec = T.ModelSpec(cfg.model, tuple(cfg.layers), cfg.batch_size, cfg.seq_len, cfg.compute_dtype, cfg.dtype, cfg.mesh)
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
        finalize_metadata(base, cfg.output, [], MergeRun().create_accumulator(), list(done.values()))
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
        "format_version": FORMAT_VERSION,
        "model": {"name_or_path": cfg.model, "architecture": model_cfg.architecture, "model_type": model_cfg.model_type,
                  "hidden_size": model_cfg.hidden_size, "num_layers": model_cfg.num_layers, "config": hf},
        "tokenizer": _tokenizer_info(cfg.model),
        "input": {"patterns": list(cfg.inputs), "files": [s.path for s in sources], "text_field": cfg.text_field,
                  "max_docs": cfg.max_docs, "num_hosts": cfg.num_hosts, "host_index": cfg.host_index,
                  "doc_index_range": list(host_docs)},
        "extraction": {"layers": list(cfg.layers), "hook": "resid_post", "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                       "mode": cfg.mode, "compute_dtype": cfg.compute_dtype,
                       "mesh": {"data": cfg.mesh[0], "model": cfg.mesh[1]} if cfg.mesh else "auto",
                       "num_shards": cfg.num_shards, "num_units": num_units},
        "dtype": cfg.dtype,
        "hidden_size": model_cfg.hidden_size,
        "compression": cfg.compression,
        "run": {"runner": str(runner), "direct_num_workers": options.view_as(DirectOptions).direct_num_workers,
                "start_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "start_unix": time.time(), "versions": _versions()},
    }


def finalize_metadata(base: dict, output: str, manifests: list, run: dict, resumed: list) -> dict:
    """Assemble metadata.json from the unit manifests and run statistics and write it - the last step."""
    from llm_activations.format import manifests as mf

    meta = json.loads(json.dumps(base))
    layers = meta["extraction"]["layers"]
    summary = mf.summarize(list(manifests) + list(resumed), layers, meta["hidden_size"])
    meta["files"] = {str(layer): [s["path"] for s in summary["shards"] if s["layer"] == layer] for layer in layers}
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
    fileio.delete(fileio.match([join(output, d, "*.inprogress-*") for d in ("layer_*", "rejected", MANIFEST_DIR)]))


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
        f"done: {c['documents']} documents ({c['rejected']} rejected), {c['tokens']} tokens x {len(meta['files'])} layer(s), "
        f"{r['tokens_per_second']:.0f} tokens/s, {files} files ({size / 2**20:.1f} MiB), "
        f"padding {c['padding_tokens'] / max(1, c['tokens'] + c['padding_tokens']):.1%}, compilations {r['compilations']}\n"
        f"      -> {os.path.abspath(cfg.output) if '://' not in cfg.output else cfg.output}/{METADATA_FILE}"
    )
