"""GPU: tokens/s and model-FLOPs utilisation of the forward step in bfloat16, against transformers.

For Qwen2.5-0.5B (16 x 2048), -1.5B (8 x 2048) and -7B (4 x 2048) shapes, in one run:
  * our step, once per attention kernel (--attention; default every GPU candidate installed:
    cudnn, xla, and tokamax when importable). The step is the Extractor's (make_step): all
    blocks as one lax.scan, activations of the last block cast to bf16 plus their moments.
    Compile seconds are measured cold and again from the persistent compilation cache (a fresh
    jit of the same step, as a second worker or run would see it);
  * transformers' Qwen2Model in eager PyTorch (bf16, sdpa attention), final norm replaced by
    identity and no lm_head: the loop a user writes, on the same shapes and tokens;
  * `extract` end to end at the 0.5B shape (--extract-model), right after that shape's rows: a
    random bf16 checkpoint written to a temporary folder (demo tokenizer), a synthetic JSONL corpus
    of ~60 batches (lognormal documents, median ~600 tokens), pipeline.run_extract in this process
    (DirectRunner) with the last layer, bf16, --num-shards 4, output on local disk. Its data
    throughput is the marginal one of bench_pipeline (a full run minus a small one, the model
    already loaded and compiled), set against the bare step row of the same attention kernel
    (issue 16's goal: >= 0.9x); compile seconds come from metadata.json's run section.
Random weights, nothing downloaded: each block weight is drawn once on the host with NumPy and
broadcast over the blocks on the device (every block computes the same work as with real weights;
no jitted initialiser). Rows are printed as soon as they are measured.

MFU = model FLOPs/s over the chip's dense bf16 peak (H100/H200: 989 TFLOP/s); model FLOPs per
token are llm_activations.model.cost.flops_per_token (the one FLOPs model, shared with `plan`):
2 x (block matmul weights) + causal attention 2 x 2 x heads x head_dim x (T+1)/2 per block
(embedding lookup, norms and softmax not counted); the same formula for both rows.

    python3 bench/gpu_bench.py                      # on the GPU host (jax[cuda], torch); < 6 minutes on an H200
    python3 bench/gpu_bench.py --tiny               # CPU smoke run of the same code paths
    python3 bench/gpu_bench.py --models Qwen2.5-7B --batch-sizes 4 --attention cudnn xla --query-blocks 512 1024

Imports no Beam except for the extract row, which runs only where apache_beam and google_crc32c
import (the GPU image has neither: bench/gpu_wheels.sh downloads their wheels to carry, and prints
the device command that installs them and runs this script). --no-extract skips the row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if "--tiny" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
# JAX and torch share the GPU: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import common  # noqa: E402  (environment and the repository on sys.path; imports no Beam)
import numpy as np  # noqa: E402

QWEN = {  # Hugging Face config.json fields of the released models (shapes only)
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
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


def say(text: str) -> None:
    print(text, flush=True)


def random_params(c, dtype, seed: int = 0):
    """The params pytree in bf16 on the default device: each weight drawn on the host by
    model.hf_weights.draw (the shared initialiser's shapes and scales, with float32 normals: half
    the time of the demo's float64 ones), one block's worth for the stacked block weights,
    broadcast over the blocks on the device."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from llm_activations.model.checkpoint import RULE_OF
    from llm_activations.model.hf_weights import draw
    from llm_activations.model.transformer import param_specs

    rng = np.random.default_rng(seed)

    def put(name: str, num_blocks: int | None):
        x = RULE_OF[name].to_ours(draw(rng, name, RULE_OF[name].hf_shape(c), np.float32), c)
        x = jax.device_put(x.astype(ml_dtypes.bfloat16))
        if num_blocks is not None:
            x = jax.jit(lambda a, n=num_blocks: jnp.broadcast_to(a[None], (n,) + a.shape).astype(dtype))(x)
        return jax.block_until_ready(x)

    specs = param_specs(c, c.num_layers)
    return {"embed": put("embed", None), "layers": {name: put(name, s.shape[0]) for name, s in specs["layers"].items()}}


def inputs(c, batch: int, seq_len: int, seed: int = 0):
    """Full rows of one segment each (what the transformers loop computes too)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, c.vocab_size, (batch, seq_len), dtype=np.int32)
    segs = np.ones((batch, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    return tokens, segs, pos


def time_steps(run, sync, steps: int) -> float:
    """Seconds per step: one warm-up, then `steps` back to back, synchronised once at the end."""
    sync(run())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = run()
    sync(out)
    return (time.perf_counter() - t0) / steps


def row(name, batch, seq_len, c, impl, seconds, peak, **extra) -> dict:
    from llm_activations.model.cost import flops_per_token

    flops = flops_per_token(c, seq_len) * batch * seq_len
    r = {"model": name, "batch x seq": f"{batch} x {seq_len}", "impl": impl, "step ms": seconds * 1e3,
         "tokens/s": batch * seq_len / seconds, "TFLOP/s": flops / seconds / 1e12, **extra}
    if peak:
        r["MFU"] = f"{flops / seconds / 1e12 / peak:.1%}"
    return r


def bench_ours(name, c, params, batch, seq_len, steps, peak, attention, query_block) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from llm_activations.model import compile_cache
    from llm_activations.model.attention import backend_for
    from llm_activations.model.extractor import make_step

    backend = backend_for(jax.devices()[:1], jnp.bfloat16, attention, query_block)
    step = make_step(c, [c.num_layers - 1], None, ml_dtypes.bfloat16, backend)
    args = [jax.device_put(x) for x in inputs(c, batch, seq_len)]
    compiled, cold = compile_cache.compile_step(jax.jit(step), params, *args)
    jax.clear_caches()  # a second worker's view: nothing in memory, the persistent cache on disk
    _, cached = compile_cache.compile_step(jax.jit(step), params, *args)
    seconds = time_steps(lambda: compiled(params, *args), jax.block_until_ready, steps)
    # with the activations copied to the host, dispatching step i+1 first (the Extractor's pattern)
    t0 = time.perf_counter()
    pending = compiled(params, *args)
    for _ in range(steps - 1):
        following = compiled(params, *args)
        jax.device_get(pending)
        pending = following
    jax.device_get(pending)
    host = (time.perf_counter() - t0) / steps
    impl = attention + (f" (query block {backend.query_block})" if backend.attention == "xla" else "")
    return row(name, batch, seq_len, c, impl, seconds, peak, **{
        "compile s cold": cold.seconds, "compile s cached": cached.seconds if cached.cache_hit else float("nan"),
        "tokens/s with host copy": batch * seq_len / host})


def bench_transformers(name, c, batch, seq_len, steps, peak, device: str) -> dict:
    import torch
    import transformers

    cfg = transformers.Qwen2Config(**{k: v for k, v in hf_config(name).items() if k not in ("architectures", "model_type")})
    with torch.device(device):  # weights drawn on the GPU, in bf16 from the start
        model = transformers.AutoModel.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model.norm = torch.nn.Identity()  # our step stops at the last block's residual stream
    tokens = torch.as_tensor(inputs(c, batch, seq_len)[0], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda *a: None)
    with torch.inference_mode():
        seconds = time_steps(lambda: model(input_ids=tokens, use_cache=False).last_hidden_state, lambda _: sync(), steps)
    model = None  # free its memory before the next shape
    if device == "cuda":
        torch.cuda.empty_cache()
    return row(name, batch, seq_len, c, f"transformers {transformers.__version__} eager (sdpa)", seconds, peak)


def extract_unavailable() -> str | None:
    """Why the extract row cannot run here, or None: it needs Beam and google-crc32c, which the
    GPU image lacks (bench/gpu_wheels.sh fetches them as wheels to carry)."""
    try:
        import apache_beam  # noqa: F401
        import google_crc32c  # noqa: F401
    except ImportError as e:
        return f"{e} (carry the wheels: bench/gpu_wheels.sh)"
    return None


def synthetic_corpus(path: str, model: str, tokens: int, seed: int = 0) -> int:
    """A JSONL corpus of about `tokens` tokens in documents of lognormal length (median ~600 tokens,
    a web corpus' shape; long ones are split into segments); returns the number of documents."""
    lengths = common.lognormal_lengths(max(64, 3 * tokens // 600), median=600, seed=seed)
    n = int(np.searchsorted(np.cumsum(lengths), tokens)) + 1
    common.write_corpus(path, lengths[:n], model=model, seed=seed)
    return n


def bench_extract(name, c, batch, seq_len, batches, cache, peak, rows) -> dict:
    """`extract` end to end (pipeline.run_extract in this process, DirectRunner) on a random
    checkpoint of this shape, the last layer in bf16, 4 shards, output on local disk.

    Three runs on one corpus: a small one (its first tenth of the documents) that loads the
    checkpoint and compiles the step, the whole corpus, then the small one again. The extractor
    stays loaded between in-process runs, so the last two differ only in data: their marginal
    throughput (tokens_full - tokens_small) / (wall_full - wall_small) is the data throughput with
    the fixed costs (model load, compile, Beam start, metadata) taken out, measured as
    bench_pipeline does. It is set against the bare step of the same shape and attention kernel
    measured above in this run.
    """
    import dataclasses
    import shutil

    import jax
    import jax.numpy as jnp

    import bench_model  # the one random bf16 HF-checkpoint writer (KEY_TABLE's keys and shapes)
    from llm_activations import demo
    from llm_activations.model.attention import backend_for

    tmp = tempfile.mkdtemp(prefix="gpu_bench_extract_")
    try:
        t0 = time.perf_counter()
        # The demo tokenizer's ids must be valid rows of the embedding (the tiny shape's 512 are
        # too few); the vocab size changes only the embedding gather, not the step's work.
        cm = dataclasses.replace(c, vocab_size=max(c.vocab_size, demo.VOCAB_SIZE))
        model = common.copy_demo_tokenizer(os.path.join(tmp, "model"))
        size = bench_model.write_checkpoint(model, cm, shard_mb=2048)
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = synthetic_corpus(corpus, model, batches * batch * seq_len)
        say(f"  {name} extract: checkpoint {size / 2**30:.2f} GiB and corpus of {docs:,} documents written in "
            f"{time.perf_counter() - t0:.1f} s")
        opts = dict(layers=(c.num_layers - 1,), seq_len=seq_len, batch_size=batch, compute_dtype="bfloat16",
                    dtype="bfloat16", num_shards=4, compilation_cache=cache or "none")
        small = max(4, docs // 10)

        def run(tag: str, max_docs=None) -> tuple[dict, float]:
            cpu = os.times()
            meta, wall = common.run_extract(model, [corpus], os.path.join(tmp, tag), max_docs=max_docs, **opts)
            cpu = sum(os.times()[:2]) - sum(cpu[:2])
            say(f"  {name} extract {tag}: {meta['counts']['tokens']:,} tokens in {meta['counts']['batches']} batches, "
                f"{wall:.1f} s wall ({cpu:.1f} s CPU), of which waiting on device results {meta['run']['extract_seconds']:.1f} s"
                # later runs reuse the loaded extractor, whose one compile metadata reports again
                + (f"; compile {meta['run']['compile_seconds']:.1f} s ({'cache hit' if meta['run']['compile_cache_hit'] else 'cold'})"
                   if tag == "small-cold" else ""))
            return meta, wall

        cold, cold_wall = run("small-cold", small)
        full, wall = run("full")
        warm, warm_wall = run("small-warm", small)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens, small_tokens = full["counts"]["tokens"], warm["counts"]["tokens"]
    if wall - warm_wall <= 0.05 * wall:  # noise, not data: the runs differ too little to separate
        raise RuntimeError(f"the full run ({wall:.2f} s) took hardly longer than the small one ({warm_wall:.2f} s): "
                           "raise --extract-batches")
    marginal = (tokens - small_tokens) / (wall - warm_wall)
    attention = backend_for(jax.devices()[:1], jnp.bfloat16, "auto").attention  # what extract's Extractor picks
    bare = next((r for r in rows if r["model"] == name and r["impl"].split()[0] == attention), None)
    compile_s, hit = cold["run"]["compile_seconds"], cold["run"]["compile_cache_hit"]
    r = row(name, batch, seq_len, c, f"extract end to end ({attention}, marginal)", batch * seq_len / marginal, peak, **{
        "compile s cold": float("nan") if hit else compile_s, "compile s cached": compile_s if hit else float("nan"),
        "extract tokens": tokens, "extract wall s": wall, "fixed s": wall - tokens / marginal,
        "load + compile s": cold_wall - warm_wall,
        "whole call tokens/s": tokens / wall,
        "vs bare": marginal / bare["tokens/s"] if bare else float("nan"),
        "vs bare with host copy": marginal / bare["tokens/s with host copy"] if bare else float("nan")})
    if bare is None:
        say(f"  {name} extract: no bare-step row with the {attention} kernel to compare with")
    return r


def candidates(platform: str) -> list[str]:
    """Attention kernels to measure on this platform: every GPU candidate that can be imported."""
    if platform != "gpu":
        return ["xla", "splash"]
    names = ["cudnn", "xla"]
    try:
        import tokamax  # noqa: F401

        names.append("tokamax")
    except ImportError:
        say("(tokamax is not installed: its row is skipped)")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B"], choices=list(QWEN))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 8, 4], help="one per model")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attention", nargs="+", help="attention kernels to measure (default: every candidate here)")
    p.add_argument("--query-blocks", type=int, nargs="+", default=[0],
                   help="query blocks for the 'xla' kernel (0 = the platform's default)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    p.add_argument("--compilation-cache", help="persistent cache folder (default: a fresh temporary one, so the cold compile is cold)")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bfloat16 peak, if not recognised")
    p.add_argument("--extract", action=argparse.BooleanOptionalAction, default=True,
                   help="the extract end-to-end row (default: on where apache_beam and google_crc32c import)")
    p.add_argument("--extract-model", help="shape of the extract row (default: Qwen2.5-0.5B, or the first of --models)")
    p.add_argument("--extract-batches", type=int, default=60, help="batches of the extract row's corpus (about)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, batch 2 x seq 256, 2 steps, extract over ~200 batches")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batch_sizes, args.seq_len, args.steps = ["tiny"], [2], 256, 2
        args.extract_batches = 200  # ~100k tokens: enough for the full run to stand out from the fixed costs on CPU
    if args.extract_model is None:
        args.extract_model = "Qwen2.5-0.5B" if "Qwen2.5-0.5B" in args.models else args.models[0]
    skip_extract = "--no-extract" if not args.extract else extract_unavailable()
    if skip_extract is None and args.extract_model not in args.models:
        skip_extract = f"--extract-model {args.extract_model} is not among --models (its bare step is the reference)"

    import jax
    import jax.numpy as jnp

    from llm_activations.model import compile_cache
    from llm_activations.model.attention import platform_of
    from llm_activations.model.config import model_config_from_hf

    started = time.perf_counter()
    cache = compile_cache.configure(args.compilation_cache or tempfile.mkdtemp(prefix="gpu_bench_xla_"))
    device = jax.devices()[0]
    platform = platform_of([device])
    peak = peak_tflops(device, args.peak_tflops)
    attention = args.attention or candidates(platform)
    say(f"gpu_bench: device {device.platform} {getattr(device, 'device_kind', '')} x {jax.device_count()} (timing uses one); "
        f"bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}; jax {jax.__version__}; "
        f"attention {attention}; compilation cache {cache}")
    if skip_extract:
        say(f"(extract row skipped: {skip_extract})")
    rows = []
    batches = args.batch_sizes + [args.batch_sizes[-1]] * (len(args.models) - len(args.batch_sizes))
    for name, batch in zip(args.models, batches):
        c = model_config_from_hf(hf_config(name))
        t0 = time.perf_counter()
        params = random_params(c, jnp.bfloat16)
        say(f"{name}: {c.param_count() / 1e9:.2f}B params drawn and placed in {time.perf_counter() - t0:.1f} s")
        for impl in attention:
            for qb in (args.query_blocks if impl == "xla" else [0]):
                try:
                    rows.append(bench_ours(name, c, params, batch, args.seq_len, args.steps, peak, impl, qb or None))
                except Exception as e:  # one kernel failing must not lose the other rows
                    say(f"  {name} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                say("  " + format_row(rows[-1]))
        del params
        if not args.no_transformers:
            try:
                rows.append(bench_transformers(name, c, batch, args.seq_len, args.steps, peak,
                                               "cuda" if platform == "gpu" else "cpu"))
                say("  " + format_row(rows[-1]))
            except Exception as e:
                say(f"  {name} transformers: FAILED {type(e).__name__}: {str(e)[:300]}")
        if name == args.extract_model and skip_extract is None:
            try:
                rows.append(bench_extract(name, c, batch, args.seq_len, args.extract_batches, cache, peak, rows))
                say("  " + format_row(rows[-1]))
            except Exception as e:
                say(f"  {name} extract: FAILED {type(e).__name__}: {str(e)[:300]}")
        say(f"  ({time.perf_counter() - started:.0f} s so far)")
    print()
    common.table(rows)
    goals(rows)
    return 0


def format_row(r: dict) -> str:
    return ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())


def goals(rows: list[dict]) -> None:
    """The issues' goals: >= 1.2x transformers' tokens/s at every shape, MFU >= 55% at 7B, compile <= 20 s cold /
    5 s cached (issue 10); extract's data throughput >= 0.9x the bare step at the 0.5B shape (issue 16)."""
    for name in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == name and not r["impl"].startswith(("transformers", "extract"))]
        peer = next((r for r in rows if r["model"] == name and r["impl"].startswith("transformers")), None)
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens/s"])
        line = f"{name}: best ours {best['impl']} {best['tokens/s']:,.0f} tok/s"
        if peer:
            ratio = best["tokens/s"] / peer["tokens/s"]
            line += f" = {ratio:.2f}x transformers (goal >= 1.2x: {'met' if ratio >= 1.2 else 'NOT met'})"
        if "MFU" in best:
            line += f"; MFU {best['MFU']}"
        line += f"; compile {best['compile s cold']:.1f} s cold, {best['compile s cached']:.1f} s cached"
        say(line)
        for r in rows:
            if r["model"] == name and r["impl"].startswith("extract"):
                say(f"{name}: extract data throughput {r['tokens/s']:,.0f} tok/s = {r['vs bare']:.2f}x the bare step "
                    f"(goal >= 0.9x: {'met' if r['vs bare'] >= 0.9 else 'NOT met'}), {r['vs bare with host copy']:.2f}x "
                    f"the bare step with its host copy; whole call {r['whole call tokens/s']:,.0f} tok/s with the "
                    f"model loaded, load + compile {r['load + compile s']:.1f} s more")


if __name__ == "__main__":
    sys.exit(main())
