"""Benchmark: forward tokens/s of the Extractor step, and peak RSS while loading a sharded checkpoint.

Writes a random Qwen2-like bfloat16 checkpoint (sharded safetensors + index, no download) with the
shape given by flags, then
  1. loads it through checkpoint.load_params in a fresh subprocess and reports peak RSS (ru_maxrss)
     against the checkpoint's size on disk, after subtracting a baseline subprocess that imports
     jax and builds the mesh but loads nothing (the interpreter + jax overhead);
  2. builds an Extractor on it and times the compiled step (dispatch i+1 before result() of i).

    python bench/bench_model.py --hidden 1024 --layers 8 --batch-size 4 --seq-len 256
    python bench/bench_model.py --compile-depths 4 24   # only: XLA compile seconds of the step per depth
    python bench/bench_model.py --compile-depths 4 24 --hooks resid_pre attn_out z resid_mid mlp_in mlp_out resid_post

Compile time is measured on random weights (no checkpoint) for the same shape at each depth; with
layers as one lax.scan it should not grow with depth, whatever hooks are captured (each hook adds
one carry to the same scan body).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_activations.format import hooks as hk  # noqa: E402
from llm_activations.model.config import ModelConfig, model_config_to_hf  # noqa: E402
from llm_activations.model.hf_weights import random_tensors, save_hf_checkpoint  # noqa: E402


def bench_config(args) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=True, o_bias=False, qk_norm=False)


def write_checkpoint(folder: str, c: ModelConfig, shard_mb: int, seed: int = 0) -> int:
    """Random bfloat16 sharded checkpoint (model.hf_weights: drawn and written one tensor at a time);
    returns its bytes on disk."""
    return save_hf_checkpoint(folder, c, random_tensors(c, seed=seed), model_config_to_hf(c), dtype=ml_dtypes.bfloat16,
                              shard_bytes=shard_mb << 20)


RSS_SCRIPT = r"""
import resource, sys, time
import numpy as np, ml_dtypes
from llm_activations.model.config import load_model_config
from llm_activations.model.sharding import make_mesh
from llm_activations.model import checkpoint
folder, load = sys.argv[1], sys.argv[2] == "load"
config, _ = load_model_config(folder)
mesh = make_mesh((1, 1), config, 1, ml_dtypes.bfloat16)
t = time.perf_counter()
if load:
    params = checkpoint.load_params(folder, config, config.num_layers, mesh, ml_dtypes.bfloat16)
    import jax; jax.block_until_ready(params)
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the forking parent's peak.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak, time.perf_counter() - t)
"""


def peak_rss(folder: str, load: bool) -> tuple[int, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device: no replicas
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, folder, "load" if load else "baseline"], env=env,
                         cwd=repo, check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def throughput(folder: str, args) -> tuple[float, int, float]:
    from llm_activations.model.extractor import Extractor

    t = time.perf_counter()
    ex = Extractor(folder, layers=[args.layers - 1], batch_size=args.batch_size, seq_len=args.seq_len,
                   compute_dtype=args.compute_dtype, storage_dtype="bfloat16", hooks=args.hooks)
    setup = time.perf_counter() - t
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    tokens = rng.integers(0, args.vocab, shape, dtype=np.int32)
    segs = np.ones(shape, np.int32)
    pos = np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy()
    ex(tokens, segs, pos)  # warm up
    t = time.perf_counter()
    pending = ex.dispatch(tokens, segs, pos)
    for _ in range(args.steps - 1):
        following = ex.dispatch(tokens, segs, pos)
        pending.result()
        pending = following
    pending.result()
    elapsed = time.perf_counter() - t
    return args.steps * args.batch_size * args.seq_len / elapsed, ex.compile_stats, setup


def compile_seconds(args, depth: int) -> tuple[float, float]:
    """(wall, CPU user+sys) seconds to lower and compile the Extractor's step for a model of `depth`
    blocks (the last one requested), on abstract random-weight shapes, no persistent cache."""
    import jax
    import jax.numpy as jnp

    from llm_activations.model.attention import backend_for
    from llm_activations.model.extractor import make_step
    from llm_activations.model.specs import ParamSpec, param_specs

    c = bench_config(argparse.Namespace(**{**vars(args), "layers": depth}))
    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(c, depth),
                          is_leaf=lambda x: isinstance(x, ParamSpec))
    ints = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32)
    step = make_step(c, [depth - 1], None, ml_dtypes.bfloat16, backend_for(jax.devices()[:1], dtype), args.hooks)
    t, cpu = time.perf_counter(), os.times()
    jax.jit(step).lower(params, ints, ints, ints).compile()
    end = os.times()
    return time.perf_counter() - t, end.user - cpu.user + end.system - cpu.system


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shard-mb", type=int, default=64)
    p.add_argument("--compile-depths", type=int, nargs="+", help="only measure compile seconds at these depths")
    p.add_argument("--hooks", nargs="+", default=list(hk.DEFAULT_HOOKS), help=f"hook points captured ({', '.join(hk.HOOKS)})")
    args = p.parse_args(argv)
    args.hooks = hk.check_hooks(args.hooks)
    if args.compile_depths:
        import jax

        jax.config.update("jax_compilation_cache_dir", None)  # measure compiles, not cache reads
        for depth in args.compile_depths:
            wall, cpu = compile_seconds(args, depth)
            print(f"compile, {depth} layers, {len(args.hooks)} hook(s), {args.compute_dtype}, "
                  f"batch {args.batch_size} x seq {args.seq_len}: "
                  f"{wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        return 0
    c = bench_config(args)
    with tempfile.TemporaryDirectory(prefix="bench_model_") as folder:
        size = write_checkpoint(folder, c, args.shard_mb)
        loaded = c.param_count() * 2
        files = len([n for n in os.listdir(folder) if n.endswith(".safetensors")])
        print(f"model: hidden={c.hidden_size} layers={c.num_layers} heads={c.num_heads}/{c.num_kv_heads} "
              f"mlp={c.intermediate_size} vocab={c.vocab_size}; {c.param_count() / 1e6:.0f}M params without lm_head")
        print(f"checkpoint: {size / 2**20:.0f} MiB bfloat16 in {files} files ({loaded / 2**20:.0f} MiB loaded; lm_head and final norm skipped)")
        base, _ = peak_rss(folder, load=False)
        peak, seconds = peak_rss(folder, load=True)
        print(f"peak RSS: baseline (python + jax + mesh) {base / 2**20:.0f} MiB; loading {peak / 2**20:.0f} MiB in {seconds:.1f} s")
        print(f"  load overhead over baseline {(peak - base) / 2**20:.0f} MiB = {(peak - base) / size:.2f} x checkpoint size "
              f"(goal <= 1.20); {(peak - base) / loaded:.2f} x bytes loaded")
        tps, compiled, setup = throughput(folder, args)
        print(f"forward ({args.compute_dtype}, batch {args.batch_size} x seq {args.seq_len}, last layer): "
              f"{tps:,.0f} tokens/s over {args.steps} steps; setup (load + compile) {setup:.1f} s, of which compile "
              f"{compiled.seconds:.1f} s ({'from the cache' if compiled.cache_hit else 'cold'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
