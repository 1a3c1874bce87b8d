"""Parity on the real SmolLM2-135M (tests/real_model.py): float32, per segment, every hook, with
and without a prepended BOS, against transformers on the same context."""

from __future__ import annotations

import numpy as np
import pytest

from llm_activations import demo, packing
from llm_activations.format import hooks as hk
from llm_activations.model.extractor import Extractor
from real_model import smollm2  # noqa: F401 (fixture)
from tiny_models import reference_hooks, rel_error

SEQ_LEN, LAYERS = 48, [0, 3]  # a short context and the first blocks keep this fast on 2 cores


def test_weights_are_real(smollm2):  # noqa: F811
    from llm_activations.model.smollm2 import greedy_completion

    _, model, tok = smollm2
    assert greedy_completion(model, tok, "The capital of France is", 2).startswith(" Paris")


@pytest.mark.parametrize("prepend", [False, True])
def test_every_hook_float32_matches_transformers_per_segment(smollm2, prepend):  # noqa: F811
    folder, model, tok = smollm2
    bos = tok.bos_token_id if prepend else None
    docs = [tok(t)["input_ids"] for t in demo.corpus_texts()[:3]]
    segments = [s for i, d in enumerate(docs) for s in packing.split_document(i, np.asarray(d[:70], np.int32), SEQ_LEN, bos)]
    rows = packing.pack_rows([s.row_length for s in segments], SEQ_LEN, "pack")
    ex = Extractor(folder, layers=LAYERS, batch_size=len(rows) + len(rows) % 2, seq_len=SEQ_LEN, compute_dtype="float32",
                   storage_dtype="float32", mesh_shape=(1, 1), hooks=hk.HOOKS, prepend=prepend)
    (batch,) = packing.make_batches(segments, rows, ex.batch_size, SEQ_LEN)
    out = ex(*batch.inputs)
    worst, checked = {h: 0.0 for h in hk.HOOKS}, 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            seg = segments[i]
            n = len(seg.tokens)
            context = ([bos] if prepend else []) + seg.tokens.tolist()
            ref = reference_hooks(model, context, LAYERS, hk.HOOKS)
            for (h, layer), want in ref.items():
                got = out.activations[(h, layer)][r, at:at + n]
                worst[h] = max(worst[h], rel_error(got, want[int(prepend):]))
            at += n
            checked += 1
    print(f"SmolLM2 float32 prepend={prepend}, {checked} segments, max rel error per hook: "
          + ", ".join(f"{h} {e:.1e}" for h, e in worst.items()))
    assert checked == len(segments) >= 5
    assert max(worst.values()) <= 1e-4, worst
