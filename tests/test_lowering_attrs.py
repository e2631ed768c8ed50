"""Every attribute of every fused node, through every lowering: expressed, or refused by name (issue #11).

The fused nodes (``llm_export.Attention``, ``llm_export.MoE``; plugins/ define their attributes and, in
``reference``, their meaning) are lowered per target, and each lowering declares what it does with every attribute
(graphs/lower.py ``RULES``, graphs/native.py ``ATTENTION``, graphs/quantize.py ``QMOE_FROM_MOE``). Checked here:

* the tables name exactly the node's attributes, for every lowering (trt-native never fuses MoE);
* node level, one fused node with random inputs and each attribute flipped in turn: lowered for ``ort`` (and
  quantized to QMoE) and ``trt-native`` and run in ONNX Runtime, it matches the plugin's torch ``reference``
  (max |diff| <= 1e-4, fp32; prefill and a decode step for attention), or the lowering refuses with a LoweringError
  naming the node, the attribute and the value. ``trt-plugin`` (TensorRT cannot run here): the plugin node carries
  exactly the fused attributes and the plugin's ``reference`` accepts them and gives the fused node's result;
* model level, the bug of issue #11: a tiny Qwen3-MoE with ``hidden_act: gelu_pytorch_tanh`` (the ort lowering used
  to hand its experts to com.microsoft.MoE as SwiGLU, 0.3 off). The ort, trt-native and quantized (int4, int8) ort
  graphs give the reference lowering's logits; ort and trt-plugin leave the MoE layer decomposed and say why;
* an attribute added to a fused node that a lowering was not taught, a value a lowering refuses, or a value the
  node does not define stops the build with a message naming them.

One export (the slow part) serves every model-level check: conftest's ``traced_graph`` copies it per lowering.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graphs import fuse, lower, native
from graphs import quantize as gq
from graphs.fold import fold_constants
from graphs.fuse import LoweringError
from plugins import attention as attn_plugin
from plugins import moe as moe_plugin
from tests.conftest import CASES, save_hf_checkpoint

TARGETS = ("ort", "trt-plugin", "trt-native")
F32, I64 = ir.DataType.FLOAT, ir.DataType.INT64


def _session(model: ir.Model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    proto.ir_version = min(proto.ir_version, 10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: ir.Model, feed: dict) -> dict:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(None, {k: v for k, v in feed.items() if k in wanted})))


def _input(name: str, dtype: ir.DataType, shape) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def _one_node_model(node: ir.Node, inputs: list[ir.Value], out_names, out_shapes, graph: ir.Graph) -> ir.Model:
    graph.append(node)
    for v, name, shape in zip(node.outputs, out_names, out_shapes):
        v.name, v.type, v.shape = name, ir.TensorType(F32), ir.Shape(list(shape))
        graph.outputs.append(v)
    return ir.Model(graph, ir_version=10)


def _refusal(lowering: str, attr: str, value, node: str) -> str:
    """The pattern of a refusal: it names the lowering, the attribute with its value, and the node."""
    return f"lowering {re.escape(lowering)} .*attribute {re.escape(f'{attr}={value!r}')} of node {re.escape(node)}"


def test_tables_name_every_attribute():
    for lowering in TARGETS:
        for plugin in (attn_plugin, moe_plugin):
            rules = lower.RULES[lowering][plugin.OP]
            if rules is None:  # the lowering never fuses this node
                assert (lowering, plugin) == ("trt-native", moe_plugin)
                continue
            assert set(rules) == set(plugin.ATTRS), (lowering, plugin.OP)
            assert all(isinstance(r, (fuse.Consumed, fuse.Matches, fuse.Needs)) for r in rules.values())
    assert lower.RULES["trt-native"][attn_plugin.OP] is native.ATTENTION
    for plugin in (attn_plugin, moe_plugin):  # the references take every attribute by name
        params = inspect.signature(plugin.reference).parameters
        assert set(plugin.ATTRS) <= {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert set(plugin.VALUES) <= set(plugin.ATTRS)
    assert set(moe_plugin.KERNEL_ACTIVATIONS) <= set(moe_plugin.ACTIVATIONS)
    assert issubclass(LoweringError, ValueError)  # the CLI prints `error: ...` and exits 2


# ---- node level: attention -------------------------------------------------------------------------------------

B, S, M = 2, 6, 12
ATTN = dict(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, softcap=0.0, window=0, kv_mode="static", qk_norm=0,
            rms_eps=1e-6)
ATTN_FLIPS = {  # case -> the attributes changed from ATTN
    "base": {},
    "mqa": {"num_kv_heads": 1},
    "mha": {"num_kv_heads": 4},
    "head_dim_32": {"head_dim": 32, "scale": 32 ** -0.5},
    "head_dim_24": {"head_dim": 24, "scale": 24 ** -0.5},
    "scale": {"scale": 0.6},
    "scale_zero": {"scale": 0.0},
    "scale_negative": {"scale": -0.25},
    "softcap": {"softcap": 2.0},  # scores reach ~4x the cap: a missing or wrong cap shows
    "window": {"window": 3},  # shorter than the prompt
    "qk_norm": {"qk_norm": 1},
    "rms_eps": {"qk_norm": 1, "rms_eps": 0.5},
    "concat": {"kv_mode": "concat"},
}
# lowering -> case -> the attribute it refuses
ATTN_REFUSED = {
    "ort": {"head_dim_24": "head_dim", "scale_zero": "scale", "concat": "kv_mode"},
    "trt-native": {"softcap": "softcap", "scale_zero": "scale", "scale_negative": "scale", "concat": "kv_mode"},
    "trt-plugin": {"concat": "kv_mode"},
}


def _attention_inputs(a: dict, seed: int = 0) -> dict:
    nH, KV, D = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    g = np.random.default_rng(seed)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    freqs = np.arange(M)[:, None] * inv_freq[None]
    return {
        "query": (g.standard_normal((B, S, nH * D)) * 2).astype(np.float32),
        "key": (g.standard_normal((B, S, KV * D)) * 2).astype(np.float32),
        "value": g.standard_normal((B, S, KV * D)).astype(np.float32),
        "position_ids": np.tile(np.arange(S), (B, 1)),
        "cos_cache": np.cos(freqs).astype(np.float32), "sin_cache": np.sin(freqs).astype(np.float32),
        "q_norm_weight": (1 + 0.3 * g.standard_normal(D)).astype(np.float32),
        "k_norm_weight": (1 + 0.3 * g.standard_normal(D)).astype(np.float32),
    }


def _attention_model(a: dict, arrays: dict, steps: int) -> ir.Model:
    """A graph holding one fused attention node for `steps` new tokens per row (static KV buffer of M slots)."""
    nH, KV, D = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    ins = [_input("query", F32, [B, steps, nH * D]), _input("key", F32, [B, steps, KV * D]),
           _input("value", F32, [B, steps, KV * D]), _input("past_key", F32, [B, KV, M, D]),
           _input("past_value", F32, [B, KV, M, D]), _input("position_ids", I64, [B, steps])]
    graph = ir.Graph(ins, [], nodes=[], opset_imports={"": 23}, name="attention")
    consts = {n: fuse.initializer(graph, n, arrays[n]) for n in ("cos_cache", "sin_cache")}
    if a["qk_norm"]:
        consts.update({n: fuse.initializer(graph, n, arrays[n]) for n in ("q_norm_weight", "k_norm_weight")})
    node = ir.node(attn_plugin.OP, [*ins, None, consts["cos_cache"], consts["sin_cache"], consts.get("q_norm_weight"),
                                    consts.get("k_norm_weight")], a, domain=attn_plugin.DOMAIN, num_outputs=3,
                   name="layers.0.attention")
    return _one_node_model(node, ins, ("output", "present_key", "present_value"),
                           ([B, steps, nH * D], [B, KV, M, D], [B, KV, M, D]), graph)


def _attention_reference(a: dict, arrays: dict, feed: dict):
    t = {k: torch.from_numpy(v) for k, v in {**arrays, **feed}.items()}
    norms = (t["q_norm_weight"], t["k_norm_weight"]) if a["qk_norm"] else (None, None)
    out = attn_plugin.reference(t["query"], t["key"], t["value"], t["past_key"], t["past_value"], t["position_ids"],
                                None, t["cos_cache"], t["sin_cache"], *norms, **a)
    return [x.numpy() for x in out]


def _attention_steps(a: dict, arrays: dict):
    """(feed, reference outputs) for a prefill of S tokens and one decode step after it (past = the prefill's)."""
    KV, D = a["num_kv_heads"], a["head_dim"]
    prefill = {k: arrays[k] for k in ("query", "key", "value", "position_ids")}
    prefill.update(past_key=np.zeros((B, KV, M, D), np.float32), past_value=np.zeros((B, KV, M, D), np.float32))
    ref0 = _attention_reference(a, arrays, prefill)
    g = np.random.default_rng(1)
    decode = {k: (g.standard_normal(arrays[k][:, :1].shape) * 2).astype(np.float32) for k in ("query", "key", "value")}
    decode.update(position_ids=np.full((B, 1), S), past_key=ref0[1], past_value=ref0[2])
    return [(prefill, ref0, S), (decode, _attention_reference(a, arrays, decode), S + 1)]


@pytest.mark.parametrize("lowering", ["ort", "trt-native"])
@pytest.mark.parametrize("case", sorted(ATTN_FLIPS))
def test_attention_attribute_runs_or_is_refused(case, lowering):
    a = dict(ATTN, **ATTN_FLIPS[case])
    arrays = _attention_inputs(a)
    refused = ATTN_REFUSED[lowering].get(case)
    if refused:
        model = _attention_model(a, arrays, S)
        with pytest.raises(LoweringError, match=_refusal(lowering, refused, a[refused], "layers.0.attention")):
            lower.lower_fused(model, lowering)
        return
    for feed, (out, pk, pv), total in _attention_steps(a, arrays):
        model = _attention_model(a, arrays, feed["query"].shape[1])
        counts = lower.lower_fused(model, lowering)
        assert counts == ({"GroupQueryAttention": 1, "MoE": 0} if lowering == "ort" else {"Attention": 1})
        assert not [n for n in model.graph if n.domain == attn_plugin.DOMAIN]
        got = _run(model, feed)
        assert np.abs(got["output"] - out).max() < 1e-4
        for name, ref in (("present_key", pk), ("present_value", pv)):  # the slots written so far
            assert np.abs(got[name][:, :, :total] - ref[:, :, :total]).max() < 1e-4


@pytest.mark.parametrize("case", sorted(ATTN_FLIPS))
def test_attention_attribute_trt_plugin(case):
    """The plugin node carries the fused attributes as they are; the plugin's reference, given the plugin node's
    attributes and inputs (TRT_INPUTS: no mask, unit norm weights when qk_norm is 0), gives the fused result."""
    a = dict(ATTN, **ATTN_FLIPS[case])
    arrays = _attention_inputs(a)
    model = _attention_model(a, arrays, S)
    refused = ATTN_REFUSED["trt-plugin"].get(case)
    if refused:
        with pytest.raises(LoweringError, match=_refusal("trt-plugin", refused, a[refused], "layers.0.attention")):
            lower.lower_fused(model, "trt-plugin")
        return
    assert lower.lower_fused(model, "trt-plugin")[attn_plugin.PLUGIN_NAME] == 1
    (node,) = [n for n in model.graph if n.domain == lower.PLUGIN_DOMAIN]
    attrs = {k: v.value for k, v in node.attributes.items()}
    assert node.op_type == attn_plugin.PLUGIN_NAME and node.name == "layers.0.attention"
    assert attrs.pop("plugin_namespace") == attn_plugin.PLUGIN_NAMESPACE
    assert attrs.pop("plugin_version") == attn_plugin.PLUGIN_VERSION
    assert attrs == a
    feed, (out, pk, pv), _ = _attention_steps(a, arrays)[0]
    values = {**feed, **{v.name: v.const_value.numpy() for v in node.inputs if v.const_value is not None}}
    t = {name: torch.from_numpy(values[v.name]) for name, v in zip(attn_plugin.TRT_INPUTS, node.inputs)}
    got = attn_plugin.reference(*(t[n] for n in attn_plugin.INPUTS[:6]), None,
                                *(t[n] for n in attn_plugin.INPUTS[7:]), **attrs)
    for x, ref in zip(got, (out, pk, pv)):
        assert np.abs(x.numpy() - ref).max() < 1e-6


# ---- node level: MoE -------------------------------------------------------------------------------------------

E, H, INNER, TOKENS = 6, 64, 32, (2, 5)
MOE = dict(num_experts=E, top_k=2, norm_topk_prob=1, moe_intermediate_size=INNER, activation="silu")
MOE_FLIPS = {
    "base": {},
    "top_k_1": {"top_k": 1},
    "top_k_3": {"top_k": 3},
    "no_renorm": {"norm_topk_prob": 0},
    "no_renorm_top_k_3": {"norm_topk_prob": 0, "top_k": 3},
    "gelu_tanh": {"activation": "gelu_tanh"},
    "num_experts_wrong": {"num_experts": E - 1},  # disagrees with the weights
    "inner_wrong": {"moe_intermediate_size": INNER // 2},
}
_MOE_REFUSED = {"gelu_tanh": "activation", "num_experts_wrong": "num_experts", "inner_wrong": "moe_intermediate_size"}
MOE_REFUSED = {"ort": _MOE_REFUSED, "trt-plugin": _MOE_REFUSED}


def _moe_arrays(seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    return {"hidden": g.standard_normal((*TOKENS, H)).astype(np.float32),
            "layers.0.moe.router.weight": g.standard_normal((H, E)).astype(np.float32),
            "layers.0.moe.gate_up": (g.standard_normal((E, 2 * INNER, H)) * 0.2).astype(np.float32),
            "layers.0.moe.down": (g.standard_normal((E, H, INNER)) * 0.2).astype(np.float32)}


def _moe_model(a: dict, arrays: dict) -> ir.Model:
    hidden = _input("hidden", F32, [*TOKENS, H])
    graph = ir.Graph([hidden], [], nodes=[], opset_imports={"": 23}, name="moe")
    weights = [fuse.initializer(graph, n, arrays[n]) for n in list(arrays)[1:]]
    node = ir.node(moe_plugin.OP, [hidden, *weights], a, domain=moe_plugin.DOMAIN, num_outputs=1, name="layers.0.moe")
    return _one_node_model(node, [hidden], ("output",), ([*TOKENS, H],), graph)


def _moe_reference(a: dict, arrays: dict, gate_up=None, down=None) -> np.ndarray:
    t = [torch.from_numpy(x) for x in arrays.values()]
    if gate_up is not None:
        t[2], t[3] = torch.from_numpy(gate_up), torch.from_numpy(down)
    return moe_plugin.reference(*t, **a).numpy()


@pytest.mark.parametrize("lowering", TARGETS)
@pytest.mark.parametrize("case", sorted(MOE_FLIPS))
def test_moe_attribute_runs_or_is_refused(case, lowering):
    a = dict(MOE, **MOE_FLIPS[case])
    arrays = _moe_arrays()
    model = _moe_model(a, arrays)
    if lowering == "trt-native":  # TensorRT has no MoE layer: the lowering never fuses it, and refuses a fused one
        with pytest.raises(LoweringError, match=r"lowering trt-native has no form for node layers\.0\.moe"):
            lower.lower_fused(model, lowering)
        return
    refused = MOE_REFUSED[lowering].get(case)
    if refused:
        with pytest.raises(LoweringError, match=_refusal(lowering, refused, a[refused], "layers.0.moe")):
            lower.lower_fused(model, lowering)
        return
    ref = _moe_reference(a, arrays)
    lower.lower_fused(model, lowering)
    if lowering == "trt-plugin":
        (node,) = [n for n in model.graph if n.domain == lower.PLUGIN_DOMAIN]
        attrs = {k: v.value for k, v in node.attributes.items()}
        assert attrs.pop("plugin_namespace") == moe_plugin.PLUGIN_NAMESPACE
        assert attrs.pop("plugin_version") == moe_plugin.PLUGIN_VERSION
        assert attrs == a and node.op_type == moe_plugin.PLUGIN_NAME
        assert [v.name for v in node.inputs] == ["hidden", *list(arrays)[1:]]
        assert np.abs(_moe_reference(attrs, arrays) - ref).max() == 0  # the plugin's reference accepts them
        return
    (moe,) = [n for n in model.graph if n.op_type == "MoE"]
    assert set(moe.attributes) == set(gq.QMOE_FROM_MOE)  # what the QMoE rewrite must carry on
    assert moe.attributes["activation_type"].value == lower.ORT_ACTIVATIONS[a["activation"]]
    assert np.abs(_run(model, {"hidden": arrays["hidden"]})["output"] - ref).max() < 1e-4


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("case", ["base", "top_k_1", "top_k_3", "no_renorm", "no_renorm_top_k_3"])
def test_moe_attribute_quantized(case, scheme):
    """ort -> QMoE (int4) / MoE on dequantized experts (int8 at accuracy level 1): the reference on the same
    quantize-dequantized experts."""
    a = dict(MOE, **MOE_FLIPS[case])
    arrays = _moe_arrays()
    model = _moe_model(a, arrays)
    lower.lower_fused(model, "ort")
    gq.quantize_graph(model, gq.QuantConfig(scheme, 32, accuracy_level=1), "ort", np.float32)
    ops = [n.op_type for n in model.graph]
    assert ("QMoE" in ops) == (scheme == "int4") and ("MoE" in ops) == (scheme == "int8")
    gate_up, down = (gq.dequantize(*gq.quantize_rtn(arrays[f"layers.0.moe.{w}"], scheme, 32, full_range=True))
                     for w in ("gate_up", "down"))
    ref = _moe_reference(a, arrays, gate_up, down)
    assert np.abs(_run(model, {"hidden": arrays["hidden"]})["output"] - ref).max() < 1e-4


def test_qmoe_rewrite_refuses_what_it_does_not_carry():
    arrays = _moe_arrays()
    cfg = gq.QuantConfig("int4", 32, accuracy_level=1)
    with pytest.raises(LoweringError, match=r"quantization \(ort\) has no form for the fused node layers\.0\.moe"):
        gq.quantize_graph(_moe_model(MOE, arrays), cfg, "ort", np.float32)  # not lowered first
    model = _moe_model(MOE, arrays)
    lower.lower_fused(model, "ort")
    (moe,) = [n for n in model.graph if n.op_type == "MoE"]
    moe.attributes["use_sparse_mixer"] = ir.AttrInt64("use_sparse_mixer", 1)
    with pytest.raises(LoweringError, match=r"does not handle attribute 'use_sparse_mixer' .*layers\.0\.moe\.ort"):
        gq.quantize_graph(model, cfg, "ort", np.float32)


# ---- model level: a Qwen3-MoE whose experts are GeGLU ----------------------------------------------------------

GELU_MOE = dict(CASES["qwen3_moe_mixed"][1], num_hidden_layers=2, num_experts=4, decoder_sparse_step=1,
                mlp_only_layers=[0], norm_topk_prob=False, hidden_act="gelu_pytorch_tanh")  # layer 1 sparse
PROMPT, NEXT = [5, 17, 33, 100, 7, 8, 9], [41, 250]
CACHE = 16


@pytest.fixture(scope="module")
def gelu_moe(tmp_path_factory, traced_graph):
    """Callable: a fresh copy of the tiny GeGLU Qwen3-MoE's exported graph (static KV, every position's logits)."""
    path = save_hf_checkpoint("qwen3_moe", GELU_MOE, tmp_path_factory.mktemp("gelu_moe") / "ckpt")
    return lambda: traced_graph(path, "static", "all")


def _lowered(gelu_moe, lowering: str, scheme: str | None = None):
    """The build's graph stages on a copy: fuse and lower, fold constants, quantize."""
    model, spec = gelu_moe()
    counts = lower.lower(model, spec, lowering, "static", CACHE, np.float32)
    fold_constants(model)
    if scheme:
        counts["quantization"] = gq.quantize_graph(model, gq.QuantConfig(scheme, 32, accuracy_level=1), lowering,
                                                   np.float32)
    return model, spec, counts


def _logits(model: ir.Model, spec) -> list[np.ndarray]:
    """The prompt's logits (every position), then one decode step per token of NEXT fed the presents back."""
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    shape = (1, spec.num_kv_heads, CACHE, spec.head_dim)
    past = {f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32) for i in range(spec.num_layers)
            for kv in ("key", "value")}
    ids, pos, out = [PROMPT], [list(range(len(PROMPT)))], []
    for tok in [None, *NEXT]:
        if tok is not None:
            ids, pos = [[tok]], [[pos[0][-1] + 1]]
        got = dict(zip(names, sess.run(None, {"input_ids": np.array(ids), "position_ids": np.array(pos), **past})))
        out.append(got["logits"])
        past = {k: got[k.replace("past_key_values", "present")] for k in past}
    return out


@pytest.fixture(scope="module")
def reference_logits(gelu_moe):
    cache = {}

    def get(scheme=None):
        if scheme not in cache:
            model, spec, _ = _lowered(gelu_moe, "reference", scheme)
            cache[scheme] = _logits(model, spec)
        return cache[scheme]

    return get


def _max_diff(a: list, b: list) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


GELU_SKIP = "layer 1: activation='gelu_tanh'"


@pytest.mark.parametrize("lowering", ["ort", "trt-native"])
def test_gelu_moe_matches_reference(lowering, gelu_moe, reference_logits):
    """The exact bug: ort gave these experts SwiGLU (max |logit diff| 0.3 on this model). Now the MoE layer stays
    decomposed on ort (reported) and the logits are the reference lowering's."""
    model, spec, counts = _lowered(gelu_moe, lowering)
    diff = _max_diff(_logits(model, spec), reference_logits())
    assert diff < 1e-4, diff
    assert counts["moe_fused"] == 0 and counts["attention_fused"] == spec.num_layers
    ops = {n.op_type for n in model.graph}
    assert "MoE" not in ops and "Einsum" in ops  # the expert loop in standard ops
    if lowering == "ort":
        assert counts["GroupQueryAttention"] == spec.num_layers
        assert counts["skipped"][0].startswith(GELU_SKIP) and "GeGLU" in counts["skipped"][0]


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_gelu_moe_quantized_matches_reference(scheme, gelu_moe, reference_logits):
    """graphs/quantize.py on an ort graph whose MoE layer stayed decomposed: its experts are quantized in the
    reference form (no QMoE, which would be SwiGLU), the rest as MatMulNBits; logits as the quantized reference."""
    model, spec, counts = _lowered(gelu_moe, "ort", scheme)
    diff = _max_diff(_logits(model, spec), reference_logits(scheme))
    assert diff < 1e-3, diff
    ops = [n.op_type for n in model.graph]
    assert "QMoE" not in ops and "MoE" not in ops and "MatMulNBits" in ops
    assert counts["quantization"]["counts"]["experts"] == 2  # gate_up and down of layer 1


def test_gelu_moe_trt_plugin_graph(gelu_moe):
    model, spec, counts = _lowered(gelu_moe, "trt-plugin")
    plugins = [n for n in model.graph if n.domain == lower.PLUGIN_DOMAIN]
    assert [n.op_type for n in plugins] == [attn_plugin.PLUGIN_NAME] * spec.num_layers  # no MoE plugin node
    for i, node in enumerate(plugins):
        attrs = {k: v.value for k, v in node.attributes.items() if not k.startswith("plugin_")}
        assert attrs == fuse.attention_attrs(spec, i, "static")
    assert counts["moe_fused"] == 0 and counts["skipped"][0].startswith(GELU_SKIP)
    assert "kernels implement silu only" in counts["skipped"][0]
    assert "Einsum" in {n.op_type for n in model.graph}


# ---- attributes no lowering was taught, and values refused before fusion ----------------------------------------

@pytest.mark.parametrize("lowering", TARGETS)
def test_new_attention_attribute_must_be_taught(lowering, gelu_moe, monkeypatch):
    """A developer adds an attribute to the fused attention node (its definition and fuse.py) but to no lowering's
    table: every lowering stops the build, naming lowering, attribute and node."""
    real = fuse.attention_attrs
    monkeypatch.setitem(attn_plugin.ATTRS, "rope_style", str)
    monkeypatch.setattr(fuse, "attention_attrs", lambda spec, i, kv: dict(real(spec, i, kv), rope_style="neox"))
    model, spec = gelu_moe()
    with pytest.raises(LoweringError, match=rf"lowering {lowering} does not handle attribute 'rope_style' "
                                            r"\(= 'neox'\) of node layers\.0\.attention"):
        lower.lower(model, spec, lowering, "static", CACHE, np.float32)


@pytest.mark.parametrize("lowering", TARGETS)
def test_new_moe_attribute_must_be_taught(lowering, gelu_moe, monkeypatch):
    real = fuse.moe_attrs
    monkeypatch.setitem(moe_plugin.ATTRS, "shared_experts", int)
    monkeypatch.setattr(fuse, "moe_attrs", lambda spec: dict(real(spec), shared_experts=1))
    model, spec = gelu_moe()
    if lowering == "trt-native":  # never fuses MoE: the exporter's expert loop is what TensorRT builds
        counts = lower.lower(model, spec, lowering, "static", CACHE, np.float32)
        assert counts["moe_fused"] == 0 and "Einsum" in {n.op_type for n in model.graph}
        return
    with pytest.raises(LoweringError, match=rf"lowering {lowering} does not handle attribute 'shared_experts' "
                                            r"\(= 1\) of node layers\.1\.moe"):
        lower.lower(model, spec, lowering, "static", CACHE, np.float32)


def test_value_refused_or_left_decomposed_before_fusion(gelu_moe, monkeypatch):
    """kv_mode concat on a fused node: trt-plugin refuses the build (its contract is every layer as a plugin);
    ort and trt-native leave the layers decomposed and report why."""
    real = fuse.attention_attrs
    monkeypatch.setattr(fuse, "attention_attrs", lambda spec, i, kv: dict(real(spec, i, kv), kv_mode="concat"))
    model, spec = gelu_moe()
    with pytest.raises(LoweringError, match=_refusal("trt-plugin", "kv_mode", "concat", "layers.0.attention")):
        lower.lower(model, spec, "trt-plugin", "static", CACHE, np.float32)
    for lowering in ("ort", "trt-native"):
        model, spec = gelu_moe()
        counts = lower.lower(model, spec, lowering, "static", CACHE, np.float32)
        assert counts["attention_fused"] == 0
        assert counts["skipped"][0].startswith("layer 0: kv_mode='concat'") and "static" in counts["skipped"][0]


def test_value_the_node_does_not_define(gelu_moe, monkeypatch):
    """A value outside the fused node's own definition (plugins' VALUES) is never fused, whatever the lowering."""
    real = fuse.moe_attrs
    monkeypatch.setattr(fuse, "moe_attrs", lambda spec: dict(real(spec), activation="relu"))
    model, spec = gelu_moe()
    with pytest.raises(LoweringError, match=r"node layers\.1\.moe: attribute activation='relu' is not one of"):
        lower.lower(model, spec, "ort", "static", CACHE, np.float32)
