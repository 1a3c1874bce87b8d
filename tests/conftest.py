"""Test session setup: 8 fake CPU devices for sharding tests, set before JAX is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")  # no progress bars in test logs
# Tests never write into the user's compilation cache; the cache tests pass their own folder.
os.environ.setdefault("LLM_ACTIVATIONS_COMPILATION_CACHE", "none")
