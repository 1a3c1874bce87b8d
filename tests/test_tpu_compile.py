"""The real TPU program, compiled here without a TPU (libtpu's deviceless compile, model/aot.py).

Each case compiles the step extract runs, with splash attention lowered through Mosaic (not Pallas
interpret mode), for one host of a TPU slice, and checks the compiler's own figures against the
arithmetic plan. The cases cover, between them, every chip preset's topology, the meshes (4,1),
(1,4) and (2,2), every hook, sequence lengths 512 and 2048, the tiny Qwen2 and Qwen3 test configs
and the Qwen2.5-0.5B and 7B shapes; one compile each keeps the group near a minute on 2 cores.
"""

import json

import pytest

pytest.importorskip("libtpu", reason="the TPU compiler comes with the tpu extra (pip install 'llm_activations[tpu]')")

from llm_activations.cli import main  # noqa: E402
from llm_activations.commands import plan  # noqa: E402
from llm_activations.format import hooks as hk  # noqa: E402
from llm_activations.model import aot, chips  # noqa: E402
from llm_activations.model.config import model_config_from_hf  # noqa: E402
from tiny_models import BASE  # noqa: E402

TINY = {
    "tiny-qwen2": {"architectures": ["Qwen2ForCausalLM"], **BASE, "tie_word_embeddings": False},
    "tiny-qwen3": {"architectures": ["Qwen3ForCausalLM"], **BASE, "head_dim": 32, "tie_word_embeddings": False},
}


def config_of(name):
    return model_config_from_hf(TINY[name]) if name in TINY else plan.preset_or_config(name)[1]


# (model, topology, mesh, layers, hooks, seq_len, batch)
CASES = [
    ("tiny-qwen3", "v4:2x2x1", (1, 4), (0, 2), hk.HOOKS, 2048, 2),
    ("Qwen2.5-0.5B", "v6e:2x2", (4, 1), (12,), ("z", "resid_post"), 2048, 4),
    ("Qwen2.5-7B", "v5p:2x2x1", (1, 4), (27,), ("resid_post",), 512, 2),
]


def _check(compiled, config, mesh, layers, seq_len, batch):
    """Compiled, the weights per device exactly the arithmetic's, and splash attention in the program."""
    assert compiled.fits and compiled.error is None
    weights = plan.weights_per_chip(config, max(layers) + 1, mesh, "bfloat16")
    assert compiled.weight_bytes == weights
    # the compiler's argument bytes: those weights and this device's int32 tokens, segment ids and
    # positions, in TPU tiles (small dimensions, as of the norm and bias stacks, are padded)
    inputs = 3 * (batch // mesh[0]) * seq_len * 4
    assert 0 <= compiled.argument_bytes - (weights + inputs) <= max(weights // 1000, 1 << 18)
    assert compiled.splash_kernels >= 1
    # no copy of the weight stacks among the temporaries (a bitcast of every stack to uint16 once
    # put 6.86 GiB there at 7B): at these few rows the working memory is far below the weights
    if weights > 2**28:
        assert compiled.temp_bytes < weights // 4


@pytest.mark.parametrize("model, topology, mesh, layers, hooks, seq_len, batch", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2][0]}x{c[2][1]}-T{c[5]}" for c in CASES])
def test_step_compiles_for_tpu(model, topology, mesh, layers, hooks, seq_len, batch):
    config = config_of(model)
    devices = aot.topology_devices(chips.parse_topology(topology))
    compiled = aot.compile_step(config, devices, layers=layers, hooks=hooks, batch_size=batch, seq_len=seq_len,
                                mesh_shape=mesh)
    _check(compiled, config, mesh, layers, seq_len, batch)


def test_plan_topology_json_tiny_qwen2_every_hook(tmp_path, capsys):
    """The command end to end: v5e:2x2 host, mesh 2,2, every hook at two layers, seq 512."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY["tiny-qwen2"]))
    argv = ["plan", "--model", str(path), "--topology", "v5e:2x2", "--mesh", "2,2", "--batch-size", "4",
            "--layers", "1", "3", "--hooks", *hk.HOOKS, "--seq-len", "512", "--json"]
    assert main(argv) == 0
    p = json.loads(capsys.readouterr().out)
    c = p["compiled"]
    assert {"topology", "devices", "mesh", "batch_size", "argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
            "hbm_bytes", "fits", "compile_seconds"} <= set(c)
    assert (c["topology"], c["devices"], c["mesh"], c["batch_size"], c["fits"]) == ("v5e:2x2", 4, [2, 2], 4, True)
    assert c["hbm_bytes"] == 16 * 2**30 and c["splash_kernels"] >= 1
    assert c["weight_bytes"] == p["weights_per_chip_bytes"]
    assert c["argument_bytes"] >= p["weights_per_chip_bytes"] + 3 * 2 * 512 * 4
    # outputs: per device, its 2 rows of every hook at 2 layers (bfloat16) plus the float32 moments
    widths = sum(hk.width(h, 64, 8, 8) for h in hk.HOOKS)
    assert c["output_bytes"] >= 2 * 512 * widths * 2 * 2


def test_out_of_memory_is_fits_false():
    """Qwen2.5-0.5B on a v5e host, 1024 rows of 2048 tokens per chip: the compiler's out-of-HBM
    verdict is an answer (fits False, its message), not an exception."""
    config = config_of("Qwen2.5-0.5B")
    devices = aot.topology_devices(chips.parse_topology("v5e:2x2"))
    compiled = aot.compile_step(config, devices, layers=(12,), hooks=("resid_post",), batch_size=4096, seq_len=2048,
                                mesh_shape=(4, 1))
    assert not compiled.fits and compiled.peak_bytes is None
    assert "exceed" in compiled.error or "RESOURCE_EXHAUSTED" in compiled.error


def test_megacore_v4_host_shows_four_devices():
    """A real v4-8 host shows 4 devices (one per chip, both TensorCores as one megacore device);
    libtpu's default deviceless v4:2x2x1 shows 8 cores, so the topology asks for megacore."""
    from jax.experimental import topologies

    assert len(aot.topology_devices(chips.parse_topology("v4:2x2x1"))) == 4
    assert len(topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices) == 8
