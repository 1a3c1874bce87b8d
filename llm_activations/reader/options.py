"""The one options object every front end (NumPy, tf.data, JAX, torch) takes, checked once."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.format import norms

DEFAULT_SHUFFLE_BUFFER = 1 << 16
DEFAULT_CYCLE_LENGTH = 8


@dataclass(frozen=True)
class ReaderOptions:
    """How one pass reads one hook (or one aligned pair of hooks) of one layer.

    shuffle_buffer: tokens per shuffle window (0 or 1: file order, no shuffle).
    seed: None draws a fresh order; an int makes the pass a pure function of (dataset, seed, options).
    normalize: multiply by the scaling factor of the delivered tokens (their mean norm becomes sqrt(width)).
    max_norm_ratio: drop tokens whose L2 norm exceeds this x the layer's median norm (metadata's
    norm histogram; format/norms.py). None keeps every token.
    """

    batch_size: int
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    seed: int | None = None
    drop_remainder: bool = True
    normalize: bool = False
    with_metadata: bool = False
    cycle_length: int = DEFAULT_CYCLE_LENGTH
    check_crc: bool = True
    hook: str = hk.DEFAULT
    max_norm_ratio: float | None = norms.DEFAULT_MAX_NORM_RATIO

    def __post_init__(self):
        if not isinstance(self.batch_size, numbers.Integral) or self.batch_size < 1:
            raise UsageError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.shuffle_buffer < 0:
            raise UsageError(f"shuffle_buffer must be >= 0 tokens (0 or 1: no shuffle), got {self.shuffle_buffer}")
        if self.cycle_length < 1:
            raise UsageError(f"cycle_length must be >= 1 file, got {self.cycle_length}")
        try:
            norms.check_ratio(self.max_norm_ratio)
        except ValueError as e:  # the contract's message, as the readers' usual one-line error
            raise UsageError(str(e)) from None

    @property
    def shuffled(self) -> bool:
        return self.shuffle_buffer > 1

    @staticmethod
    def of(batch_size: int, **kw) -> "ReaderOptions":
        """ReaderOptions from a front end's keyword arguments; an unknown one is a one-line UsageError."""
        known = {f.name for f in fields(ReaderOptions)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise UsageError(f"unknown reader option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return ReaderOptions(batch_size=batch_size, **kw)
