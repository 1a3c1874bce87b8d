"""Mesh shapes, the rules table, and sharded results equal to one device (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_activations.model import sharding
from llm_activations.model.config import load_model_config
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.model.extractor import Extractor
from tiny_models import cached_checkpoint, packed_batch

BATCH, SEQ_LEN, LAYERS = 8, 32, [1, 3]
ROWS = [[10, 22], [32], [5], [], [16, 16], [31], [3, 4, 5], [20]]


@pytest.fixture(scope="module")
def folder():
    return cached_checkpoint("qwen2")[0]  # 8 heads, 4 kv heads, mlp 128: model in {1, 2, 4}


@pytest.fixture(scope="module")
def config(folder):
    return load_model_config(folder)[0]


@pytest.fixture(scope="module")
def one_device(folder):
    ex = Extractor(folder, layers=LAYERS, batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=(1, 1))
    return ex(*packed_batch(ROWS, SEQ_LEN)[:3])


def test_eight_fake_devices():
    assert len(jax.local_devices()) == 8


def test_rules_table():
    assert sharding.logical_to_spec(("embed", "heads", "head_dim")) == P(None, "model", None)
    assert sharding.logical_to_spec(("mlp", "embed")) == P("model", None)
    assert sharding.logical_to_spec(("batch", "seq", "embed")) == P("data", None, None)
    assert sharding.logical_to_spec(("vocab", "embed")) == P(None, None)


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4), (1, 4), (2, 1)])
def test_sharded_equals_one_device(folder, one_device, shape):
    ex = Extractor(folder, layers=LAYERS, batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=shape)
    assert dict(ex.mesh.shape) == {"data": shape[0], "model": shape[1]}
    assert ex.mesh.devices.size == shape[0] * shape[1]
    qkv = ex.params["layers"]["qkv"]  # [L, D, K, G + 2, H]: split over kv heads, each with its query heads
    assert qkv.sharding.spec == P(None, None, "model", None, None)
    k, g = ex.config.num_kv_heads, ex.config.num_heads // ex.config.num_kv_heads
    assert qkv.addressable_shards[0].data.shape == (max(LAYERS) + 1, 64, k // shape[1], g + 2, 8)  # heads really split
    out = ex(*packed_batch(ROWS, SEQ_LEN)[:3])
    for layer in LAYERS:
        # only the summation order of the split matmuls differs
        np.testing.assert_allclose(out.activations[("resid_post", layer)], one_device.activations[("resid_post", layer)], rtol=1e-5, atol=1e-5)
        a, b = out.moments[("resid_post", layer)], one_device.moments[("resid_post", layer)]
        assert a.count == b.count == sum(map(sum, ROWS))
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.m2, b.m2, rtol=1e-4)
        assert a.norm_sum == pytest.approx(b.norm_sum, rel=1e-5)


def test_automatic_shape_on_cpu_is_all_data(config):
    # CPU devices report no memory limit: assume the weights fit, so no tensor parallelism
    assert sharding.auto_mesh_shape(config, 8, np.float32) == (8, 1)
    assert sharding.auto_mesh_shape(config, 6, np.float32) == (6, 1)  # data must divide the batch
    assert sharding.auto_mesh_shape(config, 5, np.float32) == (5, 1)
    assert sharding.auto_mesh_shape(config, 7, np.float32) == (7, 1)
    assert sharding.make_mesh(None, config, 4, np.float32).shape == {"data": 4, "model": 1}


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
def test_splash_kernel_sharded_equals_one_device(folder, one_device, shape):
    """The Pallas kernel runs per device under shard_map (batch over "data", heads over "model")."""
    ex = Extractor(folder, layers=LAYERS, batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=shape, attention="splash")
    out = ex(*packed_batch(ROWS, SEQ_LEN)[:3])
    for layer in LAYERS:
        key = ("resid_post", layer)
        np.testing.assert_allclose(out.activations[key], one_device.activations[key], rtol=1e-5, atol=1e-5)


def test_rules_give_the_stacked_blocks_axis_to_no_mesh_axis():
    assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P(None, None, "model")


class _Device:
    """An accelerator as auto_mesh_shape sees it: only its memory statistics."""

    def __init__(self, bytes_limit: int):
        self.bytes_limit = bytes_limit

    def memory_stats(self):
        return {"bytes_limit": self.bytes_limit}


def test_automatic_shape_splits_the_model_when_it_does_not_fit(config):
    full = sharding.weight_bytes_per_device(config, 1, np.float32)
    half = sharding.weight_bytes_per_device(config, 2, np.float32)
    # memory for the half-split weights but not the whole: model=2, the remaining 4 devices data
    roomy = [_Device(int((half + full) / 2 / sharding.WEIGHT_MEMORY_FRACTION))] * 8
    assert sharding.auto_mesh_shape(config, 8, np.float32, roomy) == (4, 2)
    # nothing fits: the largest valid split (4 = kv heads), not an invalid 8
    assert sharding.auto_mesh_shape(config, 8, np.float32, [_Device(1)] * 8) == (2, 4)


@pytest.mark.parametrize("shape, batch, message", [
    ((1, 8), 8, r"^mesh shape \(data=1, model=8\) is invalid: num_key_value_heads=4 is not divisible by model=8$"),
    ((1, 3), 8, r"num_attention_heads=8 is not divisible by model=3"),
    ((4, 1), 6, r"^mesh shape \(data=4, model=1\) is invalid: batch size 6 is not divisible by data=4$"),
    ((4, 4), 8, r"^mesh shape \(data=4, model=4\) needs 16 devices but only 8 are available$"),
    ((0, 1), 8, r"two positive integers"),
])
def test_invalid_shapes(config, shape, batch, message):
    with pytest.raises(UsageError, match=message):
        sharding.make_mesh(shape, config, batch, np.float32)


@pytest.mark.parametrize("shape, attention", [((2, 4), "xla"), ((1, 4), "splash")])
def test_every_hook_sharded_equals_one_device(folder, shape, attention):
    """Every hook's carry in the layer scan (z is heads x head_dim wide, its heads split over
    "model") gives the one-device values, with the fused kernel under shard_map too."""
    kw = dict(layers=LAYERS, batch_size=BATCH, seq_len=SEQ_LEN, compute_dtype="float32", storage_dtype="float32",
              hooks=hk.HOOKS)
    batch = packed_batch(ROWS, SEQ_LEN)[:3]
    want = Extractor(folder, mesh_shape=(1, 1), **kw)(*batch).activations
    got = Extractor(folder, mesh_shape=shape, attention=attention, **kw)(*batch).activations
    assert sorted(got) == sorted(want) == sorted((h, l) for h in hk.HOOKS for l in LAYERS)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=str(key))
