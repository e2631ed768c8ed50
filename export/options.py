"""Limits and argparse value types shared by the `python -m export` commands and the functions behind them.

What it does: defines each limit once (the CLI's `--help`, its errors and the library functions' checks all read
these), and :func:`int_in`, an argparse type naming the accepted range in its error.

What it does not do: parse command lines (export/__main__.py, export/triton_cmd.py do). Imports nothing heavy:
the CLI must parse flags without importing torch.
"""

from __future__ import annotations

import argparse
import math

from artifacts.manifest import TASKS  # noqa: F401 - the heads, defined once where the manifest validates them

# -- build ---------------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_PRECISION = "fp32"
BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_BACKEND = "onnxruntime"
KV_MODES = ("static", "concat")  # static: preallocated buffers, slot == position; concat: a cache that grows
DEFAULT_KV_MODE = "static"
EAGER_KV_MODE = "concat"  # the torch decoder of `export verify` and the parity tests grows its cache like HF's
LOWERINGS = ("reference", "ort", "trt-plugin", "trt-native")  # graphs/lower.py implements them (test_graphs checks)
TRT_LOWERINGS = ("trt-native", "trt-plugin", "reference")  # what a TensorRT engine is built from
LOGITS = ("last", "all")  # which positions the LM head runs on: each call's last (generation) or all (scoring)
DEFAULT_LOGITS = "last"
DEFAULT_MAX_BATCH = 8  # static KV slots, and Triton's max_batch_size
MAX_BATCH = 1024  # static KV slots a graph is built for; beyond this the buffers alone exceed any machine
MAX_SEQ_LEN = 1 << 20  # context a graph is built for (Qwen2.5-*-1M: 1010000); RoPE tables and KV buffers scale with it
MAX_INSTANCES = 64  # Triton instance_group count: each instance loads its own session
MAX_VERIFY_STEPS = 4096
DEFAULT_VERIFY_STEPS = 8


def default_lowering(backend: str, kv_mode: str) -> str:
    """trt-native for TensorRT; ort (GroupQueryAttention on the static buffer) or reference (concat) otherwise."""
    if backend == "tensorrt":
        return "trt-native"
    return "ort" if kv_mode == "static" else "reference"


def int_in(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (high None: no upper bound), the range named in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value

    return parse


def float_in(low: float, *, above: bool = False):
    """argparse type: a finite number >= low (> low with `above`), the bound named in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if above else '>='} {low:g}, got {text!r}")
        return value

    return parse


# Weight-only quantization (`build --quantize`): export/quantize.py checks these against the model and backend.
QUANT_SCHEMES = ("int4", "int8", "fp8")
DEFAULT_GROUP_SIZE = {"onnxruntime": 32, "tensorrt": 128}  # MLAS int4 kernels like 32; TensorRT's INT4 takes 64/128
ORT_GROUP_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits / QMoE: a power of two, 16..256
TRT_INT4_GROUP_SIZES = (64, 128)  # TensorRT's weight-only INT4 GEMM
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
DEFAULT_ACCURACY_LEVEL = 4  # int8 compute: fast with VNNI; 1 = fp32 compute, for checking against the reference
