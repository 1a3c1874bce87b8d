"""Device mesh ("data", "model") and the one table mapping logical axis names to mesh axes.

Tensor parallelism splits attention heads and the MLP's hidden dimension over "model"; the batch
is split over "data". Every weight and activation names its logical axes (model.py); nothing else
in the package mentions mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_activations.model.config import ModelConfig
from llm_activations.model.specs import MESH_AXES, RULES, check_mesh_shape, model_splits_ok  # noqa: F401  (sharding.RULES, ...)

# Fraction of a device's memory the weights may take; the rest is for activations and XLA scratch.
WEIGHT_MEMORY_FRACTION = 0.6


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names."""
    return PartitionSpec(*(RULES[a] if a is not None else None for a in axes))


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes))


def _device_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU and some plugins have no memory stats
        return None
    return (stats or {}).get("bytes_limit")


def weight_bytes_per_device(config: ModelConfig, model: int, dtype, num_layers: int | None = None) -> int:
    """Bytes of weights one device holds with `model`-way tensor parallelism (embedding replicated)."""
    layers = config.num_layers if num_layers is None else num_layers
    item = np.dtype(dtype).itemsize
    embed = config.vocab_size * config.hidden_size
    return item * (embed + layers * config.layer_param_count() // model)


def auto_mesh_shape(config: ModelConfig, batch_size: int, dtype, devices: Sequence | None = None,
                    num_layers: int | None = None) -> tuple[int, int]:
    """(data, model): the smallest valid "model" whose weights fit in device memory, the rest "data".

    Devices without memory statistics (CPU) are assumed to fit. "data" is the largest count of the
    remaining devices that divides batch_size, so a shape is always found (at worst (1, 1)).
    """
    devices = list(devices if devices is not None else jax.local_devices())
    n = len(devices)
    limit = _device_memory(devices[0])
    candidates = [m for m in range(1, n + 1) if n % m == 0 and model_splits_ok(config, m) is None]
    model = candidates[-1]
    for m in candidates:
        if limit is None or weight_bytes_per_device(config, m, dtype, num_layers) <= WEIGHT_MEMORY_FRACTION * limit:
            model = m
            break
    data = max(d for d in range(1, n // model + 1) if batch_size % d == 0)
    return data, model


def make_mesh(shape: tuple[int, int] | None, config: ModelConfig, batch_size: int, dtype,
              num_layers: int | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh over local devices (or `devices`: one host of a TPU topology, for plan --topology) with
    axes ("data", "model"); shape None picks one automatically.

    A given shape (data, model) uses the first data * model devices.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if shape is None:
        shape = auto_mesh_shape(config, batch_size, dtype, devices, num_layers)
    check_mesh_shape(shape, config, batch_size, len(devices))
    data, model = (int(s) for s in shape)
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)
