"""Weight-only quantization: RTN symmetric per-group maths, and the pass that rewrites a graph's linears.

Maths (numpy only; the exporter and the tests share it): :func:`quantize_rtn` rounds a weight ``[..., K]`` (K =
the input dimension, last) to the nearest integer of ``w / s`` with one absmax scale ``s = max|w| / qmax`` per group
of ``group`` consecutive inputs (qmax 7 for int4, 127 for int8; no zero point); fp8 is FP8E4M3 with ``s = max|w| /
448``. The scales are rounded to the activation dtype first and the integers computed from the rounded scale, so
``dequantize(q, s)`` is exactly what every lowering multiplies out. :func:`pack_nbits` lays the integers out the way
``com.microsoft.MatMulNBits`` / ``QMoE`` read them: offset binary (q + 2^(bits-1), their implicit zero point),
``[N, K/block, block*bits/8]`` uint8, int4 low nibble first.

The pass (:func:`quantize_graph`), run after fusion and lowering, per lowering:

* ``ort``: ``MatMul(x, W)`` -> ``MatMulNBits(x, B, scales)``; ``com.microsoft.MoE`` -> ``com.microsoft.QMoE``
  (``expert_weight_bits``, ``block_size``, raw un-prepacked weights; every MoE attribute carried over as
  :data:`QMOE_FROM_MOE` declares, an attribute it does not name refuses the build). MoE layers the ort lowering
  left decomposed (experts it cannot express, e.g. GeGLU) get the reference form below.
* ``trt-native``: the weight becomes ``DequantizeLinear`` (INT4 with ``block_size`` along K; INT8/FP8 per output
  channel, what TensorRT's Q/DQ takes) feeding the unchanged ``MatMul`` / expert ``Einsum``.
* ``reference``: the integers stored as int8 and dequantized with Cast/Reshape/Mul (no quantization op at all:
  the oracle the other two are checked against).

A graph still holding a fused ``llm_export`` node (one no lowering rewrote) is refused: the pass has no form for it.

Every new initializer is lazy: a weight is read, quantized and dropped while the graph is written, so the build
holds one tensor at a time (a one-slot memo lets the packed weight and its scales share one quantization).
Quantized: every MatMul with a constant weight (attention q/k/v/o, packed qkv, MLP gate/up/down) and the MoE
experts; the LM head only when asked. Never: embeddings, norms, biases, the router (a Gemm). After the rewrite the
pass looks for any float linear weight left and raises :class:`QuantizeError` naming it.

What it does not do: choose the scheme or check group sizes against the model (export/quantize.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphs import fuse
from graphs.fuse import Consumed
from plugins import attention as attn_plugin

MS = "com.microsoft"
FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
LM_HEAD = "decoder.lm_head.weight"  # also the tied embedding's name in the exported graph


class QuantizeError(RuntimeError):
    """A linear that should have been quantized was not, or a weight cannot be quantized as asked."""


# What the QMoE rewrite does with each attribute of com.microsoft.MoE as graphs/lower.py writes it (that lowering's
# own table, lower.ORT_MOE, maps the fused node's attributes onto these).
QMOE_FROM_MOE: fuse.Rules = {
    "k": Consumed("QMoE k"),
    "activation_type": Consumed("QMoE activation_type (QMoE and MoE share the CPU activation code)"),
    "swiglu_fusion": Consumed("QMoE swiglu_fusion"),
    "normalize_routing_weights": Consumed("QMoE normalize_routing_weights; when 0 the full softmax also goes in as "
                                          "router_weights (QMoE alone still renormalises over the top-k)"),
    "activation_alpha": Consumed("QMoE activation_alpha"),
    "activation_beta": Consumed("QMoE activation_beta"),
}


@dataclass(frozen=True)
class QuantConfig:
    scheme: str  # int4 | int8 | fp8
    group_size: int  # along K; 0 = one group per output channel (the whole input dimension)
    accuracy_level: int = 4  # MatMulNBits / QMoE (ort only)
    lm_head: bool = False

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8, "fp8": 8}[self.scheme]


# ---- maths -----------------------------------------------------------------------------------------------------

def qmax(scheme: str) -> float:
    return {"int4": 7.0, "int8": 127.0, "fp8": FP8_MAX}[scheme]


def quantize_rtn(w: np.ndarray, scheme: str, group: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K] -> (q [..., K] int8 (float8_e4m3fn for fp8), scales [..., K/group] in scale_dtype).
    group 0 = K (per channel)."""
    K = w.shape[-1]
    group = group or K
    if K % group:
        raise QuantizeError(f"input dimension {K} is not a multiple of the group size {group}")
    g = w.astype(np.float32).reshape(*w.shape[:-1], K // group, group)
    scale = (np.abs(g).max(axis=-1) / np.float32(qmax(scheme))).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 == 0, np.float32(1), s32)[..., None]  # an all-zero group: q = 0, scale 0
    if scheme == "fp8":
        q = np.clip(g / safe, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    else:
        m = qmax(scheme)
        q = np.clip(np.rint(g / safe), -m - 1, m).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize(q: np.ndarray, scale: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """The weight each lowering computes: q * scale per group along the last axis, in the scale's dtype (the
    activation dtype), returned as out_dtype."""
    K, groups = q.shape[-1], scale.shape[-1]
    qf = q.astype(np.float32).astype(scale.dtype).reshape(*q.shape[:-1], groups, K // groups)
    return (qf * scale[..., None]).reshape(q.shape).astype(out_dtype)


def pack_nbits(q: np.ndarray, bits: int, group: int) -> np.ndarray:
    """q [..., N, K] int8 -> uint8 [..., N, K/group, group*bits/8]: offset binary, int4 low nibble first."""
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    *lead, K = u.shape
    u = u.reshape(*lead, K // group, group)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_nbits(b: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_nbits: uint8 [..., N, K/group, group*bits/8] -> int8 [..., N, K]."""
    if bits == 8:
        u = b.astype(np.int16)
    else:
        u = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2).astype(np.int16)
    q = (u - (1 << (bits - 1))).astype(np.int8)
    return q.reshape(*q.shape[:-2], -1)


# ---- lazy, memoised quantization of one source tensor ----------------------------------------------------------

class _Quantized:
    """Quantizes one source tensor (a lazy initializer) on first read. One slot is shared by the whole pass, so at
    most one quantized tensor is alive: the q and scale initializers of a weight are written one after the other."""

    slot: list = [None, None]

    def __init__(self, src, scheme: str, group: int, scale_dtype, transpose: bool):
        self.src, self.scheme, self.group, self.scale_dtype, self.transpose = src, scheme, group, scale_dtype, transpose

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        if self.slot[0] is not self:
            w = self.src.numpy()
            w = w.T if self.transpose else w  # to [..., N, K]
            self.slot[:] = [self, quantize_rtn(w, self.scheme, self.group, self.scale_dtype)]
        return self.slot[1]


def release() -> None:
    """Forget the memoised tensor (called once the graph is written)."""
    _Quantized.slot[:] = [None, None]


def _lazy(graph: ir.Graph, name: str, dtype: ir.DataType, shape, load) -> ir.Value:
    shape = ir.Shape(list(shape))

    def make():
        arr = np.ascontiguousarray(load())
        return ir.Tensor(arr, dtype=dtype, name=name)

    value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype),
                     const_value=ir.LazyTensor(make, dtype=dtype, shape=shape, name=name))
    graph.register_initializer(value)
    return value


# ---- the pass --------------------------------------------------------------------------------------------------

def _weight_of(value: ir.Value):
    """(initializer, transposed) when value is a constant float 2-D weight [K, N] or Transpose(perm 1,0) of one
    stored [N, K] (the tied LM head), else None."""
    if value is None:
        return None
    if value.const_value is not None and value.is_initializer():
        return (value, False) if value.dtype.is_floating_point() and len(value.shape) == 2 else None
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.inputs[0] is not None:
        perm = node.attributes.get("perm")
        src = node.inputs[0]
        if perm is not None and list(perm.value) == [1, 0] and src.const_value is not None and src.is_initializer() \
                and src.dtype.is_floating_point():
            return src, True
    return None


def _expert_weight(value: ir.Value) -> bool:
    return value is not None and value.const_value is not None and value.dtype.is_floating_point() and \
        value.shape is not None and len(value.shape) == 3 and ".moe." in value.name


def quantize_graph(model: ir.Model, cfg: QuantConfig, lowering: str, np_dtype) -> dict:
    """Rewrite in place; returns counts and the scheme of every weight (by initializer name)."""
    if lowering == "trt-plugin":
        raise QuantizeError("the trt-plugin lowering has no quantized form; use trt-native")
    if cfg.scheme == "fp8" and lowering == "ort":
        raise QuantizeError("fp8 weights have no ONNX Runtime CPU kernel (MatMulNBits takes int4/int8)")
    graph = model.graph
    for node in graph:
        if node.domain == attn_plugin.DOMAIN:
            raise fuse.LoweringError(f"quantization ({lowering}) has no form for the fused node {node.name} "
                                     f"({node.domain}.{node.op_type}): lower it first (graphs/lower.py)")
    act = ir.DataType.from_numpy(np.dtype(np_dtype))
    _Quantized.slot[:] = [None, None]
    schemes: dict[str, dict] = {}
    counts = {"linear": 0, "experts": 0, "lm_head": 0}
    # TensorRT's INT8/FP8 Q/DQ is per tensor or per channel: one group spans the whole input dimension.
    group = cfg.group_size if (cfg.scheme == "int4" or lowering != "trt-native") else 0
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain == "":
            found = _weight_of(node.inputs[1])
            if found is None:
                continue
            w, transposed = found
            if _is_router(w.name):
                continue
            head = w.name == LM_HEAD
            if head and not cfg.lm_head:
                continue
            K, N = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            # quantize W^T [N, K] along K: a stored [K, N] weight is transposed, a transposed [N, K] one is not
            quant = _Quantized(w.const_value, cfg.scheme, group, np_dtype, transpose=not transposed)
            tag = f"{w.name}.{'lm_head' if head and transposed else 'q'}"
            if lowering == "ort":
                _to_matmul_nbits(graph, node, quant, tag, K, N, cfg, act)
            else:
                node.replace_input_with(1, _dequant_2d(graph, node, quant, tag, K, N, cfg, lowering, act, group))
            schemes[w.name + (".as_lm_head" if head and transposed else "")] = _scheme(cfg, group or K, [K, N])
            counts["lm_head" if head else "linear"] += 1
        elif node.domain == MS and node.op_type == "MoE" and lowering == "ort" and not _qmoe_inexact(cfg):
            _to_qmoe(graph, node, cfg, np_dtype, act, schemes)
            counts["experts"] += 2
    # Expert stacks still read as floats: the decomposed expert loop (reference, trt-native, and MoE layers the ort
    # lowering left unfused) and com.microsoft.MoE kept for exactness (_qmoe_inexact): dequantized in the graph.
    # (QMoE's own scales are float stacks too: not weights.)
    for value in list(graph.initializers.values()):
        if _expert_weight(value) and not _is_scale(value.name) and list(value.uses()):
            E, N, K = value.shape
            quant = _Quantized(value.const_value, cfg.scheme, group, np_dtype, transpose=False)
            out = _dequant_experts(graph, quant, value.name + ".q", E, N, K, cfg, lowering, act, group)
            value.replace_all_uses_with(out)
            schemes[value.name] = _scheme(cfg, group or K, [E, N, K])
            counts["experts"] += 1
    fuse.remove_unused(model)
    left = _float_linears(graph, cfg)
    if left:
        raise QuantizeError(f"{len(left)} linear weight(s) were not quantized: {', '.join(left[:8])}")
    if lowering == "ort":
        model.opset_imports.setdefault(MS, 1)
    if lowering == "trt-native":
        model.opset_imports[""] = max(model.opset_imports.get("", 21), 21)  # blocked DequantizeLinear
    for value in graph.initializers.values():  # everything else keeps its stored precision
        if value.dtype.is_floating_point() and value.name not in schemes and value.shape is not None \
                and len(value.shape) >= 1 and not _is_scale(value.name):
            schemes[value.name] = {"scheme": value.dtype.name.lower()}
    return {"scheme": cfg.scheme, "group_size": cfg.group_size, "trt_channel_wise": group == 0,
            "accuracy_level": cfg.accuracy_level if lowering == "ort" else None, "lm_head": cfg.lm_head,
            "counts": counts, "tensors": dict(sorted(schemes.items()))}


def _qmoe_inexact(cfg: QuantConfig) -> bool:
    """QMoE's block-wise 8-bit CPU kernel always quantizes the activations to int8 (measured: 1% off a numpy
    reference at accuracy_level 1). At --accuracy-level 1 (fp32 compute, for checking) int8 experts are therefore
    dequantized (the reference form, standard ops) into com.microsoft.MoE instead."""
    return cfg.scheme == "int8" and cfg.accuracy_level < 4


def _is_router(name: str) -> bool:
    """The MoE router (a Gemm in the exported graph, a MatMul after the ort lowering): it stays in the precision
    (E is small, and top-k choices are sensitive to it)."""
    return ".moe.router." in name


def _is_scale(name: str) -> bool:
    return name.endswith((".scales", ".fc1_scales", ".fc2_scales"))


def _scheme(cfg: QuantConfig, group: int, shape) -> dict:
    return {"scheme": f"{cfg.scheme}-rtn-symmetric", "bits": cfg.bits, "group_size": group, "axis": "input",
            "shape": list(shape)}


def _copy_type(old: ir.Value, new: ir.Value) -> None:
    if old.type is not None:
        new.type = old.type
    if old.shape is not None:
        new.shape = old.shape.copy()


def _to_matmul_nbits(graph, node, quant, tag, K, N, cfg, act) -> None:
    g = cfg.group_size
    bits = cfg.bits
    B = _lazy(graph, f"{tag}.packed", ir.DataType.UINT8, [N, K // g, g * bits // 8],
              lambda: pack_nbits(quant.get()[0], bits, g))
    S = _lazy(graph, f"{tag}.scales", act, [N, K // g], lambda: quant.get()[1])
    new = ir.node("MatMulNBits", [node.inputs[0], B, S],
                  {"K": K, "N": N, "bits": bits, "block_size": g, "accuracy_level": cfg.accuracy_level},
                  domain=MS, num_outputs=1, name=f"{node.name or tag}.nbits")
    _copy_type(node.outputs[0], new.outputs[0])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))


# scheme -> (ONNX type, numpy type) of the stored weights in the trt-native (DequantizeLinear) form
_TRT_QTYPES = {"int4": (ir.DataType.INT4, ml_dtypes.int4), "int8": (ir.DataType.INT8, np.int8),
               "fp8": (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn)}


def _dequant_2d(graph, node, quant, tag, K, N, cfg, lowering, act, group) -> ir.Value:
    """W [K, N] in the activation dtype, computed from q and the scales (block along K)."""
    g = group or K
    groups = K // g
    if lowering == "trt-native":
        qtype, np_q = _TRT_QTYPES[cfg.scheme]
        q = _lazy(graph, f"{tag}.weight", qtype, [K, N], lambda: quant.get()[0].T.astype(np_q))
        if group:  # int4: blocked along K (axis 0), scales [K/g, N]
            s = _lazy(graph, f"{tag}.scales", act, [groups, N], lambda: quant.get()[1].T)
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 0, "block_size": g}, name=f"{tag}.dq")
        else:  # per output channel: scales [N] on axis 1
            s = _lazy(graph, f"{tag}.scales", act, [N], lambda: quant.get()[1][:, 0])
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 1}, name=f"{tag}.dq")
        nodes = [dq]
    else:
        q = _lazy(graph, f"{tag}.weight", ir.DataType.INT8, [K, N], lambda: quant.get()[0].T)
        s = _lazy(graph, f"{tag}.scales", act, [groups, 1, N], lambda: quant.get()[1].T[:, None, :])
        split = fuse.initializer(graph, f"quant.shape_{groups}x{g}x{N}", np.array([groups, g, N], dtype=np.int64))
        merge = fuse.initializer(graph, f"quant.shape_{K}x{N}", np.array([K, N], dtype=np.int64))
        cast = ir.node("Cast", [q], {"to": act}, name=f"{tag}.cast")
        r = ir.node("Reshape", [cast.outputs[0], split], name=f"{tag}.groups")
        m = ir.node("Mul", [r.outputs[0], s], name=f"{tag}.scale")
        out = ir.node("Reshape", [m.outputs[0], merge], name=f"{tag}.dequant")
        nodes = [cast, r, m, out]
    nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = act, ir.Shape([K, N])
    graph.insert_before(node, nodes)
    return nodes[-1].outputs[0]


def _dequant_experts(graph, quant, tag, E, N, K, cfg, lowering, act, group) -> ir.Value:
    """Expert stack [E, N, K] in the activation dtype (block along K, the last axis)."""
    g = group or K
    groups = K // g
    if lowering == "trt-native":
        qtype, np_q = _TRT_QTYPES[cfg.scheme]
        # TensorRT (Myelin) refuses a 3-D blocked DequantizeLinear: dequantize the stack as one 2-D weight
        # [E*N, K] blocked along K, then view it as [E, N, K].
        q = _lazy(graph, f"{tag}.weight", qtype, [E * N, K], lambda: quant.get()[0].reshape(E * N, K).astype(np_q))
        merge = fuse.initializer(graph, f"quant.shape_{E}x{N}x{K}", np.array([E, N, K], dtype=np.int64))
        if group:
            s = _lazy(graph, f"{tag}.scales", act, [E * N, groups], lambda: quant.get()[1].reshape(E * N, groups))
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 1, "block_size": g}, name=f"{tag}.dq")
        else:  # per output channel (TensorRT int8/fp8): one scale per row of the flattened stack
            s = _lazy(graph, f"{tag}.scales", act, [E * N], lambda: quant.get()[1].reshape(E * N))
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 0}, name=f"{tag}.dq")
        nodes = [dq, ir.node("Reshape", [dq.outputs[0], merge], name=f"{tag}.dequant")]
    else:
        q = _lazy(graph, f"{tag}.weight", ir.DataType.INT8, [E, N, K], lambda: quant.get()[0])
        s = _lazy(graph, f"{tag}.scales", act, [E, N, groups, 1], lambda: quant.get()[1][..., None])
        split = fuse.initializer(graph, f"quant.shape_{E}x{N}x{groups}x{g}",
                                 np.array([E, N, groups, g], dtype=np.int64))
        merge = fuse.initializer(graph, f"quant.shape_{E}x{N}x{K}", np.array([E, N, K], dtype=np.int64))
        cast = ir.node("Cast", [q], {"to": act}, name=f"{tag}.cast")
        r = ir.node("Reshape", [cast.outputs[0], split], name=f"{tag}.groups")
        m = ir.node("Mul", [r.outputs[0], s], name=f"{tag}.scale")
        out = ir.node("Reshape", [m.outputs[0], merge], name=f"{tag}.dequant")
        nodes = [cast, r, m, out]
    nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = act, ir.Shape([E, N, K])
    # before the first node of the graph that reads it: weights have no producer, so the top of the graph is safe
    first = next(iter(graph))
    graph.insert_before(first, nodes)
    return nodes[-1].outputs[0]


def _to_qmoe(graph, node, cfg, np_dtype, act, schemes) -> None:
    """com.microsoft.MoE (fc1 = gate|up interleaved [E, 2I, H], fc2 = down [E, H, I]) -> QMoE, same routing."""
    attrs = fuse.lowered_attrs("ort (QMoE)", QMOE_FROM_MOE, node)
    x, logits, fc1, fc1_bias, fc2 = node.inputs[:5]
    if fc1_bias is not None or any(v is not None for v in node.inputs[5:]):
        raise fuse.LoweringError(f"the QMoE rewrite of node {node.name} carries no expert biases or fc3 weights")
    g, bits = cfg.group_size, cfg.bits
    new_inputs = [x, logits]
    for tag, w in (("fc1", fc1), ("fc2", fc2)):
        E, N, K = w.shape
        quant = _Quantized(w.const_value, cfg.scheme, g, np_dtype, transpose=False)
        packed = _lazy(graph, f"{w.name}.{tag}_weight", ir.DataType.UINT8, [E, N, K * bits // 8],
                       lambda quant=quant, E=E, N=N: pack_nbits(quant.get()[0], bits, g).reshape(E, N, -1))
        scales = _lazy(graph, f"{w.name}.{tag}_scales", act, [E, N, K // g], lambda quant=quant: quant.get()[1])
        new_inputs += [packed, scales, None]
        schemes[w.name] = _scheme(cfg, g, [E, N, K])
    pre = []
    if not attrs["normalize_routing_weights"]:
        # QMoE with normalize_routing_weights=0 still mixes with a softmax over the top-k logits only (measured:
        # renormalised). Without renormalisation the mixing weights are the full softmax's: pass them as
        # router_weights (router_probs then only selects the experts).
        soft = ir.node("Softmax", [logits], {"axis": -1}, name=f"{node.name}.routing")
        pre.append(soft)
        new_inputs += [None] * 6 + [soft.outputs[0]]  # fc3 weight/scales/bias, 3 zero points, router_weights
    attrs.update(expert_weight_bits=bits, block_size=g, quant_type="int", weights_prepacked=0,
                 accuracy_level=cfg.accuracy_level)
    new = ir.node("QMoE", new_inputs, attrs, domain=MS, num_outputs=1, name=f"{node.name}.q")
    _copy_type(node.outputs[0], new.outputs[0])
    ir.convenience.replace_nodes_and_values(graph, node, [node], pre + [new], list(node.outputs),
                                            list(new.outputs))


def _float_linears(graph: ir.Graph, cfg: QuantConfig) -> list[str]:
    """Names of float weights still read by a MatMul, an Einsum or a MoE node (the router is a Gemm)."""
    left = []
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "":
            found = _weight_of(node.inputs[1])
            if found is not None and not _is_router(found[0].name) and \
                    not (found[0].name == LM_HEAD and not cfg.lm_head):
                left.append(found[0].name)
        elif node.op_type in ("Einsum", "MoE"):
            left += [v.name for v in node.inputs if v is not None and _expert_weight(v)]
    return left
