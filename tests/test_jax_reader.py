"""jax_reader: batches on the device or split over a mesh, one transfer ahead, equal to the NumPy reader's."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from synthetic import make_dataset

from llm_activations import jax_reader, reader
from llm_activations.errors import UsageError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds"))
    make_dataset(root, layers=(2,), hidden_size=16, num_docs=80, seq_len=64, num_shards=3, seed=4)
    return root


def test_device_batches_equal_numpy_reader_and_stay_valid(dataset):
    kw = dict(shuffle_buffer=256, seed=9, normalize=True)
    ref = [np.array(b) for b in reader.iter_numpy_batches(dataset, 2, 64, **kw)]
    got = list(jax_reader.device_batches(dataset, 2, 64, **kw))  # all kept: host buffers must not be reused
    assert len(got) == len(ref) > 10
    for g, r in zip(got, ref):
        assert isinstance(g, jax.Array) and g.dtype == np.float32
        assert g.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(g), r)


def test_next_batch_is_put_before_the_current_one_is_handed_over(monkeypatch):
    events = []

    def host():
        for i in range(4):
            events.append(f"read {i}")
            yield np.full((2, 3), i, np.float32)

    real_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, s=None: events.append(f"put {int(x[0, 0])}") or real_put(x, s))
    for i, x in enumerate(jax_reader.prefetch_to_device(host())):
        events.append(f"got {i}")
        assert float(x[0, 0]) == i
    assert events[:6] == ["read 0", "put 0", "read 1", "put 1", "read 2", "put 2"]
    # batch i is handed over only after batch i+1's transfer was started
    for i in range(3):
        assert events.index(f"put {i + 1}") < events.index(f"got {i}")
    assert events[-1] == "got 3"


@pytest.mark.parametrize("mesh_shape,axes", [((8,), ("data",)), ((4, 2), ("data", "model"))])
def test_sharded_over_a_mesh(dataset, mesh_shape, axes):
    assert jax.device_count() == 8  # conftest: --xla_force_host_platform_device_count=8
    mesh = jax.make_mesh(mesh_shape, axes)
    sharding = NamedSharding(mesh, P("data"))
    kw = dict(shuffle_buffer=512, seed=1, with_metadata=True)
    ref = list(reader.iter_numpy_batches(dataset, 2, 64, **kw))
    got = list(jax_reader.device_batches(dataset, 2, 64, sharding=sharding, **kw))
    assert len(got) == len(ref)
    rows = 64 // mesh_shape[0]
    for g, r in zip(got, ref):
        acts = g["activations"]
        assert acts.sharding == sharding
        assert {s.data.shape for s in acts.addressable_shards} == {(rows, 16)}
        assert len(acts.addressable_shards) == 8
        for k in r:
            np.testing.assert_array_equal(np.asarray(g[k]), r[k])


def test_refuses_a_batch_that_does_not_split(dataset):
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    with pytest.raises(UsageError, match="batch_size 60 does not split"):
        jax_reader.device_batches(dataset, 2, 60, sharding=sharding)
    with pytest.raises(UsageError, match="drop_remainder=False"):
        jax_reader.device_batches(dataset, 2, 64, sharding=sharding, drop_remainder=False)
