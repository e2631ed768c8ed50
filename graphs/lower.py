"""Lowerings: turn the fused llm_export nodes into what one target runs.

Targets (DESIGN.md section 3):

* ``reference``: no fusion at all; the exporter's standard-op graph (the unfused graph every other lowering is
  tested against).
* ``ort``: attention -> ``com.microsoft.GroupQueryAttention`` on the shared static KV buffer (present aliases
  past; RoPE from the cos/sin caches inside the op; softcap; ``local_window_size = window``, which matches
  transformers' window measured against it), preceded by
  a per-head RMSNorm on q/k for Qwen3 (the CPU kernel ignores GQA's own q/k norm inputs); q/k/v projections
  packed into one MatMul where there is no q/k norm, and gate/up likewise (graphs/pack.py);
  MoE -> ``com.microsoft.MoE`` on the flattened tokens (router logits in, SwiGLU with gate/up interleaved,
  ``swiglu_fusion=1``); RMSNorms -> ``RMSNormalization``, with the residual add folded in as
  ``com.microsoft.SkipSimplifiedLayerNormalization`` in fp32 (graphs/norms.py).
  Concat-mode attention (left padding + attention mask) has no GQA form: those regions stay unfused, reported.
* ``trt-plugin``: every fused node becomes a TensorRT plugin node: op_type = plugin name, attributes
  ``plugin_namespace``/``plugin_version`` plus the node's own fields (names from plugins/).
* ``trt-native``: opset-23 ``Attention``/``RotaryEmbedding``/``RMSNormalization`` that TensorRT builds itself,
  decomposed fallback for softcap layers and MoE (graphs/native.py).

Each lowering returns a dict of counts; the build records them in the manifest.

What it does not do: find regions (fuse.py) or build engines.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse, norms, pack
from plugins import attention as attn_plugin
from plugins import moe as moe_plugin

LOWERINGS = ("reference", "ort", "trt-plugin", "trt-native")
MS = "com.microsoft"


def _ort_supports(attrs: dict) -> str | None:
    if attrs["kv_mode"] != "static":
        return "GroupQueryAttention needs the static KV buffer (build with --kv-mode static)"
    if attrs["head_dim"] % 16:
        return f"GroupQueryAttention (CPU) needs head_dim % 16 == 0, got {attrs['head_dim']}"
    return None


def lower(model: ir.Model, spec, lowering: str, kv_mode: str, max_seq_len: int, np_dtype) -> dict:
    """Fuse and lower in place. Returns counts: fused attention/MoE, lowered nodes, and what was skipped."""
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose from {LOWERINGS}")
    if lowering == "reference":
        return {"lowering": "reference", "attention_fused": 0, "moe_fused": 0, "skipped": []}
    from graphs import native

    supports = {"ort": _ort_supports, "trt-native": native.supports}.get(lowering, lambda attrs: None)
    att = fuse.fuse_attention(model, spec, kv_mode, max_seq_len, np_dtype, supports=supports)
    if lowering == "trt-plugin":  # the plugin handles every form: anything left unfused is a bug
        att.require(spec.num_layers)
    moe = fuse.Report("MoE fusion")
    if lowering != "trt-native":  # TensorRT has no native MoE layer: the expert loop stays decomposed
        moe = fuse.fuse_moe(model, spec)
        moe.require(len(spec.sparse_layers))
    counts = {"lowering": lowering, "attention_fused": att.fused, "moe_fused": moe.fused,
              "skipped": att.skipped + moe.skipped}
    if lowering == "ort":
        counts["qkv_packed"] = pack.pack_qkv(model, lambda n: not n.attributes["qk_norm"].value)
        counts["gate_up_packed"] = pack.pack_gate_up(model, spec)
        counts.update(_lower_ort(model, spec))
        counts.update(norms.fuse_rmsnorm(model, spec, skip_fusion=True))
    elif lowering == "trt-plugin":
        counts.update(_lower_trt_plugin(model))
    else:
        counts.update(native.lower_trt_native(model))
        counts.update(norms.fuse_rmsnorm(model, spec, skip_fusion=False))
    fuse.remove_unused(model)
    _strip_debug_metadata(model)
    return counts


# ---- ort -------------------------------------------------------------------------------------------------------

def _lower_ort(model: ir.Model, spec) -> dict:
    graph = model.graph
    gqa = moe = 0
    lengths = None
    for node in list(graph):
        if node.domain != fuse.attn_plugin.DOMAIN:
            continue
        if node.op_type == attn_plugin.OP:
            if lengths is None:
                lengths = _seq_lengths(graph, node, node.inputs[5])
            _attention_to_gqa(graph, node, *lengths)
            gqa += 1
        elif node.op_type == moe_plugin.OP:
            _moe_to_ort(graph, node)
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


def _attention_to_gqa(graph: ir.Graph, node: ir.Node, seqlens: ir.Value, total: ir.Value) -> None:
    a = {k: v.value for k, v in node.attributes.items()}
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


def _moe_to_ort(graph: ir.Graph, node: ir.Node) -> None:
    a = {k: v.value for k, v in node.attributes.items()}
    hidden, router, gate_up, down = node.inputs
    H = router.shape[0]
    flat = fuse.initializer(graph, "moe.flat_shape", np.array([-1, H], dtype=np.int64))
    x2 = ir.node("Reshape", [hidden, flat], name=f"{node.name}.flat")
    logits = ir.node("MatMul", [x2.outputs[0], router], name=f"{node.name}.router")
    fc1 = _interleaved(graph, gate_up)
    # The 2-D (token-major) form: with a 3-D input, ORT 1.31's CPU MoE gave wrong results downstream in a full
    # graph (the residual add after it), while the same op on the flattened tokens is exact.
    moe = ir.node("MoE", [x2.outputs[0], logits.outputs[0], fc1, None, down],
                  {"k": a["top_k"], "activation_type": "swiglu", "swiglu_fusion": 1,
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

    return fuse.lazy_initializer(graph, gate_up.name + ".interleaved", gate_up, gate_up.shape, load)


def _swap(graph: ir.Graph, old: ir.Node, new: list[ir.Node], new_outputs) -> None:
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, list(old.outputs), list(new_outputs))


# ---- trt-plugin ------------------------------------------------------------------------------------------------

PLUGIN_DOMAIN = "trt.plugins"


def _lower_trt_plugin(model: ir.Model) -> dict:
    counts = {attn_plugin.PLUGIN_NAME: 0, moe_plugin.PLUGIN_NAME: 0}
    for node in list(model.graph):
        if node.domain != attn_plugin.DOMAIN:
            continue
        plugin = attn_plugin if node.op_type == attn_plugin.OP else moe_plugin
        attrs = {k: v.value for k, v in node.attributes.items()}
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
