"""Benchmark checkpoints: `qwen2-0.5b-random`, a random-weight checkpoint with the exact Qwen2-0.5B shape.

What it does: ``ensure_bench_model("qwen2-0.5b-random")`` writes (once, atomically) under
``~/.cache/llm-export/bench-models/`` (or ``$LLM_EXPORT_CACHE/bench-models``) a Hugging Face style directory:
``config.json`` in the transformers v4 layout (model_type qwen2, Qwen2ForCausalLM, float32), one fp32
``model.safetensors`` streamed tensor by tensor from our weight plan (the whole model is never held in memory; std
0.02 normal weights, RMSNorm weights 1 + small noise), ``generation_config.json`` and the tiny byte-level BPE
tokenizer of :mod:`export.tiny` (its vocabulary is small; the benchmark feeds token ids, not text).
:func:`resolve_bench_model` maps any ``--model`` value to a checkpoint directory.

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

BENCH_MODELS: dict[str, dict] = {"qwen2-0.5b-random": QWEN2_05B_CONFIG}
STD = 0.02


def _write_safetensors_streamed(path: Path, entries: list[tuple[str, tuple[int, ...]]], make) -> None:
    """Write an fp32 safetensors file whose tensors come from make(name, shape) one at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            arr = np.ascontiguousarray(make(name, shape), dtype="<f4")
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            f.write(arr.tobytes())


def make_random_checkpoint(config: dict, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random fp32 checkpoint for `config` into out_dir (which must not exist); atomic."""
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
        _write_safetensors_streamed(tmp / "model.safetensors", entries, make)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen_config = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config["eos_token_id"],
                      "do_sample": False, "max_new_tokens": 64}
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        write_tokenizer(tmp, config["vocab_size"])
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_bench_model(name: str) -> Path:
    """The directory of bench model `name`, made on first use; the name carries a hash of its recipe."""
    from export.tiny import CORPUS, cache_root

    recipe = json.dumps([BENCH_MODELS[name], STD, CORPUS, "v1"], sort_keys=True).encode()
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
