"""Graph passes: fusion counts, the ort lowering against the unfused graph, the trt-plugin graph's attributes,
and regions that cannot be matched.

The unfused (reference) graph is the exporter's standard-op graph; every lowering ONNX Runtime can execute must
give logits within 1e-4 of it (prefill and decode steps) and the same greedy tokens as HF.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.checkpoint import Checkpoint
from export.trace import trace_graph
from export.weights import attach_weights
from export.spec import load_spec
from export.weights import weight_plan
from graphs import fuse
from graphs.lower import PLUGIN_DOMAIN, lower
from plugins import attention as attn_plugin
from plugins import moe as moe_plugin
from runtime_py.session import OrtSession
from tests.conftest import CASES
from tests.helpers import run_steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_ort_lowering_matches_unfused(case, artifacts):
    ref = OrtSession(artifacts(case, "static", lowering="reference", logits="all"), threads=2)
    ort_ = OrtSession(artifacts(case, "static", lowering="ort", logits="all"), threads=2)
    spec = load_spec(ref.manifest.model["source"])
    fusion = ort_.manifest.decoder.fusion
    if spec.head_dim % 16 == 0:
        assert fusion["GroupQueryAttention"] == spec.num_layers
        assert ort_.manifest.decoder.kv_binding == "in_place"
    else:  # the CPU kernel's limit: left unfused, each layer reported
        assert fusion["GroupQueryAttention"] == 0
        assert len(fusion["skipped"]) == spec.num_layers and "head_dim % 16" in fusion["skipped"][0]
    assert fusion["MoE"] == len(spec.sparse_layers)
    for a, b in zip(run_steps(ref), run_steps(ort_)):
        assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("case", ["qwen3_moe_mixed", "gemma2"])
def test_ort_lowering_concat_mode(case, artifacts):
    """Concat KV has no GQA form: attention stays unfused (reported), MoE is still fused; results unchanged."""
    ref = OrtSession(artifacts(case, "concat", lowering="reference", logits="all"), threads=2)
    low = OrtSession(artifacts(case, "concat", lowering="ort", logits="all"), threads=2)
    fusion = low.manifest.decoder.fusion
    spec = load_spec(ref.manifest.model["source"])
    assert fusion["attention_fused"] == 0
    assert len(fusion["skipped"]) == spec.num_layers and "static" in fusion["skipped"][0]
    assert fusion["MoE"] == len(spec.sparse_layers)
    for a, b in zip(run_steps(ref), run_steps(low)):
        assert np.abs(a - b).max() < 1e-4


def _plugin_nodes(path):
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    for a in attrs:
        a.update({k: v.decode() for k, v in a.items() if isinstance(v, bytes)})
    return nodes, attrs


@pytest.mark.parametrize("case", sorted(CASES))
def test_trt_plugin_graph(case, artifacts):
    path = artifacts(case, "static", lowering="trt-plugin")
    spec = load_spec(json.loads((path / "manifest.json").read_text())["model"]["source"])
    nodes, attrs = _plugin_nodes(path)
    att = [(n, a) for n, a in zip(nodes, attrs) if n.op_type == attn_plugin.PLUGIN_NAME]
    moe = [(n, a) for n, a in zip(nodes, attrs) if n.op_type == moe_plugin.PLUGIN_NAME]
    assert len(att) == spec.num_layers and len(moe) == len(spec.sparse_layers)
    for i, (node, a) in enumerate(att):
        assert node.name == f"layers.{i}.attention"
        assert a["plugin_namespace"] == attn_plugin.PLUGIN_NAMESPACE
        assert a["plugin_version"] == attn_plugin.PLUGIN_VERSION
        assert a["window"] == (spec.layers[i].window or 0)
        assert a["softcap"] == pytest.approx(spec.attn_softcap or 0.0)
        assert a["scale"] == pytest.approx(spec.attn_scale)
        assert (a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (spec.num_heads, spec.num_kv_heads,
                                                                       spec.head_dim)
        assert a["kv_mode"] == "static" and a["qk_norm"] == int(spec.qk_norm)
        assert set(a) == set(attn_plugin.ATTRS) | {"plugin_namespace", "plugin_version"}
        assert list(node.input)[3:5] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert len(node.input) == len(attn_plugin.TRT_INPUTS) and all(node.input)  # no empty optional inputs
        assert list(node.output)[1:] == [f"present.{i}.key", f"present.{i}.value"]
    for (node, a), i in zip(moe, spec.sparse_layers):
        assert node.name == f"layers.{i}.moe"
        assert (a["top_k"], a["num_experts"], a["norm_topk_prob"]) == (spec.top_k, spec.num_experts,
                                                                        int(spec.norm_topk_prob))
        assert a["plugin_namespace"] == moe_plugin.PLUGIN_NAMESPACE
    # nothing of the decomposed attention is left: no Softmax outside the MoE router, no ScatterElements
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "ScatterElements" not in ops and "Softmax" not in ops


def _traced(case, checkpoints):
    path = checkpoints(case)
    spec = load_spec(path)
    model = trace_graph(spec, "static", torch.float32, "last")
    attach_weights(model, spec, weight_plan(spec), Checkpoint(path), torch.float32)
    return model, spec


def test_unmatchable_region_left_untouched_and_reported(checkpoints):
    model, spec = _traced("qwen3_moe_mixed", checkpoints)
    # Break layer 2's attention region: move one of its inner nodes out of the scope, so the region leaks a
    # float value to a node outside it.
    inner = [n for n in fuse.region_nodes(model.graph, "decoder.layers.2.attn.core") if n.op_type == "Softmax"][0]
    inner.metadata_props[fuse.SCOPES_KEY] = "['', 'decoder', 'elsewhere']"
    before = len(fuse.region_nodes(model.graph, "decoder.layers.2.attn.core"))
    report = fuse.fuse_attention(model, spec, "static", 64, np.float32)
    assert report.fused == spec.num_layers - 1
    assert len(report.skipped) == 1 and report.skipped[0].startswith("layer 2:")
    assert len(fuse.region_nodes(model.graph, "decoder.layers.2.attn.core")) == before  # untouched
    with pytest.raises(fuse.FusionError, match="attention fusion: fused 3 region"):
        report.require(spec.num_layers)


def test_trt_plugin_build_fails_when_a_region_cannot_fuse(checkpoints):
    model, spec = _traced("qwen2_window", checkpoints)
    for n in fuse.region_nodes(model.graph, "decoder.layers.1.attn.core"):
        if n.op_type == "Softmax":
            n.metadata_props[fuse.SCOPES_KEY] = "[]"
    with pytest.raises(fuse.FusionError, match="layer 1"):
        lower(model, spec, "trt-plugin", "static", 64, np.float32)


def test_moe_count_mismatch_fails(checkpoints):
    model, spec = _traced("qwen3_moe_mixed", checkpoints)
    for n in fuse.region_nodes(model.graph, "decoder.layers.1.moe"):
        n.metadata_props[fuse.SCOPES_KEY] = "[]"
    with pytest.raises(fuse.FusionError, match="MoE fusion: fused 0 region"):
        lower(model, spec, "ort", "static", 64, np.float32)


def test_inspect_cli(artifacts, capsys):
    from export.__main__ import main

    path = artifacts("qwen3_moe_mixed")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    ops = report["graphs"]["decoder"]["ops"]
    assert ops["com.microsoft.GroupQueryAttention"] == 4 and ops["com.microsoft.MoE"] == 1
    assert report["graphs"]["decoder"]["fusion"]["attention_fused"] == 4
    assert report["graphs"]["decoder"]["logits"] == "last"  # the build default


def test_every_named_scope_is_in_the_traced_graph(checkpoints):
    """graphs/scopes.py names the regions; export/model.py's module names must produce exactly those scopes."""
    from graphs import scopes

    for case in ("qwen3_moe_mixed", "gemma2"):
        model, spec = _traced(case, checkpoints)
        seen = {s for node in model.graph for s in fuse.scopes(node)}
        wanted = [scopes.attn_core(i) for i in range(spec.num_layers)] + scopes.norms(spec) + \
            [scopes.moe(i) for i in spec.sparse_layers]
        assert [w for w in wanted if w not in seen] == [], case


def test_cli_lowerings_are_the_implemented_ones():
    from export.options import LOWERINGS
    from graphs import lower as lower_mod

    assert LOWERINGS == lower_mod.LOWERINGS
