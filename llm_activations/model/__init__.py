"""The JAX model: config, checkpoint loading, sharding, the transformer, attention and the extractor."""
