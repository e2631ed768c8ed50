"""`python -m runtime_py score`: teacher-forced log-probs and perplexity, against HF transformers.

Both ways of running are checked: a `--logits all` graph (one call) and the default `--logits last` graph (the
runtime steps position by position through the KV cache), in static and concat KV modes; the CLI's --ids / --text /
--file inputs and its --json object; the refused inputs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from runtime_py.__main__ import main
from runtime_py.score import score

IDS = [3, 200, 17, 45, 9, 120, 7, 66, 5, 31, 250, 2]


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)[:-1]
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


@pytest.mark.parametrize("case,kv_mode,logits,mode", [
    ("gemma2", "static", "all", "all-positions"),  # softcaps + windows shorter than the sequence
    ("gemma2", "static", "last", "stepwise"),
    ("qwen3_moe_mixed", "concat", "last", "stepwise"),
])
def test_score_matches_hf(case, kv_mode, logits, mode, artifacts, checkpoints, hf_model):
    path = artifacts(case, kv_mode, "fp32", None, logits)
    r = score(path, IDS)
    assert r["mode"] == mode and r["tokens"] == len(IDS) and len(r["logprobs"]) == len(IDS) - 1
    want = _hf_logprobs(hf_model(checkpoints(case)), IDS)
    np.testing.assert_allclose(r["logprobs"], want, atol=1e-4)
    assert math.isclose(r["nll"], -float(np.mean(want)), abs_tol=1e-4)
    assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-12)


def test_cli_json_ids_text_file(artifacts, tmp_path, capsys):
    path = artifacts("qwen2_window")
    assert main(["score", str(path), "--ids", ",".join(map(str, IDS)), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    obj = json.loads(out[-1])
    assert set(obj) >= {"logprobs", "nll", "ppl"} and len(obj["logprobs"]) == len(IDS) - 1
    np.testing.assert_allclose(obj["logprobs"], score(path, IDS)["logprobs"], atol=1e-9)
    text = "Hello world! Numbers: 0 1 2 3"
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["score", str(path), "--text", text, "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["score", str(path), "--file", str(f), "--json"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a == b and len(a["logprobs"]) >= 2
    assert main(["score", str(path), "--ids", "1,2,3"]) == 0  # the table
    assert "ppl" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--ids", "5"], "at least 2 tokens"),
    (["--ids", "5,999999"], "outside the vocabulary"),
    (["--ids", ",".join(["1"] * 200)], "context length"),
    (["--file", "/nonexistent/x.txt"], "--file /nonexistent/x.txt"),
    (["--file", "/dev/zero"], "--file /dev/zero is larger than 1048576 bytes"),  # read bounded, not whole
])
def test_bad_input_exit_2(argv, message, artifacts, capsys):
    assert main(["score", str(artifacts("qwen2_window")), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_bad_utf8_file(artifacts, tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok \xff\xfe bad")
    assert main(["score", str(artifacts("qwen2_window")), "--file", str(f)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_huge_and_overflowing_logits(tmp_path, capsys):
    """An LM head scaled x2e4: in fp32 the nll (thousands of nats, checked against HF) makes exp() overflow, so ppl
    is inf (written as Infinity, which json reads back) instead of an OverflowError. Then layer 0's down_proj x3e4
    in fp16: its output overflows fp16 and the logits turn NaN, an exit-2 error naming where and why instead of NaN
    in the output (ORT's CPU fp16 MatMul accumulates in fp32, so the LM head alone would not overflow)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from export.build import build
    from tests.conftest import CASES, save_hf_checkpoint

    ckpt = save_hf_checkpoint(*CASES["qwen2_window"], tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"] *= 2e4  # std 3000, largest entry well inside fp16's 65504
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager",
                                              local_files_only=True).eval()
    want = _hf_logprobs(hf, IDS)
    fp32 = build(str(ckpt), out=tmp_path / "fp32", max_seq_len=64, progress=False)
    assert main(["score", str(fp32), "--ids", ",".join(map(str, IDS)), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["nll"] > 710 and obj["ppl"] == math.inf
    np.testing.assert_allclose(obj["logprobs"], want, rtol=1e-4)
    weights["model.layers.0.mlp.down_proj.weight"] *= 3e4  # largest entry ~17000: fits fp16, its output does not
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    fp16 = build(str(ckpt), out=tmp_path / "fp16", precision="fp16", max_seq_len=64, progress=False)
    assert main(["score", str(fp16), "--ids", ",".join(map(str, IDS)), "--json"]) == 2
    captured = capsys.readouterr()
    assert "logits are not finite" in captured.err and "--precision fp32" in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
