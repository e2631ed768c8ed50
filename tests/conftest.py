"""Tiny random checkpoints for every trap case, written by transformers' save_pretrained (safetensors).

`make_checkpoint(case)` returns a directory per case, cached for the session. The cases cover: a sliding window
shorter than the test sequence (Qwen2 use_sliding_window + max_window_layers; Gemma2 even layers), Gemma2 softcaps
small enough to bite, head_dim != hidden/heads, MQA and GQA, tied and untied embeddings, Qwen3-MoE with dense and
sparse layers mixed and norm_topk_prob both ways, linear and yarn RoPE, and a sharded checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 256

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
               eos_token_id=None, bos_token_id=None, pad_token_id=None)

CASES: dict[str, tuple[str, dict]] = {
    # Qwen2: window 5 on layers >= 1 only (max_window_layers), GQA 4:2, untied, qkv bias.
    "qwen2_window": ("qwen2", dict(_COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                   tie_word_embeddings=False)),
    # Qwen2: MQA, tied embeddings, linear RoPE scaling.
    "qwen2_mqa_tied_linear": ("qwen2", dict(_COMMON, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=1, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 10000.0})),
    # Qwen2: yarn RoPE (v5 layout) on a GQA model.
    "qwen2_yarn": ("qwen2", dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 64})),
    # Gemma2: even layers slide (window 5), head_dim 24 != 64/4, GQA 4:2, caps small enough to bite.
    "gemma2": ("gemma2", dict(_COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                              attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    # Gemma2: MQA, untied embeddings.
    "gemma2_mqa_untied": ("gemma2", dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=6.0,
                                         tie_word_embeddings=False)),
    # Qwen3-MoE: layers 1 and 3 sparse (step 2), layer 3 forced dense via mlp_only_layers; renormalised top-k.
    "qwen3_moe_mixed": ("qwen3_moe", dict(_COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3],
                                          norm_topk_prob=True, tie_word_embeddings=False)),
    # Qwen3-MoE: every layer sparse, no renormalisation, top-3 of 6.
    "qwen3_moe_nonorm": ("qwen3_moe", dict(_COMMON, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=1, head_dim=16, num_experts=6,
                                           num_experts_per_tok=3, moe_intermediate_size=32,
                                           decoder_sparse_step=1, norm_topk_prob=False)),
    # Sharded checkpoint (model.safetensors.index.json + several files).
    "qwen2_sharded": ("qwen2", dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=False)),
}

# Weight scales chosen so logits spread well beyond the softcaps and greedy choices are not near-ties.
_STD = {"qwen2": 0.15, "gemma2": 0.15, "qwen3_moe": 0.15}


def edit_config(path: Path, fn) -> Path:
    """Apply fn to the checkpoint's config.json dict in place (for tests that flip or break fields)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    fn(cfg)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def hf_config(family: str, fields: dict):
    from transformers import Gemma2Config, Qwen2Config, Qwen3MoeConfig

    return {"qwen2": Qwen2Config, "gemma2": Gemma2Config, "qwen3_moe": Qwen3MoeConfig}[family](**fields)


def randomize(model, family: str):
    """Fill an HF model's weights in place with the test scales (norms near their identity); returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family == "gemma2" else 1.0))
            else:
                p.normal_(0.0, _STD[family])
    return model


def save_hf_checkpoint(family: str, fields: dict, out: Path, seed: int = 0, shard: str | None = None) -> Path:
    """A random HF model saved with save_pretrained (safetensors) plus a tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from export.tiny import write_tokenizer

    torch.manual_seed(seed)
    model = randomize(AutoModelForCausalLM.from_config(hf_config(family, fields), dtype=torch.float32).eval(), family)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out), **kwargs)
    write_tokenizer(out, VOCAB)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Callable: case name -> checkpoint dir (made once per session)."""
    root = tmp_path_factory.mktemp("ckpt")
    made: dict[str, Path] = {}

    def make(case: str) -> Path:
        if case not in made:
            family, fields = CASES[case]
            shard = "40KB" if case.endswith("sharded") else None
            made[case] = save_hf_checkpoint(family, fields, root / case, shard=shard)
        return made[case]

    return make


@pytest.fixture
def copy_checkpoint(checkpoints, tmp_path):
    """Callable: case -> a private, writable copy of that checkpoint (for breaking it)."""

    def copy(case: str) -> Path:
        dst = tmp_path / case
        shutil.copytree(checkpoints(case), dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def hf_model():
    """Callable: checkpoint dir -> transformers model (fp32, eager), cached per dir."""
    cache = {}

    def load(path: Path):
        from transformers import AutoModelForCausalLM

        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()
        return cache[path]

    return load


@pytest.fixture(scope="session")
def artifacts(checkpoints, tmp_path_factory):
    """Callable: (case, kv_mode, precision, lowering, logits) -> built artifact dir (made once per session).

    lowering None means the build default (ort for static KV, reference for concat); logits "last" is the build
    default (the last position's logits), "all" returns every position's."""
    from export.build import build

    root = tmp_path_factory.mktemp("artifacts")
    made = {}

    def get(case: str, kv_mode: str = "static", precision: str = "fp32", lowering: str | None = None,
            logits: str = "last"):
        key = (case, kv_mode, precision, lowering, logits)
        if key not in made:
            made[key] = build(str(checkpoints(case)), precision=precision, kv_mode=kv_mode, lowering=lowering,
                              out=root / "-".join([case, kv_mode, precision, lowering or "default", logits]),
                              max_seq_len=128, progress=False, logits=logits)
        return made[key]

    return get


@pytest.fixture(scope="session")
def traced_graph():
    """Callable: (checkpoint dir, kv_mode, logits) -> (a fresh onnx_ir copy of the exported fp32 graph with its
    weights attached, spec). The export (the slow part) runs once per key; every call returns a new copy, so graph
    passes (graphs/) may rewrite it in place."""
    import onnx_ir as ir

    from export.checkpoint import Checkpoint
    from export.spec import load_spec
    from export.trace import trace_graph
    from export.weights import attach_weights, weight_plan

    made = {}

    def get(path: Path, kv_mode: str = "static", logits: str = "all"):
        key = (str(path), kv_mode, logits)
        if key not in made:
            spec = load_spec(path)
            model = trace_graph(spec, kv_mode, torch.float32, logits)
            attach_weights(model, spec, weight_plan(spec), Checkpoint(path), torch.float32)
            made[key] = (ir.serde.serialize_model(model), spec)
        proto, spec = made[key]
        return ir.serde.deserialize_model(proto), spec

    return get
