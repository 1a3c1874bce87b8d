"""GPU: tokens/s and model-FLOPs utilisation of the forward step in bfloat16.

Qwen2.5-0.5B- and Qwen2.5-1.5B-shaped models with random bfloat16 weights drawn directly on the
device (one jitted initialiser; nothing is downloaded, no checkpoint is read), seq_len 2048. The
step is the Extractor's: all blocks up to the last layer, activations cast to the storage dtype and
per-layer moments, compiled once. Timed two ways: device only (block until ready) and with the
activations copied to the host (what `extract` does). MFU = model FLOPs/s over the chip's dense
bfloat16 peak; model FLOPs per token = 2 x (block matmul weights) + causal attention
2 x 2 x heads x head_dim x (T+1)/2 per block (embedding lookup, norms and softmax not counted).

    .venv/bin/python bench/gpu_bench.py                 # on the GPU host; < 5 minutes
    .venv/bin/python bench/gpu_bench.py --tiny          # CPU smoke run of the same code path
    .venv/bin/python bench/gpu_bench.py --query-blocks 512 2048   # also try other attention blocking
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--tiny" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
import common  # noqa: E402

QWEN = {  # Hugging Face config.json fields of the released models (shapes only)
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def hf_config(name: str) -> dict:
    return dict(QWEN[name], architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=32768,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def model_flops_per_token(c, seq_len: int) -> float:
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    matmul = d * (q + 2 * kv) + q * d + 3 * d * f
    attention = 2 * 2 * q * (seq_len + 1) / 2
    return c.num_layers * (2 * matmul + attention)


def random_params_on_device(c, dtype, seed: int = 0):
    """The params pytree drawn by one jitted function, born on the device in bfloat16."""
    import jax
    import jax.numpy as jnp

    from llm_activations.model import transformer as model

    specs = model.param_specs(c, c.num_layers)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, model.ParamSpec))

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for s, k in zip(leaves, keys):
            x = jax.random.normal(k, s.shape, jnp.float32)
            out.append((1.0 + 0.1 * x if len(s.shape) == 1 else x * s.shape[0] ** -0.5).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.block_until_ready(init(jax.random.PRNGKey(seed)))


def bench_one(name: str, batch: int, seq_len: int, steps: int, peak: float | None, query_block: int | None) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from llm_activations.model import transformer as model
    from llm_activations.model.config import model_config_from_hf
    from llm_activations.model.extractor import make_step

    default_block = model.query_block
    if query_block:
        model.query_block = lambda t: min(t, query_block)
    try:
        c = model_config_from_hf(hf_config(name))
        t0 = time.perf_counter()
        params = random_params_on_device(c, jnp.bfloat16)
        init_s = time.perf_counter() - t0
        step = jax.jit(make_step(c, [c.num_layers - 1], None, ml_dtypes.bfloat16))
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, c.vocab_size, (batch, seq_len), dtype=np.int32))
        segs = jnp.ones((batch, seq_len), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        t0 = time.perf_counter()
        compiled = step.lower(params, tokens, segs, pos).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, tokens, segs, pos))
        t0 = time.perf_counter()
        for _ in range(steps):
            out = compiled(params, tokens, segs, pos)
        jax.block_until_ready(out)
        device_s = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        pending = compiled(params, tokens, segs, pos)
        for _ in range(steps - 1):  # dispatch i+1, then bring i to the host (the Extractor's pattern)
            following = compiled(params, tokens, segs, pos)
            jax.device_get(pending)
            pending = following
        jax.device_get(pending)
        host_s = (time.perf_counter() - t0) / steps
    finally:
        model.query_block = default_block
    flops = model_flops_per_token(c, seq_len) * batch * seq_len
    row = {"model": name, "batch x seq": f"{batch} x {seq_len}", "query block": model.query_block(seq_len) if not query_block else min(seq_len, query_block),
           "params M": c.param_count() / 1e6, "init s": init_s, "compile s": compile_s,
           "step ms": device_s * 1e3, "tokens/s": batch * seq_len / device_s, "TFLOP/s": flops / device_s / 1e12,
           "tokens/s with host copy": batch * seq_len / host_s}
    if peak:
        row["MFU"] = f"{flops / device_s / 1e12 / peak:.1%}"
        row["MFU with host copy"] = f"{flops / host_s / 1e12 / peak:.1%}"
    del params
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["Qwen2.5-0.5B", "Qwen2.5-1.5B"], choices=list(QWEN))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 8], help="one per model")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bfloat16 peak, if not recognised")
    p.add_argument("--query-blocks", type=int, nargs="+", default=[0], help="attention query block sizes to try (0 = the model's default)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, batch 2 x seq 128, 2 steps")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batch_sizes, args.seq_len, args.steps = ["tiny"], [2], 128, 2

    import jax

    common.header("gpu_bench: forward step tokens/s and MFU, bfloat16")
    device = jax.devices()[0]
    peak = peak_tflops(device, args.peak_tflops)
    print(f"device: {device.platform} {getattr(device, 'device_kind', '')} x {jax.device_count()} "
          f"(timing uses one); bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}; jax {jax.__version__}")
    rows = []
    batches = args.batch_sizes + [args.batch_sizes[-1]] * (len(args.models) - len(args.batch_sizes))
    for name, batch in zip(args.models, batches):
        for qb in args.query_blocks:
            rows.append(bench_one(name, batch, args.seq_len, args.steps, peak, qb))
            print(f"  {name} done ({rows[-1]['tokens/s']:,.0f} tokens/s)", flush=True)
    common.table(rows)
    if peak:
        for r in rows:
            mfu = float(r["MFU"].rstrip("%"))
            print(f"{r['model']} (query block {r['query block']}): MFU {r['MFU']} (goal >= 50%: {'met' if mfu >= 50 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
