"""llm_activations: LLM residual-stream activations at scale, for SAE training and interpretability.

Apache Beam pipeline + jitted, mesh-sharded JAX Qwen2-family model -> per-layer TFRecord shards and
metadata.json; read back with tf.data (`reader.activation_dataset`) or plain NumPy.
"""

__version__ = "0.1.0"
