"""Lowerings: turn the fused llm_export nodes into what one target runs.

Targets (DESIGN.md section 3):

* ``reference``: no fusion at all; the exporter's standard-op graph (the unfused graph every other lowering is
  tested against).
* ``ort``: attention -> ``com.microsoft.GroupQueryAttention`` on the shared static KV buffer (present aliases
  past; RoPE from the cos/sin caches inside the op; softcap; ``local_window_size = window``, which matches
  transformers' window measured against it), preceded by a per-head RMSNorm on q/k for Qwen3 (the CPU kernel
  ignores GQA's own q/k norm inputs); q/k/v projections packed into one MatMul where there is no q/k norm, and
  gate/up likewise (graphs/pack.py); MoE -> ``com.microsoft.MoE`` on the flattened tokens (router logits in,
  SwiGLU with gate/up interleaved, ``swiglu_fusion=1``); RMSNorms -> ``RMSNormalization``, with the residual add
  folded in as ``com.microsoft.SkipSimplifiedLayerNormalization`` in fp32 (graphs/norms.py).
  Left decomposed (the exporter's standard ops), each layer reported in the counts' ``skipped``: concat-mode
  attention (left padding + attention mask has no GQA form), head_dim not a multiple of 16 (the CPU kernel), a zero
  scale (GQA reads 0 as its default), and MoE layers whose experts are not SwiGLU (com.microsoft.MoE gates only with
  swiglu: GeGLU, ``gelu_tanh``, has no form).
* ``trt-plugin``: every fused node becomes a TensorRT plugin node: op_type = plugin name, attributes
  ``plugin_namespace``/``plugin_version`` plus the node's own fields (names from plugins/). Refused: concat KV mode
  (the attention plugin implements the static buffer). Left decomposed, reported: MoE layers with ``gelu_tanh``
  experts (the MoE plugin's kernels implement silu only).
* ``trt-native``: opset-23 ``Attention``/``RotaryEmbedding``/``RMSNormalization`` that TensorRT builds itself,
  decomposed fallback for softcap layers (and a scale <= 0, which ONNX Attention refuses) and MoE
  (graphs/native.py).

What each lowering does with every attribute of every fused node is a table (attribute -> consumed, matched
against the inputs, or needed to be one of the values the target expresses; graphs/fuse.py has the vocabulary):
:data:`RULES`, one per lowering and node, with graphs/native.py's for trt-native and graphs/quantize.py's for the
QMoE rewrite. A region whose values the target cannot express stays decomposed or the build is refused
(:class:`graphs.fuse.LoweringError`, a ValueError naming the lowering, node, attribute and value); an attribute a
table does not name refuses the build, so an attribute added to a fused node must be taught to every lowering.

Each lowering returns a dict of counts; the build records them in the manifest.

What it does not do: find regions (fuse.py) or build engines.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse, native, norms, pack, quantize
from graphs.fuse import Consumed, LoweringError, Matches, Needs
from plugins import attention as attn_plugin
from plugins import moe as moe_plugin

LOWERINGS = ("reference", "ort", "trt-plugin", "trt-native")
MS = "com.microsoft"
PLUGIN_DOMAIN = "trt.plugins"


# ---- what each lowering does with each attribute --------------------------------------------------------------

def _experts(node: ir.Node) -> int:
    return node.inputs[2].shape[0]  # gate_up [E, 2I, H]


def _inner(node: ir.Node) -> int:
    return node.inputs[2].shape[1] // 2


# the fused node's activation -> com.microsoft.MoE's gated activation_type
ORT_ACTIVATIONS = {"silu": "swiglu"}

ORT_ATTENTION: fuse.Rules = {
    "num_heads": Consumed("GroupQueryAttention num_heads"),
    "num_kv_heads": Consumed("GroupQueryAttention kv_num_heads"),
    "head_dim": Needs(lambda d: d % 16 == 0, "GroupQueryAttention (CPU) needs head_dim % 16 == 0"),
    "scale": Needs(lambda s: s != 0, "GroupQueryAttention reads scale 0 as 1/sqrt(head_dim)"),
    "softcap": Consumed("GroupQueryAttention softcap (0 = off in both)"),
    "window": Consumed("GroupQueryAttention local_window_size (-1 for window 0)"),
    "kv_mode": Needs(lambda m: m == "static",
                     "GroupQueryAttention needs the static KV buffer (build with --kv-mode static)"),
    "qk_norm": Consumed("a per-head RMSNorm on q and k before GroupQueryAttention (standard ops)"),
    "rms_eps": Consumed("the epsilon of that RMSNorm"),
}

ORT_MOE: fuse.Rules = {
    "num_experts": Matches(_experts, "com.microsoft.MoE takes the expert count from the gate_up weight's shape"),
    "top_k": Consumed("com.microsoft.MoE k"),
    "norm_topk_prob": Consumed("com.microsoft.MoE normalize_routing_weights"),
    "moe_intermediate_size": Matches(_inner, "com.microsoft.MoE takes the inner size from the gate_up weight's shape"),
    "activation": Needs(lambda a: a in ORT_ACTIVATIONS,
                        "com.microsoft.MoE gates only with swiglu (silu(gate) * up); its gelu is ungated, so "
                        "gelu_tanh(gate) * up (GeGLU) has no form"),
}

TRT_PLUGIN_ATTENTION: fuse.Rules = {
    "num_heads": Consumed("plugin attribute"),
    "num_kv_heads": Consumed("plugin attribute"),
    "head_dim": Consumed("plugin attribute"),
    "scale": Consumed("plugin attribute (compiled into the AOT kernel)"),
    "softcap": Consumed("plugin attribute (compiled into the AOT kernel)"),
    "window": Consumed("plugin attribute"),
    "kv_mode": Needs(lambda m: m == "static", "the attention plugin implements the static KV buffer only "
                     "(build with --kv-mode static)", fallback=False),
    "qk_norm": Consumed("plugin attribute (the norm weights are always inputs: ones when 0)"),
    "rms_eps": Consumed("plugin attribute"),
}

TRT_PLUGIN_MOE: fuse.Rules = {
    "num_experts": Matches(_experts, "plugin attribute; the kernels read the expert count from gate_up's shape"),
    "top_k": Consumed("plugin attribute"),
    "norm_topk_prob": Consumed("plugin attribute"),
    "moe_intermediate_size": Matches(_inner, "plugin attribute; the kernels read the inner size from gate_up's shape"),
    "activation": Needs(lambda a: a in moe_plugin.KERNEL_ACTIVATIONS,
                        f"the MoE plugin's kernels implement {', '.join(moe_plugin.KERNEL_ACTIVATIONS)} only"),
}

# lowering -> fused op -> its table; None: the lowering never fuses that node (the region stays decomposed)
RULES: dict[str, dict[str, fuse.Rules | None]] = {
    "ort": {attn_plugin.OP: ORT_ATTENTION, moe_plugin.OP: ORT_MOE},
    "trt-plugin": {attn_plugin.OP: TRT_PLUGIN_ATTENTION, moe_plugin.OP: TRT_PLUGIN_MOE},
    "trt-native": {attn_plugin.OP: native.ATTENTION, moe_plugin.OP: None},  # TensorRT has no MoE layer
}


def lower(model: ir.Model, spec, lowering: str, kv_mode: str, max_seq_len: int, np_dtype) -> dict:
    """Fuse and lower in place. Returns counts: fused attention/MoE, lowered nodes, and what was skipped."""
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose from {LOWERINGS}")
    if lowering == "reference":
        return {"lowering": "reference", "attention_fused": 0, "moe_fused": 0, "skipped": []}
    rules = RULES[lowering]
    att = fuse.fuse_attention(model, spec, kv_mode, max_seq_len, np_dtype,
                              supports=fuse.supports(lowering, attn_plugin, rules[attn_plugin.OP]))
    if lowering == "trt-plugin":  # the plugin handles every form it accepts: a region left unmatched is a bug
        att.require(spec.num_layers)
    moe = fuse.Report("MoE fusion")
    if rules[moe_plugin.OP] is not None:
        moe = fuse.fuse_moe(model, spec, supports=fuse.supports(lowering, moe_plugin, rules[moe_plugin.OP]))
        moe.require(len(spec.sparse_layers))
    counts = {"lowering": lowering, "attention_fused": att.fused, "moe_fused": moe.fused,
              "skipped": att.skipped + moe.skipped}
    if lowering == "ort":
        counts["qkv_packed"] = pack.pack_qkv(model, lambda n: not n.attributes["qk_norm"].value)
        counts["gate_up_packed"] = pack.pack_gate_up(model, spec)
    counts.update(lower_fused(model, lowering))
    if lowering == "ort":
        counts.update(norms.fuse_rmsnorm(model, spec, skip_fusion=True))
    elif lowering == "trt-native":
        counts.update(norms.fuse_rmsnorm(model, spec, skip_fusion=False))
    fuse.remove_unused(model)
    _strip_debug_metadata(model)
    return counts


def lower_fused(model: ir.Model, lowering: str) -> dict:
    """Rewrite every fused node in the graph for `lowering` (in place); counts of the nodes written. Each node's
    attributes are checked against the lowering's table first: a node the lowering has no form for, or an attribute
    it does not handle or cannot express, raises LoweringError (no fallback is left once a node is fused)."""
    rules = RULES.get(lowering)
    for node in model.graph:
        if node.domain != attn_plugin.DOMAIN:
            continue
        if rules is None or rules.get(node.op_type) is None:
            raise LoweringError(f"lowering {lowering} has no form for node {node.name} "
                                f"({node.domain}.{node.op_type})")
    if lowering == "ort":
        return _lower_ort(model)
    if lowering == "trt-plugin":
        return _lower_trt_plugin(model)
    return native.lower_trt_native(model)


# ---- ort -------------------------------------------------------------------------------------------------------

def _lower_ort(model: ir.Model) -> dict:
    graph = model.graph
    gqa = moe = 0
    lengths = None
    for node in list(graph):
        if node.domain != attn_plugin.DOMAIN:
            continue
        if node.op_type == attn_plugin.OP:
            a = fuse.lowered_attrs("ort", ORT_ATTENTION, node)
            if lengths is None:
                lengths = _seq_lengths(graph, node, node.inputs[5])
            _attention_to_gqa(graph, node, a, *lengths)
            gqa += 1
        elif node.op_type == moe_plugin.OP:
            _moe_to_ort(graph, node, fuse.lowered_attrs("ort", ORT_MOE, node))
            moe += 1
    model.opset_imports.setdefault(MS, 1)
    return {"GroupQueryAttention": gqa, "MoE": moe}


def _seq_lengths(graph: ir.Graph, before: ir.Node, position_ids: ir.Value):
    """seqlens_k [B] int32 = last position per row; total_sequence_length = max position + 1 (scalar int32).

    With the static layout (slot == position, right-padded prompts) the prompt call has positions 0..S-1 in
    every row, so GQA sees the prompt case; a decode call has one position per row."""
    one = fuse.initializer(graph, "gqa.one", np.array(1, dtype=np.int64))
    axes = fuse.initializer(graph, "gqa.axis1", np.array([1], dtype=np.int64))
    row_max = ir.node("ReduceMax", [position_ids, axes], {"keepdims": 0}, name="gqa.row_max")
    seqlens = ir.node("Cast", [row_max.outputs[0]], {"to": ir.DataType.INT32}, name="gqa.seqlens_k")
    all_max = ir.node("ReduceMax", [position_ids], {"keepdims": 0}, name="gqa.max")
    total64 = ir.node("Add", [all_max.outputs[0], one], name="gqa.total64")
    total = ir.node("Cast", [total64.outputs[0]], {"to": ir.DataType.INT32}, name="gqa.total")
    new = [row_max, seqlens, all_max, total64, total]
    graph.insert_before(before, new)
    return seqlens.outputs[0], total.outputs[0]


def _attention_to_gqa(graph: ir.Graph, node: ir.Node, a: dict, seqlens: ir.Value, total: ir.Value) -> None:
    """One fused attention node (attributes `a`, checked against ORT_ATTENTION) -> [q/k RMSNorm] + GQA."""
    q, k, v, past_k, past_v, _pos, _mask, cos, sin, q_norm, k_norm = node.inputs
    new = []
    if a["qk_norm"]:
        q, k = (_head_rms_norm(graph, x, w, heads, a, new, f"{node.name}.{tag}_norm")
                for x, w, heads, tag in ((q, q_norm, a["num_heads"], "q"), (k, k_norm, a["num_kv_heads"], "k")))
    # k and v are None when graphs/pack.py packed q|k|v into the query input (GQA's packed-QKV form)
    gqa = ir.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin],
                  {"num_heads": a["num_heads"], "kv_num_heads": a["num_kv_heads"], "scale": a["scale"],
                   "softcap": a["softcap"], "local_window_size": a["window"] if a["window"] else -1,
                   "do_rotary": 1, "rotary_interleaved": 0},
                  domain=MS, num_outputs=3, name=f"{node.name}.gqa")
    new.append(gqa)
    _swap(graph, node, new, gqa.outputs)


def _head_rms_norm(graph, x, weight, heads, a, new, name):
    """[B,S,heads*D] -> per-head RMSNorm (fp32, standard ops; ORT fuses them into its own norm kernel at load)
    -> [B,S,heads*D] in x's dtype."""
    split = fuse.initializer(graph, f"gqa.heads_shape.{heads}",
                             np.array([0, 0, heads, a["head_dim"]], dtype=np.int64))
    merge = fuse.initializer(graph, "gqa.merge_shape", np.array([0, 0, -1], dtype=np.int64))
    eps = fuse.initializer(graph, "gqa.eps", np.array(a["rms_eps"], dtype=np.float32))
    last = fuse.initializer(graph, "gqa.axis_last", np.array([-1], dtype=np.int64))
    dtype = x.dtype
    nodes = [ir.node("Reshape", [x, split], name=f"{name}.split")]
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}.f32"))
    xf = nodes[-1].outputs[0]
    nodes.append(ir.node("Mul", [xf, xf], name=f"{name}.sq"))
    nodes.append(ir.node("ReduceMean", [nodes[-1].outputs[0], last], {"keepdims": 1}, name=f"{name}.mean"))
    nodes.append(ir.node("Add", [nodes[-1].outputs[0], eps], name=f"{name}.eps"))
    nodes.append(ir.node("Sqrt", [nodes[-1].outputs[0]], name=f"{name}.sqrt"))
    nodes.append(ir.node("Div", [xf, nodes[-1].outputs[0]], name=f"{name}.div"))
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], weight], name=f"{name}.scale"))  # weight is fp32
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": dtype}, name=f"{name}.cast"))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], merge], name=f"{name}.merge"))
    new += nodes
    return nodes[-1].outputs[0]


def _moe_to_ort(graph: ir.Graph, node: ir.Node, a: dict) -> None:
    """One fused MoE node (attributes `a`, checked against ORT_MOE) -> com.microsoft.MoE on the flattened tokens;
    the expert count and inner size come from the weights' shapes (checked equal to the attributes)."""
    hidden, router, gate_up, down = node.inputs
    H = router.shape[0]
    flat = fuse.initializer(graph, "moe.flat_shape", np.array([-1, H], dtype=np.int64))
    x2 = ir.node("Reshape", [hidden, flat], name=f"{node.name}.flat")
    logits = ir.node("MatMul", [x2.outputs[0], router], name=f"{node.name}.router")
    fc1 = _interleaved(graph, gate_up)
    # The 2-D (token-major) form: with a 3-D input, ORT 1.31's CPU MoE gave wrong results downstream in a full
    # graph (the residual add after it), while the same op on the flattened tokens is exact.
    moe = ir.node("MoE", [x2.outputs[0], logits.outputs[0], fc1, None, down],
                  {"k": a["top_k"], "activation_type": ORT_ACTIVATIONS[a["activation"]], "swiglu_fusion": 1,
                   "normalize_routing_weights": a["norm_topk_prob"], "activation_alpha": 1.0,
                   "activation_beta": 0.0},
                  domain=MS, num_outputs=1, name=f"{node.name}.ort")
    shape = ir.node("Shape", [hidden], name=f"{node.name}.shape")
    back = ir.node("Reshape", [moe.outputs[0], shape.outputs[0]], name=f"{node.name}.unflat")
    _swap(graph, node, [x2, logits, moe, shape, back], back.outputs)


def _interleaved(graph: ir.Graph, gate_up: ir.Value) -> ir.Value:
    """[E, 2I, H] with gate rows then up rows -> rows interleaved g0, u0, g1, u1 ... (lazy, read at save)."""
    src = gate_up.const_value

    def load():
        arr = src.numpy()
        half = arr.shape[1] // 2
        out = np.empty_like(arr)
        out[:, 0::2], out[:, 1::2] = arr[:, :half], arr[:, half:]
        return out

    value = fuse.lazy_initializer(graph, gate_up.name + ".interleaved", gate_up, gate_up.shape, load)
    pre = quantize.qsource(gate_up)  # a pre-quantized checkpoint's integers, rows interleaved the same way
    if pre is not None:
        half = gate_up.shape[1] // 2
        quantize.with_qsource(value, pre.rows(np.stack([np.arange(half), np.arange(half, 2 * half)], 1).reshape(-1)))
    return value


def _swap(graph: ir.Graph, old: ir.Node, new: list[ir.Node], new_outputs) -> None:
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, list(old.outputs), list(new_outputs))


# ---- trt-plugin ------------------------------------------------------------------------------------------------

def _lower_trt_plugin(model: ir.Model) -> dict:
    counts = {attn_plugin.PLUGIN_NAME: 0, moe_plugin.PLUGIN_NAME: 0}
    for node in list(model.graph):
        if node.domain != attn_plugin.DOMAIN:
            continue
        plugin, rules = ((attn_plugin, TRT_PLUGIN_ATTENTION) if node.op_type == attn_plugin.OP
                         else (moe_plugin, TRT_PLUGIN_MOE))
        attrs = fuse.lowered_attrs("trt-plugin", rules, node)  # every one becomes a plugin attribute
        attrs.update(plugin_namespace=plugin.PLUGIN_NAMESPACE, plugin_version=plugin.PLUGIN_VERSION)
        inputs = list(node.inputs)
        if plugin is attn_plugin:  # the registered plugin takes TRT_INPUTS: no mask, norm weights always present
            by_name = dict(zip(attn_plugin.INPUTS, inputs))
            if by_name["q_norm_weight"] is None:
                ones = fuse.initializer(model.graph, "plugin.unit_norm",
                                        np.ones(attrs["head_dim"], dtype=np.float32))
                by_name["q_norm_weight"] = by_name["k_norm_weight"] = ones
            inputs = [by_name[name] for name in attn_plugin.TRT_INPUTS]
        new = ir.node(plugin.PLUGIN_NAME, inputs, attrs, domain=PLUGIN_DOMAIN,
                      num_outputs=len(node.outputs), name=node.name)
        _swap(model.graph, node, [new], new.outputs)
        counts[plugin.PLUGIN_NAME] += 1
    model.opset_imports.setdefault(PLUGIN_DOMAIN, 1)
    return counts


def _strip_debug_metadata(model: ir.Model) -> None:
    """The exporter's stack traces and fx dumps are only needed to find regions; drop them from the artifact."""
    for node in model.graph:
        for key in ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"):
            node.metadata_props.pop(key, None)
