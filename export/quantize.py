"""`build --quantize`: which weight-only scheme a build gets, checked against the backend and the model first.

What it does: :func:`quant_config` turns the flags into a :class:`graphs.quantize.QuantConfig` (group size defaulting
per backend: 32 for ONNX Runtime, 128 for TensorRT and for a trt-native graph on either) and refuses, before any
work, a scheme the target cannot run (fp8 on ONNX Runtime, a group size MatMulNBits/QMoE or TensorRT's INT4 GEMM
does not take) or a group size that does not divide the input dimension of a linear that would be quantized (named
in the error).

What it does not do: quantize anything (graphs/quantize.py does, while the weights stream).
"""

from __future__ import annotations

from export.options import (ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, DEFAULT_GROUP_SIZE, ORT_GROUP_SIZES,
                            QUANT_SCHEMES, TRT_INT4_GROUP_SIZES)
from export.spec import ModelSpec
from graphs.quantize import QuantConfig


def quant_config(scheme: str | None, backend: str, lowering: str, group_size: int | None = None,
                 accuracy_level: int | None = None, lm_head: bool = False) -> QuantConfig | None:
    if scheme is None:
        if group_size is not None or accuracy_level is not None or lm_head:
            raise ValueError("--group-size, --accuracy-level and --quantize-lm-head need --quantize")
        return None
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"--quantize {scheme}: choose from {', '.join(QUANT_SCHEMES)}")
    if scheme == "fp8" and (backend != "tensorrt" or lowering != "trt-native"):
        raise ValueError("--quantize fp8 is for TensorRT only (--backend tensorrt, trt-native lowering): ONNX Runtime "
                         "has no FP8 kernels on the CPU (MatMulNBits takes int4/int8 weights)")
    if lowering == "trt-plugin":
        raise ValueError("--quantize: the trt-plugin lowering has no quantized form; use --lowering trt-native")
    if lowering == "reference" and backend == "tensorrt":
        raise ValueError(f"--quantize {scheme} --lowering reference: its int8-stored integers times scales are "
                         "refused by TensorRT (a quantized constant must feed a DequantizeLinear); use --lowering "
                         "trt-native, TensorRT's own quantized form (the default)")
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    if level not in ACCURACY_LEVELS:
        raise ValueError(f"--accuracy-level {level}: choose from {ACCURACY_LEVELS} (1 = fp32 compute, 4 = int8)")
    if accuracy_level is not None and lowering != "ort":
        raise ValueError(f"--accuracy-level is a MatMulNBits/QMoE setting (the ort lowering), not {lowering}")
    per_channel = lowering == "trt-native" and scheme != "int4"  # TensorRT's INT8/FP8 Q/DQ: per channel
    if per_channel and group_size is not None:
        raise ValueError(f"--group-size: TensorRT takes {scheme} weights with one scale per output channel; "
                         "the group size applies to int4 only")
    # The default follows the graph's form: a trt-native graph is TensorRT's, whichever backend builds it
    form = "tensorrt" if lowering == "trt-native" else backend
    group = DEFAULT_GROUP_SIZE[form] if group_size is None else group_size
    if lowering == "ort" and group not in ORT_GROUP_SIZES:
        raise ValueError(f"--group-size {group}: MatMulNBits/QMoE take {', '.join(map(str, ORT_GROUP_SIZES))}")
    if lowering == "trt-native" and scheme == "int4" and group not in TRT_INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {group}: TensorRT's INT4 weights take block sizes "
                         f"{' or '.join(map(str, TRT_INT4_GROUP_SIZES))}")
    if group < 2:
        raise ValueError(f"--group-size {group}: must be >= 2")
    return QuantConfig(scheme, 0 if per_channel else group, level, lm_head)


def input_dims(spec: ModelSpec, lm_head: bool) -> dict[str, int]:
    """Input dimension (K) of every linear a quantized build rewrites, by a readable name."""
    experts = ", expert gate/up" if spec.sparse_layers else ""
    dims = {f"hidden_size (q/k/v, gate/up{experts} inputs)": spec.hidden_size,
            "num_heads * head_dim (o_proj input)": spec.num_heads * spec.head_dim}
    if any(layer.mlp == "dense" for layer in spec.layers):
        dims["intermediate_size (down_proj input)"] = spec.intermediate_size
    if spec.sparse_layers:
        dims["moe_intermediate_size (expert down_proj input)"] = spec.moe_intermediate_size
    return dims


def check_group_size(spec: ModelSpec, cfg: QuantConfig | None) -> None:
    if cfg is None or cfg.group_size == 0:
        return
    bad = [f"{name} = {k}" for name, k in input_dims(spec, cfg.lm_head).items() if k % cfg.group_size]
    if bad:
        raise ValueError(f"--group-size {cfg.group_size} does not divide every input dimension of the model: "
                         f"{'; '.join(bad)} (choose a group size that divides all of them)")
