"""Weight-only quantization: RTN symmetric per-group maths, and the pass that rewrites a graph's linears.

Maths (numpy only; the exporter and the tests share it): :func:`quantize_rtn` rounds a weight ``[..., K]`` (K =
the input dimension, last) to the nearest integer of ``w / s`` with one scale per group of ``group`` consecutive
inputs, no zero point: on ort and reference ``s = extreme / -2^(bits-1)`` (the group's largest-magnitude value,
signed, lands on -8 / -128: the full integer range, as ONNX Runtime's own quantizer does it), on trt-native
``s = max|w| / qmax`` (qmax 7 / 127, positive scales for TensorRT's Q/DQ); fp8 is FP8E4M3 with ``s = max|w| / 448``.
The scales are rounded to the activation dtype first and the integers computed from the rounded scale, so
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

Pre-quantized checkpoints (``quantize_graph(model, None, ...)``): the weights export/prequant_checkpoint.py gave a
:class:`QSource` get the checkpoint's own integers (zero points, act-order permutation), never requantized, in the
form their layout allows (:func:`_form`): MatMulNBits/QMoE, DequantizeLinear, or the standard-op dequantization
(``(q - zero) * scale``, the form of every layout no kernel takes). Weights without one stay in the precision.

A graph still holding a fused ``llm_export`` node (one no lowering rewrote) is refused: the pass has no form for it.

Every new initializer is lazy: a weight is read, quantized and dropped while the graph is written, so the build
holds one tensor at a time (a one-slot memo lets the packed weight and its scales share one quantization).
Quantized: every MatMul with a constant weight (attention q/k/v/o, packed qkv, MLP gate/up/down) and the MoE
experts; the LM head only when asked (a tied model's embedding Gather then reads the head's integers, ort and
reference: :func:`_tied_embedding`). Never: an untied embedding, norms, biases, the router (a Gemm). After the
rewrite the pass looks for any float linear weight left and raises :class:`QuantizeError` naming it.

What it does not do: choose the scheme or check group sizes against the model (export/quantize.py does).
"""

from __future__ import annotations

import dataclasses
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
TASK_HEAD = "decoder.head.weight"  # seq-cls / token-cls / qa: [labels, H], a few KB, kept in the precision


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


def quantize_rtn(w: np.ndarray, scheme: str, group: int, scale_dtype=np.float32, rows: int = 1 << 12,
                 full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K] -> (q [..., K] int8 (float8_e4m3fn for fp8), scales [..., K/group] in scale_dtype).
    group 0 = K (per channel). full_range (int4/int8): the scale is the group's extreme value, signed, over
    -2^(bits-1), so the extreme lands exactly on -8 (-128) and the step is absmax/8 instead of absmax/7 (ONNX
    Runtime's own blockwise quantizer does this; a scale may be negative); otherwise absmax / qmax, positive scales
    (TensorRT's Q/DQ). Computed `rows` rows of K at a time (rows are independent, so the result is the same
    whatever `rows`): the float temporaries stay a few MiB while q is written, not five copies of a 3.4 GiB head."""
    K = w.shape[-1]
    group = group or K
    if K % group:
        raise QuantizeError(f"input dimension {K} is not a multiple of the group size {group}")
    flat = w.reshape(-1, K)
    qtype = ml_dtypes.float8_e4m3fn if scheme == "fp8" else np.int8
    q, scale = np.empty(flat.shape, qtype), np.empty((flat.shape[0], K // group), scale_dtype)
    for i in range(0, flat.shape[0], rows):
        q[i:i + rows], scale[i:i + rows] = _rtn_rows(flat[i:i + rows], scheme, group, scale_dtype,
                                                     full_range and scheme != "fp8")
    return q.reshape(w.shape), scale.reshape(*w.shape[:-1], K // group)


def _rtn_rows(w: np.ndarray, scheme: str, group: int, scale_dtype, full_range: bool) -> tuple[np.ndarray, np.ndarray]:
    K = w.shape[-1]
    g = w.astype(np.float32).reshape(*w.shape[:-1], K // group, group)
    if full_range:
        extreme = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        scale = (extreme / np.float32(-qmax(scheme) - 1)).astype(scale_dtype)
    else:
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
    u = np.ascontiguousarray(q).view(np.uint8) + np.uint8(1 << (bits - 1))  # q + 2^(bits-1), wrapping: one uint8 copy
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


# ---- where a weight's integers come from -------------------------------------------------------------------

@dataclass(frozen=True)
class QInfo:
    """What the rewrite of one weight needs before any data is read. group is along K (0 = one group spanning K);
    zeros: the integers have zero points; perm: act-order, the graph computes x[..., perm] @ W' (W' = the weight with
    its inputs permuted so that groups are contiguous)."""

    scheme: str  # int4 | int8 | fp8
    group: int
    zeros: bool = False
    perm: bool = False
    label: str = "rtn-symmetric"  # the source, after the scheme: rtn-symmetric, gptq-v2-symmetric, block (fp8), ...
    full_range: bool = False  # RTN only: the scale rule of quantize_rtn

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8


@dataclass(frozen=True)
class QWeight:
    """The integers of one weight, laid out [..., N, K] (K = input dim): q int8 signed (float8_e4m3fn for fp8),
    scales [..., N, G] float32, zeros [..., N, G] int8 signed or None, perm [K] int64 or None (see QInfo)."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None
    perm: np.ndarray | None = None


@dataclass(frozen=True)
class QSource:
    """A pre-quantized checkpoint's integers for one float initializer (export/prequant_checkpoint.py attaches it to
    the initializer's lazy tensor as ``meta[QSOURCE]``): ``load()`` -> QWeight [..., N, K], exactly the format's
    values; the float tensor itself is their dequantization."""

    info: QInfo
    load: object  # () -> QWeight

    def concat(self, others: list[QSource]) -> QSource | None:
        """The source of the weights concatenated along N (graphs/pack.py), or None when they differ in scheme
        (those are not packed)."""
        parts = [self, *others]
        if len({p.info for p in parts}) != 1 or self.info.perm:
            return None
        loads = [p.load for p in parts]
        return QSource(self.info, lambda: concat_rows([f() for f in loads]))

    def rows(self, index: np.ndarray) -> QSource:
        """The source of the weight with its N rows reordered as index (the MoE gate/up interleave)."""
        load = self.load

        def reorder():
            w = load()
            take = lambda a: None if a is None else np.ascontiguousarray(a[..., index, :])  # noqa: E731
            return QWeight(take(w.q), take(w.scales), take(w.zeros), w.perm)
        return QSource(self.info, reorder)


def concat_rows(ws: list[QWeight]) -> QWeight:
    """Weights of one scheme (no act-order) concatenated along N, the second last axis."""
    cat = lambda xs: np.concatenate(xs, axis=-2)  # noqa: E731
    return QWeight(cat([w.q for w in ws]), cat([w.scales for w in ws]),
                   None if ws[0].zeros is None else cat([w.zeros for w in ws]))


QSOURCE = "llm_export.qsource"


def qsource(value: ir.Value | None) -> QSource | None:
    """The QSource a pre-quantized checkpoint attached to this initializer, if any."""
    tensor = None if value is None else value.const_value
    return None if tensor is None else tensor.meta.get(QSOURCE)


def with_qsource(value: ir.Value, source: QSource | None) -> ir.Value:
    if source is not None:
        value.const_value.meta[QSOURCE] = source
    return value


# ---- lazy, memoised integers of one weight ---------------------------------------------------------------------

class _Quantized:
    """The integers of one weight, computed (RTN from its float source) or unpacked (pre-quantized) on first read.
    One slot is shared by the whole pass, so at most one is alive: the initializers of a weight (integers, scales,
    zero points) are written one after the other."""

    slot: list = [None, None]

    def __init__(self, info: QInfo, load):
        self.info, self._load = info, load

    @classmethod
    def rtn(cls, src, info: QInfo, scale_dtype, transpose: bool) -> _Quantized:
        def load():
            w = src.numpy()
            w = w.T if transpose else w  # to [..., N, K]
            return QWeight(*quantize_rtn(w, info.scheme, info.group, scale_dtype, full_range=info.full_range))
        return cls(info, load)

    def get(self) -> QWeight:
        if self.slot[0] is not self:
            self.slot[:] = [None, None]
            self.slot[:] = [self, self._load()]
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

NBITS_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits / QMoE block sizes: a power of two, 16..256
TRT_INT4_BLOCKS = (64, 128)  # TensorRT's weight-only INT4 GEMM


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


def _form(info: QInfo, lowering: str, K: int) -> str:
    """How one weight is stored: ``nbits`` (MatMulNBits / QMoE), ``dq`` (DequantizeLinear, what TensorRT fuses into
    its weight-only GEMMs) or ``reference`` (Cast [- zero] * scale: standard ops, any layout)."""
    group = info.group or K
    if lowering == "ort":
        return "nbits" if info.scheme != "fp8" and nbits_block(group) is not None else "reference"
    if lowering == "trt-native" and not info.zeros:
        if info.scheme == "int4" and group in TRT_INT4_BLOCKS and K % group == 0:
            return "dq"  # blocked along K
        if info.scheme in ("int8", "fp8") and group == K:
            return "dq"  # one scale per output channel
    return "reference"


def nbits_block(group: int) -> int | None:
    """The MatMulNBits block for integers stored with one scale per `group` inputs: the largest block it takes that
    divides the group (each scale then repeats group/block times: exact, e.g. a per-channel K=896 as blocks of 128),
    None when no block divides it."""
    return next((b for b in reversed(NBITS_BLOCKS) if group % b == 0), None)


def quantize_graph(model: ir.Model, cfg: QuantConfig | None, lowering: str, np_dtype,
                   accuracy_level: int | None = None) -> dict:
    """Rewrite in place; returns counts and the scheme of every weight (by initializer name).

    cfg None: a pre-quantized checkpoint's graph. The weights that carry a :class:`QSource` get its integers (their
    layout picks the form, :func:`_form`); the others stay in the precision (layers the checkpoint left float)."""
    if lowering == "trt-plugin":
        raise QuantizeError("the trt-plugin lowering has no quantized form; use trt-native")
    if cfg is not None and cfg.scheme == "fp8" and lowering == "ort":
        raise QuantizeError("fp8 weights have no ONNX Runtime CPU kernel (MatMulNBits takes int4/int8)")
    graph = model.graph
    for node in graph:
        if node.domain == attn_plugin.DOMAIN:
            raise fuse.LoweringError(f"quantization ({lowering}) has no form for the fused node {node.name} "
                                     f"({node.domain}.{node.op_type}): lower it first (graphs/lower.py)")
    act = ir.DataType.from_numpy(np.dtype(np_dtype))
    _Quantized.slot[:] = [None, None]
    schemes: dict[str, dict] = {}
    counts = {"linear": 0, "experts": 0, "lm_head": 0, "embedding": 0}
    forms = {"nbits": 0, "dq": 0, "reference": 0}
    # TensorRT's INT8/FP8 Q/DQ is per tensor or per channel: one group spans the whole input dimension.
    group = 0 if cfg is None else cfg.group_size if (cfg.scheme == "int4" or lowering != "trt-native") else 0
    level = (4 if accuracy_level is None else accuracy_level) if cfg is None else cfg.accuracy_level

    def source(w: ir.Value, transpose: bool) -> _Quantized | None:
        pre = qsource(w)
        if cfg is None:
            if pre is None:
                return None
            load = pre.load
            return _Quantized(pre.info, lambda: dataclasses.replace(w := load(), scales=w.scales.astype(np_dtype)))
        info = QInfo(cfg.scheme, group, full_range=lowering != "trt-native")  # TensorRT: positive scales
        return _Quantized.rtn(w.const_value, info, np_dtype, transpose)

    for node in list(graph):
        if node.op_type == "MatMul" and node.domain == "":
            found = _weight_of(node.inputs[1])
            if found is None:
                continue
            w, transposed = found
            if _is_router(w.name) or (w.name == TASK_HEAD and cfg is not None):  # RTN leaves a task head float
                continue
            head = w.name == LM_HEAD
            if head and cfg is not None and not cfg.lm_head:
                continue
            K, N = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            # the integers are W^T [N, K] along K: a stored [K, N] weight is transposed, a transposed [N, K] one not
            quant = source(w, transpose=not transposed)
            if quant is None:
                continue
            tag = f"{w.name}.{'lm_head' if head and transposed else 'q'}"
            form = _form(quant.info, lowering, K)
            x = _permuted_input(graph, node, quant, tag, K)
            if form == "nbits":
                quantized = _to_matmul_nbits(graph, node, x, quant, tag, K, N, level, act)
            else:
                node.replace_input_with(0, x)
                quantized = _dequant_2d(graph, node, quant, tag, K, N, form, act, lowering)
                node.replace_input_with(1, quantized)
            schemes[w.name + (".as_lm_head" if head and transposed else "")] = _scheme(quant.info, form, K, [K, N])
            counts["lm_head" if head else "linear"] += 1
            forms[form] += 1
            if head and transposed and _tied_embedding(graph, w, quantized, quant.info, form, lowering, K, N):
                schemes[w.name + ".as_embedding"] = dict(_scheme(quant.info, form, K, [N, K]),
                                                         shared_with=w.name + ".as_lm_head")
                counts["embedding"] = 1
        elif node.domain == MS and node.op_type == "MoE" and lowering == "ort":
            fc1, fc2 = node.inputs[2], node.inputs[4]
            pair = [source(fc1, False), source(fc2, False)]
            if all(q is not None and _qmoe_takes(q.info, v.shape[2], level) for q, v in zip(pair, (fc1, fc2))):
                _to_qmoe(graph, node, pair, level, act, schemes)
                counts["experts"] += 2
                forms["nbits"] += 2
    # Expert stacks still read as floats: the decomposed expert loop (reference, trt-native, and MoE layers the ort
    # lowering left unfused) and com.microsoft.MoE kept for exactness (_qmoe_takes): dequantized in the graph.
    # (QMoE's own scales are float stacks too: not weights.)
    for value in list(graph.initializers.values()):
        if _expert_weight(value) and not _is_scale(value.name) and list(value.uses()):
            E, N, K = value.shape
            quant = source(value, transpose=False)
            if quant is None:
                continue
            form = "dq" if _form(quant.info, lowering, K) == "dq" else "reference"  # no MatMulNBits for stacks
            out = _dequant_experts(graph, quant, value.name + ".q", E, N, K, form, act, lowering)
            value.replace_all_uses_with(out)
            schemes[value.name] = _scheme(quant.info, form, K, [E, N, K])
            counts["experts"] += 1
            forms[form] += 1
    fuse.remove_unused(model)
    if cfg is not None:
        left = _float_linears(graph, cfg)
        if left:
            raise QuantizeError(f"{len(left)} linear weight(s) were not quantized: {', '.join(left[:8])}")
    if lowering == "ort":
        model.opset_imports.setdefault(MS, 1)
    if lowering == "trt-native" or any(d.get("scheme", "").startswith("fp8") for d in schemes.values()):
        model.opset_imports[""] = max(model.opset_imports.get("", 21), 21)  # blocked DequantizeLinear, float8 Cast
    for value in graph.initializers.values():  # everything else keeps its stored precision (float8: an FP8 weight's
        if value.dtype.is_floating_point() and value.name not in schemes and value.shape is not None \
                and len(value.shape) >= 1 and not _is_scale(value.name) \
                and not value.dtype.name.startswith("FLOAT8"):  # stored form, recorded under its weight's name)
            schemes[value.name] = {"scheme": value.dtype.name.lower()}
    if cfg is None:  # weights whose integers no form here takes (e.g. a quantized router) are their dequantization
        kept = sorted(v.name for v in graph.initializers.values() if qsource(v) is not None and list(v.uses()))
        for name in kept:
            schemes[name]["dequantized_from"] = _scheme_name(qsource(graph.initializers[name]).info)
        return {"scheme": "pre-quantized", "accuracy_level": level if lowering == "ort" else None,
                "counts": counts, "forms": forms, "dequantized": kept, "tensors": dict(sorted(schemes.items()))}
    return {"scheme": cfg.scheme, "group_size": cfg.group_size, "trt_channel_wise": group == 0,
            "accuracy_level": cfg.accuracy_level if lowering == "ort" else None, "lm_head": cfg.lm_head,
            "counts": counts, "tensors": dict(sorted(schemes.items()))}


def _tied_embedding(graph, w: ir.Value, head, info: QInfo, form: str, lowering: str, K: int, N: int) -> bool:
    """A tied model whose LM head was just quantized: its embedding Gather reads the head's integers too, so the
    float table is not stored a second time (what onnxruntime-genai's int4 builds do). ort: the head's MatMulNBits
    weights through ``com.microsoft.GatherBlockQuantized`` (the same offset-binary bytes [N, K/g, g*bits/8] read
    as blocks of g along the last axis, the same scales viewed [N, K/g, 1], implicit zero point; the looked-up rows
    reshaped to [..., K]). Sharing the bytes themselves matters: a Reshape of B would be folded into a copy of the
    whole head when the session opens (0.43 GiB for gemma-2-9b). reference: ``Gather`` of the transposed
    standard-op dequantization (its oracle). trt-native keeps the float table (no quantized gather in TensorRT),
    and so do integers with zero points or an act-order permutation. `head` is what the head's rewrite made: the
    MatMulNBits node (nbits) or the dequantized [K, N] value (reference). Returns whether the Gather was rewritten."""
    gathers = [u.node for u in w.uses() if u.node.op_type == "Gather" and u.node.domain == "" and u.idx == 0
               and (u.node.attributes.get("axis") is None or u.node.attributes["axis"].value == 0)]
    if not gathers or info.zeros or info.perm or lowering == "trt-native" or (lowering == "ort") != (form == "nbits") \
            or any(g.outputs[0].shape is None for g in gathers):
        return False
    if form != "nbits":  # the dequantization chain moves up, before the first Gather, so every Gather can read it
        chain, order = _chain_of(graph, head), list(graph)
        graph.remove(chain)
        graph.insert_before(min(gathers, key=order.index), chain)
    for gather in gathers:
        tag = f"{w.name}.embedding"
        if form == "nbits":  # B [N, K/g, g*bits/8] as it is (no copy); only the small scales get a [N, K/g, 1] view
            B, S = head.inputs[1], head.inputs[2]
            bits, block = head.attributes["bits"].value, head.attributes["block_size"].value
            lead = len(gather.outputs[0].shape) - 1  # the ids' rank
            s_shape = fuse.initializer(graph, f"quant.shape_{N}x{K // block}x1", np.array([N, K // block, 1], np.int64))
            out_shape = fuse.initializer(graph, f"quant.shape_{'0x' * lead}{K}", np.array([0] * lead + [K], np.int64))
            scales = ir.node("Reshape", [S, s_shape], name=f"{tag}.scales")
            blocks = ir.node("GatherBlockQuantized", [B, gather.inputs[1], scales.outputs[0]],
                             {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 2},
                             domain=MS, name=f"{tag}.gather")  # [..., K/g, g]
            new = ir.node("Reshape", [blocks.outputs[0], out_shape], name=f"{tag}.rows")
            nodes = [scales, blocks, new]
        else:
            rows = ir.node("Transpose", [head], {"perm": [1, 0]}, name=f"{tag}.rows")
            new = ir.node("Gather", [rows.outputs[0], gather.inputs[1]], {"axis": 0}, name=f"{tag}.gather")
            nodes = [rows, new]
        _copy_type(gather.outputs[0], new.outputs[0])
        graph.insert_before(gather, nodes)
        gather.outputs[0].replace_all_uses_with(new.outputs[0])
        graph.remove(gather, safe=True)
    return True


def _chain_of(graph: ir.Graph, value: ir.Value) -> list[ir.Node]:
    """The nodes computing `value` from initializers only (the dequantization of one weight), in order."""
    chain, todo = [], [value.producer()]
    while todo:
        node = todo.pop()
        if node is None or node in chain:
            continue
        chain.append(node)
        todo += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(chain, key=lambda n: order[id(n)])


def _qmoe_takes(info: QInfo, K: int, level: int) -> bool:
    """QMoE holds these experts exactly: int4/int8 in a block size it takes, no zero points or act-order. Its
    block-wise 8-bit CPU kernel always quantizes the activations to int8 (measured: 1% off a numpy reference at
    accuracy_level 1), so at --accuracy-level below 4 (fp32 compute, for checking) int8 experts are dequantized (the
    reference form, standard ops) into com.microsoft.MoE instead."""
    group = info.group or K
    return (info.scheme in ("int4", "int8") and group in NBITS_BLOCKS and K % group == 0 and not info.zeros
            and not info.perm and not (info.scheme == "int8" and level < 4))


def _is_router(name: str) -> bool:
    """The MoE router (a Gemm in the exported graph, a MatMul after the ort lowering): it stays in the precision
    (E is small, and top-k choices are sensitive to it)."""
    return ".moe.router." in name


def _is_scale(name: str) -> bool:
    return name.endswith((".scales", ".fc1_scales", ".fc2_scales"))


def _scheme_name(info: QInfo) -> str:
    """A quantized tensor's scheme in the manifest: int4-rtn-symmetric, int4-gptq-v2-asymmetric, fp8-block, ..."""
    return f"{info.scheme}-{info.label}"


def _scheme(info: QInfo, form: str, K: int, shape) -> dict:
    d = {"scheme": _scheme_name(info), "bits": info.bits, "group_size": info.group or K, "axis": "input",
         "shape": list(shape)}
    if info.label != "rtn-symmetric":
        d.update(zero_points=info.zeros, act_order=info.perm, form=form)
    elif info.scheme != "fp8":
        d["scale"] = f"extreme/{-int(qmax(info.scheme)) - 1}" if info.full_range else f"absmax/{int(qmax(info.scheme))}"
    return d


def _copy_type(old: ir.Value, new: ir.Value) -> None:
    if old.type is not None:
        new.type = old.type
    if old.shape is not None:
        new.shape = old.shape.copy()


def _permuted_input(graph, node, quant, tag, K) -> ir.Value:
    """x, or x[..., perm] for an act-order weight (its inputs were permuted so that its groups are contiguous)."""
    x = node.inputs[0]
    if not quant.info.perm:
        return x
    perm = _lazy(graph, f"{tag}.perm", ir.DataType.INT64, [K], lambda: quant.get().perm.astype(np.int64))
    gather = ir.node("Gather", [x, perm], {"axis": -1}, name=f"{tag}.act_order")
    _copy_type(x, gather.outputs[0])
    graph.insert_before(node, [gather])
    return gather.outputs[0]


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' ``zero_points`` from signed zeros [N, G]: uint8 [N, ceil(G*bits/8)], offset binary (as its B),
    two 4-bit values a byte, low nibble first."""
    z = (zeros.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return z
    if z.shape[-1] % 2:
        z = np.concatenate([z, np.zeros((*z.shape[:-1], 1), np.uint8)], axis=-1)
    return (z[..., 0::2] | (z[..., 1::2] << 4)).astype(np.uint8)


def _to_matmul_nbits(graph, node, x, quant, tag, K, N, level, act) -> ir.Node:
    info = quant.info
    bits = info.bits
    g = nbits_block(info.group or K)
    rep = (info.group or K) // g  # stored groups wider than the block: each scale (and zero) repeats, exactly

    def per_block(a):
        return a if rep == 1 else np.repeat(a, rep, axis=-1)

    B = _lazy(graph, f"{tag}.packed", ir.DataType.UINT8, [N, K // g, g * bits // 8],
              lambda: pack_nbits(quant.get().q, bits, g))
    S = _lazy(graph, f"{tag}.scales", act, [N, K // g], lambda: per_block(quant.get().scales))
    inputs = [x, B, S]
    if info.zeros:
        width = (K // g) if bits == 8 else (K // g + 1) // 2
        inputs.append(_lazy(graph, f"{tag}.zero_points", ir.DataType.UINT8, [N, width],
                            lambda: pack_zero_points(per_block(quant.get().zeros), bits)))
    new = ir.node("MatMulNBits", inputs,
                  {"K": K, "N": N, "bits": bits, "block_size": g, "accuracy_level": level},
                  domain=MS, num_outputs=1, name=f"{node.name or tag}.nbits")
    _copy_type(node.outputs[0], new.outputs[0])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))
    return new


# scheme -> (ONNX type, numpy type) of the stored weights in the trt-native (DequantizeLinear) form
_TRT_QTYPES = {"int4": (ir.DataType.INT4, ml_dtypes.int4), "int8": (ir.DataType.INT8, np.int8),
               "fp8": (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn)}


def _reference(graph, quant, tag, q_shape, group_shape, s_shape, out_shape, q_of, s_of, act, lowering) -> list:
    """Cast(q) [- Cast(zero)] * scale, reshaped: the standard-op dequantization of one weight (any layout; the
    oracle of the other forms, and the form of layouts no kernel takes). float8 values, and on TensorRT (which
    takes an 8-bit constant only as the input of a DequantizeLinear) the integers too, become floats through a
    DequantizeLinear with scale 1 instead of the Cast: exact either way."""
    fp8 = quant.info.scheme == "fp8"
    qtype = ir.DataType.FLOAT8E4M3FN if fp8 else ir.DataType.INT8
    q = _lazy(graph, f"{tag}.weight", qtype, q_shape, lambda: q_of(quant.get()))
    s = _lazy(graph, f"{tag}.scales", act, s_shape, lambda: s_of(quant.get().scales))
    dims = "x".join(map(str, group_shape))
    split = fuse.initializer(graph, f"quant.shape_{dims}", np.array(group_shape, dtype=np.int64))
    merge = fuse.initializer(graph, f"quant.shape_{'x'.join(map(str, out_shape))}", np.array(out_shape, np.int64))

    def to_float(v: ir.Value, name: str) -> ir.Node:
        if fp8 or lowering == "trt-native":
            one = fuse.initializer(graph, f"quant.one_{act.name.lower()}", np.array(1, dtype=act.numpy()))
            return ir.node("DequantizeLinear", [v, one], name=name)
        return ir.node("Cast", [v], {"to": act}, name=name)

    nodes = [to_float(q, f"{tag}.cast")]
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], split], name=f"{tag}.groups"))
    if quant.info.zeros:
        z = _lazy(graph, f"{tag}.zero_points", ir.DataType.INT8, s_shape, lambda: s_of(quant.get().zeros))
        zc = to_float(z, f"{tag}.zero_cast")
        nodes += [zc, ir.node("Sub", [nodes[-1].outputs[0], zc.outputs[0]], name=f"{tag}.zero")]
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], s], name=f"{tag}.scale"))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], merge], name=f"{tag}.dequant"))
    return nodes


def _dequant_2d(graph, node, quant, tag, K, N, form, act, lowering) -> ir.Value:
    """W [K, N] in the activation dtype, computed from q and the scales (block along K)."""
    info = quant.info
    g = info.group or K
    groups = K // g
    if form == "dq":
        qtype, np_q = _TRT_QTYPES[info.scheme]
        q = _lazy(graph, f"{tag}.weight", qtype, [K, N], lambda: quant.get().q.T.astype(np_q))
        if info.scheme == "int4":  # blocked along K (axis 0), scales [K/g, N]
            s = _lazy(graph, f"{tag}.scales", act, [groups, N], lambda: quant.get().scales.T)
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 0, "block_size": g}, name=f"{tag}.dq")
        else:  # per output channel: scales [N] on axis 1
            s = _lazy(graph, f"{tag}.scales", act, [N], lambda: quant.get().scales[:, 0])
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 1}, name=f"{tag}.dq")
        nodes = [dq]
    else:  # q [K, N] as [groups, g, N]; scales (and zeros) [groups, 1, N]
        nodes = _reference(graph, quant, tag, [K, N], [groups, g, N], [groups, 1, N], [K, N],
                           lambda w: w.q.T, lambda a: a.T[:, None, :], act, lowering)
    nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = act, ir.Shape([K, N])
    graph.insert_before(node, nodes)
    return nodes[-1].outputs[0]


def _dequant_experts(graph, quant, tag, E, N, K, form, act, lowering) -> ir.Value:
    """Expert stack [E, N, K] in the activation dtype (block along K, the last axis)."""
    info = quant.info
    g = info.group or K
    groups = K // g
    if form == "dq":
        qtype, np_q = _TRT_QTYPES[info.scheme]
        # TensorRT (Myelin) refuses a 3-D blocked DequantizeLinear: dequantize the stack as one 2-D weight
        # [E*N, K] blocked along K, then view it as [E, N, K].
        q = _lazy(graph, f"{tag}.weight", qtype, [E * N, K], lambda: quant.get().q.reshape(E * N, K).astype(np_q))
        merge = fuse.initializer(graph, f"quant.shape_{E}x{N}x{K}", np.array([E, N, K], dtype=np.int64))
        if info.scheme == "int4":
            s = _lazy(graph, f"{tag}.scales", act, [E * N, groups], lambda: quant.get().scales.reshape(E * N, groups))
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 1, "block_size": g}, name=f"{tag}.dq")
        else:  # per output channel (TensorRT int8/fp8): one scale per row of the flattened stack
            s = _lazy(graph, f"{tag}.scales", act, [E * N], lambda: quant.get().scales.reshape(E * N))
            dq = ir.node("DequantizeLinear", [q, s], {"axis": 0}, name=f"{tag}.dq")
        nodes = [dq, ir.node("Reshape", [dq.outputs[0], merge], name=f"{tag}.dequant")]
    elif info.perm:  # act-order experts: each expert has its own input order; their integers in it, gathered back
        raise QuantizeError(f"{tag}: act-order expert weights have no in-graph form (their QSource should not exist)")
    else:
        nodes = _reference(graph, quant, tag, [E, N, K], [E, N, groups, g], [E, N, groups, 1], [E, N, K],
                           lambda w: w.q, lambda a: a[..., None], act, lowering)
    nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = act, ir.Shape([E, N, K])
    # before the first node of the graph that reads it: weights have no producer, so the top of the graph is safe
    first = next(iter(graph))
    graph.insert_before(first, nodes)
    return nodes[-1].outputs[0]


def _to_qmoe(graph, node, pair, level, act, schemes) -> None:
    """com.microsoft.MoE (fc1 = gate|up interleaved [E, 2I, H], fc2 = down [E, H, I]) -> QMoE, same routing."""
    attrs = fuse.lowered_attrs("ort (QMoE)", QMOE_FROM_MOE, node)
    x, logits, fc1, fc1_bias, fc2 = node.inputs[:5]
    if fc1_bias is not None or any(v is not None for v in node.inputs[5:]):
        raise fuse.LoweringError(f"the QMoE rewrite of node {node.name} carries no expert biases or fc3 weights")
    layouts = [(q.info.scheme, q.info.group or w.shape[2]) for q, w in zip(pair, (fc1, fc2))]
    if layouts[0] != layouts[1]:
        raise QuantizeError(f"QMoE node {node.name}: fc1 and fc2 weights differ in scheme or group size {layouts}")
    bits = pair[0].info.bits
    g = pair[0].info.group or fc1.shape[2]
    new_inputs = [x, logits]
    for tag, w, quant in (("fc1", fc1, pair[0]), ("fc2", fc2, pair[1])):
        E, N, K = w.shape
        packed = _lazy(graph, f"{w.name}.{tag}_weight", ir.DataType.UINT8, [E, N, K * bits // 8],
                       lambda quant=quant, E=E, N=N: pack_nbits(quant.get().q, bits, g).reshape(E, N, -1))
        scales = _lazy(graph, f"{w.name}.{tag}_scales", act, [E, N, K // g], lambda quant=quant: quant.get().scales)
        new_inputs += [packed, scales, None]
        schemes[w.name] = _scheme(quant.info, "nbits", K, [E, N, K])
    pre = []
    if not attrs["normalize_routing_weights"]:
        # QMoE with normalize_routing_weights=0 still mixes with a softmax over the top-k logits only (measured:
        # renormalised). Without renormalisation the mixing weights are the full softmax's: pass them as
        # router_weights (router_probs then only selects the experts).
        soft = ir.node("Softmax", [logits], {"axis": -1}, name=f"{node.name}.routing")
        pre.append(soft)
        new_inputs += [None] * 6 + [soft.outputs[0]]  # fc3 weight/scales/bias, 3 zero points, router_weights
    attrs.update(expert_weight_bits=bits, block_size=g, quant_type="int", weights_prepacked=0,
                 accuracy_level=level)
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
            if found is not None and not _is_router(found[0].name) and found[0].name != TASK_HEAD and \
                    not (found[0].name == LM_HEAD and not cfg.lm_head):
                left.append(found[0].name)
        elif node.op_type in ("Einsum", "MoE"):
            left += [v.name for v in node.inputs if v is not None and _expert_weight(v)]
    return left
