"""ModelSpec: the one description of a decoder that every later stage reads.

What it does: turns a Hugging Face ``config.json`` (transformers v4 layout with ``rope_theta``/``rope_scaling``
or v5 layout with ``rope_parameters``) of a ``qwen2``, ``gemma2`` or ``qwen3_moe`` model into a frozen
:class:`ModelSpec`. Family differences are data: per-layer tuples (attention window, MLP kind) and a few global
switches. One small adapter per ``model_type`` fills it; each config field is read in exactly one place here.

What it does not do: it reads no weights (see ``checkpoint.py``) and builds no model (see ``model.py``).
Unknown model types, unsupported RoPE types and fields that would change the maths but that we do not implement
(e.g. Qwen2 dual-chunk attention) raise :class:`UnsupportedConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class UnsupportedConfigError(ValueError):
    """A config value we refuse rather than silently mis-export."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"  # default | linear | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: scales cos/sin; None means derived from factor
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def inv_freq_and_scale(self, head_dim: int) -> tuple[torch.Tensor, float]:
        """fp32 inverse frequencies [head_dim // 2] and the cos/sin scale, computed with transformers' ops."""
        dim = head_dim
        pos_freqs = self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
        extrap = 1.0 / pos_freqs
        if self.rope_type == "default":
            return extrap, 1.0
        if self.rope_type == "linear":
            return extrap / self.factor, 1.0
        assert self.rope_type == "yarn", self.rope_type
        factor, orig = self.factor, self.original_max_position_embeddings

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scale = self.attention_factor
        if scale is None:
            if self.mscale and self.mscale_all_dim:
                scale = get_mscale(factor, self.mscale) / get_mscale(factor, self.mscale_all_dim)
            else:
                scale = get_mscale(factor)

        def correction_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers: prevent a singular ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrap_factor = 1 - ramp
        interp = 1.0 / (factor * pos_freqs)
        return interp * (1 - extrap_factor) + extrap * extrap_factor, float(scale)


@dataclass(frozen=True)
class LayerSpec:
    window: int | None  # sliding-window size in tokens (query sees keys with q_pos - k_pos < window); None = full
    mlp: str  # "dense" | "moe"


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width
    rms_norm_eps: float
    rope: RopeSpec
    layers: tuple[LayerSpec, ...]
    max_position_embeddings: int
    tie_embeddings: bool
    hidden_act: str  # "silu" | "gelu_tanh"
    attn_scale: float
    qkv_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sandwich_norm: bool = False  # extra RMSNorm after attention and after the MLP (Gemma2)
    norm_offset: float = 0.0  # RMSNorm weight used as (offset + w) (Gemma2: 1)
    embed_scale: float | None = None  # embeddings multiplied by this, in the activation dtype (Gemma2: sqrt(hidden))
    attn_softcap: float | None = None  # tanh cap on attention scores
    final_softcap: float | None = None  # tanh cap on the logits, after the LM head
    num_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = False
    moe_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.mlp == "moe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return ModelSpec(**d)


# ---------------------------------------------------------------------------------------------------------------
# Reading helpers: each adapter pops the fields it understands from a copy of the config; what is left is checked
# against IGNORED (fields that do not change inference maths) so an unknown field that matters cannot slip by.

IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range", "use_cache",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_bidirectional_attention", "cache_implementation", "quantization_config_ignored", "name_or_path",
    "router_jitter_noise", "keys_to_ignore_at_inference",
}


class _Fields:
    """A config dict that remembers what was read, so unread fields can be reported."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.config.get(key, default)

    def req(self, key: str) -> Any:
        self.read.add(key)
        if key not in self.config or self.config[key] is None:
            raise UnsupportedConfigError(f"config.json: required field '{key}' is missing")
        return self.config[key]

    def check_unread(self) -> None:
        left = sorted(k for k in self.config if k not in self.read and k not in IGNORED)
        if left:
            raise UnsupportedConfigError(
                f"config.json ({self.config.get('model_type')}): unsupported field(s) {left}; refusing to export "
                "rather than ignore something that may change the model's outputs"
            )


def _rope(f: _Fields) -> RopeSpec:
    """RoPE from either layout: v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`.

    Precedence is transformers v5's: a non-empty `rope_scaling` replaces `rope_parameters` wholesale (it is not
    merged into it), then `rope_theta` comes from that dict, else the top-level field, else 10000."""
    params = dict(f.get("rope_parameters") or {})
    scaling = f.get("rope_scaling")
    theta = f.get("rope_theta")
    if scaling:
        params = dict(scaling)
    if theta is not None:
        params.setdefault("rope_theta", theta)
    if params.get("rope_theta") is None:
        params["rope_theta"] = 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ("default", "linear", "yarn"):
        raise UnsupportedConfigError(
            f"config.json: rope type '{rope_type}' (rope_parameters.rope_type / rope_scaling.type) is not supported; "
            "supported: default, linear, yarn"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("config.json: rope partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    spec = RopeSpec(theta=float(params.pop("rope_theta")), rope_type=rope_type)
    if rope_type == "default":
        return spec
    factor = params.pop("factor", None)
    if rope_type == "linear":
        if factor is None:
            raise UnsupportedConfigError("config.json: linear rope scaling needs 'factor'")
        return dataclasses.replace(spec, factor=float(factor))
    # transformers gives a top-level `original_max_position_embeddings` priority over the one in the rope dict.
    orig = f.get("original_max_position_embeddings") or params.pop("original_max_position_embeddings", None) or f.get(
        "max_position_embeddings")
    if factor is None:
        factor = f.get("max_position_embeddings") / orig
    return dataclasses.replace(
        spec,
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.pop("beta_fast", None) or 32.0),
        beta_slow=float(params.pop("beta_slow", None) or 1.0),
        attention_factor=params.pop("attention_factor", None),
        mscale=params.pop("mscale", None),
        mscale_all_dim=params.pop("mscale_all_dim", None),
        truncate=bool(params.pop("truncate", True)),
    )


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _act(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if name not in table:
        raise UnsupportedConfigError(f"config.json: activation '{name}' is not supported (supported: {sorted(table)})")
    return table[name]


def _layer_windows(f: _Fields, n: int, sliding_window: int | None, default_types: list[str]) -> list[int | None]:
    types = f.get("layer_types") or default_types
    if len(types) != n:
        raise UnsupportedConfigError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    windows = []
    for i, t in enumerate(types):
        if t == "full_attention":
            windows.append(None)
        elif t == "sliding_attention":
            if not sliding_window:
                raise UnsupportedConfigError(f"config.json: layer {i} is sliding_attention but sliding_window is unset")
            windows.append(int(sliding_window))
        else:
            raise UnsupportedConfigError(f"config.json: layer_types[{i}] = '{t}' is not supported")
    return windows


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _same_or_absent(f: _Fields, key: str, value: Any, used: str) -> None:
    """Read an alias field that transformers ignores; refuse it when it contradicts the field actually used."""
    other = f.get(key)
    if other is not None and other != value:
        raise UnsupportedConfigError(
            f"config.json: '{key}' = {other!r} contradicts '{used}' = {value!r} (transformers uses '{used}'); "
            "refusing to guess which one the checkpoint was trained with"
        )


def _common(f: _Fields, default_head_dim: int | None = None) -> dict[str, Any]:
    heads = f.req("num_attention_heads")
    hidden = f.req("hidden_size")
    kv = f.get("num_key_value_heads") or heads
    if heads % kv:
        raise UnsupportedConfigError(f"config.json: num_attention_heads {heads} not a multiple of kv heads {kv}")
    return dict(
        vocab_size=f.req("vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=f.get("head_dim", default_head_dim) or hidden // heads,
        intermediate_size=f.req("intermediate_size"),
        rms_norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        rope=_rope(f),
        max_position_embeddings=f.req("max_position_embeddings"),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        bos_token_id=f.get("bos_token_id"),
        eos_token_ids=_eos(f.get("eos_token_id")),
        pad_token_id=f.get("pad_token_id"),
    )


def _qwen2(f: _Fields) -> ModelSpec:
    if f.get("use_mrope"):
        raise UnsupportedConfigError("config.json: use_mrope (multimodal RoPE) is not supported")
    if f.get("dual_chunk_attention_config"):
        raise UnsupportedConfigError("config.json: dual_chunk_attention_config is not supported")
    c = _common(f)
    n = f.req("num_hidden_layers")
    # Defaults are transformers' Qwen2Config ones (sliding_window 4096, max_window_layers 28): a config that turns
    # the window on without naming its size or first layer gets what transformers runs.
    window, use_window = f.get("sliding_window", 4096), f.get("use_sliding_window", False)
    window = window if use_window else None
    mwl = f.get("max_window_layers", 28)
    if window and mwl is None:
        raise UnsupportedConfigError("config.json: use_sliding_window is set but max_window_layers is null")
    default_types = ["sliding_attention" if window and i >= mwl else "full_attention" for i in range(n)]
    windows = _layer_windows(f, n, window, default_types)
    return ModelSpec(
        model_type="qwen2", **c,
        layers=tuple(LayerSpec(w, "dense") for w in windows),
        hidden_act=_act(f.get("hidden_act", "silu")),
        attn_scale=c["head_dim"] ** -0.5,
        qkv_bias=True,
    )


def _gemma2(f: _Fields) -> ModelSpec:
    c = _common(f, default_head_dim=256)  # Gemma2Config defaults head_dim to 256, not hidden // heads
    c["tie_embeddings"] = bool(f.get("tie_word_embeddings", True))
    n = f.req("num_hidden_layers")
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    # transformers' Gemma2 reads only `hidden_activation` (default gelu_pytorch_tanh) and only `sliding_window`
    # (default 4096); the older `hidden_act` / `sliding_window_size` that some configs also carry are accepted
    # when they agree and refused when they would say something different.
    act = f.get("hidden_activation", "gelu_pytorch_tanh")
    _same_or_absent(f, "hidden_act", act, "hidden_activation")
    sliding = f.get("sliding_window", 4096)
    _same_or_absent(f, "sliding_window_size", sliding, "sliding_window")
    windows = _layer_windows(f, n, sliding, default_types)
    if f.get("attention_bias", False):
        raise UnsupportedConfigError("config.json: attention_bias=true is not supported for gemma2")
    return ModelSpec(
        model_type="gemma2", **c,
        layers=tuple(LayerSpec(w, "dense") for w in windows),
        hidden_act=_act(act),
        attn_scale=float(f.req("query_pre_attn_scalar")) ** -0.5,
        sandwich_norm=True,
        norm_offset=1.0,
        embed_scale=float(c["hidden_size"]) ** 0.5,
        attn_softcap=_opt_float(f.get("attn_logit_softcapping", 50.0)),  # transformers' defaults when absent;
        final_softcap=_opt_float(f.get("final_logit_softcapping", 30.0)),  # an explicit null turns a cap off
    )


def _qwen3_moe(f: _Fields) -> ModelSpec:
    c = _common(f)
    n = f.req("num_hidden_layers")
    # transformers v5 applies the window to every layer when use_sliding_window is set (max_window_layers unused).
    f.get("max_window_layers")
    window, use_window = f.get("sliding_window", 4096), f.get("use_sliding_window", False)
    window = window if use_window else None
    experts_v4, experts_v5 = f.get("num_experts"), f.get("num_local_experts")  # v5 renamed the field
    if experts_v4 is not None and experts_v5 is not None and experts_v4 != experts_v5:
        raise UnsupportedConfigError(
            f"config.json: num_experts ({experts_v4}) and num_local_experts ({experts_v5}) disagree")
    experts = 128 if experts_v4 is None and experts_v5 is None else (experts_v4 or experts_v5 or 0)  # HF default
    step = f.get("decoder_sparse_step", 1)
    mlp_only = set(f.get("mlp_only_layers") or [])
    mlps = ["moe" if (i not in mlp_only and experts > 0 and (i + 1) % step == 0) else "dense" for i in range(n)]
    if not experts:  # no MoE layer: the expert fields are moot (read here so they are not reported as unknown)
        f.get("num_experts_per_tok"), f.get("moe_intermediate_size")
    if f.get("attention_bias", False):
        raise UnsupportedConfigError("config.json: attention_bias=true is not supported for qwen3_moe")
    return ModelSpec(
        model_type="qwen3_moe", **c,
        layers=tuple(LayerSpec(int(window) if window else None, m) for m in mlps),
        hidden_act=_act(f.get("hidden_act", "silu")),
        attn_scale=c["head_dim"] ** -0.5,
        qk_norm=True,
        num_experts=int(experts),
        top_k=int(f.req("num_experts_per_tok")) if experts else 0,
        norm_topk_prob=bool(f.get("norm_topk_prob", False)),
        moe_intermediate_size=int(f.req("moe_intermediate_size")) if experts else 0,
    )


ADAPTERS = {"qwen2": _qwen2, "gemma2": _gemma2, "qwen3_moe": _qwen3_moe}


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise UnsupportedConfigError(
            f"config.json: model_type '{model_type}' is not supported; supported: {sorted(ADAPTERS)}"
        )
    f = _Fields(config)
    spec = ADAPTERS[model_type](f)
    f.check_unread()
    return spec


def load_spec(model_dir: str | Path) -> ModelSpec:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: checkpoint directory does not exist")
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config.json not found in the checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise UnsupportedConfigError(f"{path}: not valid JSON ({e})") from None
    return spec_from_config(config)
