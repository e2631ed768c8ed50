"""A test per config field: flip it and show the output changes (no field is silently ignored).

Maths fields (same weight shapes): copy a checkpoint, edit config.json, and require both that our prefill logits on
the fixed prompt move by more than 1e-3 and that the flipped model still matches transformers loaded from the
flipped directory within 1e-4 (the field is honoured correctly, not just changed). Structural fields (which tensors
exist, and their shapes): the spec / weight plan changes and loading the unflipped weights with the flipped config
raises a CheckpointError naming a tensor. Defaults that only bite past a tiny model (4096-token windows, layer 28
on, Gemma2's head_dim 256) are compared with transformers' config objects instead. Token ids land in the spec. A
coverage test checks that every field an adapter reads is covered here or in test_checkpoint_errors.py.

Wrong types and ranges (BAD): for every field each family's adapter reads (a coverage test enforces it), a string
for an int, a float or a bool for an int, "false" for a bool, a list for an object and vice versa, zero or negative
sizes, indivisible heads, top-k above the expert count, bad layer_types, null where required, NaN/Inf in a float,
and values of the right type that crashed later or turned to inf/NaN in fp32 (rope_theta <= 1, yarn betas whose
correction range is not finite, positions / windows past int32, odd head_dim, softcaps and scales fp32 cannot hold):
load_spec raises one UnsupportedConfigError naming the field and the value, and the CLI prints it and exits 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import CheckpointError
from export.model import load_model
from export.spec import ADAPTERS, IGNORED, UnsupportedConfigError, _Fields, load_spec, spec_from_config
from export.verify import compare, run_hf, run_ours
from export.weights import weight_plan
from tests.conftest import CASES, VOCAB, edit_config
from tests.helpers import PROMPT

STEPS = 2  # prefill + 2 decode steps against HF (the decode path honours the field too)
BITE = 1e-3  # the flip must move our prefill logits by more than this
MATCH = 1e-4  # and we must still agree with transformers within this




def _set(**kv):
    return lambda c: c.update(kv)


def _drop(*keys, **kv):
    def fn(c):
        for k in keys:
            c.pop(k, None)
        c.update(kv)

    return fn


def _rope(**kv):
    return lambda c: c["rope_parameters"].update(kv)


def _v4_rope(theta: float = 10000.0, scaling: dict | None = None):
    """Rewrite the rope fields into the transformers v4 layout (top-level rope_theta + rope_scaling)."""
    return _drop("rope_parameters", rope_theta=theta, rope_scaling=scaling)


def _untie(tensors: dict) -> None:
    tensors.pop("lm_head.weight")


# (case, field label, config edit, tensor edit or None)
FLIPS = [
    # --- qwen2
    ("qwen2_window", "rms_norm_eps", _set(rms_norm_eps=1.0), None),
    ("qwen2_window", "rope_theta (v4 top-level)", _v4_rope(theta=100.0), None),
    ("qwen2_window", "rope_parameters.rope_theta (v5)", _rope(rope_theta=100.0), None),
    ("qwen2_window", "rope_scaling (v4, linear) next to rope_parameters",
     _set(rope_scaling={"type": "linear", "factor": 4.0}), None),
    ("qwen2_mqa_tied_linear", "rope_parameters.factor (linear)", _rope(factor=1.5), None),
    ("qwen2_mqa_tied_linear", "rope_scaling.factor (v4, linear)",
     _v4_rope(scaling={"type": "linear", "factor": 2.0}), None),
    ("qwen2_mqa_tied_linear", "rope_scaling.rope_type (v4 key spelling)",
     _v4_rope(scaling={"rope_type": "linear", "factor": 2.0}), None),
    ("qwen2_yarn", "yarn factor", _rope(factor=2.0), None),
    ("qwen2_yarn", "yarn original_max_position_embeddings", _rope(original_max_position_embeddings=16), None),
    ("qwen2_yarn", "yarn top-level original_max_position_embeddings", _set(original_max_position_embeddings=16),
     None),
    ("qwen2_yarn", "yarn beta_fast", _rope(beta_fast=2.0), None),
    ("qwen2_yarn", "yarn beta_slow", _rope(beta_slow=8.0), None),
    ("qwen2_yarn", "yarn attention_factor", _rope(attention_factor=2.0), None),
    ("qwen2_yarn", "yarn mscale / mscale_all_dim", _rope(mscale=3.0, mscale_all_dim=0.5), None),
    ("qwen2_yarn", "yarn truncate", _rope(truncate=False, beta_fast=6.0, beta_slow=1.5), None),
    ("qwen2_yarn", "yarn without factor (max_position_embeddings / original)",
     _rope(factor=None, original_max_position_embeddings=32), None),
    ("qwen2_yarn", "yarn via v4 rope_scaling",
     _v4_rope(scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}), None),
    ("qwen2_window", "use_sliding_window", _drop("layer_types", use_sliding_window=False), None),
    ("qwen2_window", "sliding_window", _set(sliding_window=3), None),
    ("qwen2_window", "sliding_window absent (transformers default 4096)", _drop("layer_types", "sliding_window"), None),
    ("qwen2_window", "max_window_layers", _drop("layer_types", max_window_layers=2), None),
    ("qwen2_window", "max_window_layers absent (transformers default 28)", _drop("layer_types", "max_window_layers"),
     None),
    ("qwen2_window", "layer_types", _set(layer_types=["sliding_attention", "full_attention", "full_attention"]), None),
    ("qwen2_window", "tie_word_embeddings", _set(tie_word_embeddings=True), _untie),
    ("qwen2_window", "hidden_act", _set(hidden_act="gelu_pytorch_tanh"), None),
    ("qwen2_window", "num_attention_heads with num_key_value_heads (same shapes)",
     _set(num_attention_heads=8, num_key_value_heads=4), None),
    # --- gemma2
    ("gemma2", "query_pre_attn_scalar", _set(query_pre_attn_scalar=64), None),
    ("gemma2", "attn_logit_softcapping", _set(attn_logit_softcapping=1.0), None),
    ("gemma2", "attn_logit_softcapping null", _set(attn_logit_softcapping=None), None),
    ("gemma2", "final_logit_softcapping", _set(final_logit_softcapping=2.0), None),
    ("gemma2", "final_logit_softcapping null", _set(final_logit_softcapping=None), None),
    ("gemma2", "softcappings absent (transformers defaults 50 / 30)",
     _drop("attn_logit_softcapping", "final_logit_softcapping"), None),
    ("gemma2", "sliding_window", _set(sliding_window=3), None),
    ("gemma2", "layer_types", _set(layer_types=["full_attention", "sliding_attention", "sliding_attention"]), None),
    ("gemma2", "layer_types absent (default: even layers slide) with sliding_window 2",
     _drop("layer_types", sliding_window=2), None),
    ("gemma2", "hidden_activation", _set(hidden_activation="silu"), None),
    ("gemma2", "rms_norm_eps", _set(rms_norm_eps=1.0), None),
    ("gemma2", "rope_parameters.rope_theta", _rope(rope_theta=100.0), None),
    ("gemma2", "rope_theta (v4 top-level)", _v4_rope(theta=100.0), None),
    ("gemma2", "rope_scaling (v4, linear)", _v4_rope(scaling={"type": "linear", "factor": 3.0}), None),
    ("gemma2_mqa_untied", "tie_word_embeddings", _set(tie_word_embeddings=True), _untie),
    # --- qwen3_moe
    ("qwen3_moe_mixed", "norm_topk_prob", _set(norm_topk_prob=False), None),
    ("qwen3_moe_nonorm", "norm_topk_prob", _set(norm_topk_prob=True), None),
    ("qwen3_moe_mixed", "num_experts_per_tok", _set(num_experts_per_tok=3), None),
    ("qwen3_moe_mixed", "rms_norm_eps", _set(rms_norm_eps=1.0), None),
    ("qwen3_moe_mixed", "use_sliding_window + sliding_window", _set(use_sliding_window=True, sliding_window=4), None),
    ("qwen3_moe_mixed", "hidden_act", _set(hidden_act="gelu_pytorch_tanh"), None),
    ("qwen3_moe_mixed", "rope_parameters.rope_theta", _rope(rope_theta=100.0), None),
    ("qwen3_moe_mixed", "rope_scaling (v4, yarn)",
     _v4_rope(scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}), None),
    ("qwen3_moe_mixed", "tie_word_embeddings", _set(tie_word_embeddings=True), _untie),
]


def hf_view(cfg) -> dict:
    """What transformers' config object says about the fields we turn into the spec (defaults applied by it)."""
    family = cfg.model_type
    n = cfg.num_hidden_layers
    if family == "qwen3_moe":  # no layer_types: the window (if any) is on every layer
        windows = (cfg.sliding_window,) * n
    else:
        windows = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types)
    rope = cfg.rope_parameters
    act = cfg.hidden_activation if family == "gemma2" else cfg.hidden_act
    view = dict(windows=windows, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                eps=cfg.rms_norm_eps, tie=cfg.tie_word_embeddings, rope_type=rope["rope_type"],
                theta=float(rope["rope_theta"]), kv=cfg.num_key_value_heads,
                act={"gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}.get(act, act))
    if family == "gemma2":
        view.update(attn_scale=cfg.query_pre_attn_scalar ** -0.5, attn_softcap=cfg.attn_logit_softcapping,
                    final_softcap=cfg.final_logit_softcapping)
    if family == "qwen3_moe":
        view.update(experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                    sparse=tuple(i for i in range(n) if i not in cfg.mlp_only_layers and cfg.num_experts > 0
                                 and (i + 1) % cfg.decoder_sparse_step == 0))
    if rope["rope_type"] != "default":  # yarn without a factor: transformers derives it as below
        view["factor"] = rope.get("factor") or cfg.max_position_embeddings / rope["original_max_position_embeddings"]
    return view


def our_view(spec) -> dict:
    view = dict(windows=tuple(layer.window for layer in spec.layers), head_dim=spec.head_dim, eps=spec.rms_norm_eps,
                tie=spec.tie_embeddings, rope_type=spec.rope.rope_type, theta=spec.rope.theta,
                kv=spec.num_kv_heads, act=spec.hidden_act)
    if spec.model_type == "gemma2":
        view.update(attn_scale=spec.attn_scale, attn_softcap=spec.attn_softcap, final_softcap=spec.final_softcap)
    if spec.model_type == "qwen3_moe":
        view.update(experts=spec.num_experts, top_k=spec.top_k, norm_topk_prob=spec.norm_topk_prob,
                    sparse=spec.sparse_layers)
    if spec.rope.rope_type != "default":
        view["factor"] = spec.rope.factor
    return view


# num_key_value_heads is given: when absent, transformers' defaults (32 / 4 / 4) differ from ours (= heads), but it is
# structural, so the k/v projection shapes decide (a disagreement is a CheckpointError, see STRUCTURAL).
_REQUIRED = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                 num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.mark.parametrize("family, fields", [
    ("qwen2", {}),
    ("qwen2", dict(use_sliding_window=True, num_hidden_layers=30)),  # window 4096 from layer 28 on (HF defaults)
    ("qwen2", dict(use_sliding_window=True, sliding_window=7, max_window_layers=2)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=7, max_window_layers=0)),
    ("qwen2", dict(num_key_value_heads=None, rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                            "original_max_position_embeddings": 64})),
    ("gemma2", dict(query_pre_attn_scalar=16)),  # head_dim 256, caps 50 / 30, window 4096 on even layers
    ("gemma2", dict(query_pre_attn_scalar=16, head_dim=24, sliding_window=9, attn_logit_softcapping=None,
                    layer_types=["full_attention", "sliding_attention"] * 2)),
    ("qwen3_moe", dict(num_experts_per_tok=2, moe_intermediate_size=32)),  # 128 experts, no window
    ("qwen3_moe", dict(num_experts_per_tok=2, moe_intermediate_size=32, use_sliding_window=True,
                       num_experts=8, decoder_sparse_step=2, mlp_only_layers=[1])),
    # real-model values next to the sanity ranges (BAD, end): usual yarn, Gemma2 9B / 27B scalars, shipped windows
    ("qwen2", dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 1e6,
        "original_max_position_embeddings": 32768})),
    ("gemma2", dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    ("gemma2", dict(query_pre_attn_scalar=144, head_dim=128, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, sliding_window=4096)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=4096)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=32768, max_position_embeddings=32768)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=131072, max_position_embeddings=131072)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=2 ** 31 - 1, max_window_layers=0)),  # = no window
])
def test_spec_agrees_with_transformers_config(family, fields):
    """Defaults and derived values that only bite beyond a tiny model (windows of 4096, layer 28 on, head_dim
    256) checked against transformers' own config objects rather than by running them."""
    from tests.conftest import hf_config

    cfg = dict(_REQUIRED, **fields)
    hf = hf_config(family, {k: v for k, v in cfg.items()})
    assert our_view(spec_from_config(dict(cfg, model_type=family))) == hf_view(hf)


@pytest.fixture(scope="module")
def baseline(checkpoints):
    """Callable: case -> our prefill logits on PROMPT for the unflipped checkpoint (computed once)."""
    cache: dict[str, torch.Tensor] = {}

    def get(case: str) -> torch.Tensor:
        if case not in cache:
            model, _ = load_model(checkpoints(case))
            cache[case] = run_ours(model, PROMPT, steps=0).logits[0]
        return cache[case]

    return get


@pytest.mark.parametrize("case, field, edit, tensors", FLIPS, ids=[f"{c}-{f}" for c, f, _, _ in FLIPS])
def test_flip_changes_output_and_matches_hf(case, field, edit, tensors, copy_checkpoint, baseline):
    path = edit_config(copy_checkpoint(case), edit)
    if tensors is not None:
        weights = load_file(str(path / "model.safetensors"))
        tensors(weights)
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    from transformers import AutoConfig

    model, spec = load_model(path)
    assert our_view(spec) == hf_view(AutoConfig.from_pretrained(str(path), local_files_only=True)), field
    ours = run_ours(model, PROMPT, steps=STEPS)
    moved = float((ours.logits[0] - baseline(case)).abs().max())
    assert moved > BITE, f"{field}: flipping it moved the logits by only {moved:.2e}"
    r = compare(ours, run_hf(path, PROMPT, steps=STEPS))
    assert r["max_logit_diff"] < MATCH, (field, r)
    assert r["max_logprob_diff"] < MATCH, (field, r)


def test_v4_and_v5_rope_layouts_are_the_same_model(copy_checkpoint, baseline):
    """The v4 spelling of the same RoPE gives bit-identical logits (the flips above compare against the v5 one)."""
    for case, edit in [("qwen2_window", _v4_rope()),
                       ("qwen2_mqa_tied_linear", _v4_rope(scaling={"type": "linear", "factor": 4.0})),
                       ("qwen2_yarn", _v4_rope(scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64}))]:
        model, _ = load_model(edit_config(copy_checkpoint(case), edit))
        assert torch.equal(run_ours(model, PROMPT, steps=0).logits[0], baseline(case)), case


# --------------------------------------------------------------------------------------------------------------
# structural fields: they decide which tensors exist and their shapes


def _plan(spec) -> dict:
    return {w.name: (w.shape, w.sources) for w in weight_plan(spec)}


STRUCTURAL = [
    # (case, field label, config edit, a tensor name the load error must name)
    ("qwen3_moe_mixed", "decoder_sparse_step", _set(decoder_sparse_step=1), "model.layers.0.mlp.gate.weight"),
    ("qwen3_moe_mixed", "mlp_only_layers (sparse layer forced dense)", _set(mlp_only_layers=[1, 3]),
     "model.layers.1.mlp.gate_proj.weight"),
    ("qwen3_moe_mixed", "mlp_only_layers (dense layer made sparse)", _set(mlp_only_layers=[]),
     "model.layers.3.mlp.gate.weight"),
    ("qwen3_moe_mixed", "num_local_experts (fewer)", _set(num_local_experts=4), "model.layers.1.mlp.gate.weight"),
    ("qwen3_moe_mixed", "num_experts (v4 name, more)", _drop("num_local_experts", num_experts=16),
     "model.layers.1.mlp.experts.8.gate_proj.weight"),
    ("qwen3_moe_mixed", "num_experts 0 (all dense)", _drop("num_local_experts", num_experts=0),
     "model.layers.1.mlp.gate_proj.weight"),
    ("qwen3_moe_mixed", "moe_intermediate_size", _set(moe_intermediate_size=16),
     "model.layers.1.mlp.experts.0.gate_proj.weight"),
    ("qwen3_moe_mixed", "intermediate_size (dense layers)", _set(intermediate_size=128),
     "model.layers.0.mlp.gate_proj.weight"),
    ("qwen3_moe_mixed", "head_dim", _set(head_dim=32), "model.layers.0.self_attn.q_proj.weight"),
    ("qwen3_moe_mixed", "num_key_value_heads", _set(num_key_value_heads=1), "model.layers.0.self_attn.k_proj.weight"),
    ("qwen3_moe_mixed", "num_hidden_layers", _set(num_hidden_layers=5), "model.layers.4.input_layernorm.weight"),
    ("qwen3_moe_mixed", "num_attention_heads", _set(num_attention_heads=8), "model.layers.0.self_attn.q_proj.weight"),
    ("qwen3_moe_mixed", "vocab_size", _set(vocab_size=128), "model.embed_tokens.weight"),
    ("qwen3_moe_mixed", "hidden_size", _set(hidden_size=32), "model.embed_tokens.weight"),
    ("qwen2_window", "num_key_value_heads", _set(num_key_value_heads=4), "model.layers.0.self_attn.k_proj.weight"),
    ("qwen2_window", "head_dim (explicit, != hidden / heads)", _set(head_dim=32),
     "model.layers.0.self_attn.q_proj.weight"),
    ("qwen2_window", "num_attention_heads", _set(num_attention_heads=8), "model.layers.0.self_attn.k_proj.weight"),
    ("qwen2_window", "intermediate_size", _set(intermediate_size=128), "model.layers.0.mlp.gate_proj.weight"),
    ("qwen2_window", "vocab_size", _set(vocab_size=300), "model.embed_tokens.weight"),
    ("qwen2_window", "hidden_size", _set(hidden_size=128), "model.embed_tokens.weight"),
    ("qwen2_window", "num_hidden_layers", _set(num_hidden_layers=4, layer_types=None),
     "model.layers.3.self_attn.q_proj.weight"),
    ("qwen2_mqa_tied_linear", "tie_word_embeddings (tied -> untied)", _set(tie_word_embeddings=False),
     "lm_head.weight"),
    ("gemma2", "num_attention_heads", _set(num_attention_heads=8), "model.layers.0.self_attn.q_proj.weight"),
    ("gemma2", "head_dim", _set(head_dim=16), "model.layers.0.self_attn.q_proj.weight"),
    ("gemma2", "head_dim absent (transformers default 256)", _drop("head_dim"),
     "model.layers.0.self_attn.q_proj.weight"),
    ("gemma2", "hidden_size", _set(hidden_size=96), "model.embed_tokens.weight"),
    ("gemma2", "intermediate_size", _set(intermediate_size=64), "model.layers.0.mlp.gate_proj.weight"),
    ("gemma2", "num_key_value_heads", _set(num_key_value_heads=4), "model.layers.0.self_attn.k_proj.weight"),
    ("gemma2", "num_hidden_layers", _set(num_hidden_layers=4, layer_types=None), "model.layers.3.mlp.up_proj.weight"),
    ("gemma2", "vocab_size", _set(vocab_size=512), "model.embed_tokens.weight"),
]


@pytest.mark.parametrize("case, field, edit, tensor", STRUCTURAL, ids=[f"{c}-{f}" for c, f, _, _ in STRUCTURAL])
def test_structural_flip_changes_plan_and_is_caught(case, field, edit, tensor, checkpoints, copy_checkpoint):
    base = load_spec(checkpoints(case))
    path = edit_config(copy_checkpoint(case), edit)
    spec = load_spec(path)
    assert spec.layers != base.layers or _plan(spec) != _plan(base), field
    with pytest.raises(CheckpointError, match=rf"checkpoint does not match config.json:(?s:.*)'{tensor}'"):
        load_model(path)


def test_structural_spec_values(checkpoints):
    """The MoE layout fields land where the plan reads them."""
    cfg = json.loads((checkpoints("qwen3_moe_mixed") / "config.json").read_text())
    assert spec_from_config(cfg).sparse_layers == (1,)  # step 2 -> 1, 3; mlp_only_layers removes 3
    assert spec_from_config(dict(cfg, decoder_sparse_step=1)).sparse_layers == (0, 1, 2)
    assert spec_from_config(dict(cfg, mlp_only_layers=[])).sparse_layers == (1, 3)
    assert spec_from_config(dict(cfg, mlp_only_layers=None)).sparse_layers == (1, 3)
    assert spec_from_config(dict(cfg, num_local_experts=0)).sparse_layers == ()
    no_experts = {k: v for k, v in cfg.items() if k != "num_local_experts"}
    assert spec_from_config(no_experts).num_experts == 128  # transformers' Qwen3MoeConfig default
    moe = spec_from_config(dict(cfg, num_experts_per_tok=3, moe_intermediate_size=48, num_local_experts=6))
    assert (moe.top_k, moe.moe_intermediate_size, moe.num_experts) == (3, 48, 6)
    qwen2 = json.loads((checkpoints("qwen2_window") / "config.json").read_text())
    assert spec_from_config(dict(qwen2, head_dim=32)).head_dim == 32  # explicit head_dim honoured for qwen2 too


def test_fewer_layers_than_stored_warns_and_names_them(copy_checkpoint, capsys):
    """num_hidden_layers below what is stored only drops layers: allowed, but every unused tensor is reported."""
    path = edit_config(copy_checkpoint("qwen3_moe_mixed"), _set(num_hidden_layers=3, mlp_only_layers=[]))
    capsys.readouterr()
    _, spec = load_model(path)
    err = capsys.readouterr().err
    assert spec.num_layers == 3
    assert "warning: " in err and "model.layers.3.input_layernorm.weight" in err


# --------------------------------------------------------------------------------------------------------------
# token ids


@pytest.mark.parametrize("fields, expected", [
    (dict(bos_token_id=1, eos_token_id=2, pad_token_id=0), (1, (2,), 0)),
    (dict(bos_token_id=None, eos_token_id=[2, 7], pad_token_id=None), (None, (2, 7), None)),
    (dict(bos_token_id=5, eos_token_id=None, pad_token_id=9), (5, (), 9)),
])
@pytest.mark.parametrize("case", ["qwen2_window", "gemma2", "qwen3_moe_mixed"])
def test_token_ids_land_in_spec(case, fields, expected, checkpoints):
    cfg = json.loads((checkpoints(case) / "config.json").read_text())
    spec = spec_from_config(dict(cfg, **fields))
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == expected
    again = type(spec).from_dict(json.loads(json.dumps(spec.to_dict())))  # survives the JSON round trip
    assert again == spec


# --------------------------------------------------------------------------------------------------------------
# coverage: every field an adapter reads is exercised somewhere

# Fields whose only effect is a refusal, tested in test_checkpoint_errors.py.
REFUSAL_FIELDS = {"use_mrope", "dual_chunk_attention_config", "attention_bias", "hidden_act", "sliding_window_size"}
# Fields read but by design without effect on the maths for that family (as in transformers; see spec.py).
MOOT_FIELDS = {("qwen3_moe", "max_window_layers"),  # the window covers every layer
               ("gemma2", "max_position_embeddings"), ("qwen3_moe", "max_position_embeddings")}  # only yarn reads it
TOKEN_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id"}  # test_token_ids_land_in_spec


def _covered(family: str, field: str) -> bool:
    """A flip or structural test of this family names the field as a whole word in its label."""
    pattern = re.compile(rf"(?<!\w){re.escape(field)}(?!\w)")
    return any(CASES[case][0] == family and pattern.search(label) for case, label, _, _ in FLIPS + STRUCTURAL)


def test_every_read_field_is_covered():
    """Each field an adapter reads (on every case's config, v4 spellings included) is flipped by a test of the
    same family, is a token id, only ever leads to a refusal (test_checkpoint_errors.py) or is moot there."""
    from tests.conftest import hf_config

    uncovered = set()
    for case, (family, fields) in CASES.items():
        cfg = hf_config(family, fields).to_dict()
        cfg.update(rope_theta=10000.0, rope_scaling=None, original_max_position_embeddings=None)
        f = _Fields(cfg)
        ADAPTERS[family](f)
        for field in f.read - IGNORED.difference(TOKEN_FIELDS):
            if field in TOKEN_FIELDS | REFUSAL_FIELDS or (family, field) in MOOT_FIELDS or _covered(family, field):
                continue
            uncovered.add((family, field))
    assert not uncovered, f"fields read by an adapter but flipped by no test: {sorted(uncovered)}"


# --------------------------------------------------------------------------------------------------------------
# wrong types and ranges: every field an adapter reads is refused by name, with its value, when it is malformed

NAN, INF = float("nan"), float("inf")


def _shown(value) -> str:
    """How spec.py shows a bad value: repr and JSON-decoded Python type, or null."""
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _bad(case: str, field: str, value, *expect: str, edit=None):
    """A row: set `field` (a top-level key, or 'rope_parameters.KEY' / 'rope_scaling.KEY' for the RoPE dict) to
    `value`; the error must contain every string of `expect` (default: the quoted field name and the shown value)."""
    if edit is None:
        if "." in field:
            outer, key = field.split(".")
            edit = lambda c: c.setdefault(outer, {}).update({key: value})  # noqa: E731
        else:
            edit = _set(**{field: value})
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:12]}...({len(repr(value))}_chars)"
    return pytest.param(case, field, edit, expect or (f"field '{field}' must be", f"got {_shown(value)}"),
                        id=f"{case}-{field}={shown}")


BAD = [
    # --- qwen2: sizes and heads
    _bad("qwen2_window", "num_hidden_layers", "2",
         "config.json: field 'num_hidden_layers' must be an integer in [1, 1024], got '2' (str)"),
    _bad("qwen2_window", "num_hidden_layers", 2.0),
    _bad("qwen2_window", "num_hidden_layers", True),
    _bad("qwen2_window", "num_hidden_layers", 0),
    _bad("qwen2_window", "num_hidden_layers", None, "required field 'num_hidden_layers' is missing (null)"),
    _bad("qwen2_window", "hidden_size", -64),
    _bad("qwen2_window", "hidden_size", "64"),
    _bad("qwen2_window", "num_attention_heads", 0),
    _bad("qwen2_window", "num_attention_heads", 4.0),
    _bad("qwen2_window", "num_key_value_heads", 0),
    _bad("qwen2_window", "num_key_value_heads", [2]),
    _bad("qwen2_window", "num_key_value_heads", 3, "num_attention_heads 4 not a multiple of kv heads 3",
         "'num_key_value_heads'"),
    _bad("qwen2_window", "num_attention_heads", 6, "hidden_size 64 is not a multiple of num_attention_heads 6",
         "'head_dim'", edit=_set(num_attention_heads=6, num_key_value_heads=2)),
    _bad("qwen2_window", "head_dim", "16"),
    _bad("qwen2_window", "head_dim", 0),
    _bad("qwen2_window", "vocab_size", "256"),
    _bad("qwen2_window", "vocab_size", 0),
    _bad("qwen2_window", "intermediate_size", -1),
    _bad("qwen2_window", "intermediate_size", None, "required field 'intermediate_size' is missing (null)"),
    _bad("qwen2_window", "max_position_embeddings", -1,
         "field 'max_position_embeddings' must be an integer >= 2, got -1 (int)"),
    _bad("qwen2_window", "max_position_embeddings", 1024.0),
    _bad("qwen2_window", "rms_norm_eps", "1e-6"),
    _bad("qwen2_window", "rms_norm_eps", NAN, "field 'rms_norm_eps' must be a finite number > 0, got nan (float)"),
    _bad("qwen2_window", "rms_norm_eps", -INF),
    _bad("qwen2_window", "rms_norm_eps", 0),
    _bad("qwen2_window", "rms_norm_eps", None),
    # --- qwen2: switches (the JSON string "false" is not false)
    _bad("qwen2_window", "tie_word_embeddings", "false",
         "field 'tie_word_embeddings' must be true or false, got 'false' (str)"),
    _bad("qwen2_window", "tie_word_embeddings", 0),
    _bad("qwen2_window", "use_sliding_window", "true"),
    _bad("qwen2_window", "use_mrope", "false"),
    _bad("qwen2_window", "dual_chunk_attention_config", [1, 2]),
    _bad("qwen2_window", "hidden_act", 5),
    _bad("qwen2_window", "hidden_act", None),
    # --- qwen2: windows and layer types
    _bad("qwen2_window", "sliding_window", "5"),
    _bad("qwen2_window", "sliding_window", 0, "field 'sliding_window' must be an integer >= 1 or null, got 0"),
    _bad("qwen2_window", "sliding_window", -1, "field 'sliding_window' must be an integer >= 0 or null, got -1",
         edit=_drop("layer_types", use_sliding_window=False, sliding_window=-1)),  # unused, but not negative
    _bad("qwen2_window", "max_window_layers", -1),
    _bad("qwen2_window", "max_window_layers", "1"),
    _bad("qwen2_window", "layer_types", {"0": "full_attention"}),
    _bad("qwen2_window", "layer_types", ["full_attention", 1, 2]),
    _bad("qwen2_window", "layer_types", ["full_attention", "sliding_attention", "global"],
         "layer_types[2] = 'global' is not supported; supported: full_attention, sliding_attention"),
    _bad("qwen2_window", "layer_types", ["full_attention"] * 4, "layer_types has 4 entries for 3 layers"),
    # --- qwen2: RoPE, both layouts
    _bad("qwen2_window", "rope_parameters", ["default"]),
    _bad("qwen2_window", "rope_parameters", "default"),
    _bad("qwen2_window", "rope_scaling", [1]),
    _bad("qwen2_window", "rope_theta", "1e4"),
    _bad("qwen2_window", "rope_theta", -1.0),
    _bad("qwen2_window", "rope_parameters.rope_theta", 0),
    _bad("qwen2_window", "rope_parameters.rope_theta", NAN),
    _bad("qwen2_window", "rope_parameters.rope_type", 5),
    _bad("qwen2_window", "rope_scaling.type", ["linear"], edit=_v4_rope(scaling={"type": ["linear"], "factor": 2.0})),
    _bad("qwen2_window", "rope_parameters.partial_rotary_factor", "1"),
    _bad("qwen2_mqa_tied_linear", "rope_parameters.factor", 0),
    _bad("qwen2_mqa_tied_linear", "rope_parameters.factor", "4"),
    _bad("qwen2_mqa_tied_linear", "rope_scaling.factor", -2.0, edit=_v4_rope(scaling={"type": "linear",
                                                                                      "factor": -2.0})),
    _bad("qwen2_yarn", "rope_parameters.factor", INF),
    _bad("qwen2_yarn", "rope_parameters.original_max_position_embeddings", 0),
    _bad("qwen2_yarn", "rope_parameters.original_max_position_embeddings", "64"),
    _bad("qwen2_yarn", "original_max_position_embeddings", -5),
    _bad("qwen2_yarn", "rope_parameters.beta_fast", "32"),
    _bad("qwen2_yarn", "rope_parameters.beta_slow", 0),
    _bad("qwen2_yarn", "rope_parameters.attention_factor", -1.0),
    _bad("qwen2_yarn", "rope_parameters.mscale", "1"),
    _bad("qwen2_yarn", "rope_parameters.mscale_all_dim", -0.5),
    _bad("qwen2_yarn", "rope_parameters.truncate", "false"),
    # --- qwen2: token ids
    _bad("qwen2_window", "bos_token_id", "1"),
    _bad("qwen2_window", "bos_token_id", 256, "field 'bos_token_id' must be null or an integer in [0, 255] "
                                              "(vocab_size 256), got 256 (int)"),
    _bad("qwen2_window", "eos_token_id", [2, "3"]),
    _bad("qwen2_window", "eos_token_id", -1),
    _bad("qwen2_window", "eos_token_id", {"id": 2}),
    _bad("qwen2_window", "pad_token_id", 1.5),
    _bad("qwen2_window", "pad_token_id", [0]),
    # --- gemma2
    _bad("gemma2", "num_hidden_layers", "3"),
    _bad("gemma2", "num_hidden_layers", 0),
    _bad("gemma2", "num_attention_heads", 0),
    _bad("gemma2", "num_key_value_heads", 3, "num_attention_heads 4 not a multiple of kv heads 3"),
    _bad("gemma2", "num_key_value_heads", True),
    _bad("gemma2", "hidden_size", 0),
    _bad("gemma2", "head_dim", -24),
    _bad("gemma2", "head_dim", 24.5),
    _bad("gemma2", "vocab_size", 256.0),
    _bad("gemma2", "intermediate_size", 0),
    _bad("gemma2", "max_position_embeddings", -1),
    _bad("gemma2", "max_position_embeddings", None, "required field 'max_position_embeddings' is missing (null)"),
    _bad("gemma2", "rms_norm_eps", NAN),
    _bad("gemma2", "tie_word_embeddings", "true"),
    _bad("gemma2", "query_pre_attn_scalar", "20"),
    _bad("gemma2", "query_pre_attn_scalar", 0),
    _bad("gemma2", "query_pre_attn_scalar", NAN),
    _bad("gemma2", "query_pre_attn_scalar", None, "required field 'query_pre_attn_scalar' is missing (null)"),
    _bad("gemma2", "attn_logit_softcapping", "50"),
    _bad("gemma2", "attn_logit_softcapping", 0),
    _bad("gemma2", "attn_logit_softcapping", NAN),
    _bad("gemma2", "final_logit_softcapping", -1.0),
    _bad("gemma2", "final_logit_softcapping", True),
    _bad("gemma2", "hidden_activation", 5),
    _bad("gemma2", "hidden_activation", "relu", "field 'hidden_activation': activation 'relu' is not supported"),
    _bad("gemma2", "hidden_act", 5, "'hidden_act' = 5 contradicts 'hidden_activation'"),
    _bad("gemma2", "sliding_window", 0),
    _bad("gemma2", "sliding_window", "5"),
    _bad("gemma2", "sliding_window_size", "5", "'sliding_window_size' = '5' contradicts 'sliding_window' = 5"),
    _bad("gemma2", "layer_types", "sliding_attention"),
    _bad("gemma2", "layer_types", [], "layer_types has 0 entries for 3 layers"),
    _bad("gemma2", "attention_bias", "false"),
    _bad("gemma2", "rope_parameters", [10000.0]),
    _bad("gemma2", "rope_scaling", "linear"),
    _bad("gemma2", "rope_theta", NAN),
    _bad("gemma2", "rope_parameters.rope_theta", "10000"),
    _bad("gemma2", "original_max_position_embeddings", 64.0,
         edit=_drop("rope_parameters", rope_scaling={"type": "yarn", "factor": 2.0},
                    original_max_position_embeddings=64.0)),
    _bad("gemma2", "bos_token_id", -2),
    _bad("gemma2", "eos_token_id", [1, 256]),
    _bad("gemma2", "pad_token_id", "0"),
    # --- qwen3_moe
    _bad("qwen3_moe_mixed", "num_hidden_layers", 4.0),
    _bad("qwen3_moe_mixed", "num_hidden_layers", -4),
    _bad("qwen3_moe_mixed", "num_attention_heads", "4"),
    _bad("qwen3_moe_mixed", "num_key_value_heads", 3, "num_attention_heads 4 not a multiple of kv heads 3"),
    _bad("qwen3_moe_mixed", "hidden_size", 0),
    _bad("qwen3_moe_mixed", "head_dim", "16"),
    _bad("qwen3_moe_mixed", "vocab_size", -1),
    _bad("qwen3_moe_mixed", "intermediate_size", 96.0),
    _bad("qwen3_moe_mixed", "max_position_embeddings", -1),
    _bad("qwen3_moe_mixed", "rms_norm_eps", INF),
    _bad("qwen3_moe_mixed", "tie_word_embeddings", "false"),
    _bad("qwen3_moe_mixed", "num_local_experts", "8"),
    _bad("qwen3_moe_mixed", "num_local_experts", -1),
    _bad("qwen3_moe_mixed", "num_experts", True, edit=_drop("num_local_experts", num_experts=True)),
    _bad("qwen3_moe_mixed", "num_experts_per_tok", 9,
         "field 'num_experts_per_tok' = 9 exceeds the number of experts 8"),
    _bad("qwen3_moe_mixed", "num_experts_per_tok", 0),
    _bad("qwen3_moe_mixed", "num_experts_per_tok", "2"),
    _bad("qwen3_moe_mixed", "num_experts_per_tok", None, "required field 'num_experts_per_tok' is missing (null)"),
    _bad("qwen3_moe_mixed", "num_experts_per_tok", "2", edit=_set(num_local_experts=0, num_experts_per_tok="2")),
    _bad("qwen3_moe_mixed", "moe_intermediate_size", 0),
    _bad("qwen3_moe_mixed", "moe_intermediate_size", None, "required field 'moe_intermediate_size' is missing"),
    _bad("qwen3_moe_mixed", "moe_intermediate_size", -1, edit=_set(num_local_experts=0, moe_intermediate_size=-1)),
    _bad("qwen3_moe_mixed", "decoder_sparse_step", 0),
    _bad("qwen3_moe_mixed", "decoder_sparse_step", "2"),
    _bad("qwen3_moe_mixed", "mlp_only_layers", {"3": True}),
    _bad("qwen3_moe_mixed", "mlp_only_layers", [4], "field 'mlp_only_layers' must be a list of integers in [0, 3]"),
    _bad("qwen3_moe_mixed", "mlp_only_layers", [1.0]),
    _bad("qwen3_moe_mixed", "mlp_only_layers", "3"),
    _bad("qwen3_moe_mixed", "norm_topk_prob", "true"),
    _bad("qwen3_moe_mixed", "norm_topk_prob", 1),
    _bad("qwen3_moe_mixed", "use_sliding_window", "false"),
    _bad("qwen3_moe_mixed", "sliding_window", 0, edit=_set(use_sliding_window=True, sliding_window=0)),
    _bad("qwen3_moe_mixed", "sliding_window", 4.5),
    _bad("qwen3_moe_mixed", "max_window_layers", "48"),
    _bad("qwen3_moe_mixed", "attention_bias", 1),
    _bad("qwen3_moe_mixed", "hidden_act", ["silu"]),
    _bad("qwen3_moe_mixed", "rope_scaling", [2.0]),
    _bad("qwen3_moe_mixed", "rope_theta", "1e6"),
    _bad("qwen3_moe_mixed", "rope_parameters", 10000.0),
    _bad("qwen3_moe_mixed", "rope_parameters.rope_theta", True),
    _bad("qwen3_moe_mixed", "rope_scaling.factor", 0, edit=_v4_rope(scaling={"type": "yarn", "factor": 0})),
    _bad("qwen3_moe_mixed", "original_max_position_embeddings", "32",
         edit=_drop("rope_parameters", rope_scaling={"type": "yarn", "factor": 2.0},
                    original_max_position_embeddings="32")),
    _bad("qwen3_moe_mixed", "bos_token_id", True),
    _bad("qwen3_moe_mixed", "eos_token_id", 1e9),
    _bad("qwen3_moe_mixed", "pad_token_id", -1),
    # --- values of the right type that would crash later or turn to inf/NaN in fp32: refused by name up front
    # RoPE: theta must be > 1 (yarn divides by log(theta); theta <= 1 has no meaning, and one that rounds to 0 in
    # fp32 gives 0 * inf = NaN at position 0)
    _bad("qwen2_yarn", "rope_parameters.rope_theta", 1.0),
    _bad("qwen2_window", "rope_parameters.rope_theta", 1e-50),
    _bad("qwen2_window", "rope_theta", 0.5),
    _bad("qwen2_yarn", "rope_parameters.beta_fast", 5e-324),
    _bad("qwen2_yarn", "rope_parameters.beta_fast", 1e308),
    _bad("qwen2_yarn", "rope_parameters.beta_slow", 1e308),
    _bad("qwen2_yarn", "rope_parameters.attention_factor", 1e300),
    _bad("qwen2_yarn", "rope_parameters.mscale", 1.7e308, "'rope_parameters.mscale' = 1.7e+308",
         "'rope_parameters.mscale_all_dim' = 1.0", edit=_rope(mscale=1.7e308, mscale_all_dim=1.0)),
    _bad("qwen2_yarn", "rope_parameters.factor", 1e-46),
    _bad("qwen2_mqa_tied_linear", "rope_parameters.factor", 1e-46),
    _bad("qwen2_yarn", "rope_parameters.factor", None, "yarn factor derived as max_position_embeddings 256 / "
         "original_max_position_embeddings 2147483647", edit=_rope(factor=None,
                                                                   original_max_position_embeddings=2 ** 31 - 1)),
    _bad("qwen2_yarn", "rope_parameters.original_max_position_embeddings", 10 ** 400,
         "field 'rope_parameters.original_max_position_embeddings' must be", "got 1000000000"),
    _bad("qwen2_yarn", "original_max_position_embeddings", 10 ** 400,
         "field 'original_max_position_embeddings' must be", "got 1000000000"),
    _bad("qwen2_yarn", "max_position_embeddings", 10 ** 400, "field 'max_position_embeddings' must be",
         "got 1000000000", edit=_drop(max_position_embeddings=10 ** 400, rope_parameters={
             "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1, "rope_theta": 1e4})),
    # windows: any value >= 2**63 overflowed torch.export; int32 plugin attributes need < 2**31
    _bad("gemma2", "sliding_window", 2 ** 70),
    _bad("qwen2_window", "sliding_window", 2 ** 64, edit=_drop("layer_types", use_sliding_window=True,
                                                               sliding_window=2 ** 64, max_window_layers=0)),
    _bad("qwen2_window", "sliding_window", 2 ** 40, edit=_drop("layer_types", use_sliding_window=False,
                                                               sliding_window=2 ** 40)),  # unused, but sane
    _bad("qwen3_moe_mixed", "sliding_window", 2 ** 63, edit=_set(use_sliding_window=True, sliding_window=2 ** 63)),
    # head_dim: RoPE's rotate_half needs an even one; sizes past int32 (float(hidden) / head_dim ** -0.5 overflow)
    _bad("qwen2_window", "head_dim", 7),
    _bad("qwen3_moe_mixed", "head_dim", 15),
    _bad("qwen2_window", "hidden_size", 28, "head_dim = hidden_size 28 / num_attention_heads 4 = 7",
         edit=_set(hidden_size=28)),
    _bad("qwen2_window", "head_dim", 2 ** 64),
    _bad("gemma2", "hidden_size", 10 ** 400, "field 'hidden_size' must be", "got 1000000000"),
    # fp32 ranges: a cap that rounds to 0 gives tanh(x / 0) * 0 = NaN, one past fp32 gives 0 * inf; the Gemma2
    # attention scale query_pre_attn_scalar ** -0.5; an rms_norm_eps that rounds to 0 gives NaN on a zero row
    _bad("gemma2", "attn_logit_softcapping", 1e-46),
    _bad("gemma2", "final_logit_softcapping", 1e-46),
    _bad("gemma2", "final_logit_softcapping", 1e40),
    _bad("gemma2", "query_pre_attn_scalar", 1e-46),
    _bad("gemma2", "query_pre_attn_scalar", 1e300),
    _bad("qwen2_window", "rms_norm_eps", 1e-46),
    _bad("gemma2", "rms_norm_eps", 1e-40),
]


@pytest.mark.parametrize("case, field, edit, expect", BAD)
def test_wrong_type_or_range_is_refused_by_name(case, field, edit, expect, copy_checkpoint, capsys):
    """The spec refuses the value with one UnsupportedConfigError naming field and value; the CLI prints it as
    `error: ...` and exits 2 (no traceback)."""
    from export.__main__ import main

    path = edit_config(copy_checkpoint(case), edit)
    with pytest.raises(UnsupportedConfigError) as e:
        load_spec(path)
    for text in expect:
        assert text in str(e.value), (field, str(e.value))
    capsys.readouterr()
    assert main(["verify", "--model", str(path), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect[0] in err and "Traceback" not in err, err


def test_every_read_field_has_a_wrong_value_row():
    """Each top-level field an adapter reads (on every case's config, v4 spellings and yarn included) has a row in
    BAD for that family, so a new field cannot be read without a type/range check being tested."""
    from tests.conftest import hf_config

    rows = {(CASES[p.values[0]][0], p.values[1].split(".")[0]) for p in BAD}
    missing = set()
    for case, (family, fields) in CASES.items():
        for extra in ({}, dict(rope_theta=10000.0, rope_scaling=None), dict(
                rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0}, original_max_position_embeddings=16,
                layer_types=None)):
            cfg = dict(hf_config(family, fields).to_dict(), **extra)
            f = _Fields(cfg)
            ADAPTERS[family](f)
            missing |= {(family, k) for k in f.read - (IGNORED - {"bos_token_id", "eos_token_id", "pad_token_id"})
                        if (family, k) not in rows}
    assert not missing, f"fields read by an adapter with no wrong-value row in BAD: {sorted(missing)}"


def test_valid_edge_values_are_accepted(checkpoints):
    """The readers are strict about types, not about values transformers accepts: ints for floats, null where
    transformers has a default, an unused window of 0, a list of eos ids."""
    cfg = json.loads((checkpoints("qwen2_window") / "config.json").read_text())
    spec = spec_from_config(dict(cfg, rms_norm_eps=1, num_key_value_heads=None, layer_types=None,
                                 use_sliding_window=False, sliding_window=0, eos_token_id=[0, 255], bos_token_id=255,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000}))
    assert (spec.rms_norm_eps, spec.num_kv_heads, spec.eos_token_ids, spec.bos_token_id) == (1.0, 4, (0, 255), 255)
    assert all(layer.window is None for layer in spec.layers) and spec.rope.theta == 10000.0
    assert isinstance(spec.rms_norm_eps, float) and isinstance(spec.rope.theta, float)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 1e6,
     "original_max_position_embeddings": 32768},  # Qwen2.5 / Qwen3 long context
    {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
     "rope_theta": 1e4, "original_max_position_embeddings": 4096},  # DeepSeek-style mscale
    {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.2, "rope_theta": 5e5, "truncate": False,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": None, "rope_theta": 1e6, "original_max_position_embeddings": 32768},
    {"rope_type": "linear", "factor": 0.5, "rope_theta": 1e4},
])
def test_usual_rope_values_pass_the_ranges_and_match_transformers(rope):
    """The sanity ranges refuse none of the usual RoPE settings, and the frequencies and cos/sin scale still equal
    transformers' own computation for them (head_dim 128, 131072 positions)."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = dict(_REQUIRED, hidden_size=512, max_position_embeddings=131072, rope_parameters=dict(rope))
    spec = spec_from_config(dict(fields, model_type="qwen2"))
    cfg = Qwen2Config(**fields)
    hf_freq, hf_scale = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    freq, scale = spec.rope.inv_freq_and_scale(spec.head_dim)
    assert spec.head_dim == 128 and torch.isfinite(freq).all()
    assert torch.equal(freq, hf_freq.float()) and scale == hf_scale


def test_real_model_values_pass_the_ranges():
    """Values shipped by real checkpoints sit inside the new bounds: long contexts (10M positions), vocabularies,
    eps values, Gemma2's scalars and caps."""
    big = spec_from_config(dict(_REQUIRED, model_type="qwen2", max_position_embeddings=10485760, vocab_size=262144,
                                rms_norm_eps=1e-12, use_sliding_window=True, sliding_window=10485760,
                                max_window_layers=0, rope_theta=5e8))
    assert big.max_position_embeddings == 10485760 and {layer.window for layer in big.layers} == {10485760}
    gemma = spec_from_config(dict(_REQUIRED, model_type="gemma2", query_pre_attn_scalar=224,
                                  attn_logit_softcapping=1e-3, final_logit_softcapping=1e6))
    assert (gemma.attn_softcap, gemma.final_softcap, gemma.attn_scale) == (1e-3, 1e6, 224 ** -0.5)
