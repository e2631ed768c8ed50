"""Plain constants and helpers shared by several test modules (fixtures live in conftest.py).

Test modules import from here, never from each other. Nothing here is a fixture; the Triton fixtures shared by the
tests/test_triton*.py modules are in tests/triton_helpers.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from export.engine import EngineError, load_tensorrt
from runtime_py.sampling import SamplingParams

if TYPE_CHECKING:
    from runtime_py.session import OrtSession

PROMPT = [5, 17, 200, 33, 9, 120, 64, 3, 250, 77, 18, 41]  # 12 tokens: longer than every window (5)

GREEDY32 = SamplingParams(greedy=True, max_new_tokens=32, ignore_eos=True, logprobs=True)


def hf_greedy(hf, prompt, n=32):
    """HF `generate`'s n greedy tokens after prompt (no EOS stop)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_steps(session: OrtSession, steps: int = 6) -> list[np.ndarray]:
    """Prefill PROMPT then feed a fixed token sequence; logits of every call (same inputs for every graph). Built
    with ``logits="all"``, the prefill's logits cover every prompt position."""
    cache = session.new_cache(1, len(PROMPT) + steps + 1)
    n = len(PROMPT)
    mask = np.ones((1, n), dtype=np.int64)
    out = [session.forward(np.array([PROMPT]), np.arange(n)[None], mask, cache)[0]]
    for step, tok in enumerate([7, 99, 3, 250, 18, 41][:steps]):
        mask = np.ones((1, n + step + 1), dtype=np.int64)
        out.append(session.forward(np.array([[tok]]), np.array([[n + step]]), mask, cache)[0])
    return out


# ---- TensorRT (ahead of time, no GPU) -----------------------------------------------------------------------------

try:
    load_tensorrt()
    HAVE_TRT = True
except EngineError:
    HAVE_TRT = False
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx_bindings is installed")

ONNX_TO_TRT = {"int64": "int64", "float32": "float", "float16": "half"}  # graph dtype -> TensorRT I/O dtype name


def engine_manifest(path) -> dict:
    """The manifest of a TensorRT artifact, after checking that its engine file exists, its graph is trt-native and
    the engine's I/O names and dtypes are the graph's (the contract)."""
    import json

    m = json.loads((path / "manifest.json").read_text())
    engine, graph = m["engine"], m["graphs"]["decoder"]
    assert (path / engine["file"]).stat().st_size > 0 and graph["lowering"] == "trt-native"
    for ours, trt in ((graph["inputs"], engine["io"]["inputs"]), (graph["outputs"], engine["io"]["outputs"])):
        assert [t["name"] for t in ours] == [t["name"] for t in trt]
        assert [ONNX_TO_TRT[t["dtype"]] for t in ours] == [t["dtype"] for t in trt]
    return m
