"""Artifacts end to end on ONNX Runtime: build -> open -> generate, against HF transformers.

Every trap checkpoint is built (static KV, fp32) and must give HF `generate`'s 32 greedy tokens with chosen-token
log-probs within 1e-3; one checkpoint per family is also built in concat mode. Then the runtime's behaviour:
seeded sampling, streaming, ragged batches, stop strings, fp16, and the errors for bad input.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from artifacts.bundle import ArtifactError, open_artifact
from export.build import build
from export.verify import run_hf
from runtime_py.generate import ContextLengthError, Generator
from runtime_py.sampling import SamplingParams
from tests.conftest import CASES
from tests.helpers import GREEDY32, PROMPT, hf_greedy, run_steps

FP16_LOGPROB_BOUND = 0.01  # measured (2026-11-23): max |logprob(fp16 artifact) - logprob(HF fp32)| <= 0.0029,
# 8/8 greedy tokens equal, on qwen2_window, gemma2, qwen3_moe_mixed, qwen2_yarn


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_artifact_matches_hf(case, artifacts, checkpoints, hf_model):
    path = checkpoints(case)
    gen = Generator(artifacts(case), threads=2)
    result = gen.generate([PROMPT], GREEDY32)
    assert result.tokens[0] == hf_greedy(hf_model(path), PROMPT)
    ref = run_hf(path, PROMPT, steps=31, hf_model=hf_model(path))
    assert np.max(np.abs(np.array(result.rows[0].logprobs) - np.array(ref.logprobs))) < 1e-3


@pytest.mark.parametrize("case", ["qwen2_window", "gemma2", "qwen3_moe_mixed"])
def test_concat_artifact_matches_hf(case, artifacts, checkpoints, hf_model):
    path = checkpoints(case)
    gen = Generator(artifacts(case, "concat"), threads=2)
    result = gen.generate([PROMPT], GREEDY32)
    assert result.tokens[0] == hf_greedy(hf_model(path), PROMPT)


@pytest.mark.parametrize("kv_mode", ["static", "concat"])
def test_ragged_batch_equals_each_alone(kv_mode, artifacts):
    gen = Generator(artifacts("gemma2", kv_mode), threads=2)
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:9]]
    params = SamplingParams(greedy=True, max_new_tokens=12, ignore_eos=True, logprobs=True)
    batched = gen.generate(prompts, params)
    for p, row in zip(prompts, batched.rows):
        alone = gen.generate([p], params).rows[0]
        assert row.tokens == alone.tokens
        assert len(row.logprobs) == len(row.tokens) == 12
        np.testing.assert_allclose(row.logprobs, alone.logprobs, atol=1e-4)


@pytest.mark.parametrize("kv_mode", ["static", "concat"])
def test_last_logits_equal_all_logits(kv_mode, artifacts):
    """The default graph (--logits last) returns, for prefill and decode, the last row of --logits all's."""
    from runtime_py.session import OrtSession

    last = OrtSession(artifacts("gemma2", kv_mode), threads=2)
    full = OrtSession(artifacts("gemma2", kv_mode, logits="all"), threads=2)
    assert (last.manifest.decoder.logits, full.manifest.decoder.logits) == (
        "last", "all")
    a, b = run_steps(last), run_steps(full)
    assert a[0].shape == (1, last.vocab_size) and b[0].shape == (len(PROMPT), last.vocab_size)
    for x, y in zip(a, b):
        assert np.abs(x[-1] - y[-1]).max() < 1e-5


def test_seeded_sampling_reproducible(artifacts):
    gen = Generator(artifacts("qwen2_window"), threads=2)
    params = SamplingParams(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=1234, max_new_tokens=24,
                            ignore_eos=True)
    a = gen.generate([PROMPT], params).tokens[0]
    b = gen.generate([PROMPT], params).tokens[0]
    c = gen.generate([PROMPT], SamplingParams(**{**params.__dict__, "seed": 99})).tokens[0]
    assert a == b
    assert a != c


def test_stream_equals_generate_and_stop_strings(artifacts):
    gen = Generator(artifacts("qwen2_window"), threads=2)
    params = SamplingParams(greedy=False, temperature=1.2, seed=7, max_new_tokens=30, ignore_eos=True)
    full = gen.generate([PROMPT], params).rows[0]
    streamed = "".join(gen.stream(PROMPT, params))
    assert streamed == full.text and len(full.text) > 10
    # Stop at a string that occurs in the middle of that text: generation ends there, text is cut before it.
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    at = full.text.find(stop)
    stopped = gen.generate([PROMPT], SamplingParams(**{**params.__dict__, "stop": (stop,)})).rows[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:at]
    assert len(stopped.tokens) < len(full.tokens)
    assert "".join(gen.stream(PROMPT, SamplingParams(**{**params.__dict__, "stop": (stop,)}))) == stopped.text


def test_eos_ends_generation(artifacts):
    gen = Generator(artifacts("qwen2_window"), threads=2)
    free = gen.generate([PROMPT], GREEDY32).tokens[0]
    gen.eos_ids = {free[5]}  # pretend the 6th greedy token is EOS
    row = gen.generate([PROMPT], SamplingParams(greedy=True, max_new_tokens=32)).rows[0]
    assert row.finish_reason == "eos" and row.tokens == free[:free.index(free[5])]
    assert row.logprobs == []  # not asked for


def test_fp16_artifact_within_bound(artifacts, checkpoints, hf_model):
    for case in ("qwen2_window", "gemma2", "qwen3_moe_mixed"):
        path = checkpoints(case)
        gen = Generator(artifacts(case, precision="fp16"), threads=2)
        row = gen.generate([PROMPT], SamplingParams(greedy=True, max_new_tokens=8, ignore_eos=True,
                                                    logprobs=True)).rows[0]
        ref = run_hf(path, PROMPT, steps=7, hf_model=hf_model(path))
        agree = next((i for i, (a, b) in enumerate(zip(row.tokens, ref.tokens)) if a != b), len(row.tokens))
        assert agree == 8, case
        diff = np.abs(np.array(row.logprobs[:agree]) - np.array(ref.logprobs[:agree])).max()
        assert diff < FP16_LOGPROB_BOUND, (case, diff)


def test_manifest_contents(artifacts):
    path = artifacts("qwen3_moe_mixed")
    m = open_artifact(path)
    assert m.kv_mode == "static" and m.precision == "fp32"
    names = [i.name for i in m.decoder.inputs]
    assert names[:2] == ["input_ids", "position_ids"] and "past_key_values.3.value" in names
    outs = [o.name for o in m.decoder.outputs]
    assert outs[0] == "logits" and outs[-1] == "present.3.value"
    for rel, info in m.files.items():
        assert len(info["sha256"]) == 64 and (path / rel).exists()
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= set(m.files)
    import onnx

    onnx.checker.check_model(str(path / "model.onnx"), full_check=True)


def test_cli_generate_json(artifacts, capsys):
    from runtime_py.__main__ import main

    path = artifacts("qwen2_window")
    assert main(["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "5",
                 "--ignore-eos", "--logprobs", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert len(out["tokens"]) == 5 == len(out["logprobs"]) and out["ttft_s"] > 0 and out["decode_tok_s"] > 0
    assert isinstance(out["text"], str)
    assert main(["generate", str(path), "--chat", "hello there", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3
    assert main(["generate", str(path), "--prompt", "hi", "--stream", "--json"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["bench", str(path), "--prompt-len", "8", "--new-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["peak_rss_bytes"] > 0 and r["decode_tok_s"] > 0


# ---- bad input -----------------------------------------------------------------------------------------------

def test_prompt_longer_than_context(artifacts, capsys):
    gen = Generator(artifacts("qwen2_window"), threads=2)
    with pytest.raises(ContextLengthError, match="context length 128"):
        gen.generate([list(range(120))], SamplingParams(max_new_tokens=16))
    from runtime_py.__main__ import main

    assert main(["generate", str(artifacts("qwen2_window")), "--prompt-ids", ",".join(["1"] * 200)]) == 2
    assert "context length" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_sampling_values(flags, message, artifacts, capsys):
    from runtime_py.__main__ import main

    assert main(["generate", str(artifacts("qwen2_window")), "--prompt-ids", "1,2,3", *flags]) == 2
    assert message in capsys.readouterr().err


def test_tampered_and_missing_artifact(artifacts, tmp_path):
    import shutil

    src = artifacts("qwen2_window")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    with open(dst / "model.onnx.data", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="model.onnx.data.*sha256"):
        Generator(dst)
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_artifact(dst)
    with pytest.raises(ArtifactError, match="does not exist"):
        Generator(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Generator(tmp_path / "empty")


def test_interrupted_build_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    import export.build as build_mod

    def boom(model, path, progress):  # the save stage, interrupted after writing part of the graph
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        build(str(checkpoints("qwen2_window")), out=tmp_path / "art", progress=False)
    assert os.listdir(tmp_path) == []


def test_existing_output_not_overwritten(artifacts, checkpoints):
    path = artifacts("qwen2_window")
    with pytest.raises(ArtifactError, match="already exists"):
        build(str(checkpoints("qwen2_window")), out=path, progress=False)


def test_chat_cli_streams_a_reply(artifacts):
    import subprocess
    import sys

    path = artifacts("qwen2_window")
    proc = subprocess.run([sys.executable, "-m", "runtime_py", "chat", str(path), "--max-new-tokens", "6",
                           "--ignore-eos", "--seed", "1"], input="hello\nand again\n\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
