"""The ``trt-native`` lowering: fused attention -> standard ONNX opset-23 ops that TensorRT builds natively.

Per layer: per-head ``RMSNormalization`` on q/k (Qwen3), ``RotaryEmbedding`` on q and k (cos/sin caches indexed
by position_ids), the static KV buffer updated with ``ScatterElements`` at the positions, and ``Attention``
(one output, scale, boolean mask from positions: causal + sliding window) on the updated buffer.
TensorRT's attention has no logit softcap, so layers with a softcap (Gemma2) are not fused here: they keep the
exporter's decomposed form (the "decomposed fallback"), reported by the fusion pass. Concat-mode attention is left
decomposed too. MoE stays decomposed in this lowering (TensorRT has no native MoE layer): it is never fused, and
a fused MoE node is refused (graphs/lower.py).

:data:`ATTENTION` is this lowering's table of what it does with each attribute of the fused attention node
(graphs/fuse.py's vocabulary): the fusion pass reads it to leave a layer decomposed, and :func:`lower_trt_native`
checks every node against it (an attribute it does not name, or a value it cannot express, raises
``LoweringError``).

The same graph runs on ONNX Runtime (CPU), which is how its numerics are tested against the unfused graph.

What it does not do: build the engine (export/engine.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse
from graphs.fuse import Consumed, Needs
from plugins import attention as attn_plugin

OPSET = 23

ATTENTION: fuse.Rules = {
    "num_heads": Consumed("head split (Reshape) and RotaryEmbedding num_heads of q"),
    "num_kv_heads": Consumed("head split (Reshape) and RotaryEmbedding num_heads of k"),
    "head_dim": Consumed("head split (Reshape)"),
    "scale": Needs(lambda s: s > 0, "ONNX Attention takes a scale > 0 only (ONNX Runtime checks it)"),
    "softcap": Needs(lambda c: not c, "TensorRT's attention has no softcap: decomposed fallback"),
    "window": Consumed("the boolean mask (causal, and p - k < window)"),
    "kv_mode": Needs(lambda m: m == "static", "trt-native attention needs the static KV buffer (--kv-mode static)"),
    "qk_norm": Consumed("per-head RMSNormalization on q and k"),
    "rms_eps": Consumed("RMSNormalization epsilon"),
}


def _i64(graph, name, values):
    return fuse.initializer(graph, name, np.array(values, dtype=np.int64))


def lower_trt_native(model: ir.Model) -> dict:
    graph = model.graph
    shared: dict = {}
    count = 0
    for node in list(graph):
        if node.domain == attn_plugin.DOMAIN and node.op_type == attn_plugin.OP:
            new, outs = _attention(graph, node, shared)
            graph.insert_before(node, shared.pop("_pending", []))
            ir.convenience.replace_nodes_and_values(graph, node, [node], new, list(node.outputs), outs)
            count += 1
    model.opset_imports[""] = OPSET
    return {"Attention": count}


def _mask(graph, pos, past_k, window: int, shared) -> ir.Value:
    """bool [B,1,S,M]: key slot k visible to the query at position p iff k <= p (and p - k < window)."""
    key = ("mask", window)
    if key in shared:
        return shared[key]
    pending = shared.setdefault("_pending", [])
    if "slots" not in shared:
        shape = ir.node("Shape", [past_k], {"start": 2, "end": 3}, name="native.cache_len")
        zero, one = _i64(graph, "native.zero", 0), _i64(graph, "native.one", 1)
        length = ir.node("Squeeze", [shape.outputs[0]], name="native.cache_len_scalar")
        slots = ir.node("Range", [zero, length.outputs[0], one], name="native.slots")  # [M]
        qpos = ir.node("Unsqueeze", [pos, _i64(graph, "native.axes_last", [-1])], name="native.qpos")  # [B,S,1]
        pending += [shape, length, slots, qpos]
        shared["slots"], shared["qpos"] = slots.outputs[0], qpos.outputs[0]
    slots, qpos = shared["slots"], shared["qpos"]
    causal = ir.node("LessOrEqual", [slots, qpos], name=f"native.causal_w{window}")  # [B,S,M]
    allowed = causal
    nodes = [causal]
    if window:
        dist = ir.node("Sub", [qpos, slots], name=f"native.dist_w{window}")
        inside = ir.node("Less", [dist.outputs[0], _i64(graph, f"native.window_{window}", window)],
                         name=f"native.inside_w{window}")
        allowed = ir.node("And", [causal.outputs[0], inside.outputs[0]], name=f"native.allowed_w{window}")
        nodes += [dist, inside, allowed]
    mask = ir.node("Unsqueeze", [allowed.outputs[0], _i64(graph, "native.axes_1", [1])], name=f"native.mask_w{window}")
    pending += nodes + [mask]
    shared[key] = mask.outputs[0]
    return mask.outputs[0]


def _attention(graph, node, shared):
    a = fuse.lowered_attrs("trt-native", ATTENTION, node)
    q, k, v, past_k, past_v, pos, _mask_in, cos, sin, qn, kn = node.inputs
    nh, kvh, d, name = a["num_heads"], a["num_kv_heads"], a["head_dim"], node.name
    new = []

    def add(op, inputs, attrs=None, suffix=""):
        n = ir.node(op, inputs, attrs or {}, name=f"{name}.{suffix or op.lower()}")
        new.append(n)
        return n.outputs[0]

    def heads(x, count, tag):  # [B,S,count*D] -> [B,S,count,D]
        return add("Reshape", [x, _i64(graph, f"native.split_{count}", [0, 0, count, d])], suffix=f"{tag}_split")

    merge = _i64(graph, "native.merge", [0, 0, -1])
    if a["qk_norm"]:
        for tag in ("q", "k"):
            x, w, count = (q, qn, nh) if tag == "q" else (k, kn, kvh)
            if x.dtype != w.dtype:
                w = add("Cast", [w], {"to": x.dtype}, suffix=f"{tag}_norm_w")
            y = add("RMSNormalization", [heads(x, count, tag), w], {"axis": -1, "epsilon": a["rms_eps"],
                                                                    "stash_type": 1}, suffix=f"{tag}_norm")
            y = add("Reshape", [y, merge], suffix=f"{tag}_merge")
            q, k = (y, k) if tag == "q" else (q, y)
    q = add("RotaryEmbedding", [q, cos, sin, pos], {"num_heads": nh, "interleaved": 0}, suffix="q_rope")
    k = add("RotaryEmbedding", [k, cos, sin, pos], {"num_heads": kvh, "interleaved": 0}, suffix="k_rope")
    perm = {"perm": [0, 2, 1, 3]}
    q4 = add("Transpose", [heads(q, nh, "q4")], perm, suffix="q_bnsd")  # [B,nH,S,D]
    k4 = add("Transpose", [heads(k, kvh, "k4")], perm, suffix="k_bnsd")  # [B,KV,S,D]
    v4 = add("Transpose", [heads(v, kvh, "v4")], perm, suffix="v_bnsd")
    idx = add("Expand", [add("Unsqueeze", [pos, _i64(graph, "native.axes_1_3", [1, 3])], suffix="pos_idx"),
                         add("Shape", [k4], suffix="k_shape")], suffix="write_idx")  # [B,KV,S,D] = positions
    present_k = add("ScatterElements", [past_k, idx, k4], {"axis": 2}, suffix="k_update")
    present_v = add("ScatterElements", [past_v, idx, v4], {"axis": 2}, suffix="v_update")
    mask = _mask(graph, pos, past_k, a["window"], shared)
    # No softmax_precision attribute: TensorRT's parser refuses it (its fused attention keeps the softmax
    # statistics in fp32 itself); ONNX Runtime then computes the softmax in the input precision.
    y = add("Attention", [q4, present_k, present_v, mask], {"scale": a["scale"], "is_causal": 0},
            suffix="attention")
    out = add("Reshape", [add("Transpose", [y], perm, suffix="out_bsnd"), merge], suffix="out")
    return new, [out, present_k, present_v]
