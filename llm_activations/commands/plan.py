"""`python -m llm_activations plan`: memory, batch size, storage and throughput before a run.

Two answers, from the same step:

* arithmetic (instant, nothing loaded, no TPU compiler): weights per chip walk the model's param
  specs (specs.param_specs) with the sharding rules (specs.RULES), so each weight is
  divided exactly as extract shards it (the embedding is replicated); working memory per row is
  model/cost.py's, calibrated to what the TPU compiler reports for the step.
* `--topology NAME` (libtpu, the `tpu` extra): the step extract would run is compiled for one host
  of that TPU slice without a TPU (model/aot.py), and the compiler's own memory figures decide
  what fits; without --batch-size the largest batch is found by compiles.

M = model-axis size, D = data-axis size, b = compute dtype bytes, s = storage bytes:

* loaded parameters: embedding + blocks 0..deepest requested layer. The extractor stops at the
  deepest hook, so later blocks, the final norm and the lm_head are never loaded.
* weights per chip = sum over weights of its bytes / (the mesh axes its logical axes shard over).
* working memory per row: cost.row_bytes (one block's peak; no KV cache, nothing is generated).
* largest batch = D x floor((HBM x (1 - reserve) - weights per chip) / working memory per row).
  On a TPU without a model axis, largest_batch_lean is the same without the residual term: what
  fits if the TPU compiler updates the residual stream in place, which it does for some models
  under memory pressure (cost.py); only --topology says whether it does.
* FLOPs per token: cost.flops_per_token over the loaded blocks (matmuls + causal attention).
  tokens/s per chip = peak bf16 FLOP/s x MFU / FLOPs per token.
* storage per token per layer = the --hooks' widths x s bytes: H per hook, heads x head_dim for z
  (+ about 8-12 bytes of varint token ids/positions per hook); the captured outputs are also
  held in working memory until the step ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, replace

from llm_activations.errors import UsageError
from llm_activations.format import dtypes
from llm_activations.format import hooks as hk
from llm_activations.model import chips as chips_mod
from llm_activations.model import cost, specs
from llm_activations.model.chips import CHIP_PRESETS, GIB, Chip
from llm_activations.model.config import ModelConfig, check_layers, load_model_config, model_config_from_hf


def _qwen2(hidden, inter, layers, heads, kv, vocab, tied, max_pos=32768, theta=1000000.0):
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": max_pos, "rope_theta": theta, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    }


def _qwen3(hidden, inter, layers, heads, kv, tied, head_dim=128, vocab=151936):
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "attention_bias": False,
        "hidden_act": "silu", "rms_norm_eps": 1e-6,
    }


# The numbers of the public Hugging Face config.json files (Qwen/<name>).
MODEL_PRESETS = {
    "Qwen2.5-0.5B": _qwen2(896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen2.5-1.5B": _qwen2(1536, 8960, 28, 12, 2, 151936, tied=True),
    "Qwen2.5-3B": _qwen2(2048, 11008, 36, 16, 2, 151936, tied=True),
    "Qwen2.5-7B": _qwen2(3584, 18944, 28, 28, 4, 152064, tied=False, max_pos=131072),
    "Qwen2.5-14B": _qwen2(5120, 13824, 48, 40, 8, 152064, tied=False, max_pos=131072),
    "Qwen2.5-32B": _qwen2(5120, 27648, 64, 40, 8, 152064, tied=False, max_pos=131072),
    "Qwen2.5-72B": _qwen2(8192, 29568, 80, 64, 8, 152064, tied=False, max_pos=131072),
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "Qwen3-14B": _qwen3(5120, 17408, 40, 40, 8, tied=False),
}


@dataclass(frozen=True)
class Plan:
    model: str
    chip: str
    layers: tuple[int, ...]
    hooks: tuple[str, ...]
    seq_len: int
    mesh: tuple[int, int]  # (data, model)
    dtype: str
    compute_dtype: str
    attention: str  # the kernel extract picks on this chip ("splash", "cudnn", "xla")
    mfu: float
    chips_per_host: int
    hbm_bytes: int
    usable_bytes: int
    total_params: int
    loaded_params: int
    loaded_blocks: int
    weights_per_chip_bytes: int
    row_bytes: dict  # component -> bytes per row per chip
    row_bytes_total: int
    rows_per_data_shard: int
    largest_batch: int
    largest_batch_lean: int | None  # if the TPU compiler updates the residual stream in place (cost.py); TPU, M = 1
    storage_bytes_per_token_per_layer: int  # all requested hooks
    storage_bytes_per_token_by_hook: dict  # hook -> bytes per token per layer
    storage_bytes_per_billion_tokens: int  # all requested hooks and layers
    flops_per_token: float
    tokens_per_second_per_chip: float
    tokens_per_second_per_host: float
    hours_per_billion_tokens_per_host: float
    write_bytes_per_second_per_host: float
    caution: str | None = None  # where the arithmetic was found over the compiler's answer (caution_for)
    compiled: dict | None = None  # --topology: what the TPU compiler reports (compiled_summary)


def total_params(c: ModelConfig) -> int:
    """All parameters of the checkpoint: embedding, blocks, final norm, lm_head unless tied."""
    return c.param_count() + c.hidden_size + (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)


def attention_for(chip, compute_dtype: str) -> str:
    """The kernel extract's "auto" picks on this chip (cost.auto_attention; a preset without a TPU
    topology is a GPU)."""
    return cost.auto_attention("tpu" if chip.topology else "gpu", dtypes.itemsize(compute_dtype))


def check_mesh(config: ModelConfig, mesh: tuple[int, int], chips_per_host: int, batch_size: int | None) -> None:
    """The mesh against one host's chips and the model's heads: extract's own check (model/specs.py)."""
    specs.check_mesh_shape(mesh, config, batch_size or mesh[0], chips_per_host)


def weights_per_chip(config: ModelConfig, blocks: int, mesh: tuple[int, int], compute_dtype: str) -> int:
    """Bytes of weights one chip holds: the param specs extract loads, walked with the sharding rules."""
    return cost.weight_bytes_per_device(specs.param_specs(config, blocks), specs.RULES, dict(zip(specs.MESH_AXES, mesh)),
                                        dtypes.itemsize(compute_dtype))


def caution_for(row: dict, attention: str) -> str | None:
    """One line where the arithmetic is known to be over what the TPU compiler fits: the qk-norm peak
    (cost.py: Qwen3 with 2 q heads per kv head), where the compiler's heap packing left 5-10% fewer
    rows than the arithmetic (3.7 GB more from one row to the next at the limit). Not a margin on
    the number: --topology compiles the step and answers for the shape."""
    if attention == "splash" and "qk_norm" in row:
        return ("the TPU compiler fitted 5-10% fewer rows than this arithmetic for Qwen3 models with 2 query "
                "heads per kv head (its packing at the qk-norm peak); check with --topology")
    return None


def make_plan(
    config: ModelConfig,
    *,
    model_name: str,
    chip: Chip,
    layers: tuple[int, ...],
    seq_len: int,
    mesh: tuple[int, int],
    dtype: str = "bfloat16",
    compute_dtype: str = "bfloat16",
    attention: str = "splash",
    mfu: float = 0.4,
    reserve: float = 0.1,
    hooks: tuple[str, ...] = hk.DEFAULT_HOOKS,
) -> Plan:
    """The plan for extracting `hooks` at `layers` of `config` on mesh (data, model) of `chip` (formulas: module doc)."""
    hooks = hk.check_hooks(hooks)
    check_layers(config, layers)  # the plan keeps the order given
    data, model = mesh
    if data < 1 or model < 1:
        raise UsageError(f"--mesh {data},{model}: both axes must be >= 1")
    if dtype not in dtypes.STORAGE or compute_dtype not in dtypes.COMPUTE:
        raise UsageError(f"--dtype must be one of {', '.join(dtypes.STORAGE)} and --compute-dtype one of {', '.join(dtypes.COMPUTE)}")
    b, s = dtypes.itemsize(compute_dtype), dtypes.itemsize(dtype)
    T = seq_len
    widths = {h: hk.width(h, config.hidden_size, config.num_heads, config.head_dim) for h in hooks}
    per_token = sum(widths.values()) * s  # bytes per token per layer, all hooks
    blocks = max(layers) + 1
    loaded = config.param_count(blocks)
    weights = weights_per_chip(config, blocks, mesh, compute_dtype)
    row = cost.row_bytes(config, T, model_axis=model, compute_bytes=b, storage_bytes=s,
                         output_values=sum(widths.values()) * len(layers), carry_is_output="resid_post" in hooks,
                         attention=attention)
    row_total = sum(row.values())
    usable = int(chip.hbm_bytes * (1 - reserve))
    rows = cost.rows_per_chip(row, usable, weights)
    lean = cost.lean_rows_per_chip(row, usable, weights, model) if attention == "splash" else None
    flops = cost.flops_per_token(config, T, blocks)
    per_chip = chip.peak_bf16_flops * mfu / flops
    per_host = per_chip * chip.chips_per_host
    return Plan(
        model=model_name, chip=chip.name, layers=tuple(layers), hooks=hooks, seq_len=T, mesh=(data, model), dtype=dtype,
        compute_dtype=compute_dtype, attention=attention, mfu=mfu, chips_per_host=chip.chips_per_host,
        hbm_bytes=chip.hbm_bytes, usable_bytes=usable, total_params=total_params(config), loaded_params=loaded,
        loaded_blocks=blocks, weights_per_chip_bytes=weights, row_bytes=row, row_bytes_total=row_total,
        rows_per_data_shard=int(rows), largest_batch=int(rows) * data,
        largest_batch_lean=None if lean is None else lean * data, storage_bytes_per_token_per_layer=per_token,
        storage_bytes_per_token_by_hook={h: w * s for h, w in widths.items()},
        storage_bytes_per_billion_tokens=per_token * len(layers) * 10**9, flops_per_token=float(flops),
        tokens_per_second_per_chip=per_chip, tokens_per_second_per_host=per_host,
        hours_per_billion_tokens_per_host=1e9 / per_host / 3600,
        write_bytes_per_second_per_host=per_host * per_token * len(layers), caution=caution_for(row, attention),
    )


def preset_or_config(name_or_path: str) -> tuple[str, ModelConfig]:
    """(display name, ModelConfig) for plan's --model: a preset name (also as Qwen/NAME or in lower case),
    a config.json path, or a model folder. Unlike extract's --model (model/source.py), nothing is
    downloaded: a plan needs the numbers alone."""
    if name_or_path in MODEL_PRESETS:
        return name_or_path, model_config_from_hf(MODEL_PRESETS[name_or_path])
    lower = {k.lower(): k for k in MODEL_PRESETS}
    key = name_or_path.split("/")[-1].lower()
    if key in lower and not os.path.exists(name_or_path):  # "Qwen/Qwen2.5-7B" or "qwen2.5-7b"
        return lower[key], model_config_from_hf(MODEL_PRESETS[lower[key]])
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path, encoding="utf-8") as f:
                return name_or_path, model_config_from_hf(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--model {name_or_path}: cannot read it as config.json ({e})") from None
    if os.path.isdir(name_or_path):
        return name_or_path, load_model_config(name_or_path)[0]
    raise UsageError(f"--model {name_or_path!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config.json path")


def _human(n: float, unit: str = "B") -> str:
    if unit == "B":
        for u, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if n >= f:
                return f"{n / f:,.2f} {u}"
        return f"{n:,.0f} B"
    for u, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:,.2f} {u}{unit}"
    return f"{n:,.1f} {unit}"


def format_plan(p: Plan) -> str:
    data, model = p.mesh
    lines = [
        ("model", f"{p.model}: {p.total_params:,} parameters ({_human(p.total_params, '')})"),
        ("layers", f"{list(p.layers)} (hook{'s' if len(p.hooks) > 1 else ''} {', '.join(p.hooks)}); loads blocks 0..{p.loaded_blocks - 1} + embedding"),
        ("loaded parameters", f"{p.loaded_params:,} ({p.loaded_params / p.total_params:.0%} of the model)"),
        ("chip", f"{p.chip}: {_human(p.hbm_bytes)} HBM ({_human(p.usable_bytes)} usable), {p.chips_per_host} per host"),
        ("mesh (data, model)", f"({data}, {model}); compute {p.compute_dtype}, storage {p.dtype}, {p.attention} attention"),
        ("weights per chip", _human(p.weights_per_chip_bytes)),
        ("working memory per row", f"{_human(p.row_bytes_total)} at seq_len {p.seq_len}"),
    ]
    lines += [(f"  {k}", _human(v)) for k, v in p.row_bytes.items()]
    fits = (
        f"{p.largest_batch} rows ({p.rows_per_data_shard} per data shard)"
        + (f"; up to {p.largest_batch_lean} if the TPU compiler updates the residual stream in place"
           if p.largest_batch_lean and p.largest_batch_lean > p.largest_batch else "")
        if p.largest_batch
        else "does not fit: raise the model axis (--mesh DATA,MODEL) or use a chip with more memory"
    )
    lines += [
        ("largest batch", fits),
        *([("  caution", p.caution)] if p.caution and not p.compiled else []),
        ("storage per token", f"{_human(p.storage_bytes_per_token_per_layer)} per layer (+ ~10 B of ids"
                              f"{' per hook' if len(p.hooks) > 1 else ''})"),
        *([("  by hook", ", ".join(f"{h} {_human(v)}" for h, v in p.storage_bytes_per_token_by_hook.items()))]
          if len(p.hooks) > 1 else []),
        ("storage per 1B tokens", f"{_human(p.storage_bytes_per_billion_tokens)} for {len(p.layers)} layer(s)"),
        ("FLOPs per token", f"{_human(p.flops_per_token, 'FLOP')}"),
        ("throughput", f"{p.tokens_per_second_per_chip:,.0f} tokens/s per chip, "
                       f"{p.tokens_per_second_per_host:,.0f} per host (at {p.mfu:.0%} MFU)"),
        ("1B tokens", f"{p.hours_per_billion_tokens_per_host:,.2f} host-hours; "
                      f"writes {_human(p.write_bytes_per_second_per_host)}/s per host"),
    ]
    if p.compiled:
        c = p.compiled
        head = (f"{c['topology']} ({c['devices']} devices per host), mesh {tuple(c['mesh'])}, batch {c['batch_size']}: "
                + ("fits" if c["fits"] else "does not fit"))
        lines += [("compiled for TPU", head)]
        if c.get("peak_bytes") is not None:
            lines += [("  per device", f"arguments {_human(c['argument_bytes'])}, outputs {_human(c['output_bytes'])}, "
                                       f"temporaries {_human(c['temp_bytes'])}, peak {_human(c['peak_bytes'])} "
                                       f"of {_human(c['usable_bytes'])} usable")]
        if c.get("error"):
            lines += [("  compiler", c["error"])]
        if "largest_batch" in c:
            nxt = f"; the next, {c['next_batch']}, does not fit" if c["next_batch"] else ""
            lines += [("  largest batch", f"{c['largest_batch']} rows ({c['compiles']} compiles, "
                                          f"{c['compile_seconds_total']:.0f} s){nxt}")]
        lines += [("  compile", f"{c['compile_seconds']:.1f} s, {c['splash_kernels']} splash attention kernel(s)")]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _positive(value, option: str):
    """value if it is a finite number > 0 (or None), else one UsageError line."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{option} {value}: must be a finite number > 0")
    return value


def parse_mesh(text: str | None) -> tuple[int, int] | None:
    """--mesh DATA,MODEL exactly as extract takes it (options.parse_mesh)."""
    from llm_activations.options import parse_mesh as extract_parse_mesh

    return extract_parse_mesh(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="Qwen2.5-7B", help=f"preset ({', '.join(MODEL_PRESETS)}) or config.json path / model folder")
    parser.add_argument("--chip", choices=sorted(CHIP_PRESETS), help="accelerator preset (default: v5e, or the --topology's chip)")
    parser.add_argument("--topology", nargs="?", const="", metavar="NAME",
                        help=f"compile the step for one host of this TPU slice with libtpu (the tpu extra): {chips_mod.FORMS}; "
                             "alone, the --chip's own host (" + ", ".join(f"{k} {c.topology}" for k, c in CHIP_PRESETS.items() if c.topology) + ")")
    parser.add_argument("--batch-size", type=int, help="rows per step, as extract's; --topology compiles this batch "
                                                       "(default: find the largest that fits by compiling)")
    parser.add_argument("--chips-per-host", type=int, help="override the preset's chips per host")
    parser.add_argument("--memory-gib", type=float, help="override HBM per chip (GiB), e.g. what is free of it")
    parser.add_argument("--peak-tflops", type=float, help="override dense bf16 peak per chip (TFLOP/s)")
    parser.add_argument("--layers", type=int, nargs="+", help="0-based layers to extract (default: the middle one)")
    parser.add_argument("--hooks", nargs="+", metavar="H", default=list(hk.DEFAULT_HOOKS),
                        help=f"hook points per layer ({', '.join(hk.HOOKS)}; default: resid_post)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--mesh", help="mesh DATA,MODEL as extract's --mesh, e.g. 4,1 (default: chips per host,1)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(dtypes.STORAGE), help="storage dtype")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=list(dtypes.COMPUTE))
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0-1]")
    parser.add_argument("--reserve", type=float, default=0.1, help="fraction of HBM kept for the runtime")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def resolve_chip(args: argparse.Namespace) -> tuple[str, Chip, chips_mod.Topology | None]:
    """(preset key, Chip with the overrides, Topology or None): every numeric option checked here."""
    topology = None
    if args.topology is not None:
        key = args.chip or "v5e"
        name = args.topology or CHIP_PRESETS[key].topology
        if name is None:
            raise UsageError(f"--topology: the {args.chip} is not a TPU; name a TPU slice ({chips_mod.FORMS})")
        topology = chips_mod.parse_topology(name)
        if args.chip and args.chip != topology.chip:
            raise UsageError(f"--topology {topology.name} is a {topology.chip} slice but --chip is {args.chip}")
        if args.chips_per_host is not None and args.chips_per_host != topology.chips_per_host:
            raise UsageError(f"--chips-per-host {args.chips_per_host}: a {topology.name} host has {topology.chips_per_host} chips")
    key = topology.chip if topology else (args.chip or "v5e")
    chip = CHIP_PRESETS[key]
    if topology:
        chip = replace(chip, chips_per_host=topology.chips_per_host)
    if args.chips_per_host is not None:
        if args.chips_per_host < 1:
            raise UsageError(f"--chips-per-host {args.chips_per_host}: must be >= 1")
        chip = replace(chip, chips_per_host=args.chips_per_host)
    if _positive(args.memory_gib, "--memory-gib") is not None:
        chip = replace(chip, hbm_bytes=int(args.memory_gib * GIB))
    if _positive(args.peak_tflops, "--peak-tflops") is not None:
        chip = replace(chip, peak_bf16_flops=args.peak_tflops * 1e12)
    if not 0 < args.mfu <= 1 or not 0 <= args.reserve < 1 or args.seq_len < 1:
        raise UsageError("--mfu must be in (0, 1], --reserve in [0, 1) and --seq-len >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    return key, chip, topology


def compiled_summary(topology: chips_mod.Topology, devices: int, mesh, chosen, usable: int, hbm: int,
                     tried: list | None = None) -> dict:
    """The JSON `compiled` object: the compile of `chosen` (an aot.Compiled) and, after a search, its trail."""
    out = {"topology": topology.name, "devices": devices, "mesh": list(mesh), "batch_size": chosen.batch_size,
           "weight_bytes": chosen.weight_bytes, "argument_bytes": chosen.argument_bytes, "output_bytes": chosen.output_bytes,
           "temp_bytes": chosen.temp_bytes, "peak_bytes": chosen.peak_bytes, "hbm_bytes": hbm,
           "usable_bytes": usable, "fits": chosen.fits, "compile_seconds": round(chosen.compile_seconds, 2),
           "splash_kernels": chosen.splash_kernels, "error": chosen.error}
    if tried is not None:
        over = [c for c in tried if not c.fits and c.batch_size > chosen.batch_size]
        out.update(largest_batch=chosen.batch_size if chosen.fits else 0, compiles=len(tried),
                   compile_seconds_total=round(sum(c.compile_seconds for c in tried), 1),
                   next_batch=min(c.batch_size for c in over) if over else None,
                   tried={str(c.batch_size): c.peak_bytes for c in tried})
    return out


def compile_for(topology: chips_mod.Topology, config: ModelConfig, plan: Plan, batch_size: int | None) -> dict:
    """--topology: compile the step on one host of the slice (aot.py, which imports JAX and libtpu)."""
    from llm_activations.model import aot

    devices = aot.topology_devices(topology)  # one host; the mesh was checked against its chips
    data = plan.mesh[0]

    def compile_batch(batch: int):
        return aot.compile_step(config, devices, layers=plan.layers, hooks=plan.hooks, batch_size=batch,
                                seq_len=plan.seq_len, mesh_shape=plan.mesh, compute_dtype=plan.compute_dtype,
                                storage_dtype=plan.dtype, budget_bytes=plan.usable_bytes)

    if batch_size is not None:
        return compiled_summary(topology, len(devices), plan.mesh, compile_batch(batch_size), plan.usable_bytes, plan.hbm_bytes)
    rows, tried = aot.largest_rows(lambda r: compile_batch(r * data), plan.usable_bytes, plan.rows_per_data_shard)
    chosen = next((c for c in tried if c.batch_size == rows * data), None) or min(tried, key=lambda c: c.batch_size)
    return compiled_summary(topology, len(devices), plan.mesh, chosen, plan.usable_bytes, plan.hbm_bytes, tried)


def run(args: argparse.Namespace) -> int:
    name, config = preset_or_config(args.model)
    key, chip, topology = resolve_chip(args)
    layers = tuple(args.layers) if args.layers else (config.num_layers // 2,)
    check_layers(config, layers)
    mesh = parse_mesh(args.mesh) or (chip.chips_per_host, 1)
    check_mesh(config, mesh, chip.chips_per_host, args.batch_size)
    plan = make_plan(
        config, model_name=name, chip=chip, layers=layers, seq_len=args.seq_len, mesh=mesh,
        dtype=args.dtype, compute_dtype=args.compute_dtype, attention=attention_for(chip, args.compute_dtype),
        mfu=args.mfu, reserve=args.reserve, hooks=tuple(args.hooks),
    )
    if topology is not None:
        plan = replace(plan, compiled=compile_for(topology, config, plan, args.batch_size))
    print(json.dumps(asdict(plan), indent=1) if args.json else format_plan(plan))
    return 0
