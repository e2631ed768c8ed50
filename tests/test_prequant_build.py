"""`export build` on pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8): exact against transformers.

Each checkpoint is written from a tiny trap checkpoint of every family by tests/prequant_writer.py (the documented
packing, checked there against the libraries), with its `-dequant` twin: the same model with the exact dequantized
weights, which transformers runs as the reference. Built at ``--precision fp32 --accuracy-level 1`` on ONNX Runtime
(and the reference lowering once), with no ``--quantize``: the artifact's greedy tokens equal transformers' exactly
and its log-probs of that text (``runtime_py score``) are within 2e-3 of transformers'. Covered: GPTQ v1 and v2,
symmetric and asymmetric, act-order (MatMulNBits on the permuted activation), 8-bit per channel, AWQ,
compressed-tensors (asymmetric act-order, symmetric experts through QMoE), FP8 blocks, layers the config leaves
float (an attention projection; one expert, which leaves its stack dequantized), tied embeddings, MoE. The manifest
says what each weight became. TensorRT-RTX builds an engine from each format (ahead of time), its I/O checked
against the contract. AutoGPTQ's quantize_config.json is read when config.json has no quantization_config. Bad
input: a conflicting --quantize, a missing tensor, unsupported bits and an unknown
quant_method get exit 2 and no artifact.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.__main__ import main as export_main
from export.build import build
from runtime_py.generate import Generator
from runtime_py.sampling import SamplingParams
from runtime_py.score import score
from tests.conftest import CASES, save_hf_checkpoint
from tests.helpers import PROMPT, engine_manifest, hf_greedy, needs_trt
from tests.prequant_writer import write_prequant

N_NEW = 16

# id: (checkpoint case, format, writer options, lowering, forms the manifest must count)
BUILDS = {
    "gptq-v1-asym-actorder-qwen2": ("qwen2_window", "gptq", dict(
        sym=False, desc_act=True, version=1, float_layers=("model.layers.0.self_attn.o_proj",)), "ort", {"nbits"}),
    "gptq-v1-asym-actorder-qwen2-reference": ("qwen2_window", "gptq", dict(
        sym=False, desc_act=True, version=1, float_layers=("model.layers.0.self_attn.o_proj",)), "reference",
        {"reference"}),
    # per channel: K=64 is a MatMulNBits block; down_proj's K=96 is not, and takes blocks of 32 (scales repeated)
    "gptq-v2-sym-8bit-channel-qwen2-tied": ("qwen2_mqa_tied_linear", "gptq", dict(bits=8, group=-1, version=2), "ort",
                                            {"nbits"}),
    "awq-gemma2": ("gemma2", "awq", dict(group=32), "ort", {"nbits"}),
    "ct-asym-actorder-gemma2": ("gemma2_mqa_untied", "compressed-tensors", dict(sym=False, desc_act=True, group=16),
                                "ort", {"nbits"}),
    "ct-sym-moe": ("qwen3_moe_nonorm", "compressed-tensors", dict(group=32), "ort", {"nbits"}),  # QMoE
    "awq-moe-one-float-expert": ("qwen3_moe_mixed", "awq", dict(
        float_layers=("model.layers.1.mlp.experts.0.down_proj",)), "ort", {"nbits", "reference"}),
    "fp8-moe": ("qwen3_moe_nonorm", "fp8", {}, "ort", {"reference"}),
    "fp8-qwen2-float-q": ("qwen2_yarn", "fp8", dict(float_layers=("model.layers.0.self_attn.q_proj",)), "ort",
                          {"reference"}),
}


@pytest.fixture(scope="module")
def written(checkpoints, tmp_path_factory):
    """Callable: (case, fmt, options) -> (quantized dir, dequant dir), each written once."""
    root = tmp_path_factory.mktemp("prequant_build")
    made = {}

    def get(case, fmt, opts):
        key = json.dumps([case, fmt, opts], sort_keys=True)
        if key not in made:
            made[key] = (root / f"q{len(made)}", write_prequant(checkpoints(case), root / f"q{len(made)}", fmt, **opts))
        return made[key]

    return get


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("key", list(BUILDS))
def test_build_equals_transformers_on_the_dequantized_weights(key, written, tmp_path):
    case, fmt, opts, lowering, forms = BUILDS[key]
    qdir, deq = written(case, fmt, opts)
    path = build(str(qdir), out=tmp_path / "a", lowering=lowering, max_seq_len=64, progress=False,
                 accuracy_level=1 if lowering == "ort" else None)
    hf = _hf(deq)
    want = hf_greedy(hf, PROMPT, N_NEW)
    gen = Generator(path)
    got = gen.generate([PROMPT], SamplingParams(greedy=True, max_new_tokens=N_NEW, ignore_eos=True)).tokens[0]
    assert got == want
    ids = PROMPT + want
    np.testing.assert_allclose(score(path, ids, generator=gen)["logprobs"], _hf_logprobs(hf, ids), atol=2e-3)

    q = json.loads((path / "manifest.json").read_text())["quantization"]
    assert q["scheme"] == "pre-quantized" and q["source"]["method"] == fmt
    assert {f for f, n in q["forms"].items() if n} == forms
    stored = {name: t for name, t in q["tensors"].items() if "form" in t}
    assert stored and all(t["scheme"].startswith(f"int{opts.get('bits', 4)}-" if fmt != "fp8" else "fp8-")
                          for t in stored.values())
    assert fmt != "fp8" or {t["scheme"] for t in stored.values()} == {"fp8-block"}  # was "fp8-fp8-block"
    # every entry is a weight of the model (an FP8 weight's stored float8 copy used to be listed as one more)
    assert not [n for n in q["tensors"] if ".weight.q." in n or q["tensors"][n]["scheme"].startswith("float8")]
    assert set(q["dequantized"]) <= set(q["tensors"]), q["dequantized"]
    if opts.get("float_layers"):  # a float layer stays in the precision, its neighbours quantized
        layer = opts["float_layers"][0]
        i = layer.split(".")[2]
        if ".experts." in layer:  # one float expert: its whole stack is the dequantization, said so
            assert any(f"layers.{i}.moe." in name for name in q["dequantized"])
        else:
            proj = layer.rsplit(".", 1)[1].removesuffix("_proj")
            assert q["tensors"][f"decoder.layers.{i}.attn.{proj}.weight"] == {"scheme": "float"}  # onnx FLOAT
    if opts.get("desc_act") and lowering == "ort":
        ops = json.loads((path / "manifest.json").read_text())["graphs"]["decoder"]["op_histogram"]
        assert ops.get("Gather", 0) > 0 and ops.get("com.microsoft.MatMulNBits", ops.get("MatMulNBits", 0)) > 0


@pytest.mark.parametrize("case, group", [("qwen2_window", -1), ("qwen2_window", 32), ("qwen3_moe_nonorm", 32)])
def test_act_order_declared_over_a_g_idx_in_group_order(case, group, written, tmp_path):
    """desc_act true while the stored g_idx is already in group order (any group_size -1 checkpoint: all zeros;
    AutoGPTQ static_groups): built as the plain order, the same graph as without desc_act (no Gather of the
    activation, MoE experts kept in QMoE) and equal to transformers. Before: an AttributeError traceback."""
    qdir, deq = written(case, "gptq", dict(group=group, version=2))
    plain = build(str(qdir), out=tmp_path / "plain", max_seq_len=64, progress=False, accuracy_level=1)
    declared = tmp_path / "declared"
    shutil.copytree(qdir, declared)
    config = json.loads((declared / "config.json").read_text())
    config["quantization_config"].update(desc_act=True, static_groups=True)
    (declared / "config.json").write_text(json.dumps(config))
    path = build(str(declared), out=tmp_path / "a", max_seq_len=64, progress=False, accuracy_level=1)
    graphs = [json.loads((p / "manifest.json").read_text())["graphs"]["decoder"]["op_histogram"] for p in (plain, path)]
    assert graphs[0] == graphs[1]
    hf = _hf(deq)
    want = hf_greedy(hf, PROMPT, N_NEW)
    gen = Generator(path)
    assert gen.generate([PROMPT], SamplingParams(greedy=True, max_new_tokens=N_NEW, ignore_eos=True)).tokens[0] == want
    ids = PROMPT + want
    np.testing.assert_allclose(score(path, ids, generator=gen)["logprobs"], _hf_logprobs(hf, ids), atol=2e-3)


# ---- TensorRT-RTX (ahead of time, no GPU) ---------------------------------------------------------------------
# K a multiple of 64 everywhere, so GPTQ's group 64 takes TensorRT's INT4 DequantizeLinear form.
TRT_FIELDS = {"qwen2": dict(intermediate_size=128), "gemma2": dict(intermediate_size=128),
              "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64)}
TRT_BUILDS = {
    "gptq-int4-g64": ("qwen2_window", "gptq", dict(group=64, version=2), {"dq"}),
    "awq-asym": ("gemma2_mqa_untied", "awq", dict(group=32), {"reference"}),  # zero points: the standard-op form
    "ct-int8-channel-moe": ("qwen3_moe_mixed", "compressed-tensors", dict(bits=8, strategy="channel"), {"dq"}),
    "fp8-moe": ("qwen3_moe_nonorm", "fp8", {}, {"dq"}),
}


@needs_trt
@pytest.mark.parametrize("key", list(TRT_BUILDS))
def test_tensorrt_engine_from_each_format(key, tmp_path):
    case, fmt, opts, forms = TRT_BUILDS[key]
    family, fields = CASES[case]
    src = save_hf_checkpoint(family, dict(fields, **TRT_FIELDS[family]), tmp_path / "src")
    qdir = tmp_path / "q"
    write_prequant(src, qdir, fmt, **opts)
    path = build(str(qdir), backend="tensorrt", out=tmp_path / "a", max_seq_len=32, max_batch=1, progress=False)
    m = engine_manifest(path)
    assert {f for f, n in m["quantization"]["forms"].items() if n} == forms


# ---- bad input: exit 2, nothing written ----------------------------------------------------------------------

def _qwen2_gptq(written):
    return written("qwen2_mqa_tied_linear", "gptq", dict(version=2))[0]


def _cli(args, capsys):
    code = export_main(args)
    return code, capsys.readouterr().err


def test_conflicting_quantize_is_refused(written, tmp_path, capsys):
    qdir = _qwen2_gptq(written)
    for flags in (["--quantize", "int4"], ["--group-size", "32"], ["--quantize-lm-head"]):
        code, err = _cli(["build", "--model", str(qdir), "--out", str(tmp_path / "a"), *flags], capsys)
        assert code == 2 and "already quantized (GPTQ v2 4-bit, group 32, symmetric" in err, err
        assert "Traceback" not in err and not (tmp_path / "a").exists()
    code, err = _cli(["build", "--model", str(qdir), "--out", str(tmp_path / "a"), "--lowering", "reference",
                      "--accuracy-level", "1"], capsys)
    assert code == 2 and "--accuracy-level is a MatMulNBits/QMoE setting" in err


@pytest.mark.parametrize("breakage,message", [
    ("drop:model.layers.1.self_attn.k_proj.qzeros", "missing tensor(s) ['model.layers.1.self_attn.k_proj.qzeros']"),
    ("config:bits=3", "quantization_config.bits"),
    ("config:quant_method=hqq", "not a supported pre-quantized format"),
    ("shape:model.layers.0.mlp.up_proj.scales", "model.layers.0.mlp.up_proj.scales"),
    # a float weight beside the integers: the integers silently won before
    ("float:model.layers.0.self_attn.q_proj.weight",
     "has both a float tensor 'model.layers.0.self_attn.q_proj.weight'"),
])
def test_bad_quantized_checkpoints_are_refused(breakage, message, written, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(_qwen2_gptq(written), bad)
    kind, what = breakage.split(":", 1)
    if kind == "config":
        field, value = what.split("=")
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"][field] = int(value) if value.isdigit() else value
        (bad / "config.json").write_text(json.dumps(cfg))
    else:
        tensors = load_file(bad / "model.safetensors")
        if kind == "drop":
            del tensors[what]
        elif kind == "float":
            tensors[what] = torch.zeros(4, 4)
        else:
            tensors[what] = tensors[what][:-1].clone()
        save_file(tensors, bad / "model.safetensors")
    code, err = _cli(["build", "--model", str(bad), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "a").exists()


@pytest.mark.parametrize("fmt,tensor,breakage,message", [
    ("gptq", "model.layers.0.self_attn.q_proj.qweight", "flatten", "(GPTQ qweight) has shape ["),
    ("compressed-tensors", "model.layers.0.self_attn.q_proj.weight_shape", "row", "has shape [1, 2] and holds"),
    ("fp8", "model.layers.0.self_attn.q_proj.weight", "nan", "(FP8 weight) holds 1 non-finite value(s)"),
])
def test_malformed_quantized_tensors_are_refused(fmt, tensor, breakage, message, written, tmp_path, capsys):
    """Tensors of the wrong rank (a 1-D qweight, a [1, 2] weight_shape) and a NaN FP8 code (0x7f) are exit 2 naming
    the tensor, not a traceback, an unnamed unpacking error, or an artifact whose logits are NaN."""
    bad = tmp_path / "bad"
    shutil.copytree(written("qwen2_mqa_tied_linear", fmt, {})[0], bad)
    tensors = load_file(bad / "model.safetensors")
    t = tensors[tensor]
    if breakage == "flatten":
        tensors[tensor] = t.flatten().clone()
    elif breakage == "row":
        tensors[tensor] = t[None].clone()
    else:
        raw = t.view(torch.uint8).clone()
        raw.view(-1)[0] = 0x7F  # e4m3fn NaN
        tensors[tensor] = raw.view(torch.float8_e4m3fn)
    save_file(tensors, bad / "model.safetensors")
    code, err = _cli(["build", "--model", str(bad), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and tensor in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "a").exists()


def test_autogptq_quantize_config_json(written, tmp_path):
    """An AutoGPTQ checkpoint keeps its scheme in quantize_config.json (no quantization_config in config.json)."""
    src = tmp_path / "legacy"
    shutil.copytree(_qwen2_gptq(written), src)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}))
    path = build(str(src), out=tmp_path / "a", max_seq_len=32, progress=False)
    q = json.loads((path / "manifest.json").read_text())["quantization"]
    assert q["source"]["method"] == "gptq" and q["forms"]["nbits"] > 0
