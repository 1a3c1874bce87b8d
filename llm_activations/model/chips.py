"""Accelerator presets and TPU topology names: what `plan` plans for and compiles against. No JAX.

A topology name is libtpu's own form, GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC (v4, v5p):
the chips of a slice along each axis of its torus. Extraction runs one process per host on that
host's chips (the Extractor's mesh is the host's local devices), so a plan is for one host of the
slice: the chips of process 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llm_activations.errors import UsageError

GIB = 1 << 30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip
    chips_per_host: int
    topology: str | None = None  # default libtpu topology: one host of this chip (None: not a TPU)


# Vendor figures: HBM per chip and dense bf16 peak. TPU hosts have 4 chips (v5e/v6e also come as
# 8-chip single hosts: --topology v5e:2x4); GPU hosts are 8-GPU HGX boards.
CHIP_PRESETS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 4, "v4:2x2x1"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 4, "v5e:2x2"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 4, "v5p:2x2x1"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 4, "v6e:2x2"),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 8),
    "h200": Chip("NVIDIA H200 SXM", 141 * 10**9, 989e12, 8),
}

# generation -> (torus axes, chips of the largest single host, megacore)
# v4 and v5p chips have two TensorCores that the runtime shows as ONE device ("megacore"): a v4-8
# host shows 4 devices. libtpu's deviceless topology shows each core as a device unless asked for
# the megacore chip config, so megacore generations always ask for it.
# v5e and v6e sell single hosts of 1, 4 and 8 chips (v5litepod-8 is one 2x4 host); bigger slices
# are made of 2x2 hosts. v4 and v5p hosts are 2x2x1.
_GENERATIONS = {
    "v4": (3, (2, 2, 1), True),
    "v5p": (3, (2, 2, 1), True),
    "v5e": (2, (2, 4, 1), False),
    "v6e": (2, (2, 4, 1), False),
}
FORMS = "v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB (e.g. v4:2x2x1, v5p:2x2x1, v5e:2x2, v5e:2x4, v6e:2x2)"


@dataclass(frozen=True)
class Topology:
    """A TPU slice by libtpu's name, and the keyword arguments that describe its hosts to libtpu."""

    name: str
    chip: str  # a CHIP_PRESETS key
    dims: tuple[int, int, int]
    chips_per_host_bounds: tuple[int, int, int]
    chip_config_name: str  # "megacore" or "default"

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.chips_per_host_bounds)

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host

    def libtpu_kwargs(self) -> dict:
        """Keyword arguments of jax.experimental.topologies.get_topology_desc for this slice."""
        return dict(topology_name=self.name, platform="tpu", chip_config_name=self.chip_config_name,
                    chips_per_host_bounds=self.chips_per_host_bounds)


def parse_topology(name: str) -> Topology:
    """A Topology from libtpu's name (module doc); UsageError (one line listing the forms) otherwise."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", name.strip().lower())
    bad = UsageError(f"--topology {name!r}: unknown; valid forms are {FORMS}")
    if not m:
        raise bad
    gen, shape = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    axes, host, megacore = _GENERATIONS[gen]
    if len(shape) != axes or min(shape) < 1:
        raise bad
    dims = (shape + (1,))[:3]
    if math.prod(dims) <= math.prod(host) and all(d <= h for d, h in zip(sorted(dims), sorted(host))):
        bounds = dims  # the whole slice is one host
    else:
        bounds = (2, 2, 1)
        if any(d % b for d, b in zip(dims, bounds)):
            raise UsageError(f"--topology {name}: a slice of several hosts must be whole 2x2 hosts; "
                             f"valid forms are {FORMS}")
    return Topology(f"{gen}:{m.group(2)}", gen, dims, bounds, "megacore" if megacore else "default")
