"""FLOPs and memory of the forward step: one model, shared by `plan` and the benchmarks.

Pure arithmetic on a ModelConfig (no JAX), so `plan` stays light. Symbols: T = seq_len, D = hidden,
F = intermediate, q = heads x head_dim, kv = kv_heads x head_dim, n = heads, M = the mesh's model
axis, b = compute bytes, s = storage bytes.

FLOPs per token (the MFU numerator, the convention of the PaLM paper's appendix B):
    per block: 2 x matmul weights [D (q + 2 kv) + q D + 3 D F]   (biases and norms are negligible)
             + causal attention 2 x 2 x q x (T + 1) / 2          (QK^T and AV over the keys a query sees)
The embedding is a lookup (no FLOPs); no final norm or lm_head runs. The attention runs causally in
every implementation (query blocks that skip later keys on CPU, splash / flash kernels on
accelerators), so this count matches the work actually done up to the kernels' block granularity.

Working memory per row, the peak of one block (blocks run one after another in a scan), with a
fused attention kernel (splash on TPU, cuDNN / tokamax on GPU), which never materialises scores.
What is alive, read from the TPU compiler's buffer assignment of the step (`plan --topology` with
XLA_FLAGS=--xla_dump_to); the block's peak is the largest of its MLP, its attention and, for Qwen3
with 2 query heads per kv head, its qk-norm:
    MLP  mlp        T F b / M   the gate GEMM's output; silu(gate) * up is written over it, and up
                                never exists whole (two GEMMs on gate_up's halves, transformer.mlp)
         residual   T D b       the stream after attention (x + attn_out) that the MLP's output is
                                added to; 2 T D b at M = 1, where the compiler reports 0.86 T D b
                                per row more (outside the buffer the MLP shares; not traced further)
    attention       T x [(n + 2 kv) L(H) b + n L(H) 4 + n L(H/2) b + 2 L(H/2) 4]   (n, kv: heads per
                    chip; L(w): w rounded up to whole 128-lane tiles, as TPU arrays are stored):
                    q|k|v's GEMM output, q in float32 for RoPE (transformer.rope), the half of q
                    RoPE is writing, RoPE's float32 cos and sin. It is the peak only where the MLP
                    is small against the heads, or head_dim is 64 (Qwen2.5-0.5B, whose halves of
                    32 take four times their size)
    qk-norm         T [(n + 2 kv) L(H) b + 2 n L(H) 4] + 2 T D b (the stream x, and the output's
                    buffer, which the compiler counts in temporaries there, at M = 1 and 2 alike):
                    Qwen3 norms q in float32, and the compiler holds q twice, its convert in the
                    GEMM's T-minor layout and the normed copy in the head-minor one (a relayout,
                    not in place). With 2 query heads per kv head it does q before k and v, so
                    q|k|v's output is alive too: Qwen3-0.6B, a Qwen3-1.7B shape; with 4 (Qwen3-4B,
                    8B, and Qwen3-0.6B with its kv heads halved, nothing else changed) it does k and
                    v first, q's float32 pair (+ x) is at most the other phases, and the term is
                    left out. A scheduling order seen with libtpu 0.0.42.1, not a law: group
                    sizes 1 and 3 were not compiled (cost.QK_NORM_WHOLE_QKV_GROUP)
  and in both:
    carry           T D b       the scan's carry, unless the deepest resid_post is captured: then
                                the carry is that output's own buffer
    captures        T (K + 2 D) b   K = values per token kept in the scan's [R, B, T, width]
                                carries (every captured output but the deepest resid_post), plus the
                                slot a block rewrites, old and new value (transformer.forward)
    outputs         T V s       the step's outputs (V = values per token of all captured outputs)
Under memory pressure, without a model axis, the TPU compiler may also update the residual stream
in place, so that the residual term is not held ("lean"); whether it does is its own heuristic,
decided against the chip's own HBM (not `plan --memory-gib`), and this model does not predict it:
largest batches count the residual, and lean_rows_per_chip is an upper bound.
Measured (libtpu 0.0.42.1; compiled temporaries per row, the slope between two batches, against
the terms above less the outputs):
    Qwen2.5-7B T 2048, M = 1, one layer     104.86 MB   (model 106.95)
    Qwen2.5-7B T 2048, M = 1, four layers   165.6 MB    (model 180.4)
    Qwen2.5-7B T 2048, M = 2, one layer      53.48 MB   (model 53.48)   M = 4: 34.09 MB (model 34.08)
    Qwen2.5-7B T 2048, M = 2, four layers   121.64 MB   (model 126.9)
    Qwen2.5-0.5B T 512, M = 1 (attention)     8.26 MB   (model 8.39; 1610 rows, one compile)
    Qwen3-0.6B T 512, M = 1 (qk-norm)        15.21 MB   (model 14.68; 883 rows, one compile)
Lean: Qwen2.5-7B on v5e (16 GiB) went lean from 60 rows per chip (77.6 MB per row at 79 rows: the
MLP term alone), as on v4 (32 GiB) at 250 rows; Qwen2.5-3B (four layers, T = 1024, v4) went half
way; Qwen3-8B on v5e did not. BENCHMARKS.md ("Issue 23, recalibration") has the figures, and the
largest batches: the arithmetic within 6% of the compiled for 14 of 15 cases, not the lean one;
Qwen3-0.6B (T 512 and 2048, mesh 4,1) and the Qwen3-1.7B shape, 38-52% over before the qk-norm
term, are 5.7-5.9% over with it, and 0.6B at mesh 2,2 11% (25% before) ("Issue 23, the Qwen3-0.6B
case"; the rest is the heap's packing, whose waste jumps by 3.7 GB from 883 to 884 rows per chip
there, and is not modelled: plan prints a caution for these shapes). GPU kernels
(cuDNN, tokamax) take the same formula, not calibrated on a GPU.
The blocked "xla" attention (CPU; float32 on GPU) keeps the conservative per-tensor sum:
    residual + normed input 2 T D b, q/k/v T (q + 2 kv) b / M, attention output T q b / M,
    MLP gate, up, gate*up 3 T F b / M, and one query block of float32 logits + probabilities
    2 (n / M) x query_block x T x 4.
"""

from __future__ import annotations

import math

from llm_activations.model.config import ModelConfig

# Queries per attention block on accelerators (the CPU reference path uses smaller blocks); the
# largest logits tile the blocked attention keeps live.
ACCELERATOR_QUERY_BLOCK = 512

# The lanes of a TPU vector register: the last dimension of an array in HBM is padded to a multiple
# (a head_dim of 64, or RoPE's halves of one, take twice or four times their size).
TPU_LANES = 128


# What extract's attention "auto" picks per platform (attention.backend_for); here, without JAX, so
# that plan predicts the same kernel. cuDNN's kernel takes only 16-bit inputs: float32 uses "xla".
AUTO_ATTENTION = {"cpu": "xla", "tpu": "splash", "gpu": "cudnn"}


def auto_attention(platform: str, itemsize: int) -> str:
    """The attention kernel "auto" means on this platform for a compute dtype of `itemsize` bytes."""
    kernel = AUTO_ATTENTION.get(platform, "xla")
    return "xla" if kernel == "cudnn" and itemsize != 2 else kernel


def matmul_params_per_block(c: ModelConfig) -> int:
    """Weights of one block's matmuls (q, k, v, o projections and the SwiGLU MLP)."""
    d = c.hidden_size
    return d * (c.q_size + 2 * c.kv_size) + c.q_size * d + 3 * d * c.intermediate_size


def weight_bytes_per_device(specs, rules: dict, axis_sizes: dict, itemsize: int) -> int:
    """Bytes of weights one device holds: each spec's elements divided, per dimension, by the size
    of the mesh axis its logical axis maps to (rules: logical -> mesh axis or None; axis_sizes:
    mesh axis -> size), rounded up per dimension as a sharded array's shard shape is.

    specs is any nesting of dicts whose leaves have .shape and .axes (specs.ParamSpec), so a
    fused or renamed weight is counted as declared. Plain Python: `plan` needs no JAX for it.
    """
    if hasattr(specs, "axes"):
        n = 1
        for size, axis in zip(specs.shape, specs.axes):
            mesh_axis = rules.get(axis) if axis is not None else None
            n *= -(-size // axis_sizes.get(mesh_axis, 1)) if mesh_axis else size
        return n * itemsize
    return sum(weight_bytes_per_device(v, rules, axis_sizes, itemsize) for v in specs.values())


def flops_per_token(c: ModelConfig, seq_len: int, blocks: int | None = None) -> float:
    """Model FLOPs per token of a step running blocks 0..blocks-1 (all blocks when None)."""
    blocks = c.num_layers if blocks is None else blocks
    attention = 2 * 2 * c.q_size * (seq_len + 1) / 2
    return blocks * (2 * matmul_params_per_block(c) + attention)


def lanes(width: int) -> int:
    """A TPU array's last dimension as stored: padded to whole 128-lane tiles."""
    return -(-width // TPU_LANES) * TPU_LANES


def _qkv_out(c: ModelConfig, model_axis: int, compute_bytes: int) -> tuple[int, int]:
    """(query heads per chip, bytes per token of q|k|v's GEMM output on one chip, lane-padded)."""
    n, kv = -(-c.num_heads // model_axis), -(-c.num_kv_heads // model_axis)
    return n, (n + 2 * kv) * lanes(c.head_dim) * compute_bytes


def attention_bytes_per_token(c: ModelConfig, model_axis: int = 1, compute_bytes: int = 2) -> int:
    """Bytes per token alive at the attention's peak on TPU, last dimensions lane-padded (module
    doc): q|k|v's GEMM output, q in float32 for RoPE (transformer.rope), the half of q RoPE is
    writing, and RoPE's float32 cos and sin tables."""
    n, qkv = _qkv_out(c, model_axis, compute_bytes)
    h = c.head_dim
    return qkv + n * lanes(h) * 4 + n * lanes(h // 2) * compute_bytes + 2 * lanes(h // 2) * 4


# Query heads per kv head up to which the TPU compiler (libtpu 0.0.42.1) keeps q|k|v's GEMM output
# alive through q's float32 qk-norm (module doc): seen at 2 (Qwen3-0.6B, a Qwen3-1.7B shape), not at 4
# (Qwen3-4B, 8B, and Qwen3-0.6B with its kv heads halved, which changes nothing else).
QK_NORM_WHOLE_QKV_GROUP = 2


def qk_norm_bytes_per_token(c: ModelConfig, model_axis: int = 1, compute_bytes: int = 2) -> int:
    """Bytes per token alive at the qk-norm of q on TPU where the compiler schedules it before k and v
    (qk_norm and group_size <= QK_NORM_WHOLE_QKV_GROUP; else 0): q|k|v's GEMM output, and q in float32
    twice, the convert in the GEMM's layout and the normed copy in the head-minor one (a relayout, so
    not in place). The residual stream beside it is row_bytes' (module doc)."""
    if not c.qk_norm or c.group_size > QK_NORM_WHOLE_QKV_GROUP:
        return 0
    n, qkv = _qkv_out(c, model_axis, compute_bytes)
    return qkv + 2 * n * lanes(c.head_dim) * 4


def row_bytes(c: ModelConfig, seq_len: int, *, model_axis: int = 1, compute_bytes: int = 2,
              storage_bytes: int = 2, outputs: int = 1, output_values: int | None = None,
              carry_is_output: bool = True, attention: str = "xla",
              query_block: int = ACCELERATOR_QUERY_BLOCK) -> dict[str, int]:
    """Peak working memory of one row (sequence) on one chip, by component (module doc).

    output_values: values per token over all captured (hook, layer) outputs; default outputs x D.
    carry_is_output: the deepest layer's resid_post is among them (the scan's final carry is then
    that output). attention: the kernel (attention.IMPLEMENTATIONS). The fused kernels (splash,
    cuDNN, tokamax) never materialise scores, and the rest is what the TPU compiler holds; the
    blocked "xla" path keeps the conservative per-tensor sum and one logits tile.
    """
    t, d, m, b = seq_len, c.hidden_size, model_axis, compute_bytes
    output_values = outputs * d if output_values is None else output_values
    stored = t * output_values * storage_bytes
    if attention != "xla":
        phases = [{"residual": (2 if m == 1 else 1) * t * d * b, "mlp": t * c.intermediate_size * b // m},
                  {"attention": t * attention_bytes_per_token(c, m, b)}]
        if qk_norm_bytes_per_token(c, m, b):
            # x and the output's buffer, which the compiler counts in temporaries here at M = 2 as well
            phases.append({"qk_norm": t * qk_norm_bytes_per_token(c, m, b), "stream": 2 * t * d * b})
        rows = max(phases, key=lambda phase: sum(phase.values()))  # ties: the MLP, then the attention
        if not (carry_is_output and storage_bytes == compute_bytes):
            rows["carry"] = t * d * b
        kept = output_values - (d if carry_is_output else 0)
        if kept > 0:
            rows["captures"] = t * (kept + 2 * d) * b
        return {**rows, "outputs": stored}
    return {
        "residual": 2 * t * d * b,
        "qkv": t * (c.q_size + 2 * c.kv_size) * b // m,
        "attention_scores": 2 * math.ceil(c.num_heads / m) * min(query_block, t) * t * 4,
        "attention_out": t * c.q_size * b // m,
        "mlp": 3 * t * c.intermediate_size * b // m,
        "outputs": stored,
    }


def rows_per_chip(row: dict[str, int], usable_bytes: int, weight_bytes: int) -> int:
    """Rows of `row` (row_bytes) that fit beside the weights in usable_bytes."""
    return max(0, (usable_bytes - weight_bytes) // sum(row.values()))


def lean_rows_per_chip(row: dict[str, int], usable_bytes: int, weight_bytes: int, model_axis: int) -> int | None:
    """Rows that fit if the TPU compiler updates the residual stream in place (module doc): an
    upper bound it reached for some models and not others; None with a model axis, where it never did."""
    if model_axis > 1 or "residual" not in row:
        return None
    return max(0, (usable_bytes - weight_bytes) // (sum(row.values()) - row["residual"]))
