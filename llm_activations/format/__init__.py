"""The dataset format: records, metadata, manifests, stats, file access and dtypes.

Imports no JAX, Beam or TensorFlow, so that readers and tools stay light (tests/test_layout.py)."""
