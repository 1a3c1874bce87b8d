"""Compile the extract step for a TPU slice without a TPU: deviceless ahead-of-time compilation.

libtpu (the `tpu` extra) holds the TPU compiler, and JAX can hand it a topology of compile-only
devices (`jax.experimental.topologies`). The program compiled here is the one `extract` runs
(extractor.jit_step: the same step, hooks, layers, dtypes, mesh rules and attention choice, which
for TPU devices is splash attention through Mosaic), with abstract weights: nothing is loaded and
nothing runs. The compiler then says exactly what one chip holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import jax

from llm_activations.errors import UsageError
from llm_activations.format import dtypes
from llm_activations.model import sharding
from llm_activations.model.attention import backend_for
from llm_activations.model.chips import Topology
from llm_activations.model.config import ModelConfig
from llm_activations.model.extractor import jit_step
from llm_activations.model.specs import ParamSpec, param_specs
from llm_activations.model.transformer import param_shardings

EXTRA = "pip install 'llm_activations[tpu]'"


@dataclass(frozen=True)
class Compiled:
    """What the compiler reports for one (batch_size, seq_len) step on one device of the mesh."""

    batch_size: int
    fits: bool  # compiled, and peak_bytes <= the budget it was checked against
    compile_seconds: float
    weight_bytes: int | None = None  # the params' bytes per device under the compiled program's shardings
    argument_bytes: int | None = None  # weights + inputs per device, in TPU tiles (None: out of HBM)
    output_bytes: int | None = None
    temp_bytes: int | None = None
    peak_bytes: int | None = None  # arguments + outputs - aliased + temporaries + program
    splash_kernels: int = 0  # Mosaic splash-attention custom calls in the compiled program
    error: str | None = None  # the compiler's out-of-memory message


def topology_devices(topology: Topology) -> list:
    """The compile-only devices of process 0 of the slice (one host: what one extract process sees).

    Raises UsageError naming the extra when libtpu is not installed.
    """
    # plan never runs on a device: keep JAX off any attached TPU (which an extract may be using),
    # and name the slice for libtpu so it does not go looking for the host's own accelerator type.
    # (After JAX's backends are up, as in the tests, this update changes nothing.)
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.chip}-{topology.chips}")
    # libtpu takes /tmp/libtpu_lockfile for the process's lifetime, so a second process (a plan
    # beside a running extract, parallel tests) would be refused; compile-only devices open no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(**topology.libtpu_kwargs()).devices
    except RuntimeError as e:  # JaxRuntimeError is one; so is "TPU support not installed"
        if "not installed" in str(e):
            raise UsageError(f"--topology needs libtpu, the TPU compiler: {EXTRA}") from None
        raise UsageError(f"--topology {topology.name}: libtpu refused it ({str(e).splitlines()[0]})") from None
    return [d for d in devices if d.process_index == 0]


def abstract_params(config: ModelConfig, num_blocks: int, mesh, dtype) -> dict:
    """The params pytree as ShapeDtypeStructs with their shardings: what checkpoint.load_params would
    place on the mesh, without a byte of it."""
    return jax.tree.map(lambda s, placed: jax.ShapeDtypeStruct(s.shape, dtype, sharding=placed),
                        param_specs(config, num_blocks), param_shardings(config, num_blocks, mesh),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def _bytes(shape, dtype, sharding) -> int:
    """Bytes of one device's shard of an array of this shape and dtype under this sharding."""
    n = 1
    for size in sharding.shard_shape(shape):
        n *= size
    return n * dtype.itemsize


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or ("exceed" in str(e) and "memory" in str(e).lower())


def compile_step(config: ModelConfig, devices: Sequence, *, layers: Sequence[int], hooks: Sequence[str],
                 batch_size: int, seq_len: int, mesh_shape: tuple[int, int] | None,
                 compute_dtype: str = "bfloat16", storage_dtype: str = "bfloat16", attention: str = "auto",
                 budget_bytes: int | None = None) -> Compiled:
    """Compile the extract step for `devices` (one host of a topology) and report its memory.

    The mesh comes from sharding.make_mesh, so a shape the host cannot hold or that does not divide
    the heads is the same one-line UsageError extract gives. An out-of-memory compile is
    fits=False with the compiler's message, not an exception.
    """
    compute, storage = dtypes.COMPUTE[compute_dtype], dtypes.STORAGE[storage_dtype]
    layers = tuple(sorted(layers))
    blocks = layers[-1] + 1
    mesh = sharding.make_mesh(mesh_shape, config, batch_size, compute, blocks, devices=devices)
    backend = backend_for(mesh.devices.flat, compute, attention)
    params = abstract_params(config, blocks, mesh, compute)
    # prepend=True: extract's default (--prepend auto) moves the stored tokens to the row's front on device
    jitted, inputs = jit_step(config, layers, tuple(hooks), mesh, storage, backend, params, batch_size, seq_len,
                              prepend=True)
    start = time.perf_counter()
    try:
        compiled = jitted.lower(params, *inputs).compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only its out-of-memory verdict is an answer
        if not _out_of_memory(e):
            raise
        message = next((line for line in str(e).splitlines() if "exceed" in line or "RESOURCE" in line), str(e))
        return Compiled(batch_size, False, time.perf_counter() - start, error=message.strip()[:300])
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)
    # The params' logical bytes under the shardings the program was compiled with; argument_bytes
    # is larger by the TPU's tile padding of small dimensions (norm and bias stacks).
    compiled_params = compiled.input_shardings[0][0]
    weights = sum(_bytes(a.shape, a.dtype, sh) for a, sh in zip(jax.tree.leaves(params), jax.tree.leaves(compiled_params)))
    text = compiled.as_text()
    splash = sum(1 for line in text.splitlines() if "tpu_custom_call" in line and "splash" in line)
    return Compiled(batch_size, budget_bytes is None or peak <= budget_bytes, seconds, weights, m.argument_size_in_bytes,
                    m.output_size_in_bytes, m.temp_size_in_bytes, peak, splash)


def largest_rows(compile_rows, budget_bytes: int, guess: int) -> tuple[int, list[Compiled]]:
    """(the most rows per data shard that fit, every Compiled tried in order of rows), by compiles.

    compile_rows(r) compiles the step with r rows per data shard. Starting from `guess` (the
    arithmetic plan's), each compile's own figures give the next guess: its bytes beyond the
    arguments, per row, divided into what the budget leaves after the arguments (a secant step;
    small batches are no guide, since the TPU compiler keeps small temporaries in on-chip memory
    that HBM figures do not show). Then the bracket [fits, does not fit] is widened by doubling
    steps and narrowed by bisection until it is one row wide, so the answer always comes with a
    compile that fits and, one row above it, one that does not.
    """
    tried: dict[int, Compiled] = {}

    def fits(r: int) -> bool:
        if r not in tried:
            tried[r] = compile_rows(r)
        return tried[r].fits

    r = max(1, guess)
    for _ in range(3):
        if r in tried:
            break
        fits(r)
        c = tried[r]
        if c.peak_bytes is None:  # the compiler ran out of HBM: no figures, halve
            r = max(1, r // 2)
            continue
        per_row = max(1, (c.peak_bytes - c.argument_bytes) / r)
        r = max(1, int((budget_bytes - c.argument_bytes) // per_row))
    lo = max((k for k, c in tried.items() if c.fits), default=0)
    above = [k for k, c in tried.items() if not c.fits and k > lo]
    hi = min(above) if above else None
    step = 1
    while hi is None:
        if fits(lo + step):
            lo, step = lo + step, step * 2
        else:
            hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, [tried[k] for k in sorted(tried)]
