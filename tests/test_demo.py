"""README command 1: `python -m llm_activations extract` with no arguments runs the bundled demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_no_argument_demo(tmp_path):
    env = dict(os.environ, LLM_ACTIVATIONS_CACHE=str(tmp_path / "cache"), LLM_ACTIVATIONS_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    root = Path(__file__).parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "llm_activations", "extract"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 1536 documents" in proc.stdout and "activations_demo/metadata.json" in proc.stdout
    meta = json.loads((tmp_path / "activations_demo" / "metadata.json").read_text())
    c = meta["counts"]
    assert c["documents"] == 1536 and c["rejected"] == 0
    assert c["tokens"] / (c["tokens"] + c["padding_tokens"]) >= 0.98  # packing goal on the demo corpus
    assert meta["run"]["compilations"] == 1
    assert meta["extraction"]["layers"] == [2] and meta["model"]["architecture"] == "Qwen2ForCausalLM"
    assert meta["extraction"]["prepend_token_id"] == 0  # --prepend auto (the default): the demo tokenizer's EOS
    # a second run refuses to overwrite the finished dataset (exit 2, one line)
    again = subprocess.run([sys.executable, "-m", "llm_activations", "extract"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr.strip().splitlines()[-1]
