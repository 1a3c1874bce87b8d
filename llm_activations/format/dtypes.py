"""The dtype names a dataset and a run may use, and what each means in NumPy: one table.

Storage dtypes are what metadata.json's `dtype` may say; compute dtypes are what the model may run
in. bfloat16 comes from ml_dtypes (the NumPy extension JAX itself uses), so readers need neither
JAX nor TensorFlow to decode it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from llm_activations.errors import DatasetError

# name -> little-endian NumPy dtype of the stored activations
STORAGE = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
# dtypes the forward step may compute in (float16 overflows in Qwen2's residual stream)
COMPUTE = {"bfloat16": STORAGE["bfloat16"], "float32": STORAGE["float32"]}


def numpy_dtype(name: str) -> np.dtype:
    """Storage dtype name from metadata.json -> little-endian NumPy dtype."""
    try:
        return STORAGE[name]
    except KeyError:
        raise DatasetError(f"metadata dtype {name!r} is not one of {', '.join(STORAGE)}") from None


def itemsize(name: str) -> int:
    """Bytes per element of a storage or compute dtype name."""
    return numpy_dtype(name).itemsize
