"""Write a real pre-quantized Hugging Face checkpoint (GPTQ, AWQ, compressed-tensors, FP8) from a tiny float one.

A test helper (not a test module): :func:`write_prequant` turns a float checkpoint directory (config.json +
model.safetensors, as transformers' save_pretrained writes it) into

* ``dst``: the same model stored in one pre-quantized format, with the format's own tensor names, layouts and
  ``quantization_config`` field names, and
* ``dst.parent / (dst.name + "-dequant")`` (returned): a float checkpoint whose quantized linears hold the exact
  dequantized weights, computed here from the integers and scales written to ``dst`` -- the Hugging Face reference an
  exported pre-quantized model is compared against.

What it does:

* Quantizes, by round-to-nearest (no calibration, no GPTQ error feedback, no AWQ activation scaling), every
  ``*.self_attn.{q,k,v,o}_proj``, ``*.mlp.{gate,up,down}_proj`` and Qwen3-MoE expert
  ``*.mlp.experts.<e>.{gate,up,down}_proj`` linear, except those named (module name, without ``.weight``) in
  `float_layers`. Everything else -- embeddings, norms, biases, the LM head, the MoE router ``mlp.gate``, task heads
  -- is written exactly as in `src` (same dtype). Every linear left float that the format would otherwise quantize is
  named in the config the way the format does it (below).
* Integer formats, groups of `group` inputs (-1: one group per output channel), ``maxq = 2^bits - 1``,
  ``mid = 2^(bits-1)``; the scale is rounded to its stored dtype first and the integers are computed from the stored
  scale:

  - symmetric: ``scale = absmax / (mid - 1)``, zero point ``mid``;
  - asymmetric: ``scale = (max(w_max, 0) - min(w_min, 0)) / maxq``, zero point ``round(-min(w_min, 0) / scale)``
    in ``[0, maxq]`` (GPTQ v1: ``[1, maxq]``, see below);
  - ``q = clip(round(w / scale) + zero, 0, maxq)`` and the reference weight ``(q - zero) * scale``.

  GPTQ/AWQ store these unsigned values (offset binary) and fp16 scales; compressed-tensors stores the same values
  minus ``mid`` (signed) and scales in the linear's own float dtype.
* Act-order (`desc_act`; GPTQ, and compressed-tensors ``actorder: "group"``): a random permutation ``perm`` per
  linear (numpy ``default_rng(seed)``) stands in for the Hessian order, and ``g_idx`` is made as AutoGPTQ's
  ``fasterquant`` makes it: group ``i // group`` for the i-th permuted column, ``g_idx = that[argsort(perm)]`` --
  non-monotonic, `group` inputs per group. Each input column is quantized with the scale and zero of its group.
* Layouts, packed with the documented packers below (cross-checked against the libraries in tests/test_prequant.py):

  - ``gptq``: ``qweight`` int32 ``[in*bits/32, out]``, ``qzeros`` int32 ``[groups, out*bits/32]``, ``scales`` fp16
    ``[groups, out]``, ``g_idx`` int32 ``[in]`` (always written, as AutoGPTQ does). ``version=2`` stores the zero
    points as they are (``checkpoint_format: "gptq_v2"``); ``version=1`` stores zero - 1 (:func:`gptq_v2_to_v1` on
    the packed words, ``checkpoint_format: "gptq"``) and keeps asymmetric zero points >= 1, because a stored -1
    borrows into the neighbouring value, which AutoGPTQ's per-value v1 readers do not undo. Float linears: one
    GPTQModel ``dynamic`` rule ``"-:^<escaped name>$": {}`` each.
  - ``awq``: 4-bit, always asymmetric (`sym` is not read), AutoAWQ GEMM: ``qweight`` int32 ``[in, out/8]`` and
    ``qzeros`` int32 ``[groups, out/8]`` in :data:`AWQ_ORDER`, ``scales`` fp16 ``[groups, out]``. Float linears:
    ``modules_to_not_convert`` (plus ``mlp.gate`` when the model has routers).
  - ``compressed-tensors`` (``pack-quantized``): ``weight_packed`` int32 ``[out, ceil(in*bits/32)]``,
    ``weight_shape`` int64 ``[out, in]``, ``weight_scale`` ``[out, groups]`` (``strategy`` "group"; "channel":
    ``[out, 1]``, `group` not read; "tensor": ``[1]``), asymmetric ``weight_zero_point`` (int32 packed along the
    output dim ``[ceil(out*bits/32), groups]``; "tensor": int8 ``[1]``), act-order ``weight_g_idx`` int32 ``[in]``.
    Float linears: ``ignore`` (always ``lm_head``, ``re:.*mlp\\.gate$`` when the model has routers, then the exact
    names).
  - ``fp8``: ``weight`` float8_e4m3fn ``[out, in]`` (``w / scale``, clipped to +-448) and ``weight_scale_inv``
    float32 ``[ceil(out/128), ceil(in/128)]``, ``scale = absmax / 448`` per 128x128 block (a multiplier). `bits`,
    `group`, `sym`, `version` and `strategy` are not read. Float linears: ``modules_to_not_convert`` (always
    ``lm_head``, ``mlp.gate`` when the model has routers, then the exact names).
* ``dst/config.json`` is src's plus ``quantization_config``; every file of `src` other than config.json and its
  safetensors files (tokenizer, generation_config.json, ...) is copied unchanged into both directories; all tensors
  go into one ``model.safetensors`` (a sharded `src` is read whole).
* The reference: ``(q - zero[g_idx]) * scale[g_idx]`` (FP8: ``q * scale`` per block) in float64 on the stored values,
  rounded to float32 (exact for fp16/bf16 scales; one rounding for fp32 scales and FP8) and then to the linear's
  dtype in `src`. The -dequant config is src's config.json unchanged (no quantization_config).

What it does not do: calibrate, use export/prequant.py (the reference is computed independently of the reader under
test), write activation / KV-cache quantization, 2/3-bit, Marlin/exllama/GEMV layouts, a quantized LM head or
embeddings, or per-layer schemes other than "float". It refuses (ValueError) what the format cannot store:
a `group` that does not divide a linear's input dim, an output dim the packing cannot hold, act-order where the
format has none, unknown `float_layers` names.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMATS = ("gptq", "awq", "compressed-tensors", "fp8")
FP8_MAX = 448.0
FP8_BLOCK = (128, 128)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ order_map: word nibble i holds output 8c + AWQ_ORDER[i]

_LINEAR = re.compile(r"(^|\.)(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)$")
_ROUTER = re.compile(r"(^|\.)mlp\.gate$")


# ---- documented packers (independent of export/prequant.py; cross-checked in tests/test_prequant.py) -------------

def pack_along_rows(vals: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ nn_modules/qlinear/qlinear_cuda.py QuantLinear.pack (qweight loop): word row r gets
    vals[i + j] << (bits * j) for j in range(32 // bits), i = r * 32 // bits."""
    per = 32 // bits
    out = np.zeros((vals.shape[0] // per, vals.shape[1]), dtype=np.uint32)
    for r in range(out.shape[0]):
        for j in range(per):
            out[r] |= vals[r * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def pack_along_cols(vals: np.ndarray, bits: int, order=None) -> np.ndarray:
    """The same along the last axis (AutoGPTQ QuantLinear.pack, qzeros loop); `order` = AutoAWQ's order_map
    (awq/modules/linear/gemm.py WQLinear_GEMM.from_linear: qweight[:, col] |= intweight[:, col*8 + order_map[i]]
    << (i * 4))."""
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((vals.shape[0], math.ceil(vals.shape[1] / per)), dtype=np.uint32)
    padded = np.zeros((vals.shape[0], out.shape[1] * per), dtype=np.uint32)
    padded[:, :vals.shape[1]] = vals
    for c in range(out.shape[1]):
        for i in range(per):
            out[:, c] |= padded[:, c * per + order[i]] << np.uint32(bits * i)
    return out.view(np.int32)


def gptq_v2_to_v1(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """GPTQModel gptqmodel/utils/model.py convert_gptq_v2_to_v1_format_module: `module.qzeros.data -=
    0b00010001000100010001000100010001` (4 bits) / `0b00000001000000010000000100000001` (8 bits) on the int32
    tensor (wrapping, borrows included)."""
    t = torch.from_numpy(qzeros.copy())
    t -= 0b00010001000100010001000100010001 if bits == 4 else 0b00000001000000010000000100000001
    return t.numpy()


def ct_pack(vals_signed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """compressed-tensors compressors/quantized_compressors/pack_quantized.py pack_to_int32 (commit 52792be0):
    offset binary (value + 2^(bits-1)), padded, value i of a word at bits i*num_bits, along `axis`."""
    u = (vals_signed.astype(np.int32) + (1 << (bits - 1))).astype(np.uint32)
    return pack_along_cols(u, bits) if axis == 1 else np.ascontiguousarray(pack_along_cols(u.T, bits).T)


# ---- the writer --------------------------------------------------------------------------------------------------

def write_prequant(src: Path, dst: Path, fmt: str, *, bits: int = 4, group: int = 32, sym: bool = True,
                   desc_act: bool = False, version: int = 2, float_layers: tuple[str, ...] = (),
                   strategy: str = "group", seed: int = 0) -> Path:
    """Write `src` (a float HF checkpoint dir) quantized in `fmt` to `dst` (must not exist) and its exact
    dequantization to ``dst.parent / (dst.name + "-dequant")``; returns that -dequant dir. See the module docstring
    for what each format and option means."""
    src, dst = Path(src), Path(dst)
    ref = dst.parent / f"{dst.name}-dequant"
    opts = _check_options(fmt, bits, group, sym, desc_act, version, strategy)
    for d in (dst, ref):
        if d.exists():
            raise FileExistsError(f"{d} exists; write_prequant writes a new directory")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized (config.json has a quantization_config)")
    tensors = _load_tensors(src)

    weights = {n.removesuffix(".weight"): t for n, t in tensors.items() if n.endswith(".weight")}  # module -> W
    linears = sorted(m for m in weights if _LINEAR.search(m))
    unknown = sorted(set(float_layers) - set(linears))
    if unknown:
        raise ValueError(f"float_layers {unknown} are not quantizable linears of {src} (those are: "
                         f"{', '.join(linears)})")
    quantized = [m for m in linears if m not in float_layers]
    has_router = any(_ROUTER.search(m) for m in weights)
    # other 2-D weights the writer leaves float that a "quantize every Linear" rule would catch (e.g. a task head)
    others = sorted(m for m, t in weights.items() if t.ndim == 2 and t.is_floating_point() and m not in linears
                    and "embed" not in m and not _ROUTER.search(m) and m.split(".")[-1] != "lm_head")
    float_named = sorted(set(float_layers)) + others

    rng = np.random.default_rng(seed)
    out, deq = dict(tensors), dict(tensors)
    for name in quantized:
        w = tensors[f"{name}.weight"]
        stored, w_hat = _quantize(fmt, name, w, rng, **opts)
        del out[f"{name}.weight"]
        out.update({f"{name}.{k}": v for k, v in stored.items()})
        deq[f"{name}.weight"] = torch.from_numpy(w_hat.astype(np.float32)).to(w.dtype)

    qc = _quantization_config(fmt, opts, float_named, has_router)
    _write(src, dst, dict(config, quantization_config=qc), out)
    _write(src, ref, config, deq)
    return ref


def _check_options(fmt, bits, group, sym, desc_act, version, strategy) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"fmt {fmt!r}: supported: {', '.join(FORMATS)}")
    if fmt == "fp8":
        if desc_act:
            raise ValueError("fp8 has no act-order")
        return {}
    if bits not in (4, 8) or (fmt == "awq" and bits != 4):
        raise ValueError(f"bits {bits}: {fmt} supports {'4' if fmt == 'awq' else '4 or 8'}")
    if group != -1 and group < 1:
        raise ValueError(f"group {group}: -1 (per output channel) or >= 1")
    if fmt == "compressed-tensors":
        if strategy not in ("group", "channel", "tensor"):
            raise ValueError(f"strategy {strategy!r}: compressed-tensors supports group, channel, tensor")
        if strategy == "group" and group == -1:
            raise ValueError("compressed-tensors strategy 'group' needs group >= 1 (use strategy='channel')")
        if desc_act and strategy != "group":
            raise ValueError("compressed-tensors actorder 'group' needs strategy 'group'")
        if strategy != "group":
            group = -1
    elif strategy != "group":
        raise ValueError(f"strategy {strategy!r}: only compressed-tensors has strategies")
    if fmt == "awq":
        if desc_act:
            raise ValueError("AWQ has no act-order")
        sym = False
    if fmt == "gptq" and version not in (1, 2):
        raise ValueError(f"version {version}: GPTQ is 1 or 2")
    return dict(bits=bits, group=group, sym=sym, desc_act=desc_act, version=version, strategy=strategy)


def _load_tensors(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(src / f)))
    return tensors


def _write(src: Path, dst: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == "config.json" or p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json":
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


# ---- quantization ------------------------------------------------------------------------------------------------

def _act_order_g_idx(K: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """AutoGPTQ quantization/gptq.py fasterquant with act-order: column i of the permuted weight is in group
    i // group_size; g_idx = that[invperm]. A random permutation stands in for argsort(diag(H), descending)."""
    perm = rng.permutation(K)
    return (np.arange(K) // group)[np.argsort(perm)].astype(np.int32)


def _to_stored(x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """(x rounded to `dtype` as a tensor, the same values in float64); never 0."""
    t = torch.from_numpy(np.where(x > 0, x, 1.0)).to(dtype).clamp_min(torch.finfo(dtype).tiny)
    return t, t.to(torch.float64).numpy()


def _rtn(w: np.ndarray, bits: int, g_idx: np.ndarray, G: int, sym: bool, zero_min: int,
         scale_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
    """Round-to-nearest of w [out, in] (float64) with the groups g_idx [in]: (q [out, in], zero [out, G] unsigned
    int64, scales as stored [out, G], scales float64)."""
    maxq, mid = (1 << bits) - 1, 1 << (bits - 1)
    N = w.shape[0]
    s = np.empty((N, G))
    lo = np.empty((N, G))
    for g in range(G):
        cols = w[:, g_idx == g]
        if sym:
            s[:, g] = np.abs(cols).max(axis=1) / (mid - 1)
        else:
            lo[:, g] = np.minimum(cols.min(axis=1), 0.0)
            s[:, g] = (np.maximum(cols.max(axis=1), 0.0) - lo[:, g]) / maxq
    s_t, s64 = _to_stored(s, scale_dtype)
    z = np.full((N, G), mid, dtype=np.int64) if sym else \
        np.clip(np.round(-lo / s64), zero_min, maxq).astype(np.int64)
    q = np.clip(np.round(w / s64[:, g_idx]) + z[:, g_idx], 0, maxq).astype(np.int64)
    return q, z, s_t, s64


def _quantize(fmt: str, name: str, weight: torch.Tensor, rng: np.random.Generator, **o
              ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """(the stored tensors of one linear, keyed by suffix; its dequantized weight in float64)."""
    w = weight.to(torch.float64).numpy()
    N, K = w.shape
    if fmt == "fp8":
        return _quantize_fp8(w)
    bits, sym, desc_act = o["bits"], o["sym"], o["desc_act"]
    per = 32 // bits
    g = K if o["group"] == -1 else o["group"]
    if K % g:
        raise ValueError(f"linear '{name}': group {g} does not divide its input dim {K}")
    G = K // g
    g_idx = _act_order_g_idx(K, g, rng) if desc_act else (np.arange(K) // g).astype(np.int32)
    if fmt == "gptq" and (K % per or N % per):
        raise ValueError(f"linear '{name}' [{N}, {K}]: GPTQ {bits}-bit packs {per} values a word along both dims")
    if fmt == "awq" and N % 8:
        raise ValueError(f"linear '{name}' [{N}, {K}]: AWQ packs 8 outputs a word")
    scale_dtype = weight.dtype if fmt == "compressed-tensors" else torch.float16
    if fmt == "compressed-tensors" and o["strategy"] == "tensor":
        q, z, s_t, s64 = _rtn_tensor(w, bits, sym, scale_dtype)
        g_idx = np.zeros(K, dtype=np.int32)
    else:
        zero_min = 1 if fmt == "gptq" and o["version"] == 1 else 0
        q, z, s_t, s64 = _rtn(w, bits, g_idx, G, sym, zero_min, scale_dtype)
    w_hat = (q - z[:, g_idx]).astype(np.float64) * s64[:, g_idx]

    if fmt == "gptq":
        qzeros = pack_along_cols(z.T, bits)
        if o["version"] == 1:
            qzeros = gptq_v2_to_v1(qzeros, bits)
        stored = {"qweight": pack_along_rows(q.T, bits), "qzeros": qzeros, "scales": s_t.T, "g_idx": g_idx}
    elif fmt == "awq":
        stored = {"qweight": pack_along_cols(q.T, 4, AWQ_ORDER), "qzeros": pack_along_cols(z.T, 4, AWQ_ORDER),
                  "scales": s_t.T}
    else:
        mid = 1 << (bits - 1)
        stored = {"weight_packed": ct_pack(q - mid, bits, 1), "weight_scale": s_t,
                  "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
        if not sym:
            stored["weight_zero_point"] = np.array([z[0, 0] - mid], dtype=np.int8) if o["strategy"] == "tensor" \
                else ct_pack(z - mid, bits, 0)
        if desc_act:
            stored["weight_g_idx"] = g_idx
    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
            for k, v in stored.items()}, w_hat


def _rtn_tensor(w: np.ndarray, bits: int, sym: bool, scale_dtype: torch.dtype):
    """compressed-tensors strategy 'tensor': one scale (and zero) for the whole weight; the scale is stored [1]."""
    q, z, s_t, s64 = _rtn(w.reshape(1, -1), bits, np.zeros(w.size, dtype=np.int32), 1, sym, 0, scale_dtype)
    N = w.shape[0]
    return q.reshape(w.shape), np.broadcast_to(z, (N, 1)), s_t.reshape(1), np.broadcast_to(s64, (N, 1))


def _quantize_fp8(w: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    N, K = w.shape
    b0, b1 = FP8_BLOCK
    R, C = math.ceil(N / b0), math.ceil(K / b1)
    amax = np.zeros((R, C))
    for r in range(R):
        for c in range(C):
            amax[r, c] = np.abs(w[r * b0:(r + 1) * b0, c * b1:(c + 1) * b1]).max()
    s_t, s64 = _to_stored(amax / FP8_MAX, torch.float32)
    s_full = s64[np.arange(N)[:, None] // b0, np.arange(K)[None, :] // b1]
    q = torch.from_numpy(np.clip(w / s_full, -FP8_MAX, FP8_MAX)).to(torch.float8_e4m3fn)
    w_hat = q.to(torch.float64).numpy() * s_full
    return {"weight": q, "weight_scale_inv": s_t}, w_hat


# ---- config ------------------------------------------------------------------------------------------------------

def _quantization_config(fmt: str, o: dict, float_named: list[str], has_router: bool) -> dict:
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": o["bits"], "group_size": o["group"], "sym": o["sym"],
              "desc_act": o["desc_act"], "checkpoint_format": "gptq_v2" if o["version"] == 2 else "gptq",
              "lm_head": False, "pack_dtype": "int32"}
        if float_named:
            qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in float_named}
        return qc
    routers = ["mlp.gate"] if has_router else []
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": o["group"], "zero_point": True, "version": "gemm",
                "modules_to_not_convert": (routers + float_named) or None}
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK),
                "modules_to_not_convert": ["lm_head"] + routers + float_named}
    weights = {"num_bits": o["bits"], "type": "int", "symmetric": o["sym"], "strategy": o["strategy"],
               "group_size": o["group"] if o["strategy"] == "group" else None,
               "actorder": "group" if o["desc_act"] else None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["lm_head"] + (["re:.*mlp\\.gate$"] if has_router else []) + float_named,
            "kv_cache_scheme": None}
