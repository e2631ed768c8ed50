"""Weight-only quantization (`build --quantize`): the RTN maths, the ONNX Runtime contrib ops against numpy, the
weights read back from every lowering's graph against quantize-dequantize of the checkpoint (exactly), `ort`
against `reference` on the same quantized weights, int8 greedy tokens against fp32 on the trained tiny models,
TensorRT-RTX engine builds (ahead of time) for int4/int8/fp8, and the refused flag values.

Every check runs real ONNX Runtime sessions / real TensorRT-RTX builds on the tiny trap checkpoints of conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.build import build
from export.checkpoint import Checkpoint
from export.spec import load_spec
from export.weights import load_tensor, weight_plan
from graphs import quantize as gq
from graphs.quantize import dequantize, pack_nbits, quantize_rtn, unpack_nbits
from tests.conftest import CASES, save_hf_checkpoint

IDS = [5, 17, 33, 100, 7, 8, 9, 200, 3, 4, 5, 6, 77, 12]
FAMILY_CASES = ["qwen2_window", "gemma2", "qwen3_moe_mixed"]
ALL_CASES = ["qwen2_window", "qwen2_mqa_tied_linear", "gemma2", "gemma2_mqa_untied", "qwen3_moe_mixed",
             "qwen3_moe_nonorm"]


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    model.ir_version = min(model.ir_version, 10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ---- maths ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 16), ("int4", 0), ("fp8", 0)])
def test_rtn_error_bound_and_range(scheme, group, full_range):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((24, 64)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero group: scale 0, q 0, dequantized exactly 0
    q, s = quantize_rtn(w, scheme, group, full_range=full_range)
    g = group or 64
    assert s.shape == (24, 64 // g)
    dq = dequantize(q, s)
    assert np.all(dq[3, :32] == 0)
    err = np.abs(dq - w).reshape(24, 64 // g, g)
    step = np.abs(s)[..., None]
    if scheme == "fp8":  # 3 mantissa bits: relative error <= 2^-4 (full_range changes nothing for fp8)
        assert np.all(np.abs(dq - w) <= np.abs(w) * 2 ** -4 + s.repeat(g, axis=1) * 2 ** -9 + 1e-12)
        return
    m = gq.qmax(scheme)
    assert q.dtype == np.int8 and q.min() >= -m - 1 and q.max() <= m
    groups = w.reshape(24, 64 // g, g)
    extreme = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], -1)[..., 0]
    if full_range:  # the extreme lands on -2^(bits-1): step absmax/8 (int4), some values clip by up to one step
        assert np.allclose(s, extreme / (-m - 1))
        qg = q.reshape(groups.shape)
        assert np.all(np.take_along_axis(qg, np.abs(groups).argmax(-1)[..., None], -1)[..., 0][extreme != 0] == -m - 1)
        assert np.all(err <= step * (1 + 1e-6) + 1e-12)
        inside = (groups / np.where(s == 0, 1, s)[..., None]) <= m + 0.5  # not clipped: round to nearest
        assert np.all(err[inside] <= (step / 2 * (1 + 1e-6) + 1e-12).repeat(g, -1)[inside])
        assert np.mean((dequantize(*quantize_rtn(w, scheme, group)) - w) ** 2) > np.mean((dq - w) ** 2)
    else:
        assert np.all(s >= 0) and np.allclose(s, np.abs(extreme) / m)
        assert np.all(err <= step / 2 * (1 + 1e-6) + 1e-12)  # round to nearest
        assert np.abs(q).max() == m  # absmax maps to +-qmax
    # wrong group size is refused, not silently truncated
    with pytest.raises(gq.QuantizeError, match="not a multiple"):
        quantize_rtn(w, scheme, 48)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_rtn_row_blocks_change_nothing(scheme):
    """quantize_rtn works `rows` rows at a time (bounded temporaries); the result is bit-identical to one block,
    also for a transposed (non-contiguous) view and a stack of experts."""
    w = np.random.default_rng(3).standard_normal((3, 50, 64)).astype(np.float32)
    for x, group, full in ((w, 32, False), (w[0].T, 0, False), (w, 32, True)):
        one = quantize_rtn(x, scheme, group, np.float16, rows=1 << 20, full_range=full)
        for rows in (1, 7, 64):
            blocked = quantize_rtn(x, scheme, group, np.float16, rows=rows, full_range=full)
            assert all(a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
                       for a, b in zip(one, blocked))
    # and the single block is the per-group absmax rule itself
    q, s = quantize_rtn(w[0], scheme, 32, np.float32, rows=1 << 20)
    assert np.array_equal(s, np.abs(w[0]).reshape(50, 2, 32).max(-1) / np.float32(gq.qmax(scheme)))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_roundtrip_and_layout(bits):
    rng = np.random.default_rng(2)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, size=(3, 5, 64)).astype(np.int8)
    b = pack_nbits(q, bits, 32)
    assert b.dtype == np.uint8 and b.shape == (3, 5, 2, 32 * bits // 8)
    assert np.array_equal(unpack_nbits(b, bits), q)
    if bits == 4:  # low nibble first, offset binary (implicit zero point 8)
        assert b[0, 0, 0, 0] == ((int(q[0, 0, 0]) + 8) | ((int(q[0, 0, 1]) + 8) << 4))


# ---- the contrib ops against numpy ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_matches_numpy(bits):
    rng = np.random.default_rng(3)
    K, N, g = 96, 40, 32
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.2
    x = rng.standard_normal((5, K)).astype(np.float32)
    q, s = quantize_rtn(w, f"int{bits}", g, full_range=True)  # the ort rule: negative scales too
    assert (s < 0).any() and (s > 0).any()
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=g, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, N])],
                              [numpy_helper.from_array(pack_nbits(q, bits, g), "b"), numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(gq.MS, 1)])
    y = _session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize(q, s).T, atol=2e-5)


def _moe_numpy(x, logits, w1, w2, k, normalize):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-p[t])[:k]
        wt = p[t, top] / (p[t, top].sum() if normalize else 1.0)
        for e, a in zip(top, wt):
            h = w1[e] @ x[t]
            gate, up = h[0::2], h[1::2]  # interleaved (swiglu_fusion=1)
            out[t] += a * (w2[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("normalize", [1, 0])
@pytest.mark.parametrize("bits,atol", [(4, 2e-5), (8, 0.2)])
def test_qmoe_matches_numpy(bits, atol, normalize):
    """QMoE's layout (weights [E, N, K*bits/8] raw, scales [E, N, K/block], implicit zero point) against numpy.
    int4 at accuracy_level 1 is fp32 compute (exact); the block-wise int8 kernel always quantizes activations to
    int8, hence the loose bound (and why the ort lowering dequantizes int8 experts at --accuracy-level 1).
    Without renormalisation the full softmax goes in as router_weights (QMoE's normalize_routing_weights=0 alone
    still renormalises over the top-k)."""
    rng = np.random.default_rng(4)
    E, H, I, k, n, g = 4, 64, 32, 2, 6, 32
    fc1 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.2
    fc2 = rng.standard_normal((E, H, I)).astype(np.float32) * 0.2
    (q1, s1), (q2, s2) = (quantize_rtn(f, f"int{bits}", g, full_range=True) for f in (fc1, fc2))
    x = rng.standard_normal((n, H)).astype(np.float32)
    logits = rng.standard_normal((n, E)).astype(np.float32)
    inits = [numpy_helper.from_array(pack_nbits(q1, bits, g).reshape(E, 2 * I, -1), "w1"),
             numpy_helper.from_array(s1, "s1"),
             numpy_helper.from_array(pack_nbits(q2, bits, g).reshape(E, H, -1), "w2"),
             numpy_helper.from_array(s2, "s2")]
    extra = [] if normalize else [""] * 6 + ["rw"]
    node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2", "", *extra], ["y"], domain=gq.MS, k=k,
                            activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                            activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=bits, block_size=g,
                            quant_type="int", weights_prepacked=0, accuracy_level=1)
    ins = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [n, sz]) for v, sz in (("x", H), ("r", E), ("rw", E))]
    graph = helper.make_graph([node], "g", ins[:2 if normalize else 3],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(gq.MS, 1)])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = _session(model).run(None, {"x": x, "r": logits, **({} if normalize else {"rw": probs})})[0]
    ref = _moe_numpy(x, logits, dequantize(q1, s1), dequantize(q2, s2), k, bool(normalize))
    assert np.abs(y - ref).max() <= atol


# ---- built artifacts ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qbuild(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def get(case, scheme=None, lowering="ort", source=None, **kw):
        key = (case, scheme, lowering, tuple(sorted(kw.items())))
        if key not in made:
            if lowering == "ort" and scheme is not None:
                kw.setdefault("accuracy_level", 1)
            name = "-".join(str(p) for p in (case, scheme, lowering, *sorted(kw.items())))
            made[key] = build(str(source or checkpoints(case)), quantize=scheme, lowering=lowering,
                              out=root / name.replace(" ", "").replace("'", ""), max_seq_len=64, progress=False, **kw)
        return made[key]

    return get


def _initializers(path: Path) -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(path / "model.onnx"))  # external data loaded from model.onnx.data
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _to_np(a):
    return np.asarray(a).astype(np.float32) if a.dtype != np.int8 else a


def read_back(path: Path) -> dict[str, np.ndarray]:
    """Every quantized weight of an artifact's graph, dequantized in numpy, as [..., N, K] (out, in), keyed by the
    graph's weight name."""
    model, inits = _initializers(path)
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            q = unpack_nbits(inits[node.input[1]], bits)
            out[node.input[1].rsplit(".", 2)[0]] = dequantize(q, inits[node.input[2]])
        elif node.op_type == "QMoE":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            bits, g = attrs["expert_weight_bits"], attrs["block_size"]
            for wi, si in ((2, 3), (5, 6)):
                b = inits[node.input[wi]]
                E, N, _ = b.shape
                scales = inits[node.input[si]]
                q = unpack_nbits(b.reshape(E, N, scales.shape[-1], -1), bits)
                out[node.input[wi].rsplit(".", 1)[0]] = dequantize(q, scales)
        elif node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight"):
            q, s = inits[node.input[0]], inits[node.input[1]]
            attrs = {a.name: a.i for a in node.attribute}
            base = node.input[0].rsplit(".", 2)[0]
            qf = q.astype(np.float32)
            if "block_size" in attrs:
                w = qf * np.repeat(s, attrs["block_size"], axis=attrs["axis"])
            else:
                w = qf * (s[None, :] if attrs["axis"] == 1 else s[:, None])
            if attrs["axis"] == 0 and "block_size" in attrs or attrs["axis"] == 1 and "block_size" not in attrs:
                w = w.T  # a linear's [K, N]
            out[base] = w
        elif node.op_type == "Cast" and node.input[0].endswith(".weight") and node.input[0] in inits:
            q = inits[node.input[0]]
            base = node.input[0].rsplit(".", 2)[0]
            s = inits[node.input[0][:-len("weight")] + "scales"]
            if q.ndim == 2:  # [K, N] with scales [K/g, 1, N]
                out[base] = dequantize(q.T, s[:, 0, :].T)
            else:  # [E, N, K] with scales [E, N, K/g, 1]
                out[base] = dequantize(q, s[..., 0])
    return out


def expected(ckpt_dir: Path, scheme: str, group: int, full_range: bool = True) -> dict[str, np.ndarray]:
    """quantize-dequantize of each checkpoint linear ([..., N, K]) keyed by our parameter name (full_range: the ort
    and reference rule; trt-native's is absmax / qmax)."""
    spec = load_spec(ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    out = {}
    for w in weight_plan(spec):
        if w.fp32 or w.name == "embed.weight" or "router" in w.name or w.name.endswith(".bias"):
            continue
        t = load_tensor(w, ckpt, torch.float32, spec.norm_offset).numpy()
        out[w.name] = dequantize(*quantize_rtn(t, scheme, group, full_range=full_range))
    return out


def _graph_to_params(name: str, E: dict) -> np.ndarray:
    """The expectation for one graph weight name (packed q|k|v and gate|up concatenated along N, ORT's MoE fc1
    interleaved)."""
    base = name.removeprefix("decoder.")
    if base.endswith(".attention.qkv.weight"):
        i = base.split(".")[1]
        return np.concatenate([E[f"layers.{i}.attn.{p}.weight"] for p in "qkv"])
    if base.endswith(".mlp.gate_up.weight"):
        i = base.split(".")[1]
        return np.concatenate([E[f"layers.{i}.mlp.gate.weight"], E[f"layers.{i}.mlp.up.weight"]])
    if base.endswith(".moe.gate_up.interleaved"):
        w = E[base.removesuffix(".interleaved")]
        half = w.shape[1] // 2
        out = np.empty_like(w)
        out[:, 0::2], out[:, 1::2] = w[:, :half], w[:, half:]
        return out
    return E[base.removesuffix(".as_lm_head")]


def _check_weights(path: Path, ckpt_dir: Path, scheme: str, group: int, lm_head: bool,
                   full_range: bool = True) -> int:
    got = read_back(path)
    want = expected(ckpt_dir, scheme, group, full_range)
    covered = set()
    for name, w in got.items():
        ref = _graph_to_params(name, want)
        if w.ndim != ref.ndim:  # trt-native dequantizes an expert stack flat, [E*N, K]
            w = w.reshape(ref.shape)
        assert w.shape == ref.shape, name
        assert np.array_equal(w, ref), f"{name}: max diff {np.abs(w - ref).max()}"
        covered.add(name)
    linears = {k for k in want if k != "lm_head.weight" or lm_head}
    n_packed = sum(1 for n in covered if "qkv" in n) * 2 + sum(1 for n in covered if "mlp.gate_up" in n)
    assert len(covered) + n_packed == len(linears), (sorted(covered), sorted(linears))
    return len(covered)


def _score(path):
    from runtime_py.score import score

    return np.array(score(path, IDS)["logprobs"])


@pytest.mark.parametrize("case", ALL_CASES)
def test_int4_ort_and_reference(case, qbuild, checkpoints):
    ort_path, ref_path = qbuild(case, "int4", "ort"), qbuild(case, "int4", "reference")
    for path in (ort_path, ref_path):
        _check_weights(path, checkpoints(case), "int4", 32, lm_head=False)
    m = json.loads((ort_path / "manifest.json").read_text())
    q = m["quantization"]
    assert q["scheme"] == "int4" and q["group_size"] == 32 and q["accuracy_level"] == 1 and not q["lm_head"]
    ops = m["graphs"]["decoder"]["op_histogram"]
    spec = load_spec(checkpoints(case))
    assert ops.get("com.microsoft.QMoE", 0) == len(spec.sparse_layers) and "com.microsoft.MoE" not in ops
    assert ops["com.microsoft.MatMulNBits"] == q["counts"]["linear"] > 0
    assert m["graphs"]["decoder"]["fusion"].get("GroupQueryAttention", 0) == m["graphs"]["decoder"]["fusion"][
        "attention_fused"]  # the fused attention paths are kept
    # every tensor has a scheme: embeddings and norms stay fp32, linears int4
    assert q["tensors"]["decoder.embed.weight" if "decoder.embed.weight" in q["tensors"] else
                        "decoder.lm_head.weight"]["scheme"] == "float"
    assert any(v["scheme"] == "int4-rtn-symmetric" and v["group_size"] == 32 for v in q["tensors"].values())
    assert all(v["scheme"] == "float" for k, v in q["tensors"].items() if "norm" in k)
    diff = np.abs(_score(ort_path) - _score(ref_path)).max()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_int8_ort_and_reference(case, qbuild, checkpoints, artifacts):
    ort_path, ref_path = qbuild(case, "int8", "ort"), qbuild(case, "int8", "reference")
    for path in (ort_path, ref_path):
        _check_weights(path, checkpoints(case), "int8", 32, lm_head=False)
    fp32 = _score(artifacts(case, "static", "fp32", "reference"))  # shared with the other test files
    a, b = _score(ort_path), _score(ref_path)
    assert np.abs(a - b).max() < 1e-3
    # int8 is close to fp32, and it did change the weights (median: in the tiny MoE a router near-tie can flip an
    # expert at one position, measured 0.21 there with every other position under 0.08)
    assert 0 < np.median(np.abs(b - fp32)) < 0.03 and np.abs(b - fp32).max() < 0.5


def _embedding_rows(path: Path, ids: np.ndarray) -> np.ndarray:
    """Run the artifact's own embedding lookup (its GatherBlockQuantized node and the nodes between it, input_ids
    and the initializers) alone on ONNX Runtime for `ids`."""
    model, inits = _initializers(path)
    producer = {o: n for n in model.graph.node for o in n.output}
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    out = next(n for n in model.graph.node if gbq.output[0] in n.input)  # the Reshape back to [..., K]
    nodes, todo = [], [out]
    while todo:
        node = todo.pop()
        if node not in nodes:
            nodes.append(node)
            todo += [producer[i] for i in node.input if i in producer]
    order = list(model.graph.node)
    nodes.sort(key=order.index)
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "embedding",
                              [helper.make_tensor_value_info(gbq.input[1], TensorProto.INT64, [1, len(ids)])],
                              [helper.make_tensor_value_info(out.output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(inits[n], n) for n in used if n in inits])
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    return _session(m).run(None, {gbq.input[1]: ids[None]})[0][0]


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_lm_head_quantized_tied(scheme, qbuild, checkpoints):
    """The tied head (the exporter's Transpose of the embedding) quantized, and the embedding served from its
    integers: on ort a GatherBlockQuantized over the MatMulNBits bytes, on reference a Gather of the dequantized
    head. The float table is gone from the artifact; the rows looked up are quantize-dequantize of the checkpoint's
    embedding, exactly."""
    case = "qwen2_mqa_tied_linear"
    paths = [qbuild(case, scheme, low, quantize_lm_head=True) for low in ("ort", "reference")]
    for path in paths:
        _check_weights(path, checkpoints(case), scheme, 32, lm_head=True)
        m = json.loads((path / "manifest.json").read_text())
        q = m["quantization"]
        assert q["counts"]["lm_head"] == 1 == q["counts"]["embedding"] and q["lm_head"]
        assert "decoder.lm_head.weight" not in q["tensors"]  # no float table stored
        assert q["tensors"]["decoder.lm_head.weight.as_embedding"]["scheme"] == f"{scheme}-rtn-symmetric"
    ops = json.loads((paths[0] / "manifest.json").read_text())["graphs"]["decoder"]["op_histogram"]
    assert ops["com.microsoft.GatherBlockQuantized"] == 1
    graph = onnx.load(str(paths[0] / "model.onnx"), load_external_data=False).graph
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == gbq.input[0])
    assert head.input[1] in {t.name for t in graph.initializer}  # the head's own bytes, no copy made of them
    embed = Checkpoint(checkpoints(case)).get("model.embed_tokens.weight").numpy()
    ids = np.array([0, 5, 17, embed.shape[0] - 1, 5], np.int64)
    want = dequantize(*quantize_rtn(embed, scheme, 32, full_range=True))[ids]
    assert np.array_equal(_embedding_rows(paths[0], ids), want)
    plain = qbuild(case, scheme, "ort")  # the default: float head, the float table shared by head and Gather
    size = lambda p: (p / "model.onnx.data").stat().st_size  # noqa: E731
    assert size(paths[0]) < size(plain) - 0.6 * embed.nbytes, (size(paths[0]), size(plain), embed.nbytes)
    assert np.abs(_score(paths[0]) - _score(paths[1])).max() < 1e-3


def test_int4_smaller_than_fp32(qbuild):
    sizes = {s: (qbuild("qwen3_moe_mixed", s, "ort" if s else "reference") / "model.onnx.data").stat().st_size
             for s in (None, "int4")}
    assert sizes["int4"] < sizes[None] / 2.5, sizes


def test_unquantized_linear_fails_the_build(monkeypatch, qbuild):
    real = gq._to_matmul_nbits

    def skip_o(graph, node, x, quant, tag, *args):
        if ".attn.o." not in tag:
            real(graph, node, x, quant, tag, *args)

    monkeypatch.setattr(gq, "_to_matmul_nbits", skip_o)
    with pytest.raises(gq.QuantizeError, match=r"not quantized: decoder\.layers\.0\.attn\.o\.weight"):
        qbuild("qwen2_window", "int4", "ort", group_size=16)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma2", "tiny-qwen3-moe"])
def test_int8_greedy_equals_fp32_on_trained_tiny(name, tmp_path):
    from runtime_py.generate import Generator
    from runtime_py.sampling import SamplingParams

    tokens = {}
    for scheme in (None, "int8"):
        path = build(name, quantize=scheme, out=tmp_path / str(scheme), max_seq_len=64, progress=False)
        gen = Generator(path)
        prompt = gen.encode("Hello world! How are")
        tokens[scheme] = gen.generate([prompt], SamplingParams(greedy=True, max_new_tokens=16,
                                                               ignore_eos=True)).tokens[0]
    assert tokens["int8"] == tokens[None]


# ---- bad values -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4", "--lowering", "reference", "--group-size", "48"], "does not divide"),
    (["--quantize", "int4", "--group-size", "48"], "MatMulNBits/QMoE take 16, 32"),
    (["--quantize", "fp8"], "TensorRT only"),
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--quantize", "int4", "--accuracy-level", "7"], "expected an integer in [0, 4]"),
    (["--group-size", "32"], "need --quantize"),
])
def test_bad_values_exit_2(argv, message, checkpoints, tmp_path, capsys):
    from export.__main__ import main

    try:
        code = main(["build", "--model", str(checkpoints("qwen2_window")), "--out", str(tmp_path / "a"),
                     "--no-progress", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and not (tmp_path / "a").exists()


# ---- TensorRT-RTX (ahead of time, no GPU) ---------------------------------------------------------------------

try:
    from export.engine import load_tensorrt

    load_tensorrt()
    HAVE_TRT = True
except Exception:  # noqa: BLE001
    HAVE_TRT = False
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx_bindings is installed")

# TensorRT's INT4 block is 64 or 128 along K: the trap checkpoints with every input dimension a multiple of 64.
TRT_CASES = {"qwen2_window": dict(intermediate_size=128), "gemma2_mqa_untied": dict(intermediate_size=128),
             "qwen3_moe_mixed": dict(intermediate_size=128, moe_intermediate_size=64)}


@pytest.fixture(scope="module")
def trt_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_ckpt")
    made = {}

    def get(case):
        if case not in made:
            family, fields = CASES[case]
            made[case] = save_hf_checkpoint(family, dict(fields, **TRT_CASES[case]), root / case)
        return made[case]

    return get


# each scheme once, and the MoE body (expert Einsums) with int4 and fp8: the engine builds are the slow part
TRT_BUILDS = [("qwen2_window", "int4"), ("gemma2_mqa_untied", "int8"), ("qwen3_moe_mixed", "int4"),
              ("qwen3_moe_mixed", "fp8")]


@needs_trt
@pytest.mark.parametrize("case,scheme", TRT_BUILDS, ids=[f"{c}-{s}" for c, s in TRT_BUILDS])
def test_trt_engine_builds(case, scheme, trt_checkpoint, tmp_path):
    from tests.helpers import engine_manifest

    ckpt = trt_checkpoint(case)
    group = 64 if scheme == "int4" else None
    path = build(str(ckpt), backend="tensorrt", quantize=scheme, group_size=group, out=tmp_path / "a",
                 max_seq_len=32, max_batch=2, progress=False)
    m = engine_manifest(path)
    engine = m["engine"]
    if scheme == "fp8":
        assert set(engine["compute_capabilities"]) == {"SM89", "SM120"}
    # the weights: typed DequantizeLinear (no zero point) into the unchanged MatMul / expert Einsum
    model, inits = _initializers(path)
    want = {"int4": np.dtype(ml_dtypes.int4), "int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight")]
    assert dqs and all(len(n.input) == 2 and inits[n.input[0]].dtype == want[scheme] for n in dqs)
    assert len(dqs) == m["quantization"]["counts"]["linear"] + m["quantization"]["counts"]["experts"]
    if scheme == "int4":
        assert all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in dqs)
    # the same graph on ONNX Runtime: its weights are quantize-dequantize of the checkpoint (int4 blocked along K,
    # int8/fp8 per output channel)
    _check_weights(path, ckpt, scheme, 64 if scheme == "int4" else 0, lm_head=False, full_range=False)


@needs_trt
def test_trt_int4_group_size_checked(trt_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="TensorRT's INT4 weights take block sizes 64 or 128"):
        build(str(trt_checkpoint("qwen2_window")), backend="tensorrt", quantize="int4", group_size=32,
              out=tmp_path / "a", progress=False)


@pytest.mark.parametrize("case", ["qwen2_window", "gemma2_mqa_untied"])
def test_int4_kernel_bench_times_the_built_shapes(case, qbuild, checkpoints):
    """bench.int4_kernel times MatMulNBits on layer_shapes(config): those are the (K, N) of the body linears our
    int4 ort build emits (packed q|k|v and gate|up), layer by layer, and its table runs on them."""
    from bench.int4_kernel import layer_shapes, matmul_nbits_session

    config = json.loads((checkpoints(case) / "config.json").read_text())
    model = onnx.load(str(qbuild(case, "int4", "ort") / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    shapes = [(next(a.i for a in n.attribute if a.name == "K"), next(a.i for a in n.attribute if a.name == "N"))
              for n in nodes]
    want = sorted(layer_shapes(config).values()) * config["num_hidden_layers"]
    assert sorted(shapes) == sorted(want)
    k, n = layer_shapes(config)["gate_up"]
    y = matmul_nbits_session(k, n, 32, 1, 1).run(None, {"A": np.ones((3, k), np.float32)})[0]
    assert y.shape == (3, n) and np.isfinite(y).all()


def test_trt_native_int4_runs_exactly_on_onnx_runtime(tmp_path):
    """A trt-native int4 graph (DequantizeLinear -> MatMul) run by runtime_py on ONNX Runtime: ORT fuses each pair
    into MatMulNBits, which defaults to int8 activations; runtime_py's sessions keep fp32 compute, so the scores
    equal the unfused graph's (ORT with every optimization off) to fp32 rounding, not to ~1e-2."""
    import onnxruntime as ort

    from runtime_py.score import score

    family, fields = CASES["qwen2_window"]
    ckpt = save_hf_checkpoint(family, dict(fields, intermediate_size=128), tmp_path / "ckpt")  # K % 64 == 0
    art = build(str(ckpt), quantize="int4", group_size=64, lowering="trt-native", logits="all", max_seq_len=32,
                out=tmp_path / "art", progress=False)
    ours = np.array(score(art, IDS)["logprobs"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(art / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in plain.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([IDS], np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(len(IDS), dtype=np.int64)[None]
        else:  # past_key_values.*: [1, KV, max_seq_len, D], zeros
            feeds[i.name] = np.zeros([1] + [d if isinstance(d, int) else 32 for d in i.shape[1:]], np.float32)
    logits = plain.run(["logits"], feeds)[0][0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    want = logp[np.arange(len(IDS) - 1), IDS[1:]]
    assert np.abs(ours - want).max() < 1e-4, np.abs(ours - want).max()


def test_trt_native_default_group_is_tensorrts():
    """A trt-native graph is TensorRT's form whichever backend builds it: without --group-size its int4 blocks are
    128 (TensorRT's default), not ONNX Runtime's 32, which TensorRT's INT4 weights refuse."""
    from export.quantize import quant_config

    assert quant_config("int4", "onnxruntime", "trt-native").group_size == 128
    assert quant_config("int4", "onnxruntime", "ort").group_size == 32
    assert quant_config("int4", "tensorrt", "trt-native").group_size == 128
