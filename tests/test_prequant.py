"""Pre-quantized checkpoint formats (export/prequant.py): unpacking is exact, against each format's own library.

For GPTQ (v1/v2, sym/asym, act-order, 4/8 bits), AWQ GEMM, compressed-tensors pack-quantized (int4/int8, sym/asym,
group/channel/tensor, with/without g_idx, an input dim that is not a multiple of the pack factor) and FP8 block-wise
(including a shape that is not a multiple of 128), random integers / float8 values and fp16/bf16/fp32 scales are
packed, then unpacked and dequantized, and compared bit for bit with

* the documented formula ``(q - z) * s[g_idx]`` computed in float64 on the integers we started from (always runs;
  exact because each product is representable in float32), and
* the writing library's own packer and dequantization where it is importable: compressed-tensors (installed from the
  dev extra), transformers' FP8 dequantization (always installed for the tests), AutoGPTQ (``auto_gptq``) and
  AutoAWQ (``awq``) when on the path. Those two do not install into this environment with their dependencies (they
  pull accelerate/datasets/peft and, for GPTQModel, a CUDA torch), so their tests load the one source file that packs
  or dequantizes (the package is located with importlib.util.find_spec, its __init__ not run) and skip, saying so,
  when the package is absent. GPTQModel's v1 <-> v2 zero-point conversion is transcribed (cited) below.

The test packers (tests/prequant_writer.py) are written loop by loop from the library sources (cited at each),
independently of the unpacker.
Also: bad configs and bad tensors are refused naming the field / tensor; per-layer rules (modules_to_not_convert,
lm_head, router, GPTQModel dynamic, compressed-tensors ignore/targets); the MatMulNBits form runs in ONNX Runtime.
Numpy/torch only, no model builds.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import torch

from export import prequant as P
from export.checkpoint import CheckpointError
from graphs.quantize import pack_nbits
from tests.prequant_writer import AWQ_ORDER, ct_pack, gptq_v2_to_v1, pack_along_cols, pack_along_rows

RNG = np.random.default_rng(1234)
L = "model.layers.0.self_attn.q_proj"


def fp16_scales(*shape) -> np.ndarray:
    return (RNG.uniform(0.002, 0.05, shape)).astype(np.float16)


def gptq_case(bits, K, N, group, sym, desc_act, version, zero_min=0):
    """Random GPTQ integers and their tensors. Act-order g_idx as AutoGPTQ's quantization/gptq.py fasterquant
    makes it: [i // group_size for i in range(columns)] over the permuted columns, then g_idx[invperm]
    (non-monotonic, group_size inputs per group)."""
    maxq, G = (1 << bits) - 1, K // group
    q = RNG.integers(0, maxq + 1, (K, N))
    z = np.full((G, N), 1 << (bits - 1)) if sym else RNG.integers(zero_min, maxq + 1, (G, N))
    s = fp16_scales(G, N)
    if desc_act:
        perm = RNG.permutation(K)
        g_idx = (np.arange(K) // group)[np.argsort(perm)].astype(np.int32)
    else:
        g_idx = (np.arange(K) // group).astype(np.int32)
    qzeros = pack_along_cols(z, bits)
    if version == 1:
        qzeros = gptq_v2_to_v1(qzeros, bits)
    tensors = {f"{L}.qweight": torch.from_numpy(pack_along_rows(q, bits)), f"{L}.qzeros": torch.from_numpy(qzeros),
               f"{L}.scales": torch.from_numpy(s), f"{L}.g_idx": torch.from_numpy(g_idx)}
    return q, z, s, g_idx, tensors


def formula(q_in_out, z_groups_out, s_groups_out, g_idx):
    """(q - z[g_idx]) * s[g_idx] in float64, laid out [out, in]."""
    w = (q_in_out.astype(np.float64) - z_groups_out[g_idx].astype(np.float64)) * s_groups_out[g_idx].astype(
        np.float64)
    return w.T


def exact_f32(w64: np.ndarray) -> np.ndarray:
    f = w64.astype(np.float32)
    assert np.array_equal(f.astype(np.float64), w64), "the reference is not representable in float32"
    return f


def gptq_config(**kw):
    return {"quantization_config": {"quant_method": "gptq", "damp_percent": 0.01, "true_sequential": True, **kw}}


# ---- GPTQ ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_unpacks_exactly(bits, version, sym, desc_act):
    K, N, group = 64, 48, 16
    q, z, s, g_idx, tensors = gptq_case(bits, K, N, group, sym, desc_act, version)
    fmt = {"checkpoint_format": "gptq_v2"} if version == 2 else {"checkpoint_format": "gptq"}
    pq = P.detect(gptq_config(bits=bits, group_size=group, sym=sym, desc_act=desc_act, **fmt))
    assert (pq.method, pq.bits, pq.group_size, pq.sym, pq.desc_act, pq.format_version) == \
        ("gptq", bits, group, sym, desc_act, version)
    assert "quantization_config.damp_percent" in pq.ignored_fields
    u = P.unpack(pq, tensors, L, shape=(N, K))
    half = 1 << (bits - 1)
    assert u.q.dtype == np.int8 and u.shape == (N, K) and np.array_equal(u.q.astype(int) + half, q.T)
    if sym:
        assert u.zeros is None  # every zero point is the midpoint: MatMulNBits' default
    else:
        assert u.zeros.dtype == np.int8 and np.array_equal(u.zeros.astype(int) + half, z.T)
    assert (u.g_idx is not None) == desc_act and u.scale_dtype == "F16"
    if desc_act:
        assert np.array_equal(u.g_idx, g_idx)
    w = P.dequantize(u)
    assert w.dtype == np.float32 and np.array_equal(w, exact_f32(formula(q, z, s, g_idx)))


def test_gptq_v1_zero_of_zero_round_trips_through_gptqmodel_conversion():
    """A true zero point of 0 (or 15) in v1: GPTQModel's word-wide subtract borrows into the next nibble; unpacking
    with the word-wide add (convert_gptq_v1_to_v2_format_module) undoes it exactly."""
    K, N, group, bits = 32, 16, 16, 4
    q, z, s, g_idx, tensors = gptq_case(bits, K, N, group, sym=False, desc_act=False, version=1)
    z[:] = np.resize([0, 15, 0, 0, 7, 15, 15, 0], z.shape)
    tensors[f"{L}.qzeros"] = torch.from_numpy(gptq_v2_to_v1(pack_along_cols(z, bits), bits))
    pq = P.detect(gptq_config(bits=4, group_size=group, sym=False))
    u = P.unpack(pq, tensors, L)
    assert np.array_equal(u.zeros.astype(int) + 8, z.T)
    # and the conversion itself, GPTQModel's code on the torch tensor: v1 + 0x11111111 == v2
    v1 = torch.from_numpy(gptq_v2_to_v1(pack_along_cols(z, bits), bits))
    v1 += 0b00010001000100010001000100010001
    assert np.array_equal(v1.numpy(), pack_along_cols(z, bits))


def test_gptq_per_channel_and_bf16_scales():
    K, N, bits = 32, 16, 4
    q, z, s, g_idx, tensors = gptq_case(bits, K, N, K, sym=False, desc_act=False, version=2)
    tensors[f"{L}.scales"] = torch.from_numpy(s.astype(np.float32)).to(torch.bfloat16)
    s_bf = tensors[f"{L}.scales"].float().numpy()
    del tensors[f"{L}.g_idx"]  # optional without act-order
    pq = P.detect(gptq_config(bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2"))
    u = P.unpack(pq, tensors, L)
    assert u.group_size == K and u.scales.shape == (N, 1) and u.scale_dtype == "BF16"
    assert np.array_equal(P.dequantize(u), exact_f32(formula(q, z, s_bf, g_idx)))


def _load_source(package: str, relpath: str, modname: str, stubs=None):
    """One source file of an installed package, without running the package's __init__ (which imports heavy
    optional dependencies). `stubs(root)` returns sys.modules entries the file's own imports need; they are
    removed again afterwards."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not importable here (it does not install into this environment with its "
                    f"dependencies); the documented-packing tests cover the format")
    root = list(spec.submodule_search_locations)[0]
    extra = stubs(root) if stubs else {}
    saved = {k: sys.modules[k] for k in extra if k in sys.modules}
    sys.modules.update(extra)
    try:
        file_spec = importlib.util.spec_from_file_location(modname, f"{root}/{relpath}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    finally:
        for k in extra:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return module, root


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_against_autogptq(bits, desc_act):
    """AutoGPTQ's own QuantLinear (nn_modules/qlinear/qlinear_cuda.py): its pack() writes the same words as our
    documented packer (v1), and its CPU forward (scales[g_idx] * (weight - zeros[g_idx]), fp16) equals our
    dequantization rounded to fp16. Zero points >= 1: AutoGPTQ's v1 packer corrupts a zero of 0 (it packs -1)."""
    ql, _ = _load_source("auto_gptq", "nn_modules/qlinear/qlinear_cuda.py", "_autogptq_qlinear_cuda")
    K, N, group = 64, 32, 16
    q, z, s, g_idx, tensors = gptq_case(bits, K, N, group, sym=False, desc_act=desc_act, version=1, zero_min=1)
    layer = ql.QuantLinear(bits, group, K, N, False, weight_dtype=torch.float16)
    lin = torch.nn.Linear(K, N, bias=False).double()
    s64, z64 = torch.from_numpy(s.astype(np.float64)), torch.from_numpy(z.astype(np.float64))
    gi = torch.from_numpy(g_idx).long()
    lin.weight.data = ((torch.from_numpy(q.astype(np.float64)) - z64[gi]) * s64[gi]).T.contiguous()
    layer.pack(lin, s64.T.contiguous(), z64.T.contiguous(), torch.from_numpy(g_idx))  # takes [out, groups]
    layer.scales = layer.scales.half()
    assert np.array_equal(layer.qweight.numpy(), tensors[f"{L}.qweight"].numpy())
    assert np.array_equal(layer.qzeros.numpy(), tensors[f"{L}.qzeros"].numpy())
    oracle = layer(torch.eye(K, dtype=torch.float16))  # [in, out]: the dequantized weight itself
    mine = {f"{L}.qweight": layer.qweight, f"{L}.qzeros": layer.qzeros, f"{L}.scales": layer.scales,
            f"{L}.g_idx": layer.g_idx}
    pq = P.detect(gptq_config(bits=bits, group_size=group, sym=False, desc_act=desc_act))
    w = P.dequantize(P.unpack(pq, mine, L))
    assert np.array_equal(w.astype(np.float16), oracle.numpy().T)


# ---- AWQ -------------------------------------------------------------------------------------------------------

def awq_case(K, N, group):
    G = K // group
    q, z, s = RNG.integers(0, 16, (K, N)), RNG.integers(0, 16, (G, N)), fp16_scales(G, N)
    tensors = {f"{L}.qweight": torch.from_numpy(pack_along_cols(q, 4, AWQ_ORDER)),
               f"{L}.qzeros": torch.from_numpy(pack_along_cols(z, 4, AWQ_ORDER)), f"{L}.scales": torch.from_numpy(s)}
    return q, z, s, tensors


@pytest.mark.parametrize("group", [16, -1])
def test_awq_unpacks_exactly(group):
    K, N = 64, 48
    q, z, s, tensors = awq_case(K, N, K if group == -1 else group)
    pq = P.detect({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group, "version": "GEMM",
                                           "zero_point": True, "modules_to_not_convert": None}})
    assert (pq.method, pq.bits, pq.sym) == ("awq", 4, False)
    u = P.unpack(pq, tensors, L, shape=(N, K))
    assert np.array_equal(u.q.astype(int) + 8, q.T) and np.array_equal(u.zeros.astype(int) + 8, z.T)
    gi = np.arange(K) // u.group_size
    assert np.array_equal(P.dequantize(u), exact_f32(formula(q, z, s, gi)))


def _awq_stubs(root):
    """awq/modules/linear/gemm.py imports awq.utils.utils (which imports accelerate) only for get_best_device, and
    optional triton kernels (None here: an ImportError its try/except expects); the package and its subpackages are
    namespaces so their heavy __init__ files do not run; awq.utils.module and packing_utils are the real files."""
    def package(name, path):
        m = types.ModuleType(name)
        m.__path__ = [path]
        return m

    def real(name, rel):
        spec = importlib.util.spec_from_file_location(name, f"{root}/{rel}")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m

    best = types.ModuleType("awq.utils.utils")
    best.get_best_device = lambda: "cpu"
    return {"awq": package("awq", root), "awq.utils": package("awq.utils", f"{root}/utils"),
            "awq.modules": package("awq.modules", f"{root}/modules"), "awq.utils.utils": best,
            "awq.modules.triton": None, "awq.modules.triton.gemm": None,
            "awq.utils.module": real("awq.utils.module", "utils/module.py"),
            "awq.utils.packing_utils": real("awq.utils.packing_utils", "utils/packing_utils.py")}


def test_awq_against_autoawq():
    """AutoAWQ's WQLinear_GEMM.from_linear packs the same words as our documented packer, and its
    awq/utils/packing_utils.py dequantize_gemm (unpack_awq + reverse_awq_order, (q - z) * s in fp16) equals our
    dequantization rounded to fp16."""
    gemm, root = _load_source("awq", "modules/linear/gemm.py", "_autoawq_gemm", stubs=_awq_stubs)
    pu, _ = _load_source("awq", "utils/packing_utils.py", "_autoawq_packing_utils")
    K, N, group = 64, 32, 16
    q, z, s, tensors = awq_case(K, N, group)
    lin = torch.nn.Linear(K, N, bias=False).double()
    s64, z64 = torch.from_numpy(s.astype(np.float64)), torch.from_numpy(z.astype(np.float64))
    gi = torch.arange(K) // group
    lin.weight.data = ((torch.from_numpy(q.astype(np.float64)) - z64[gi]) * s64[gi]).T.contiguous()
    layer = gemm.WQLinear_GEMM.from_linear(lin, 4, group, scales=s64, zeros=z64)  # scales/zeros [groups, out]
    assert np.array_equal(layer.qweight.numpy(), tensors[f"{L}.qweight"].numpy())
    assert np.array_equal(layer.qzeros.numpy(), tensors[f"{L}.qzeros"].numpy())
    oracle = pu.dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group)  # [in, out] fp16
    pq = P.detect({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group}})
    mine = {f"{L}.qweight": layer.qweight, f"{L}.qzeros": layer.qzeros, f"{L}.scales": layer.scales}
    assert np.array_equal(P.dequantize(P.unpack(pq, mine, L)).astype(np.float16), oracle.numpy().T)


# ---- compressed-tensors ----------------------------------------------------------------------------------------

def ct_config(bits, sym, strategy, group, actorder=None, ignore=("lm_head",)):
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy, "group_size": group,
               "dynamic": False, "observer": "minmax", "actorder": actorder}
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None}},
        "ignore": list(ignore), "kv_cache_scheme": None, "sparsity_config": {}, "version": "0.9.1",
        "global_compression_ratio": 1.5}}


def ct_case(bits, sym, strategy, K, N, group, g_idx_kind, scale_dtype=torch.float16):
    G = {"group": K // max(group, 1), "channel": 1, "tensor": 1}[strategy]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = RNG.integers(lo, hi + 1, (N, K)).astype(np.int8)
    zp = None if sym else RNG.integers(lo, hi + 1, (N, G) if strategy != "tensor" else (1,)).astype(np.int8)
    s = torch.from_numpy(RNG.uniform(0.002, 0.05, (N, G) if strategy != "tensor" else (1,)).astype(np.float32)
                         ).to(scale_dtype)
    g_idx = None
    if g_idx_kind:
        g_idx = (RNG.permutation(K) // group).astype(np.int32)
    tensors = {f"{L}.weight_packed": torch.from_numpy(ct_pack(q, bits, 1)), f"{L}.weight_scale": s,
               f"{L}.weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if zp is not None:
        tensors[f"{L}.weight_zero_point"] = torch.from_numpy(ct_pack(zp, bits, 0)) if strategy != "tensor" \
            else torch.from_numpy(zp)
    if g_idx is not None:
        tensors[f"{L}.weight_g_idx"] = torch.from_numpy(g_idx)
    return q, zp, s, g_idx, tensors


def ct_formula(q, zp, s, g_idx, group, K):
    s64 = s.float().numpy().astype(np.float64)
    N = q.shape[0]
    s64 = np.broadcast_to(s64.reshape(-1, s64.shape[-1]) if s64.ndim == 2 else s64.reshape(1, 1), (N, s64.shape[-1]
                                                                                                   if s64.ndim == 2
                                                                                                   else 1))
    z64 = np.zeros_like(s64) if zp is None else np.broadcast_to(zp.reshape(N, -1) if zp.ndim == 2 else
                                                                zp.reshape(1, 1), s64.shape).astype(np.float64)
    gi = g_idx if g_idx is not None else np.arange(K) // (group if s64.shape[1] > 1 else K)
    return (q.astype(np.float64) - z64[:, gi]) * s64[:, gi]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("strategy,g_idx_kind", [("group", False), ("group", True), ("channel", False),
                                                 ("tensor", False)])
def test_compressed_tensors_unpacks_exactly(bits, sym, strategy, g_idx_kind):
    K, N, group = 64, 40, 16
    q, zp, s, g_idx, tensors = ct_case(bits, sym, strategy, K, N, group, g_idx_kind)
    cfg = ct_config(bits, sym, strategy, group if strategy == "group" else None,
                    actorder="group" if g_idx_kind else None)
    pq = P.detect(cfg)
    assert (pq.method, pq.bits, pq.sym, pq.desc_act) == ("compressed-tensors", bits, sym, g_idx_kind)
    assert "quantization_config.config_groups.group_0.weights.observer" in pq.ignored_fields
    u = P.unpack(pq, tensors, L, shape=(N, K))
    assert np.array_equal(u.q, q) and (u.zeros is None) == (sym or not zp.any())
    if not sym and strategy != "tensor":
        assert np.array_equal(u.zeros, zp)
    assert np.array_equal(P.dequantize(u), exact_f32(ct_formula(q, zp, s, g_idx, group, K)))


def test_compressed_tensors_dense_packing_of_an_odd_input_dim_and_unpacked_zero_points():
    """in = 36 (not a multiple of 8): compressed-tensors pads the last word; older writers stored the asymmetric
    zero point unpacked int8 [out, groups]."""
    K, N, group, bits = 36, 24, 12, 4
    q, zp, s, _, tensors = ct_case(bits, False, "group", K, N, group, False, scale_dtype=torch.bfloat16)
    assert tensors[f"{L}.weight_packed"].shape == (N, 5)
    tensors[f"{L}.weight_zero_point"] = torch.from_numpy(zp)
    pq = P.detect(ct_config(bits, False, "group", group))
    u = P.unpack(pq, tensors, L)
    assert u.scale_dtype == "BF16" and np.array_equal(u.zeros, zp)
    assert np.array_equal(P.dequantize(u), exact_f32(ct_formula(q, zp, s, None, group, K)))


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    except ImportError as e:
        pytest.skip(f"compressed-tensors is not importable ({e}); `pip install -e .[dev]` installs it")
    return PackedQuantizationCompressor, pack_to_int32, unpack_from_int32, QuantizationArgs, QuantizationScheme


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_compressed_tensors_against_the_library(bits, sym, strategy):
    """compressed-tensors' own PackedQuantizationCompressor.compress (quantize + pack_to_int32, zero point packed
    along dim 0) writes the tensors; our unpack equals its unpack_from_int32, and our dequantization its
    decompress, bit for bit (fp16 and bf16 scales). Its documented packing equals ours."""
    Compressor, pack_to_int32, unpack_from_int32, QArgs, QScheme = _ct()
    K, N, group = 64, 40, 16
    for scale_dtype in (torch.float16, torch.bfloat16):
        q, zp, s, _, mine = ct_case(bits, sym, strategy, K, N, group, False, scale_dtype)
        assert np.array_equal(pack_to_int32(torch.from_numpy(q), bits).numpy(), mine[f"{L}.weight_packed"].numpy())
        args = QArgs(num_bits=bits, symmetric=sym, strategy=strategy,
                     group_size=group if strategy == "group" else None)
        scheme = QScheme(targets=["Linear"], weights=args)
        zt = None if sym else torch.from_numpy(zp)
        # the float32 weight on the grid (exact: a small integer times an fp16/bf16 scale) quantizes back to q
        w = torch.from_numpy(exact_f32(ct_formula(q, zp, s, None, group, K)))
        sd = {"weight": w, "weight_scale": s}
        if zt is not None:
            sd["weight_zero_point"] = zt
        packed = Compressor.compress(sd, scheme)
        assert np.array_equal(packed["weight_packed"].numpy(), mine[f"{L}.weight_packed"].numpy())
        if not sym:
            assert np.array_equal(packed["weight_zero_point"].numpy(), mine[f"{L}.weight_zero_point"].numpy())
        tensors = {f"{L}.{k}": v for k, v in packed.items()}
        pq = P.detect(ct_config(bits, sym, strategy, group if strategy == "group" else None))
        u = P.unpack(pq, tensors, L)
        assert np.array_equal(u.q, unpack_from_int32(packed["weight_packed"], bits, torch.Size([N, K])).numpy())
        oracle = Compressor.decompress(dict(packed), scheme)["weight"]
        assert oracle.dtype == scale_dtype
        assert torch.equal(torch.from_numpy(P.dequantize(u)).to(scale_dtype), oracle)


def test_compressed_tensors_g_idx_matches_the_library_algorithm():
    """compressed-tensors removed act-order 'group' in 2026; checkpoints written before carry weight_g_idx. Its
    dequantization then (quantization/lifecycle/forward.py _process_quantization, commit 52792be0): perm =
    argsort(g_idx), columns permuted, contiguous groups of group_size dequantized, inverse permutation. Transcribed
    here; ours equals it."""
    K, N, group, bits = 64, 24, 16, 4
    q, zp, s, g_idx, tensors = ct_case(bits, False, "group", K, N, group, True)
    u = P.unpack(P.detect(ct_config(bits, False, "group", group, actorder="group")), tensors, L)
    x = torch.from_numpy(q.astype(np.float32)).to(torch.float16)
    perm = torch.argsort(torch.from_numpy(g_idx))
    xg = x.index_select(-1, perm).unflatten(-1, (K // group, group))
    sc, zz = s.unsqueeze(-1), torch.from_numpy(zp).to(torch.float16).unsqueeze(-1)
    old = ((xg.to(s.dtype) - zz) * sc).flatten(start_dim=-2).index_select(-1, torch.argsort(perm))
    assert torch.equal(torch.from_numpy(P.dequantize(u)).to(torch.float16), old)


# ---- FP8 -------------------------------------------------------------------------------------------------------

def fp8_case(N, K, block=(128, 128), scale_dtype=torch.float32):
    w = torch.from_numpy(RNG.normal(0, 100, (N, K)).clip(-448, 448).astype(np.float32)).to(torch.float8_e4m3fn)
    shape = (math.ceil(N / block[0]), math.ceil(K / block[1]))
    s = torch.from_numpy(RNG.uniform(1e-4, 1e-2, shape).astype(np.float32)).to(scale_dtype)
    return w, s, {f"{L}.weight": w, f"{L}.weight_scale_inv": s}


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_unpacks_exactly(shape, scale_dtype):
    N, K = shape
    w, s, tensors = fp8_case(N, K, scale_dtype=scale_dtype)
    pq = P.detect({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]}})
    u = P.unpack(pq, tensors, L, shape=(N, K))
    assert u.q.dtype == ml_dtypes.float8_e4m3fn and u.block == (128, 128) and u.scales.shape == s.shape
    s64 = s.float().numpy().astype(np.float64)
    ref = w.float().numpy().astype(np.float64) * s64[np.arange(N)[:, None] // 128, np.arange(K)[None, :] // 128]
    got = P.dequantize(u)
    assert np.array_equal(got, ref.astype(np.float32))  # one float32 rounding, as the libraries do
    # transformers' own FP8 dequantization (integrations/finegrained_fp8.py _dequantize_fp8_weight)
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    oracle = fp8._dequantize_fp8_weight(w, s, [128, 128], torch.float32)
    assert torch.equal(torch.from_numpy(got), oracle)
    if N % 128 == 0 and K % 128 == 0:  # Fp8Dequantize (the load path) derives the block from the scale grid
        op = fp8.Fp8Dequantize(None)
        assert torch.equal(torch.from_numpy(got), op._dequantize_one(w, s, output_dtype=torch.float32))


def test_fp8_per_tensor_scale():
    w, _, tensors = fp8_case(64, 96)
    tensors[f"{L}.weight_scale_inv"] = torch.tensor(0.0125)
    pq = P.detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}})
    u = P.unpack(pq, tensors, L)
    assert u.block == (64, 96)
    assert np.array_equal(P.dequantize(u), w.float().numpy() * np.float32(0.0125))


# ---- MatMulNBits: the unpacked form is what ONNX Runtime multiplies --------------------------------------------

@pytest.mark.parametrize("case", ["gptq4_act_order", "gptq8_sym", "awq4"])
def test_unpacked_form_runs_in_matmul_nbits(case):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    K, N, group = 64, 32, 32
    if case == "awq4":
        *_, tensors = awq_case(K, N, group)
        pq = P.detect({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group}})
    else:
        bits, sym, desc = (4, False, True) if case == "gptq4_act_order" else (8, True, False)
        *_, tensors = gptq_case(bits, K, N, group, sym, desc, version=1)
        pq = P.detect(gptq_config(bits=bits, group_size=group, sym=sym, desc_act=desc))
    u = P.unpack(pq, tensors, L)
    perm, us = P.sort_by_group(u)
    assert (perm is not None) == (case == "gptq4_act_order")
    x = RNG.normal(0, 1, (3, K)).astype(np.float32)
    want = x.astype(np.float64) @ P.dequantize(u).astype(np.float64).T
    xin = x if perm is None else x[:, perm]
    inits = [helper.make_tensor("B", TensorProto.UINT8, [N, K // group, group * u.bits // 8],
                                pack_nbits(us.q, u.bits, group).tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, [N, K // group], us.scales.tobytes(), raw=True)]
    inputs = ["x", "B", "S"]
    zp = P.matmul_nbits_zero_points(us)
    if zp is not None:
        inits.append(helper.make_tensor("Z", TensorProto.UINT8, list(zp.shape), zp.tobytes(), raw=True))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=u.bits,
                            block_size=group, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": xin})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- per-layer rules -------------------------------------------------------------------------------------------

def test_gptq_layer_rules_lm_head_router_dynamic_and_not_converted():
    pq = P.detect(gptq_config(bits=4, group_size=32, dynamic={
        r"-:.*\.layers\.1\..*": {},
        r"+:.*\.mlp\.down_proj": {"bits": 8, "group_size": 64, "damp_percent": 0.05},
        r".*\.layers\.0\.self_attn\.o_proj": {"sym": False},
    }, modules_to_not_convert=["model.layers.2.mlp.gate_proj"]))
    assert pq.scheme_for("lm_head") is None and pq.scheme_for("model.layers.0.mlp.gate") is None  # router
    assert r"quantization_config.dynamic.+:.*\.mlp\.down_proj.damp_percent" in pq.ignored_fields
    assert pq.scheme_for("model.layers.1.self_attn.q_proj") is None
    down = pq.scheme_for("model.layers.0.mlp.down_proj")
    assert (down.bits, down.group_size) == (8, 64)
    assert pq.scheme_for("model.layers.0.self_attn.o_proj").sym is False
    assert pq.scheme_for("model.layers.2.mlp.gate_proj") is None
    assert pq.scheme_for("model.layers.2.mlp.up_proj") == pq.default
    assert pq.scheme_for("model.layers.0.mlp.experts.3.gate_proj") == pq.default
    assert P.detect(gptq_config(bits=4, lm_head=True)).scheme_for("lm_head") is not None
    blocks = P.detect(gptq_config(bits=4, modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj"]]))
    assert blocks.scheme_for("model.layers.3.self_attn.k_proj") is not None
    assert blocks.scheme_for("model.layers.3.self_attn.v_proj") is None
    assert P.tensor_names(pq, L) == [f"{L}.qweight", f"{L}.qzeros", f"{L}.scales"]
    assert P.optional_tensor_names(pq, L) == [f"{L}.g_idx"]
    assert P.tensor_names(pq, "lm_head") == ["lm_head.weight"]


def test_not_converted_follows_transformers_boundaries():
    pq = P.detect({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                           "modules_to_not_convert": ["mlp.gate", "model.layers.1"]}})
    assert pq.scheme_for("model.layers.0.mlp.gate_proj") is not None  # 'mlp.gate' is not a prefix of 'gate_proj'
    assert pq.scheme_for("model.layers.0.mlp.gate") is None
    assert pq.scheme_for("model.layers.1.self_attn.q_proj") is None
    assert pq.scheme_for("model.layers.11.self_attn.q_proj") is not None
    fp8 = P.detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                            "modules_to_not_convert": ["model.layers.0.mlp.gate"]}})
    assert fp8.scheme_for("lm_head") is None and fp8.scheme_for("model.layers.0.mlp.gate") is None
    # transformers' FP8 converts nn.Linear and the experts; Qwen3-MoE's router (Qwen3MoeTopKRouter) is neither
    assert fp8.scheme_for("model.layers.1.mlp.gate") is None
    assert fp8.scheme_for("model.layers.1.mlp.down_proj") is not None
    gptq = P.detect({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    assert gptq.scheme_for("score") is None  # GPTQ/AWQ quantize inside the decoder layers only
    assert gptq.scheme_for("model.layers.3.mlp.up_proj") is not None
    # which tensors the transformers rule wants matches the tools' checkpoints
    f = P.tensor_names(fp8, L)
    assert f == [f"{L}.weight", f"{L}.weight_scale_inv"]


def test_compressed_tensors_targets_and_ignore():
    cfg = ct_config(4, True, "group", 32, ignore=["lm_head", "re:.*mlp\\.gate$"])
    cfg["quantization_config"]["config_groups"]["group_1"] = {
        "targets": ["re:.*down_proj$"], "format": "pack-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}}
    pq = P.detect(cfg)
    assert pq.scheme_for("lm_head") is None and pq.scheme_for("model.layers.0.mlp.gate") is None
    assert pq.scheme_for("model.layers.0.mlp.gate_proj").bits == 4
    down = pq.scheme_for("model.layers.0.mlp.down_proj")  # a regex target beats the class name
    assert (down.bits, down.sym, down.strategy, down.group_size) == (8, False, "channel", -1)
    assert P.tensor_names(pq, "model.layers.0.mlp.down_proj")[-1].endswith(".weight_zero_point")


def test_resolve_linear_checks_the_checkpoint_against_the_config():
    pq = P.detect(gptq_config(bits=4, group_size=16))
    *_, tensors = gptq_case(4, 32, 16, 16, True, False, 1)
    assert P.resolve_linear(pq, L, tensors) == pq.default
    with pytest.raises(P.PreQuantError, match=r"missing tensor\(s\) \['model.layers.0.self_attn.q_proj.qzeros'\]"):
        P.resolve_linear(pq, L, {k: v for k, v in tensors.items() if not k.endswith("qzeros")})
    with pytest.raises(P.PreQuantError, match=r"lm_head.*stays float.*lm_head.qweight"):
        P.resolve_linear(pq, "lm_head", {"lm_head.qweight": 0, "lm_head.weight": 0})
    assert P.resolve_linear(pq, "lm_head", {"lm_head.weight": 0}) is None
    with pytest.raises(P.PreQuantError, match="missing tensor 'model.layers.0.mlp.gate.weight'"):
        P.resolve_linear(pq, "model.layers.0.mlp.gate", {})


# ---- refusals --------------------------------------------------------------------------------------------------

def test_no_quantization_config_is_a_float_checkpoint():
    assert P.detect({"model_type": "qwen2"}) is None
    legacy = P.detect({}, quantize_config={"bits": 4, "group_size": 128, "desc_act": True, "sym": True,
                                           "model_file_base_name": "model"})
    assert legacy.method == "gptq" and legacy.desc_act


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
    ({"quant_method": "gptq", "bits": 3}, "quantization_config.bits"),
    ({"quant_method": "gptq", "bits": "4"}, "quantization_config.bits"),
    ({"quant_method": "gptq", "bits": True}, "quantization_config.bits"),
    ({"quant_method": "gptq"}, "quantization_config.bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "quantization_config.group_size"),
    ({"quant_method": "gptq", "bits": 4, "sym": "true"}, "quantization_config.sym"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq", "format": "gptq_v2"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, "quantization_config.is_marlin_format"),
    ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}, "quantization_config.pack_dtype"),
    ({"quant_method": "gptq", "bits": 4, "adapter": {"name": "eora", "rank": 64}}, "quantization_config.adapter"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"+:(": {}}}, "quantization_config.dynamic"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"x": {"bits": 2}}}, "quantization_config.dynamic.x.bits"),
    ({"quant_method": "awq", "bits": 8}, "quantization_config.bits"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "quantization_config.version"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "quantization_config.zero_point"),
    ({"quant_method": "awq", "bits": 4, "modules_to_not_convert": "lm_head"},
     "quantization_config.modules_to_not_convert"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "quantization_config.activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size"),
    ({"quant_method": "fp8", "scale_fmt": "ue8m0"}, "quantization_config.scale_fmt"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8}}}}, "quantization_config.format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
     "quantization_config.config_groups"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128, "strategy": "group"},
        "input_activations": {"num_bits": 8}}}}, "quantization_config.config_groups.g.input_activations"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 2}}}}, "quantization_config.config_groups.g.weights.num_bits"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "frozen",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
     "quantization_config.quantization_status"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "transform_config": {"x": {}},
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}},
     "quantization_config.transform_config"),
])
def test_bad_configs_are_refused_naming_the_field(qc, field):
    with pytest.raises(P.PreQuantError, match=f"'[^']*{field.split('.')[-1]}'") as e:
        P.detect({"quantization_config": qc})
    assert field in str(e.value) and isinstance(e.value, CheckpointError)


def _gptq_tensors(**over):
    *_, tensors = gptq_case(4, 64, 32, 16, False, False, 2)
    tensors.update(over)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("change,match", [
    ({f"{L}.qzeros": None}, r"missing tensor 'model.layers.0.self_attn.q_proj.qzeros' \(GPTQ qzeros"),
    ({f"{L}.scales": None}, r"missing tensor '.*q_proj.scales'"),
    ({f"{L}.scales": torch.zeros(3, 32, dtype=torch.float16)}, r"'.*q_proj.scales' \(GPTQ scales\) has shape \[3, 32\]"
                                                                r"; expected \[4, 32\]"),
    ({f"{L}.qzeros": torch.zeros(4, 3, dtype=torch.int32)}, r"'.*q_proj.qzeros' \(GPTQ qzeros\) has shape \[4, 3\]"),
    ({f"{L}.qweight": torch.zeros(8, 32)}, r"'.*q_proj.qweight' \(GPTQ qweight\) has dtype F32; expected I32"),
    ({f"{L}.g_idx": torch.full((64,), 9, dtype=torch.int32)}, r"'.*q_proj.g_idx'.*group indices in \[9, 9\]"),
    ({f"{L}.g_idx": torch.zeros(60, dtype=torch.int32)}, r"'.*q_proj.g_idx'.*shape \[60\]; expected \[64\]"),
    ({f"{L}.scales": torch.full((4, 32), float("nan"), dtype=torch.float16)}, r"'.*q_proj.scales'.*non-finite"),
])
def test_bad_gptq_tensors_are_refused_naming_the_tensor(change, match):
    pq = P.detect(gptq_config(bits=4, group_size=16, sym=False, checkpoint_format="gptq_v2"))
    with pytest.raises(P.PreQuantError, match=match):
        P.unpack(pq, _gptq_tensors(**change), L)


def test_other_bad_tensors_are_refused():
    pq = P.detect(gptq_config(bits=4, group_size=24))  # 24 does not divide in = 64
    with pytest.raises(P.PreQuantError, match=r"'.*qweight'.*input dimension of 64.*group_size 24 does not divide"):
        P.unpack(pq, _gptq_tensors(), L)
    pq = P.detect(gptq_config(bits=4, group_size=16, desc_act=True))
    with pytest.raises(P.PreQuantError, match=r"missing tensor '.*q_proj.g_idx'"):
        P.unpack(pq, _gptq_tensors(**{f"{L}.g_idx": None}), L)
    with pytest.raises(P.PreQuantError, match=r"\[32, 64\] weight .*config.json expects \[32, 128\]"):
        P.unpack(P.detect(gptq_config(bits=4, group_size=16)), _gptq_tensors(), L, shape=(32, 128))
    with pytest.raises(P.PreQuantError, match="is not quantized by config.json"):
        P.unpack(P.detect(gptq_config(bits=4)), {}, "lm_head")
    # compressed-tensors
    q, zp, s, g_idx, tensors = ct_case(4, False, "group", 64, 40, 16, True)
    pq = P.detect(ct_config(4, False, "group", 16, actorder="group"))
    bad = dict(tensors, **{f"{L}.weight_shape": torch.tensor([40, 72])})
    with pytest.raises(P.PreQuantError, match=r"'.*weight_packed' \(compressed-tensors weight_packed\) has shape "
                                              r"\[40, 8\]; expected \[40, 9\]"):
        P.unpack(pq, bad, L)
    with pytest.raises(P.PreQuantError, match=r"missing tensor '.*weight_zero_point'"):
        P.unpack(pq, {k: v for k, v in tensors.items() if not k.endswith("zero_point")}, L)
    uneven = dict(tensors, **{f"{L}.weight_g_idx": torch.from_numpy(np.r_[np.zeros(20), np.arange(44) % 4]
                                                                         .astype(np.int32))})
    with pytest.raises(P.PreQuantError, match=r"'.*weight_g_idx'.*puts \d+ inputs in group 0"):
        P.unpack(pq, uneven, L)
    sym = P.detect(ct_config(4, True, "group", 16))
    with pytest.raises(P.PreQuantError, match="non-zero values but the scheme is symmetric"):
        P.unpack(sym, tensors, L)
    # FP8
    w, s, tensors = fp8_case(200, 300)
    pq = P.detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    with pytest.raises(P.PreQuantError, match=r"'.*weight_scale_inv' \(FP8 weight_scale_inv\) has shape \[1, 2\]; "
                                              r"expected \[2, 3\]"):
        P.unpack(pq, dict(tensors, **{f"{L}.weight_scale_inv": torch.ones(1, 2)}), L)
    with pytest.raises(P.PreQuantError, match=r"'.*q_proj.weight' \(FP8 weight\) has dtype BF16; expected F8_E4M3"):
        P.unpack(pq, dict(tensors, **{f"{L}.weight": torch.zeros(200, 300, dtype=torch.bfloat16)}), L)
