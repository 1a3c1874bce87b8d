"""`extract`'s configuration: the frozen ExtractConfig, its command-line options, and every check
that can run on the launcher before a model is loaded or a worker is started (each raised as a
UsageError: exit 2, one line)."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field

from llm_activations import demo
from llm_activations.argtypes import integer
from llm_activations.errors import UsageError
from llm_activations.format import dtypes
from llm_activations.format import hooks as hk

MODES = ("pack", "pad")
PREPEND_DEFAULT = "auto"  # docs/FORMAT.md "Context token (--prepend)": why, measured on SmolLM2
COMPRESSIONS = ("none", "gzip")
DOCS_PER_UNIT = 4096


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    inputs: tuple
    output: str
    text_field: str = "text"
    layers: tuple = ()
    hooks: tuple = hk.DEFAULT_HOOKS
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
    verify: bool = False  # --resume --verify: also compare each kept shard's sha256 (reads every shard)
    compilation_cache: str | None = None  # persistent XLA cache folder, "none", or None for the default
    prepend: str = PREPEND_DEFAULT  # --prepend: auto, none or a token
    prepend_token_id: int | None = None  # what check_config resolved --prepend to (None: nothing prepended)


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
    a("--layers", nargs="+", type=int, metavar="L", help="0-based decoder blocks; stores the --hooks of each (default: the middle layer)")
    a("--hooks", nargs="+", metavar="H", default=list(hk.DEFAULT_HOOKS),
      help=f"hook points stored at every layer, one or more of {', '.join(hk.HOOKS)} (TransformerLens names; default: resid_post)")
    a("--seq-len", type=integer(1), default=1024, help="tokens per row, fixed; longer documents are split into segments (default: 1024)")
    a("--batch-size", type=integer(1), default=8, help="rows per model step, fixed; must divide by the mesh 'data' axis (default: 8)")
    a("--mode", default="pack", choices=MODES, help="pack: several segments per row (little padding); pad: one segment per row (default: pack)")
    a("--dtype", default="bfloat16", choices=list(dtypes.STORAGE), help="storage dtype of activations (default: bfloat16)")
    a("--compute-dtype", default="bfloat16", choices=list(dtypes.COMPUTE), help="dtype the model computes in (default: bfloat16)")
    a("--num-shards", type=integer(0), default=0, help="files per layer; each file is a fixed share of the input, so reruns are byte-identical (0 = one per ~4096 documents)")
    a("--compression", default="none", choices=COMPRESSIONS, help="TFRecord compression (default: none)")
    a("--overwrite", action="store_true", help="allow writing into a non-empty output folder (its previous dataset is removed)")
    a("--resume", action="store_true", help="continue an interrupted run in --output: units already finished by the same configuration are kept, the rest are extracted")
    a("--verify", action="store_true", help="with --resume: also check each kept shard's sha256 (reads every shard back; "
      "without it a shard is checked by the size and identity a listing gives)")
    a("--max-docs", type=integer(1), help="use only the first N input records (default: all)")
    a("--mesh", help="device mesh DATA,MODEL, e.g. 4,1 or 2,4 (default: automatic: enough 'model' to fit the weights, the rest 'data')")
    a("--num-hosts", type=integer(1), default=1, help="independent-host mode: number of hosts sharing the input (default: 1)")
    a("--host-index", type=integer(0), default=0, help="independent-host mode: this host's index, 0..num-hosts-1 (default: 0)")
    a("--compilation-cache", metavar="DIR",
      help="persistent XLA compilation cache, local or gs://, shared by runs and hosts; 'none' turns it off "
           "(default: $LLM_ACTIVATIONS_COMPILATION_CACHE, else ~/.cache/llm_activations/jax under $XDG_CACHE_HOME if set)")
    a("--prepend", default=PREPEND_DEFAULT, metavar="{auto,none,TOKEN}",
      help="a context token the model sees before every segment (continuations of long documents included), "
           "computed but never stored: auto = the tokenizer's BOS, else its EOS; none; or a token of the "
           f"vocabulary (default: {PREPEND_DEFAULT})")
    a("--docs-per-unit", type=integer(1), default=DOCS_PER_UNIT, help=argparse.SUPPRESS)


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
        hooks=tuple(args.hooks),
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
        verify=args.verify,
        compilation_cache=args.compilation_cache,
        prepend=args.prepend,
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


# ----------------------------------------------------------------------------- checks


def check_config(cfg: ExtractConfig, *, check_weights: bool = True):
    """All cheap checks; returns (resolved cfg, model config, raw HF config dict).

    check_weights=False skips the checkpoint's weights (for a run whose extractor is injected and
    never loads them, such as bench/bench_simulated.py's stand-in device)."""
    from llm_activations.format import fileio
    from llm_activations.model import source
    from llm_activations.model.config import check_layers, load_model_config

    # gs:// without Beam's GCP extra or credentials: one line now, not a traceback mid-run.
    fileio.check_urls([p for p in (*cfg.inputs, cfg.output) if not p.startswith("hf://")])
    if cfg.seq_len < 1 or cfg.batch_size < 1:
        raise UsageError(f"--seq-len and --batch-size must be positive (got {cfg.seq_len}, {cfg.batch_size})")
    hooks = hk.check_hooks(cfg.hooks)
    if cfg.verify and not cfg.resume:
        raise UsageError("--verify checks the shards a --resume keeps: pass it with --resume (`validate` checks a finished dataset)")
    if cfg.num_shards < 0:
        raise UsageError(f"--num-shards {cfg.num_shards}: must be 0 (automatic) or positive")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise UsageError(f"--max-docs {cfg.max_docs}: must be positive")
    if not (cfg.num_hosts >= 1 and 0 <= cfg.host_index < cfg.num_hosts):
        raise UsageError(f"--host-index {cfg.host_index} must be in 0..{cfg.num_hosts - 1} (--num-hosts {cfg.num_hosts})")
    cache = check_cache_folder(cfg.compilation_cache)
    folder = source.resolve(cfg.model)
    source.check_folder(folder)
    model_cfg, hf = load_model_config(folder)
    layers = check_layers(model_cfg, cfg.layers or (model_cfg.num_layers // 2,))
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model_cfg.max_position_embeddings})")
    if cfg.mesh is not None:  # the device count itself: check_devices, which knows the runner
        from llm_activations.model.specs import check_mesh_shape

        check_mesh_shape(cfg.mesh, model_cfg, cfg.batch_size, num_devices=cfg.mesh[0] * cfg.mesh[1])
    prepend_token_id = resolve_prepend(cfg.prepend, folder, cfg.seq_len)
    if check_weights:
        from llm_activations.model.checkpoint import check_complete

        check_complete(folder, model_cfg, max(layers) + 1)
    # A hub id stays a hub id: the workers of a distributed runner (Dataflow, Flink, Spark) have no
    # access to the launcher's download folder, so each resolves the id into its own hub cache.
    model = cfg.model if source.is_hub_id(cfg.model) and not os.path.isdir(cfg.model) else folder
    return (ExtractConfig(**{**asdict(cfg), "model": model, "layers": layers, "hooks": hooks, "compilation_cache": cache,
                             "prepend_token_id": prepend_token_id}), model_cfg, hf)


def resolve_prepend(value: str, folder: str, seq_len: int) -> int | None:
    """--prepend's token id (None for none), from the checkpoint's tokenizer."""
    if value == "none":
        return None
    if seq_len < 2:
        raise UsageError(f"--prepend {value} needs --seq-len 2 or more (the prepended token takes one position)")
    from llm_activations.units import load_tokenizer

    try:
        tok = load_tokenizer(folder)
    except Exception as e:  # no tokenizer files, or one transformers cannot read: the model's own problem
        raise UsageError(f"--prepend {value}: cannot load the tokenizer of {folder} ({type(e).__name__}); "
                         "pass --prepend none") from None
    return prepend_token_id(value, tok)


def prepend_token_id(value: str, tok) -> int:
    """auto: BOS, else EOS (the document separator); otherwise the token itself, which must be in the vocabulary."""
    if value == "auto":
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(tok, name, None)
            if tid is not None:
                return int(tid)
        raise UsageError("--prepend auto: the tokenizer has neither a BOS nor an EOS token; "
                         "use --prepend none, or --prepend TOKEN with a token of its vocabulary")
    tid = tok.get_vocab().get(value)
    if tid is None:
        raise UsageError(f"--prepend {value!r} is not a token of the tokenizer's vocabulary "
                         "(give auto, none, or one token as the tokenizer spells it, e.g. <|endoftext|>)")
    return int(tid)


def check_cache_folder(folder: str | None) -> str | None:
    """compile_cache.check for the compilation cache folder, however it was named (--compilation-cache,
    the environment, the default): one line if it cannot serve. Returns what workers get: the folder
    named (absolute), "none", or None for the default folder, which each worker resolves on its own
    disk (a remote runner's workers do not share the launcher's home)."""
    from llm_activations.model import compile_cache

    path, named = compile_cache.resolve(folder)
    compile_cache.check(path, named)
    if folder is None and not os.environ.get(compile_cache.ENV):
        return None
    return path or compile_cache.OFF


def check_devices(cfg: ExtractConfig, options) -> None:
    """An explicit --mesh against the devices this host has, when the workers run in this process
    (the DirectRunner in memory or in threads); remote runners' devices are on their workers."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if cfg.mesh is None or runner not in ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"):
        return
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        return  # the workers are other processes: a TPU opened here would be busy for them
    import jax

    have, need = jax.device_count(), cfg.mesh[0] * cfg.mesh[1]
    if need > have:
        raise UsageError(f"--mesh {cfg.mesh[0]},{cfg.mesh[1]} needs {need} devices; this host has {have} "
                         f"({jax.devices()[0].platform})")


def parse_beam_options(args: tuple):
    """Beam PipelineOptions from the options extract does not know; a typo is a usage error
    (Beam itself would only log that it discarded the option and run without it)."""
    import contextlib
    import io
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions

    said = io.StringIO()  # Beam's argparse prints its whole usage before it exits: keep its last line
    try:
        with contextlib.redirect_stderr(said):
            options = PipelineOptions(list(args))
            beam_log = logging.getLogger("apache_beam.options.pipeline_options")
            level, beam_log.level = beam_log.level, logging.ERROR  # we report unknown options ourselves
            try:
                unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
            finally:
                beam_log.level = level
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or ["?"])[-1].split("error: ", 1)[-1]
        raise UsageError(f"bad Beam pipeline option: {reason}") from None
    except ValueError as e:
        raise UsageError(f"bad Beam pipeline option in {' '.join(args)} ({e})") from None
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join('--' + u for u in sorted(unknown))}: neither an extract "
                         "option (see --help) nor an Apache Beam pipeline option (options cannot be abbreviated)")
    stray = _positionals(args)
    if stray:  # Beam's parser drops them silently
        raise UsageError(f"unexpected argument {stray[0]!r}: extract takes only --options (quote globs, e.g. --input 'data/*.jsonl')")
    return options


def _positionals(args: tuple) -> list:
    """Arguments that no Beam option consumes as its value."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options builds its parser
    _, rest = parser.parse_known_args(list(args))
    return [a for a in rest if not a.startswith("-")]
