"""bench/compare.py end to end on the tiny model: one round, every peer that is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_compare_tiny(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--model", "tiny-qwen2", "--prompt-len", "8",
                           "--new-tokens", "4", "--runs", "1", "--out", str(out), "--threads", "2",
                           "--bandwidth-gib", "0.25"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((out / "results.json").read_text())
    for key in ("checkpoint_bytes", "weight_bytes_per_token"):
        assert res[key] > 0
    assert res["bandwidth"]["bytes_per_s"] > 0
    assert res["floor"]["s_per_token"] > 0 and res["floor"]["tok_s"] > 0
    assert res["config"]["prompt_len"] == 8 and res["config"]["new_tokens"] == 4

    peers = res["peers"]
    assert set(peers) == {"ours", "hf-eager", "ort-genai"}
    run_keys = ("ttft_ms", "decode_tok_s", "run_peak_rss_bytes", "load_s")
    build_keys = ("build_s", "build_peak_rss_bytes", "build_rss_over_ckpt")
    for key in run_keys + build_keys:
        assert peers["ours"][key] > 0, key
    for run in peers["ours"]["runs"]:
        assert len(run["tokens"]) == 4
    # a child's peak RSS is its own, not the benchmark process's (which holds torch and a bandwidth array)
    assert peers["ours"]["run_peak_rss_bytes"] < 2**30

    if _installed("transformers"):
        for key in run_keys:
            assert peers["hf-eager"][key] > 0, key
        assert res["token_agreement_vs_ours"]["hf-eager"]["of"] == 4
    if _installed("onnxruntime_genai"):
        assert peers["ort-genai"]["available"], peers["ort-genai"]["note"]
        for key in run_keys + build_keys:
            assert peers["ort-genai"][key] > 0, key
    else:
        assert not peers["ort-genai"]["available"] and "not importable" in peers["ort-genai"]["note"]
        assert "n/a" in proc.stdout

    assert "decode tok/s:" in proc.stdout and "memory-bandwidth floor" in proc.stdout
    if _installed("matplotlib"):
        png = out / "results.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "models").exists()  # built models are removed unless --keep-artifacts


def test_random_checkpoint_streamed(tmp_path):
    """The streamed safetensors writer produces a checkpoint our loader accepts, shape-checked against config."""
    from bench.models import QWEN2_05B_CONFIG, make_random_checkpoint
    from export.checkpoint import Checkpoint
    from export.spec import load_spec
    from export.weights import check_checkpoint

    small = dict(QWEN2_05B_CONFIG, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_window_layers=2)
    ckpt = make_random_checkpoint(small, tmp_path / "ckpt")
    spec = load_spec(ckpt)
    assert check_checkpoint(spec, Checkpoint(ckpt)) == []
    emb = Checkpoint(ckpt).get("model.embed_tokens.weight")
    assert emb.shape == (300, 64) and 0.01 < float(emb.std()) < 0.03
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "float32"
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "generation_config.json").exists()
