"""Benchmark checkpoints with random weights and exact real shapes, and the weight bytes a decode step reads.

What it does: ``ensure_bench_model(name)`` writes (once, atomically) under ``~/.cache/llm-export/bench-models/`` (or
``$LLM_EXPORT_CACHE/bench-models``) a Hugging Face style directory: ``config.json`` in the transformers v4 layout,
fp32 safetensors streamed from our weight plan in chunks of at most 64 MiB (the model, or even one embedding, is
never held in memory; std 0.02 normal weights, RMSNorm weights 1 + small noise, Gemma's stored as small noise
around 0 since it adds the 1), ``generation_config.json`` and the tiny byte-level BPE tokenizer of
:mod:`export.tiny`, its vocabulary filled up to the model's with one word per id (:func:`fill_vocab`: every id a
random model writes decodes to text, so text streams such as Triton's have a delta per token; encoding text never
produces the filler ids). A checkpoint up to
``SHARD_BYTES`` is one ``model.safetensors``; a larger one is ``model-0000i-of-0000n.safetensors`` shards of at most
that size plus ``model.safetensors.index.json``, as Hugging Face writes them. Models:

* ``qwen2-0.5b-random``: Qwen2-0.5B (hidden 896, 24 layers, 14/2 heads, vocab 151936, tied), 1.84 GiB, one file;
* ``gemma-2-9b-random``: google/gemma-2-9b (hidden 3584, 42 layers, 16/8 heads of 256, intermediate 14336, vocab
  256000, tied, sliding window 4096 on every other layer, softcaps 50/30), 34.4 GiB in 8 shards: for the memory
  runs of a 9B build and decode on a CPU machine.

:func:`resolve_bench_model` maps any ``--model`` value to a checkpoint directory. :func:`bytes_read_per_token` is
the weight traffic of one decode step (the memory-bandwidth floor of bench/compare.py): every weight once, except
that a token reads one row of the embedding table and only ``top_k / num_experts`` of each expert stack.

What it does not do: the weights are random, so the model says nothing useful; only speed and memory are real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

QWEN2_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": 2,  # <|im_end|> of the tiny tokenizer; generation ignores EOS in the benchmark anyway
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# google/gemma-2-9b's config.json (transformers v4 layout), fp32; only the token ids of the tiny tokenizer differ
# (bos none, eos 2 = <|im_end|>, pad 0). Checked against transformers' Gemma2Config defaults (head_dim 256,
# query_pre_attn_scalar 256, sliding_window 4096, softcaps 50/30, max_position_embeddings 8192, vocab 256000, tied)
# and the 9B dimensions of the model card (hidden 3584, intermediate 14336, 42 layers, 16 heads, 8 KV heads).
GEMMA2_9B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": None,
    "cache_implementation": "hybrid",
    "eos_token_id": 2,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}

BENCH_MODELS: dict[str, dict] = {"qwen2-0.5b-random": QWEN2_05B_CONFIG, "gemma-2-9b-random": GEMMA2_9B_CONFIG}
STD = 0.02
SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size ("5GB")
CHUNK_BYTES = 64 * 2**20  # rows generated and written at a time


def _nbytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * 4


def _write_safetensors_streamed(path: Path, entries: list[tuple[str, tuple[int, ...]]], make) -> None:
    """Write an fp32 safetensors file whose tensors come from make(name, shape) in row chunks of at most
    CHUNK_BYTES (make is called for consecutive row blocks of each tensor, in order)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = _nbytes(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            rows, row_shape = (shape[0], tuple(shape[1:])) if shape else (1, ())
            step = max(1, CHUNK_BYTES // max(_nbytes(row_shape), 1))
            for start in range(0, rows, step):
                chunk = (min(step, rows - start), *row_shape) if shape else ()
                arr = np.ascontiguousarray(make(name, chunk), dtype="<f4")
                assert arr.shape == tuple(chunk), (name, arr.shape, chunk)
                f.write(memoryview(arr).cast("B"))  # no bytes copy of the chunk


def _shards(entries: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most `limit` bytes each (a bigger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        n = _nbytes(entry[1])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def write_checkpoint_files(out: Path, entries: list[tuple[str, tuple[int, ...]]], make,
                           shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """``model.safetensors`` when everything fits in one shard, else HF-named shards plus the index."""
    groups = _shards(entries, shard_bytes)
    if len(groups) == 1:
        _write_safetensors_streamed(out / "model.safetensors", entries, make)
        return [out / "model.safetensors"]
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors_streamed(out / name, group, make)
        files.append(out / name)
        weight_map.update({tensor: name for tensor, _ in group})
    index = {"metadata": {"total_size": sum(_nbytes(shape) for _, shape in entries)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def make_random_checkpoint(config: dict, out_dir: str | Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random fp32 checkpoint for `config` into out_dir (which must not exist); atomic. The values depend
    only on the config and the seed (not on the chunk or shard sizes)."""
    from export.spec import spec_from_config
    from export.tiny import write_tokenizer
    from export.weights import _source_shape, weight_plan

    spec = spec_from_config(config)
    entries: list[tuple[str, tuple[int, ...]]] = []
    norms: set[str] = set()
    seen: set[str] = set()
    for w in weight_plan(spec):
        if w.name == "lm_head.weight" and spec.tie_embeddings:
            continue
        for src in w.sources:
            if src not in seen:
                seen.add(src)
                entries.append((src, _source_shape(w)))
                if w.transform == "norm":
                    norms.add(src)
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        if name in norms:
            return (1.0 - spec.norm_offset) + 0.05 * x
        x *= STD
        return x

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint_files(tmp, entries, make, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen_config = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config["eos_token_id"],
                      "do_sample": False, "max_new_tokens": 64}
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        write_tokenizer(tmp, config["vocab_size"])
        fill_vocab(tmp / "tokenizer.json", config["vocab_size"])
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def fill_vocab(path: Path, vocab_size: int) -> None:
    """Give every id below `vocab_size` a token in the byte-level BPE tokenizer.json at `path`: the trained
    vocabulary is a few hundred tokens, so the ids above it get " w<id>" (byte-level spelled "Ġw<id>"), which the
    decoder turns into text. No merges reach them: encoding is unchanged."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"\u0120w{i}"] = i
    path.write_text(json.dumps(data, ensure_ascii=False))


def ensure_bench_model(name: str) -> Path:
    """The directory of bench model `name`, made on first use; the name carries a hash of its recipe."""
    from export.tiny import CORPUS, cache_root

    recipe = json.dumps([BENCH_MODELS[name], STD, CORPUS, "v2"], sort_keys=True).encode()  # v2: fill_vocab
    out = cache_root() / "bench-models" / f"{name}-{hashlib.sha256(recipe).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        try:
            make_random_checkpoint(BENCH_MODELS[name], out)
        except OSError:
            if not (out / "config.json").exists():  # lost a race with another process: fine if it finished
                raise
    return out


def resolve_bench_model(model: str) -> Path:
    """A checkpoint directory for --model: a bench model name, or anything `python -m export` accepts."""
    if model in BENCH_MODELS:
        return ensure_bench_model(model)
    from export.checkpoint import resolve_model

    return resolve_model(model)


def quantized_bytes(shape: tuple[int, ...], bits: int, group: int, scale_bytes: int) -> int:
    """Bytes of a weight stored as `bits`-bit integers along its last axis (K) with one scale per `group` inputs
    (0 = one per output row), as MatMulNBits / QMoE / GatherBlockQuantized store it (no zero points)."""
    n = int(np.prod(shape))
    K = shape[-1]
    groups = n // (group or K)
    return n * bits // 8 + groups * scale_bytes


def bytes_read_per_token(spec, act_bytes: int = 4, quant: dict | None = None) -> dict:
    """Weight bytes one decode step reads, from the spec alone: every weight once (norms in fp32, the rest in
    `act_bytes` per value, or quantized per `quant`), except the embedding table, of which a token reads one row
    (a tied embedding is read in full as the LM head, so it counts once), and the MoE expert stacks, of which a
    token reads only ``top_k / num_experts`` (the router picks top_k of num_experts experts per token; the router
    itself is read in full).

    quant: None (float weights) or {"bits": 4|8, "group": G (0 = per channel), "scale_bytes": 4, "lm_head": bool}:
    every linear and expert stack quantized, the LM head only when quant["lm_head"]; norms, biases, the router and
    the embedding stay float. Returns {"total", "expert_stored", "expert_read", "non_expert"} in bytes."""
    from export.weights import weight_plan

    def stored(w, quantized: bool) -> int:
        if w.fp32:
            return int(np.prod(w.shape)) * 4
        if quantized:
            return quantized_bytes(w.shape, quant["bits"], quant["group"], quant.get("scale_bytes", act_bytes))
        return int(np.prod(w.shape)) * act_bytes

    non_expert = expert = 0
    for w in weight_plan(spec):
        if w.name == "embed.weight":
            non_expert += 0 if spec.tie_embeddings else w.shape[1] * act_bytes  # one row; tied: counted as the head
        elif w.name == "lm_head.weight":
            non_expert += stored(w, quant is not None and bool(quant.get("lm_head")))
        elif w.transform in ("stack", "stack_gate_up"):
            expert += stored(w, quant is not None)
        else:
            linear = w.transform == "copy" and len(w.shape) == 2 and not w.name.endswith(".router.weight")
            non_expert += stored(w, quant is not None and linear)
    read = expert * spec.top_k // spec.num_experts if spec.num_experts else 0
    return {"total": non_expert + read, "expert_stored": expert, "expert_read": read, "non_expert": non_expert}
