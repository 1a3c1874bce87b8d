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
fused attention kernel (splash on TPU, cuDNN / tokamax on GPU), which never materialises scores:
    residual stream                   2 T D b
    one MLP intermediate              T F b / M      (XLA fuses gate, up and silu(gate) * up)
    tensor-parallel partial sums      3 T D b        (only when M > 1)
    capture buffers                   2 T (V - D) b  (V = the outputs' values per token; the scan's
                                      carry and its copy out, beyond the first D, which XLA aliases)
    captured outputs                  T x (sum of the outputs' widths) x s  (held until the step ends;
                                      a hook's width is D, or q for z)
This is what the TPU compiler reports for the step at the batch sizes that fill a chip (v5e,
Qwen2.5-7B, T = 2048: 106.98 MB of temporaries per row at M = 1 against 106.95 MB here; with 4
layers captured 197 MB against 195 MB; M = 4 about 5% more than here). Below ~10 rows the compiler keeps part of it in on-chip memory, so
small batches take less HBM than this; with a model axis it is conservative (v4, M = 2, 4 layers:
25% more per row than compiled). BENCHMARKS.md (issue 23) has the figures. GPU kernels (cuDNN,
tokamax) take the same formula, not calibrated on a GPU.
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


def matmul_params_per_block(c: ModelConfig) -> int:
    """Weights of one block's matmuls (q, k, v, o projections and the SwiGLU MLP)."""
    d = c.hidden_size
    return d * (c.q_size + 2 * c.kv_size) + c.q_size * d + 3 * d * c.intermediate_size


def weight_bytes_per_device(specs, rules: dict, axis_sizes: dict, itemsize: int) -> int:
    """Bytes of weights one device holds: each spec's elements divided, per dimension, by the size
    of the mesh axis its logical axis maps to (rules: logical -> mesh axis or None; axis_sizes:
    mesh axis -> size), rounded up per dimension as a sharded array's shard shape is.

    specs is any nesting of dicts whose leaves have .shape and .axes (transformer.ParamSpec), so a
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


def row_bytes(c: ModelConfig, seq_len: int, *, model_axis: int = 1, compute_bytes: int = 2,
              storage_bytes: int = 2, outputs: int = 1, output_values: int | None = None,
              attention: str = "xla", query_block: int = ACCELERATOR_QUERY_BLOCK) -> dict[str, int]:
    """Peak working memory of one row (sequence) on one chip, by component (module doc).

    output_values: values per token over all captured (hook, layer) outputs; default outputs x D.
    attention: the kernel (attention.IMPLEMENTATIONS). The fused kernels (splash, cuDNN, tokamax)
    never materialise scores, and the rest is calibrated to what the TPU compiler reports; the
    blocked "xla" path keeps the conservative per-tensor sum and one logits tile.
    """
    t, d, m, b = seq_len, c.hidden_size, model_axis, compute_bytes
    output_values = outputs * d if output_values is None else output_values
    stored = t * output_values * storage_bytes
    if attention != "xla":
        rows = {"residual": 2 * t * d * b, "mlp": t * c.intermediate_size * b // m}
        if m > 1:
            rows["tensor_parallel"] = 3 * t * d * b
        if output_values > d:
            rows["captures"] = 2 * t * (output_values - d) * b
        return {**rows, "outputs": stored}
    return {
        "residual": 2 * t * d * b,
        "qkv": t * (c.q_size + 2 * c.kv_size) * b // m,
        "attention_scores": 2 * math.ceil(c.num_heads / m) * min(query_block, t) * t * 4,
        "attention_out": t * c.q_size * b // m,
        "mlp": 3 * t * c.intermediate_size * b // m,
        "outputs": stored,
    }
