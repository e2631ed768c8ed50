"""Layer copying at export (export/replicate.py): a build that traces a few layers and copies the rest must give
the same graph and the same numbers as a build that traces every layer, and HF's greedy tokens.

Six-layer checkpoints, one per family, with the layer kinds that make it interesting: Qwen2 with a full-attention
first layer then windowed layers (traces 3, copies 3), Gemma2 alternating windowed/global (traces 4, copies 2),
Qwen3-MoE alternating dense/sparse with a forced-dense last layer (traces 4, copies 2).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import export.replicate
from export.build import build
from export.replicate import traced_layers
from export.spec import load_spec
from runtime_py.session import OrtSession
from tests.conftest import CASES, save_hf_checkpoint
from tests.helpers import GREEDY32, PROMPT, hf_greedy, run_steps

DEEP = {
    "qwen2": ("qwen2", dict(CASES["qwen2_window"][1], num_hidden_layers=6), 3),
    "gemma2": ("gemma2", dict(CASES["gemma2"][1], num_hidden_layers=6), 4),
    "qwen3_moe": ("qwen3_moe", dict(CASES["qwen3_moe_mixed"][1], num_hidden_layers=6, mlp_only_layers=[5]), 4),
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {name: save_hf_checkpoint(family, fields, root / name) for name, (family, fields, _) in DEEP.items()}


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("name", sorted(DEEP))
def test_copied_layers_equal_traced_layers(name, deep, tmp_path, monkeypatch, hf_model):
    ckpt = deep[name]
    assert traced_layers(load_spec(ckpt)) == DEEP[name][2]  # the copy path is really taken
    for lowering in ("ort",):  # the default: fusion finds the copies by their renamed scopes
        copied = build(str(ckpt), out=tmp_path / f"copied-{lowering}", lowering=lowering, max_seq_len=64,
                       progress=False, logits="all")
        with monkeypatch.context() as m:
            m.setattr(export.replicate, "traced_layers", lambda spec: spec.num_layers)
            traced = build(str(ckpt), out=tmp_path / f"traced-{lowering}", lowering=lowering, max_seq_len=64,
                           progress=False, logits="all")
        assert _ops(copied) == _ops(traced)
        a, b = OrtSession(copied, threads=2), OrtSession(traced, threads=2)
        assert a.manifest.decoder.fusion == b.manifest.decoder.fusion
        for x, y in zip(run_steps(a), run_steps(b)):
            assert np.abs(x - y).max() < 1e-6
    from runtime_py.generate import Generator

    assert Generator(copied, threads=2).generate([PROMPT], GREEDY32).tokens[0] == hf_greedy(hf_model(ckpt), PROMPT)
