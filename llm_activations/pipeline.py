"""`python -m llm_activations extract`: build and run the Beam pipeline (configuration and its
checks live in options.py).

    PlanUnits -> Reshuffle -> ReadTokenizePack (one unit ahead) -> Batch
              -> Extract (batches in flight) -> WriteShards (a writer thread per layer)   (transforms.ExtractUnits)
    unit manifests (shards, counts, rejected, Moments) + run stats -> metadata.json (last)

Every configuration error is found on the launcher (options.check_config) before a model is loaded
or a worker is started, and raised as a UsageError (exit 2, one line).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time

from llm_activations import __version__
from llm_activations import output_folder as out
from llm_activations.errors import UsageError
from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format.fileio import join
from llm_activations.format.metadata import METADATA_FILE, read_metadata, write_metadata
# add_arguments is this command's parser (cli.COMMANDS): it lives with the config it builds.
from llm_activations.options import (ExtractConfig, add_arguments, check_config, check_devices,  # noqa: F401
                                     config_from_args, parse_beam_options)
from llm_activations.run_plan import RunPlan

# ----------------------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    meta = run_extract(cfg)
    print_summary(cfg, meta)
    return 0


# ----------------------------------------------------------------------------- the pipeline


def build_pipeline(p, plan: RunPlan, todo: list, metadata_base: dict, resumed: list, extractor_factory=None):
    """Attach the extraction of units `todo` to Beam pipeline p. The whole job reads as this one screen.

    extractor_factory: see run_extract.
    """
    import apache_beam as beam
    from apache_beam.pvalue import AsList, AsSingleton

    from llm_activations import transforms as T

    out_ = (
        p
        | "PlanUnits" >> beam.Create(todo)
        | "Distribute" >> beam.Reshuffle()
        | "ExtractUnits" >> T.ExtractUnits(plan, extractor_factory)
    )
    run_stats = out_[T.RUN] | "MergeRunStats" >> beam.CombineGlobally(T.MergeRun())
    return (
        p
        | "Finalize" >> beam.Create([metadata_base])
        | "WriteMetadata" >> beam.Map(finalize_metadata, output=plan.cfg.output, manifests=AsList(out_["manifests"]),
                                      run=AsSingleton(run_stats), resumed=resumed)
    )


def run_extract(cfg: ExtractConfig, extractor_factory=None) -> dict:
    """Check, plan, run the pipeline to completion; returns the written metadata.

    extractor_factory(spec: units.ModelSpec) -> Extractor-like replaces the model (None: the
    checkpoint's own Extractor). It is the one public seam for a stand-in device
    (bench/bench_simulated.py); it goes to the Extract step alone.

    Nothing in the output folder is deleted until every check that can run on the launcher has
    passed: options, checkpoint headers, devices, inputs (files, fields, hf:// split), the folder
    itself and its lock (whose creation proves it writable).
    """
    options = parse_beam_options(cfg.beam_args)
    cfg, model_cfg, hf = check_config(cfg, check_weights=extractor_factory is None)
    check_devices(cfg, options)
    plan = RunPlan.build(cfg, hf)
    listing = out.list_output(cfg.output)  # the one listing of OUT this run makes
    out.check_output(cfg, listing)
    with out.OutputLock(cfg.output):
        resume = out.resume_plan(cfg, plan.fingerprint, plan.units, listing) if cfg.resume else out.ResumePlan()
        out.prepare_output(cfg, listing, resume, plan.num_units)  # only now is anything deleted
        base = metadata_base(plan, model_cfg, hf, options)
        ok = False
        try:
            _run_pipeline(plan, options, [u for u in plan.units if u.index not in resume.keep], base,
                          list(resume.keep.values()), extractor_factory)
            ok = True
        finally:
            if not ok:  # failed or interrupted (Ctrl-C): no half-written file stays behind
                out.remove_partial_shards(cfg.output)
        meta = read_metadata(cfg.output)
        if meta["counts"]["documents"] == 0:
            fileio.delete([join(cfg.output, METADATA_FILE)])  # not a dataset: readers must refuse it
            raise UsageError(no_documents_message(cfg.output, meta))
        return meta


def _run_pipeline(plan: RunPlan, options, todo: list, base: dict, resumed: list, extractor_factory=None) -> None:
    import apache_beam as beam

    from llm_activations.transforms import MergeRun

    if not todo:  # everything was finished before: only the metadata is missing
        nothing = MergeRun()
        finalize_metadata(base, plan.cfg.output, [], nothing.extract_output(nothing.create_accumulator()), resumed)
        return
    with _sigint_seen() as interrupted:
        try:
            p = beam.Pipeline(options=options)
            build_pipeline(p, plan, todo, base, resumed, extractor_factory)
            result = p.run()
            result.wait_until_finish()
            print_counters(result)
        except Exception:  # a worker's Fault comes back wrapped: cli prints its line (errors.fault_line)
            if interrupted.is_set():  # Beam re-raises Ctrl-C inside a DoFn as a RuntimeError
                raise KeyboardInterrupt from None
            raise


@contextlib.contextmanager
def _sigint_seen():
    """An Event set by Ctrl-C (which still raises KeyboardInterrupt where the program is)."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):
        seen.set()
        # Beam logs the exception of every DoFn the interrupt unwinds through, traceback included:
        # the user asked to stop, so from here on the only message is the CLI's one line.
        logging.disable(logging.CRITICAL)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def no_documents_message(output: str, meta: dict) -> str:
    """One line for a run that accepted no document, naming the most common rejection reason."""
    reasons: collections.Counter = collections.Counter()
    for rel in meta["run"].get("rejected_files", []):
        for line in (fileio.read_text(join(output, rel)) or "").splitlines():
            reasons[json.loads(line)["reason"].split(" (")[0]] += 1
    n = meta["counts"]["rejected"]
    if not reasons:
        return "no document was accepted: the input holds no records (--max-docs, --num-hosts or empty files?)"
    reason, k = reasons.most_common(1)[0]
    return (f"no document was accepted: all {n} records were rejected, {k} of them for: {reason} "
            f"(see {join(output, 'rejected')}/); check --input and --text-field")


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


def metadata_base(plan: RunPlan, model_cfg, hf: dict, options) -> dict:
    """The arguments of format.metadata.build_metadata known before the run (all but shards, counts
    and stats; "run" gets its end figures in finalize_metadata)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    cfg, sources, host_docs, num_units = plan.cfg, plan.sources, plan.host_docs, plan.num_units
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return {
        "model": {"name_or_path": cfg.model, "architecture": model_cfg.architecture, "model_type": model_cfg.model_type,
                  "hidden_size": model_cfg.hidden_size, "num_layers": model_cfg.num_layers, "config": hf},
        "tokenizer": _tokenizer_info(cfg.model),
        "input": {"patterns": list(cfg.inputs), "files": [s.path for s in sources], "text_field": cfg.text_field,
                  "max_docs": cfg.max_docs, "num_hosts": cfg.num_hosts, "host_index": cfg.host_index,
                  "doc_index_range": list(host_docs)},
        "extraction": {"layers": list(cfg.layers), **hk.extraction_fields(cfg.hooks), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                       "mode": cfg.mode, "compute_dtype": cfg.compute_dtype,
                       "prepend_token_id": cfg.prepend_token_id,  # seen by the model before every segment, not stored
                       "mesh": {"data": cfg.mesh[0], "model": cfg.mesh[1]} if cfg.mesh else "auto",
                       # files per layer actually written (--num-shards 0 lets the planner choose;
                       # an hf:// split is one stream, one file)
                       "num_shards": num_units, "num_shards_requested": cfg.num_shards, "num_units": num_units},
        "dtype": cfg.dtype,
        "hidden_size": model_cfg.hidden_size,
        # every hook's width (z is heads x head_dim); build_metadata writes them for version 2 only
        "hook_widths": {h: hk.width(h, model_cfg.hidden_size, model_cfg.num_heads, model_cfg.head_dim) for h in cfg.hooks},
        "compression": cfg.compression,
        "run": {"runner": str(runner), "direct_num_workers": options.view_as(DirectOptions).direct_num_workers,
                "start_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "start_unix": time.time(), "versions": _versions()},
    }


def finalize_metadata(base: dict, output: str, manifests: list, run: dict, resumed: list) -> dict:
    """metadata.json from metadata_base, the unit manifests and the run statistics, through
    build_metadata, written - the last step."""
    meta = md.assemble(base, manifests, resumed, run, end_unix=time.time())
    out.remove_partial_shards(output)
    write_metadata(output, meta)
    return meta


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
        f"      -> {cfg.output if fileio.is_url(cfg.output) else os.path.abspath(cfg.output)}/{METADATA_FILE}"
    )
