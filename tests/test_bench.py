"""bench/: compare.py end to end on the tiny model (one round, --quantize int4 with the fp32 rows, every peer that
is installed), the MoE-aware memory-bandwidth floor, and the streamed (sharded) random checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import VOCAB

ROOT = Path(__file__).resolve().parent.parent


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_compare_tiny_quantized(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--model", "tiny-qwen2", "--prompt-len", "8",
                           "--new-tokens", "4", "--runs", "1", "--out", str(out), "--threads", "2",
                           "--bandwidth-gib", "0.25", "--quantize", "int4", "--group-size", "32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((out / "results.json").read_text())
    for key in ("checkpoint_bytes", "weight_bytes_per_token"):
        assert res[key] > 0
    assert res["bandwidth"]["bytes_per_s"] > 0
    assert res["floor"]["s_per_token"] > 0 and res["floor"]["tok_s"] > 0
    assert res["config"]["prompt_len"] == 8 and res["config"]["new_tokens"] == 4
    assert res["config"]["quantize"]["scheme"] == "int4" and res["config"]["quantize"]["group_size"] == 32
    assert res["reference_peer"] == "ours-fp32"

    peers = res["peers"]
    assert list(peers) == ["ours-int4", "ort-genai-int4", "ours-fp32", "ort-genai-fp32", "hf-eager"]
    run_keys = ("ttft_ms", "decode_tok_s", "run_peak_rss_bytes", "load_s", "nll", "disk_bytes")
    build_keys = ("build_s", "build_peak_rss_bytes", "build_rss_over_ckpt")
    ours, fp32 = peers["ours-int4"], peers["ours-fp32"]
    for p in (ours, fp32):
        for key in run_keys + build_keys:
            assert p[key] > 0, key
        for run in p["runs"]:
            assert len(run["tokens"]) == 4
    # a child's peak RSS is its own, not the benchmark process's (which holds torch and a bandwidth array)
    assert ours["run_peak_rss_bytes"] < 2**30
    # int4 weights: smaller on disk and read per token, and the build really quantized (our LM head stays fp32)
    assert ours["disk_bytes"] < fp32["disk_bytes"]
    assert ours["bytes_read_per_token"] < fp32["bytes_read_per_token"] == res["weight_bytes_per_token"]
    assert ours["graph"]["ops"].get("com.microsoft.MatMulNBits", 0) > 0 and not ours["graph"]["lm_head_quantized"]
    # quality: the fp32 continuation scored under every peer; the fp32 peers agree on it
    cont = json.loads((out / "continuation.json").read_text())
    assert cont["from"] == "ours-fp32" and cont["continuation"] == fp32["runs"][-1]["tokens"]
    assert 0 < fp32["nll"] < 20 and abs(ours["nll"] - fp32["nll"]) < 5

    if _installed("transformers"):
        assert abs(peers["hf-eager"]["nll"] - fp32["nll"]) < 1e-3
        assert res["token_agreement"]["hf-eager"]["of"] == 4
    if _installed("onnxruntime_genai"):
        for name in ("ort-genai-int4", "ort-genai-fp32"):
            assert peers[name]["available"], peers[name]["note"]
            for key in run_keys + build_keys:
                assert peers[name][key] > 0, (name, key)
        assert abs(peers["ort-genai-fp32"]["nll"] - fp32["nll"]) < 1e-3
        assert peers["ort-genai-int4"]["graph"]["lm_head_quantized"]  # their builder quantizes the head too
        assert "--extra_options block_size=32" in peers["ort-genai-int4"]["build_cmd"]
    else:
        assert not peers["ort-genai-int4"]["available"] and "not importable" in peers["ort-genai-int4"]["note"]
        assert "n/a" in proc.stdout

    for text in ("decode tok/s:", "memory-bandwidth floor", "NLL:", "disk:", "quantized graphs:"):
        assert text in proc.stdout, text
    if _installed("matplotlib"):
        png = out / "results.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "models").exists()  # built models are removed unless --keep-artifacts


def test_peers_without_quantize():
    from bench.compare import PEERS, main, peer_specs, reference_peer

    assert [p["name"] for p in peer_specs(None)] == list(PEERS) == ["ours", "hf-eager", "ort-genai"]
    assert reference_peer(None) == "ours"
    try:
        main(["--group-size", "64"])  # quantization flags without --quantize
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--group-size without --quantize was accepted")


def test_floor_counts_top_k_of_the_experts():
    """Bytes one decode step reads, for tiny-qwen3-moe (hidden 64, vocab 512, 4 heads / 2 KV heads of 16, layer 0
    dense with intermediate 128, layer 1 MoE: 8 experts of intermediate 32, top 2, untied), counted by hand."""
    from bench.models import bytes_read_per_token
    from export.spec import spec_from_config
    from export.tiny import TINY_MODELS

    spec = spec_from_config(TINY_MODELS["tiny-qwen3-moe"])
    attn = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64  # q, k, v, o per layer
    norms = 64 + 64 + 16 + 16  # input / post-attention norms, q_norm, k_norm per layer (fp32)
    dense = 3 * 128 * 64  # gate, up, down of layer 0
    router = 8 * 64
    experts = 8 * (2 * 32) * 64 + 8 * 64 * 32  # gate_up and down stacks of layer 1
    head, embed_row, final_norm = 512 * 64, 64, 64
    values = embed_row + 2 * attn + 2 * norms + dense + router + experts * 2 // 8 + final_norm + head
    got = bytes_read_per_token(spec)
    assert got["total"] == 4 * values == 380672
    assert got["expert_stored"] == 4 * experts and got["expert_read"] == 4 * experts // 4

    # int4, group 32, fp32 scales, LM head fp32: 4 bits + 4 bytes per 32 values for every linear and expert
    q4 = lambda n: n // 2 + n // 32 * 4  # noqa: E731
    want = 4 * (embed_row + 2 * norms + final_norm + router + head) + q4(2 * attn) + q4(dense) + q4(experts) // 4
    got4 = bytes_read_per_token(spec, 4, {"bits": 4, "group": 32, "scale_bytes": 4, "lm_head": False})
    assert got4["total"] == want == 173312

    # a tied dense model: the embedding is read once, as the LM head (the Qwen2-0.5B figure of bench/README.md)
    from bench.models import QWEN2_05B_CONFIG

    assert bytes_read_per_token(spec_from_config(QWEN2_05B_CONFIG))["total"] == 1976131072


def test_random_checkpoint_streamed(tmp_path, monkeypatch):
    """The streamed safetensors writer produces a checkpoint our loader accepts, shape-checked against config; a
    sharded one (with its index) holds the same values as the single file, whatever the chunk size."""
    import bench.models as bm
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

    from tokenizers import Tokenizer  # every id the model can write decodes to text (fill_vocab)

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.get_vocab_size() == 300 and all(tok.decode([i]) for i in range(3, 300))
    from export.tiny import write_tokenizer

    write_tokenizer(tmp_path, 300)  # the unfilled tokenizer encodes text the same way
    text = "Hello world, numbers 123."
    assert tok.encode(text).ids == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids

    monkeypatch.setattr(bm, "CHUNK_BYTES", 1000)  # every tensor in several chunks
    sharded = make_random_checkpoint(small, tmp_path / "sharded", shard_bytes=80_000)  # the 300 x 64 embedding is 76.8 kB
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert all(p.stat().st_size <= 80_000 + 4096 for p in sharded.glob("*.safetensors"))
    a, b = Checkpoint(ckpt), Checkpoint(sharded)
    assert check_checkpoint(load_spec(sharded), b) == []
    assert index["metadata"]["total_size"] == sum(int(np.prod(i.shape)) * 4 for i in a.tensors.values())
    for name in a.tensors:
        assert np.array_equal(a.get(name).numpy(), b.get(name).numpy()), name


def test_gemma_2_9b_shape():
    """gemma-2-9b-random has google/gemma-2-9b's shape: 9.24e9 parameters (34.4 GiB fp32) in 8 shards <= 5 GB."""
    from bench.models import GEMMA2_9B_CONFIG, SHARD_BYTES, _shards
    from export.spec import spec_from_config
    from export.weights import _source_shape, weight_plan

    spec = spec_from_config(GEMMA2_9B_CONFIG)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (3584, 42, 16, 8, 256)
    assert (spec.intermediate_size, spec.vocab_size, spec.tie_embeddings) == (14336, 256000, True)
    assert [layer.window for layer in spec.layers[:2]] == [4096, None]
    assert (spec.attn_softcap, spec.final_softcap, spec.attn_scale) == (50.0, 30.0, 256 ** -0.5)
    entries = [(src, _source_shape(w)) for w in weight_plan(spec) if w.name != "lm_head.weight" for src in w.sources]
    params = sum(int(np.prod(shape)) for _, shape in entries)
    assert params == 9_241_705_984
    shards = _shards(entries, SHARD_BYTES)
    assert len(shards) == 8 and all(sum(int(np.prod(s)) * 4 for _, s in g) <= SHARD_BYTES for g in shards)


def test_int4_kernel_table(capsys):
    from bench.int4_kernel import main

    assert main(["--iters", "2", "--blocks", "128", "--accuracy-levels", "4", "--batch", "2", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128, 4 |")]
    assert len(rows) == 1
    cells = [float(c) for c in rows[0].strip("|").split("|")[1:]]
    assert len(cells) == 5 and all(c > 0 for c in cells)  # M=1, 2, 8 times, then M=2 / M=1 and M=8 / M=1
    for ratio, t in zip(cells[3:], cells[1:3]):  # the printed ratios are the printed times' (up to rounding)
        assert abs(ratio / (t / cells[0]) - 1) < 0.05
    with pytest.raises(SystemExit) as e:
        main(["--blocks", "48"])
    assert e.value.code == 2 and "does not divide qkv (K=896)" in capsys.readouterr().err


def test_serve_bench_tiny(tmp_path):
    """bench.serve_bench end to end on tiny-qwen2: builds the int4-head variant, serves it, streams 1 and 2 requests
    through the openai client; every stream writes exactly --new-tokens tokens, and the files are written."""
    out = tmp_path / "serve"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "bench.serve_bench", "--model", "tiny-qwen2", "--variants",
                           "int4-head", "--streams", "1", "2", "--prompt-len", "8", "--new-tokens", "6", "--rounds",
                           "1", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    points = res["variants"]["int4-head"]
    assert [p["streams"] for p in points] == [1, 2]
    for p in points:
        assert [r["tokens"] for r in p["rounds"]] == [p["streams"] * 6]
        assert p["decode_tok_s"] > 0 and 0 < p["ttft_p50_ms"] <= p["ttft_p99_ms"]
    manifest = json.loads((out / "models" / "int4-head" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "int4" and manifest["quantization"]["lm_head"] is True
    assert "| int4-head | 2 |" in (out / "table.md").read_text()


@pytest.mark.parametrize("kv_mode", ["static", "concat"])
def test_op_profile_counts_every_layer(checkpoints, tmp_path, capsys, kv_mode):
    """bench.op_profile on a 3-layer qwen2 (int4, ort lowering for static KV; reference for concat): every decode
    step runs one attention kernel per layer and one vocabulary-sized MatMul, at each batch size; the per-operator
    times add up to the 'all kernels' row, which the profiled step contains; bad values are exit 2."""
    from bench.op_profile import main
    from export.build import build

    layers = 3  # qwen2_window
    # max_seq_len == the vocabulary (256): a static KV buffer [B, KV, 256, D] is not an LM head
    art = build(str(checkpoints("qwen2_window")), kv_mode=kv_mode, quantize="int4", max_seq_len=VOCAB, max_batch=2,
                out=tmp_path / "art", progress=False)
    assert main([str(art), "--batch", "1", "2", "--context", "8", "--warmup", "1", "--steps", "3",
                 "--threads", "1"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| operator") and not line.startswith("| ---"):
            rows[cells[0]] = cells[1:]
    attention = "GroupQueryAttention" if kv_mode == "static" else "Softmax"
    assert f"{attention} x{layers}" in rows, rows.keys()
    head = [k for k in rows if k.startswith("LM head: ")]
    assert head and any(k.startswith(("LM head: MatMul x1", "LM head: MatMulNBits x1")) for k in head), head
    ms = {k: [float(v[0]), float(v[2])] for k, v in rows.items() if not k.startswith(("all kernels", "step ms"))}
    for col in (0, 1):
        total = sum(v[col] for v in ms.values())
        # each printed row is rounded to 0.01 ms: the sum of n rows may be off by n x 0.005
        assert abs(total - float(rows["all kernels"][2 * col])) <= 0.005 * len(ms) + 0.01 * total + 0.005
        assert float(rows["all kernels"][2 * col]) <= float(rows["step ms (profiled)"][2 * col])
    for bad, message in ((["--batch", "3"], "max batch 2"), (["--context", "250"], "max_seq_len 256"),
                         (["--steps", "0"], "--steps: expected an integer >= 1"),
                         (["--context", "0"], "--context: expected an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            main([str(art), *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2


@pytest.mark.parametrize("module, argv, message", [
    ("bench.compare", ["--threads", "0"], "--threads: expected an integer >= 1"),
    ("bench.compare", ["--bandwidth-gib", "nan"], "--bandwidth-gib: expected a finite number > 0"),
    ("bench.compare", ["--quantize", "int4", "--group-size", "0"], "--group-size: expected an integer >= 2"),
    ("bench.compare", ["--new-tokens", "1"], "--new-tokens: expected an integer >= 2"),
    ("bench.serve_bench", ["--threads", "0"], "--threads: expected an integer >= 1"),
    ("bench.serve_bench", ["--prefill-chunk", "0"], "--prefill-chunk: expected an integer >= 1"),
    ("bench.int4_kernel", ["--accuracy-levels", "7"], "--accuracy-levels: invalid choice: 7"),
    ("artifacts.triton", ["serve", "repo", "--http-port", "70000"], "expected a TCP port in [1, 65535]"),
])
def test_bench_and_serve_arguments_are_checked_before_any_work(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_with_a_missing_model_is_exit_2_and_writes_nothing(tmp_path, capsys):
    from bench.compare import main

    assert main(["--model", str(tmp_path / "nope"), "--skip-hf", "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int4_kernel_table_without_batches_is_well_formed(capsys):
    from bench.int4_kernel import main

    assert main(["--blocks", "32", "--accuracy-levels", "4", "--batch", "1", "--iters", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1 and len(rows) == 3, rows
