"""ModelSpec: the one description of a decoder that every later stage reads.

What it does: turns a Hugging Face ``config.json`` (transformers v4 layout with ``rope_theta``/``rope_scaling``
or v5 layout with ``rope_parameters``) of a ``qwen2``, ``gemma2`` or ``qwen3_moe`` model into a frozen
:class:`ModelSpec`. Family differences are data: per-layer tuples (attention window, MLP kind) and a few global
switches. One small adapter per ``model_type`` fills it; each config field is read in exactly one place here.

Every field an adapter reads is validated where it is read, by type and range (small typed readers: ``_int``,
``_float``, ``_bool``, ``_str``, ``_dict``, ``_int_list``, ``_token_ids``), plus the cross-field checks the maths
needs (heads divisible by kv heads, hidden size by heads when head_dim is absent, top-k <= experts, layer_types
length and values, mlp_only_layers in range, token ids inside the vocabulary), plus sanity ranges where a value of
the right type would only overflow later or turn to inf/NaN in fp32 (positions and windows within int32, even
head_dim, rope_theta > 1, yarn parameters giving a finite correction range, softcaps and scales fp32 can hold;
see ``_within``). JSON types are taken literally:
``true`` is not an integer, ``2.0`` is not an integer, ``"false"`` is not a boolean, NaN/Infinity are not numbers;
an integer is accepted where a float is wanted. A bad value raises one :class:`UnsupportedConfigError` naming the
field and the value, e.g. ``config.json: field 'num_hidden_layers' must be an integer >= 1, got '2' (str)``.

What it does not do: it reads no weights (see ``checkpoint.py``) and builds no model (see ``model.py``); it does not
check values against build options (``--max-seq-len`` is checked against ``max_position_embeddings`` in build.py).
Unknown model types, unsupported RoPE types and fields that would change the maths but that we do not implement
(e.g. Qwen2 dual-chunk attention) raise :class:`UnsupportedConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts.paths import json_loads
from export.checkpoint import checkpoint_file


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
        factor = self.factor
        scale = self.yarn_scale()
        low, high = self.correction_dim(self.beta_fast, dim), self.correction_dim(self.beta_slow, dim)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers: prevent a singular ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrap_factor = 1 - ramp
        interp = 1.0 / (factor * pos_freqs)
        return interp * (1 - extrap_factor) + extrap * extrap_factor, float(scale)

    def yarn_scale(self) -> float:
        """yarn's cos/sin scale: attention_factor, else derived from factor (and mscale / mscale_all_dim)."""
        if self.attention_factor is not None:
            return self.attention_factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)

    def correction_dim(self, rot: float, dim: int) -> float:
        """transformers' find_correction_dim: the dimension whose wavelength fits `rot` rotations into the original
        context (yarn's ramp runs between those of beta_fast and beta_slow). May raise ValueError / OverflowError /
        ZeroDivisionError on values spec_from_config refuses."""
        orig = self.original_max_position_embeddings
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(self.theta))


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
    # The head on the body (TASKS): causal-lm = the LM head [V, H]; seq-cls / token-cls = ``score`` [labels, H]
    # (seq-cls pools the last non-padding token first); qa = ``qa_outputs`` [2, H] -> start and end logits.
    task: str = "causal-lm"
    id2label: tuple[str, ...] = ()  # seq-cls / token-cls: label names by id (num_labels = its length)
    head_bias: bool = False  # token-cls (token_classification_bias, default true) and qa heads carry a bias
    problem_type: str | None = None  # seq-cls: what the score is (classify.label_scores), as config.json says

    @property
    def num_labels(self) -> int:
        """Width of the task head: labels (classification), 2 (qa: start, end), 0 for the LM head."""
        return 2 if self.task == "qa" else len(self.id2label)

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
        d["id2label"] = tuple(d.get("id2label", ()))
        return ModelSpec(**d)


# ---------------------------------------------------------------------------------------------------------------
# Reading helpers: each adapter reads the fields it understands through _Fields, which remembers them; what is left
# is checked against IGNORED (fields that do not change inference maths) so an unknown field that matters cannot
# slip by.
# Every field goes through one typed reader (_int, _float, _bool, _str, _dict, ...) that checks type and range and
# raises one UnsupportedConfigError naming the field and the value. JSON types are taken literally: true is not
# an integer, "false" is not a boolean, 2.0 is not an integer (an integer is accepted where a float is wanted).

IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range", "use_cache",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_bidirectional_attention", "cache_implementation", "quantization_config_ignored", "name_or_path",
    "router_jitter_noise", "keys_to_ignore_at_inference", "classifier_dropout", "hidden_dropout",
    "quantization_config",  # how the weights are stored, not the maths: read by export/prequant_checkpoint.py
}

_REQUIRED = object()  # default of a reader: the field must be present and not null


class _Fields:
    """A config dict that remembers what was read, so unread fields can be reported. `prefix` names a nested
    object in messages (e.g. 'rope_parameters.')."""

    def __init__(self, config: dict[str, Any], prefix: str = ""):
        self.config = config
        self.prefix = prefix
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.config.get(key, default)

    def req(self, key: str) -> Any:
        self.read.add(key)
        if key not in self.config:
            raise UnsupportedConfigError(f"config.json: required field '{self.prefix}{key}' is missing")
        if self.config[key] is None:
            raise UnsupportedConfigError(f"config.json: required field '{self.prefix}{key}' is missing (null)")
        return self.config[key]

    def check_unread(self) -> None:
        left = sorted(k for k in self.config if k not in self.read and k not in IGNORED)
        if left:
            raise UnsupportedConfigError(
                f"config.json ({self.config.get('model_type')}): unsupported field(s) {left}; refusing to export "
                "rather than ignore something that may change the model's outputs"
            )


# Far above any model of these families (Qwen2.5-72B: 80 layers; Qwen3-235B: 128 experts), far below what would make
# the weight plan itself (a list of every expected tensor) exhaust memory before the checkpoint is compared with it.
MAX_LAYERS = 1024
MAX_EXPERTS = 1024
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
MAX_LABELS = 1 << 20  # a head of more labels than any vocabulary: num_labels alone must not size a tuple past that
# Positions (max_position_embeddings, original_max_position_embeddings, sliding_window) and tensor sizes: an int32.
# Far above any real model (10M-token contexts, 256k vocabularies), and what the graphs can carry (TensorRT plugin
# INT attributes such as the window are int32); a bigger value means nothing and only overflowed later (float(),
# torch.export's int64). --max-seq-len (build.py, MAX_SEQ_LEN) is a separate, smaller cap on what is built.
MAX_POSITIONS = (1 << 31) - 1
MAX_DIM = (1 << 31) - 1
# fp32 sanity ranges for floats used as divisors / multipliers in the graph (real models: softcaps 50 / 30,
# query_pre_attn_scalar 144 / 256, rope factors 2..64, yarn cos/sin scales ~1..1.5).
SOFTCAP_RANGE = (1e-3, 1e6)
QUERY_SCALAR_RANGE = (1e-3, 1e9)
ROPE_FACTOR_RANGE = (1e-3, 1e6)
ROPE_SCALE_RANGE = (1e-3, 1e2)
MAX_CORRECTION_DIM = float(1 << 53)  # yarn's floor/ceil of it must stay an exact int64 and a finite fp32
MIN_EPS = float(torch.finfo(torch.float32).tiny)  # the smallest normal fp32


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


def _bad(f: _Fields, key: str, want: str, value: Any) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json: field '{f.prefix}{key}' must be {want}, got {_show(value)}")


def _raw(f: _Fields, key: str, default: Any) -> Any:
    return f.req(key) if default is _REQUIRED else f.get(key, default)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(f: _Fields, key: str, default: Any = _REQUIRED, *, min: int | None = None, max: int | None = None,
         nullable: bool = False) -> int | None:
    """An integer field (JSON true/false and 2.0 are refused), optionally bounded; None only if `nullable`."""
    value = _raw(f, key, default)
    if value is None and nullable:
        return None
    if not _is_int(value) or (min is not None and value < min) or (max is not None and value > max):
        bound = (f" in [{min}, {max}]" if min is not None and max is not None else f" >= {min}" if min is not None
                 else f" <= {max}" if max is not None else "")
        raise _bad(f, key, "an integer" + bound + (" or null" if nullable else ""), value)
    return value


def _float(f: _Fields, key: str, default: Any = _REQUIRED, *, gt: float | None = None, ge: float | None = None,
           nullable: bool = False) -> float | None:
    """A finite number (an integer is accepted), above `gt` / at least `ge`; None only if `nullable`."""
    value = _raw(f, key, default)
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge)
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        bound = f" > {gt}" if gt is not None else f" >= {ge}" if ge is not None else ""
        raise _bad(f, key, "a finite number" + bound + (" or null" if nullable else ""), value)
    return float(value)


def _within(f: _Fields, key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
            why: str) -> Any:
    """A sanity range on a value its typed reader already accepted (None passes through): a value of the right type
    that would overflow later or turn to inf/NaN in fp32 is refused naming the field, the value and `why`. Kept
    apart from the readers so their messages for wrong types and signs stay as they are."""
    if value is None or ((lo is None or value >= lo) and (hi is None or value <= hi)):
        return value
    bound = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
    raise _bad(f, key, f"{bound} ({why})", value)


_POS_WHY = "a position count; larger than any context, and past int32"
_DIM_WHY = "a tensor dimension; past int32"
# transformers masks a key only when q - k >= sliding_window, so any window at or past the context already means
# full attention: every meaningful window fits MAX_POSITIONS. A larger one is refused rather than clamped (no
# checkpoint ships one, and it overflowed torch.export / the int32 plugin attribute instead of meaning anything).
_WINDOW_WHY = "a window in tokens; one >= max_position_embeddings already masks nothing, and past int32 overflows"


def _dim(f: _Fields, key: str, default: Any = _REQUIRED, *, min: int = 1, nullable: bool = False) -> int | None:
    """A tensor size: an integer >= min, at most MAX_DIM."""
    return _within(f, key, _int(f, key, default, min=min, nullable=nullable), hi=MAX_DIM, why=_DIM_WHY)


def _window(f: _Fields, min: int) -> int | None:
    """sliding_window (default 4096 as transformers), read and range-checked even where it is unused."""
    return _within(f, "sliding_window", _int(f, "sliding_window", 4096, min=min, nullable=True), hi=MAX_POSITIONS,
                   why=_WINDOW_WHY)


def _bool(f: _Fields, key: str, default: Any = _REQUIRED) -> bool:
    """JSON true / false only: the string "false" and 0 / 1 are refused (bool("false") would be True)."""
    value = _raw(f, key, default)
    if not isinstance(value, bool):
        raise _bad(f, key, "true or false", value)
    return value


def _str(f: _Fields, key: str, default: Any = _REQUIRED, *, nullable: bool = False) -> str | None:
    value = _raw(f, key, default)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise _bad(f, key, "a string" + (" or null" if nullable else ""), value)
    return value


def _dict(f: _Fields, key: str) -> _Fields | None:
    """An optional JSON object, returned as a _Fields whose messages name it ('key.sub'); null / absent -> None."""
    value = f.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(f, key, "an object ({...}) or null", value)
    return _Fields(value, prefix=f"{f.prefix}{key}.")


def _int_list(f: _Fields, key: str, *, min: int, max: int) -> list[int]:
    """An optional list of integers in [min, max]; null / absent -> []."""
    value = f.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and min <= v <= max for v in value):
        raise _bad(f, key, f"a list of integers in [{min}, {max}] or null", value)
    return value


def _token_ids(f: _Fields, key: str, vocab: int, many: bool = False) -> tuple[int, ...] | int | None:
    """A token id in [0, vocab) or null; with `many` also a list of them (returned as a tuple, null -> ())."""
    value = f.get(key)
    ok_id = lambda v: _is_int(v) and 0 <= v < vocab  # noqa: E731
    if many:
        if value is None:
            return ()
        if ok_id(value):
            return (value,)
        if isinstance(value, list) and all(ok_id(v) for v in value):
            return tuple(value)
        raise _bad(f, key, f"null, an integer in [0, {vocab - 1}] (vocab_size {vocab}) or a list of them", value)
    if value is None or ok_id(value):
        return value
    raise _bad(f, key, f"null or an integer in [0, {vocab - 1}] (vocab_size {vocab})", value)


def _rope(f: _Fields, max_position_embeddings: int, head_dim: int) -> RopeSpec:
    """RoPE from either layout: v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`.

    Precedence is transformers v5's: a non-empty `rope_scaling` replaces `rope_parameters` wholesale (it is not
    merged into it), then `rope_theta` comes from that dict, else the top-level field, else 10000.

    rope_theta must be > 1 for every type: yarn divides by log(theta) (transformers raises ZeroDivisionError at 1),
    theta <= 1 has no meaning as a RoPE base (frequencies all 1, or rising with the dimension), and one that rounds
    to 0 in fp32 makes inv_freq inf and cos(0 * inf) NaN at position 0 (in transformers too)."""
    params = _dict(f, "rope_parameters")
    scaling = _dict(f, "rope_scaling")
    top_theta = _float(f, "rope_theta", None, gt=1, nullable=True)
    if scaling is not None and scaling.config:
        params = scaling
    if params is None:
        params = _Fields({}, prefix="rope_parameters.")
    theta = _float(params, "rope_theta", None, gt=1, nullable=True)
    theta = theta if theta is not None else top_theta if top_theta is not None else 10000.0
    rope_type = (_str(params, "rope_type", None, nullable=True) or _str(params, "type", None, nullable=True)
                 or "default")
    if rope_type not in ("default", "linear", "yarn"):
        raise UnsupportedConfigError(
            f"config.json: rope type '{rope_type}' (rope_parameters.rope_type / rope_scaling.type) is not supported; "
            "supported: default, linear, yarn"
        )
    if _float(params, "partial_rotary_factor", 1.0, gt=0) != 1.0:
        raise UnsupportedConfigError("config.json: rope partial_rotary_factor != 1 is not supported")
    spec = RopeSpec(theta=theta, rope_type=rope_type)
    if rope_type == "default":
        return spec
    # fp32: inv_freq / factor, so a factor that rounds to 0 (or whose inverse overflows) is inf, and 0 * inf = NaN
    factor = _within(params, "factor", _float(params, "factor", None, gt=0, nullable=True), *ROPE_FACTOR_RANGE,
                     why="the RoPE frequencies are divided by it in fp32; outside this they overflow to inf / NaN")
    if rope_type == "linear":
        if factor is None:
            raise UnsupportedConfigError("config.json: linear rope scaling needs 'factor'")
        return dataclasses.replace(spec, factor=factor)
    if "factor" not in params.config:  # transformers refuses this (a null factor it derives, as below)
        raise UnsupportedConfigError("config.json: yarn rope scaling needs 'factor' (transformers refuses a yarn "
                                     "rope_parameters / rope_scaling without one)")
    # transformers gives a top-level `original_max_position_embeddings` priority over the one in the rope dict.
    def orig_field(g: _Fields) -> int | None:
        return _within(g, "original_max_position_embeddings",
                       _int(g, "original_max_position_embeddings", None, min=1, nullable=True), hi=MAX_POSITIONS,
                       why=_POS_WHY)

    orig = orig_field(f) or orig_field(params) or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / orig
        lo, hi = ROPE_FACTOR_RANGE
        if not lo <= factor <= hi:
            raise UnsupportedConfigError(
                f"config.json: yarn factor derived as max_position_embeddings {max_position_embeddings} / "
                f"original_max_position_embeddings {orig} = {factor:g} (field '{params.prefix}factor' is null) must "
                f"be in [{lo}, {hi}] (the RoPE frequencies are divided by it in fp32)")
    spec = dataclasses.replace(
        spec,
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=_float(params, "beta_fast", None, gt=0, nullable=True) or 32.0,
        beta_slow=_float(params, "beta_slow", None, gt=0, nullable=True) or 1.0,
        attention_factor=_float(params, "attention_factor", None, gt=0, nullable=True),
        mscale=_float(params, "mscale", None, ge=0, nullable=True),
        mscale_all_dim=_float(params, "mscale_all_dim", None, ge=0, nullable=True),
        truncate=_bool(params, "truncate", True),
    )
    _check_yarn(params, spec, head_dim)
    return spec


def _check_yarn(params: _Fields, spec: RopeSpec, head_dim: int) -> None:
    """What RopeSpec.inv_freq_and_scale will compute from the yarn fields must be finite: each beta's correction
    dimension (floor/ceil'd into an int64, then used in fp32; a beta that underflows or overflows 2*pi*beta gave
    OverflowError or 'math domain error') and the cos/sin scale (cos and sin are multiplied by it)."""
    for key, beta in (("beta_fast", spec.beta_fast), ("beta_slow", spec.beta_slow)):
        try:
            d = spec.correction_dim(beta, head_dim)
        except (ValueError, OverflowError, ZeroDivisionError):
            d = math.nan
        if not (math.isfinite(d) and abs(d) <= MAX_CORRECTION_DIM):
            raise _bad(params, key, "a number whose yarn correction dimension head_dim * ln(original_max_position_"
                       f"embeddings / (2*pi*{key})) / (2 * ln(rope_theta)) is finite, within +-2**53 (here head_dim "
                       f"{head_dim}, original_max_position_embeddings {spec.original_max_position_embeddings}, "
                       f"rope_theta {spec.theta!r}: {d!r})", beta)
    try:
        scale = spec.yarn_scale()
    except (ValueError, OverflowError, ZeroDivisionError):
        scale = math.nan
    lo, hi = ROPE_SCALE_RANGE
    if math.isfinite(scale) and lo <= scale <= hi:
        return
    why = "cos and sin are multiplied by it: outside this q and k overflow fp16 or vanish"
    if spec.attention_factor is not None:
        raise _bad(params, "attention_factor", f"in [{lo}, {hi}] ({why})", spec.attention_factor)
    raise UnsupportedConfigError(
        f"config.json: yarn cos/sin scale get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) = "
        f"{scale!r} from fields '{params.prefix}mscale' = {spec.mscale!r}, '{params.prefix}mscale_all_dim' = "
        f"{spec.mscale_all_dim!r} (factor {spec.factor!r}) must be finite and in [{lo}, {hi}] ({why})")


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _act(name: str, key: str) -> str:
    """Our name for the activation `name` read from field `key`."""
    if name not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"config.json: field '{key}': activation '{name}' is not supported "
                                     f"(supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_windows(f: _Fields, n: int, sliding_window: int | None, default_types: list[str]) -> list[int | None]:
    types = f.get("layer_types")
    if types is None:
        types = default_types
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise _bad(f, "layer_types", f"a list of {n} strings ({', '.join(_LAYER_TYPES)}) or null", types)
    if len(types) != n:
        raise UnsupportedConfigError(f"config.json: layer_types has {len(types)} entries for {n} layers "
                                     "(num_hidden_layers)")
    windows = []
    for i, t in enumerate(types):
        if t == "full_attention":
            windows.append(None)
        elif t == "sliding_attention":
            if sliding_window is None:
                raise UnsupportedConfigError(f"config.json: layer {i} is sliding_attention but sliding_window is unset")
            windows.append(sliding_window)
        else:
            raise UnsupportedConfigError(f"config.json: layer_types[{i}] = '{t}' is not supported; supported: "
                                         f"{', '.join(_LAYER_TYPES)}")
    return windows


def _same_or_absent(f: _Fields, key: str, value: Any, used: str) -> None:
    """Read an alias field that transformers ignores; refuse it when it contradicts the field actually used."""
    other = f.get(key)
    if other is not None and other != value:
        raise UnsupportedConfigError(
            f"config.json: '{key}' = {other!r} contradicts '{used}' = {value!r} (transformers uses '{used}'); "
            "refusing to guess which one the checkpoint was trained with"
        )


def _common(f: _Fields, default_head_dim: int | None = None, default_tie: bool = False) -> dict[str, Any]:
    """The fields every family reads, with the cross-field checks the attention maths needs."""
    heads = _dim(f, "num_attention_heads")
    hidden = _dim(f, "hidden_size")
    kv = _dim(f, "num_key_value_heads", None, nullable=True) or heads  # null: MHA, as transformers
    if heads % kv:
        raise UnsupportedConfigError(f"config.json: num_attention_heads {heads} not a multiple of kv heads {kv} "
                                     "(fields 'num_attention_heads', 'num_key_value_heads')")
    head_dim = _dim(f, "head_dim", default_head_dim, nullable=True)
    # RoPE rotates pairs of dimensions (rotate_half splits head_dim in halves): an odd head_dim cannot be rotated
    # (transformers fails too; here torch.export did, after the weights were read).
    if head_dim is None:
        if hidden % heads:
            raise UnsupportedConfigError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads "
                                         f"{heads} and field 'head_dim' is not set (head_dim = hidden_size / "
                                         "num_attention_heads)")
        head_dim = hidden // heads
        if head_dim % 2:
            raise UnsupportedConfigError(
                f"config.json: head_dim = hidden_size {hidden} / num_attention_heads {heads} = {head_dim} is odd "
                "(fields 'hidden_size', 'num_attention_heads'; 'head_dim' is not set); RoPE rotates pairs of "
                "dimensions, so head_dim must be even")
    elif head_dim % 2:
        raise _bad(f, "head_dim", "an even integer (RoPE rotates pairs of dimensions)", head_dim)
    vocab = _dim(f, "vocab_size")
    max_pos = _within(f, "max_position_embeddings", _int(f, "max_position_embeddings", min=2), hi=MAX_POSITIONS,
                      why=_POS_WHY)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=_dim(f, "intermediate_size"),
        rms_norm_eps=_within(f, "rms_norm_eps", _float(f, "rms_norm_eps", 1e-6, gt=0), MIN_EPS,
                             why="the smallest normal fp32: rms_norm adds it in fp32, and a smaller one rounds to 0 "
                                 "or a subnormal (flushed to 0 on GPUs), so an all-zero row gives 0 * inf = NaN"),
        rope=_rope(f, max_pos, head_dim),
        max_position_embeddings=max_pos,
        tie_embeddings=_bool(f, "tie_word_embeddings", default_tie),
        bos_token_id=_token_ids(f, "bos_token_id", vocab),
        eos_token_ids=_token_ids(f, "eos_token_id", vocab, many=True),
        pad_token_id=_token_ids(f, "pad_token_id", vocab),
    )


def _qwen2(f: _Fields) -> ModelSpec:
    if _bool(f, "use_mrope", False):
        raise UnsupportedConfigError("config.json: use_mrope (multimodal RoPE) is not supported")
    dual_chunk = _dict(f, "dual_chunk_attention_config")
    if dual_chunk is not None and dual_chunk.config:
        raise UnsupportedConfigError("config.json: dual_chunk_attention_config is not supported")
    c = _common(f)
    n = _int(f, "num_hidden_layers", min=1, max=MAX_LAYERS)
    # Defaults are transformers' Qwen2Config ones (sliding_window 4096, max_window_layers 28): a config that turns
    # the window on without naming its size or first layer gets what transformers runs. An unused window may be 0.
    use_window = _bool(f, "use_sliding_window", False)
    window = _window(f, min=1 if use_window else 0)
    window = window if use_window else None
    mwl = _int(f, "max_window_layers", 28, min=0, nullable=True)
    if window and mwl is None:
        raise UnsupportedConfigError("config.json: use_sliding_window is set but max_window_layers is null")
    default_types = ["sliding_attention" if window and i >= mwl else "full_attention" for i in range(n)]
    windows = _layer_windows(f, n, window, default_types)
    return ModelSpec(
        model_type="qwen2", **c,
        layers=tuple(LayerSpec(w, "dense") for w in windows),
        hidden_act=_act(_str(f, "hidden_act", "silu"), "hidden_act"),
        attn_scale=c["head_dim"] ** -0.5,
        qkv_bias=True,
    )


def _softcap(f: _Fields, key: str, default: float) -> float | None:
    """tanh(x / cap) * cap in fp32: a cap that rounds to 0 gives tanh(inf) * 0 = NaN (a tiny one sends x / cap to
    inf), one past fp32 gives tanh(0) * inf = NaN; Gemma2 ships 50 and 30. Null turns the cap off."""
    return _within(f, key, _float(f, key, default, gt=0, nullable=True), *SOFTCAP_RANGE,
                   why="logits / cap is computed in fp32: a smaller cap sends it to inf and NaN, a larger one to 0")


def _gemma2(f: _Fields) -> ModelSpec:
    # Gemma2Config defaults head_dim to 256 (not hidden // heads) and ties the embeddings unless told otherwise.
    c = _common(f, default_head_dim=256, default_tie=True)
    n = _int(f, "num_hidden_layers", min=1, max=MAX_LAYERS)
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    # transformers' Gemma2 reads only `hidden_activation` (default gelu_pytorch_tanh) and only `sliding_window`
    # (default 4096); the older `hidden_act` / `sliding_window_size` that some configs also carry are accepted
    # when they agree and refused when they would say something different.
    act = _str(f, "hidden_activation", "gelu_pytorch_tanh")
    _same_or_absent(f, "hidden_act", act, "hidden_activation")
    sliding = _window(f, min=1)
    _same_or_absent(f, "sliding_window_size", sliding, "sliding_window")
    windows = _layer_windows(f, n, sliding, default_types)
    if _bool(f, "attention_bias", False):
        raise UnsupportedConfigError("config.json: attention_bias=true is not supported for gemma2")
    return ModelSpec(
        model_type="gemma2", **c,
        layers=tuple(LayerSpec(w, "dense") for w in windows),
        hidden_act=_act(act, "hidden_activation"),
        attn_scale=_within(f, "query_pre_attn_scalar", _float(f, "query_pre_attn_scalar", gt=0),
                           *QUERY_SCALAR_RANGE, why="the attention scale is its ** -0.5, applied in fp32") ** -0.5,
        sandwich_norm=True,
        norm_offset=1.0,
        embed_scale=float(c["hidden_size"]) ** 0.5,
        # transformers' defaults when absent; an explicit null turns a cap off
        attn_softcap=_softcap(f, "attn_logit_softcapping", 50.0),
        final_softcap=_softcap(f, "final_logit_softcapping", 30.0),
    )


def _qwen3_moe(f: _Fields) -> ModelSpec:
    c = _common(f)
    n = _int(f, "num_hidden_layers", min=1, max=MAX_LAYERS)
    # transformers v5 applies the window to every layer when use_sliding_window is set (max_window_layers unused).
    _int(f, "max_window_layers", None, min=0, nullable=True)
    use_window = _bool(f, "use_sliding_window", False)
    window = _window(f, min=1 if use_window else 0)
    window = window if use_window else None
    experts_v4 = _int(f, "num_experts", None, min=0, max=MAX_EXPERTS, nullable=True)
    experts_v5 = _int(f, "num_local_experts", None, min=0, max=MAX_EXPERTS, nullable=True)  # v5 renamed the field
    if experts_v4 is not None and experts_v5 is not None and experts_v4 != experts_v5:
        raise UnsupportedConfigError(
            f"config.json: num_experts ({experts_v4}) and num_local_experts ({experts_v5}) disagree")
    experts = 128 if experts_v4 is None and experts_v5 is None else (experts_v4 or experts_v5 or 0)  # HF default
    step = _int(f, "decoder_sparse_step", 1, min=1)
    mlp_only = set(_int_list(f, "mlp_only_layers", min=0, max=n - 1))
    mlps = ["moe" if (i not in mlp_only and experts > 0 and (i + 1) % step == 0) else "dense" for i in range(n)]
    if experts:
        top_k = _int(f, "num_experts_per_tok", min=1)
        if top_k > experts:
            raise UnsupportedConfigError(f"config.json: field 'num_experts_per_tok' = {top_k} exceeds the number of "
                                         f"experts {experts} (num_experts / num_local_experts)")
        moe_size = _dim(f, "moe_intermediate_size")
    else:  # no MoE layer: the expert fields are moot (type-checked, and read so they are not reported as unknown)
        _int(f, "num_experts_per_tok", None, min=0, nullable=True)
        _int(f, "moe_intermediate_size", None, min=0, nullable=True)
        top_k = moe_size = 0
    if _bool(f, "attention_bias", False):
        raise UnsupportedConfigError("config.json: attention_bias=true is not supported for qwen3_moe")
    return ModelSpec(
        model_type="qwen3_moe", **c,
        layers=tuple(LayerSpec(window, m) for m in mlps),
        hidden_act=_act(_str(f, "hidden_act", "silu"), "hidden_act"),
        attn_scale=c["head_dim"] ** -0.5,
        qk_norm=True,
        num_experts=experts,
        top_k=top_k,
        norm_topk_prob=_bool(f, "norm_topk_prob", False),
        moe_intermediate_size=moe_size,
    )


ADAPTERS = {"qwen2": _qwen2, "gemma2": _gemma2, "qwen3_moe": _qwen3_moe}

# The task heads transformers defines per family (its classes are f"{prefix}For{...}"): Gemma2 has no QA head.
_ARCH_SUFFIX = {"ForCausalLM": "causal-lm", "ForSequenceClassification": "seq-cls",
                "ForTokenClassification": "token-cls", "ForQuestionAnswering": "qa"}
FAMILY_TASKS = {"qwen2": ("Qwen2", ("causal-lm", "seq-cls", "token-cls", "qa")),
                "gemma2": ("Gemma2", ("causal-lm", "seq-cls", "token-cls")),
                "qwen3_moe": ("Qwen3Moe", ("causal-lm", "seq-cls", "token-cls", "qa"))}


def _task(f: _Fields, model_type: str, requested: str | None) -> str:
    """The head: from ``architectures`` (transformers' class names), or `requested` (``--task``) when the config
    names none; a request that contradicts the config, an unknown class or a head the family lacks is refused."""
    prefix, defined = FAMILY_TASKS[model_type]
    archs = f.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise _bad(f, "architectures", "a list of class names", archs)
    found = set()
    for arch in archs or []:
        task = next((t for suffix, t in _ARCH_SUFFIX.items() if arch == prefix + suffix and t in defined), None)
        if task is None:
            known = ", ".join(prefix + s for s, t in _ARCH_SUFFIX.items() if t in defined)
            raise UnsupportedConfigError(f"config.json: architectures names {arch!r}, which this exporter does not "
                                         f"build for model_type {model_type!r}; supported: {known}")
        found.add(task)
    if len(found) > 1:
        raise UnsupportedConfigError(f"config.json: architectures {archs} name more than one head; keep one")
    named = found.pop() if found else None
    if requested is not None and named is not None and requested != named:
        raise UnsupportedConfigError(f"--task {requested} contradicts config.json architectures {archs} "
                                     f"(a {named} checkpoint)")
    task = requested or named or "causal-lm"
    if task not in defined:
        raise UnsupportedConfigError(f"--task {task}: transformers defines no {task} head for {model_type} "
                                     f"(it has: {', '.join(defined)})")
    return task


def _labels(f: _Fields) -> tuple[str, ...]:
    """id2label as a tuple by id: keys "0".."n-1" (JSON object keys are strings), string values; label2id, when
    present, must be its inverse; num_labels, when present, its length. transformers' default is two labels."""
    raw = f.get("id2label")
    num = f.get("num_labels")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_LABELS):
        raise _bad(f, "num_labels", f"an integer in [1, {MAX_LABELS}]", num)
    if raw is None:  # transformers names them LABEL_i, num_labels of them (2 by default)
        labels = tuple(f"LABEL_{i}" for i in range(2 if num is None else num))
    else:
        if not isinstance(raw, dict) or not raw:
            raise _bad(f, "id2label", "a non-empty object {\"0\": label, ...}", raw)
        by_id = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not re.fullmatch(r"[0-9]+", key, re.ASCII) or not isinstance(value, str):
                raise _bad(f, "id2label", "an object of \"id\": \"label\" strings", raw)
            by_id[int(key)] = value
        if sorted(by_id) != list(range(len(by_id))):
            raise _bad(f, "id2label", f"ids 0..{len(by_id) - 1} with none missing", raw)
        labels = tuple(by_id[i] for i in range(len(by_id)))
    label2id = f.get("label2id")
    if label2id is not None and label2id != {name: i for i, name in enumerate(labels)}:
        raise UnsupportedConfigError(f"config.json: label2id {_show(label2id)} is not the inverse of id2label "
                                     f"{list(labels)}")
    if num is not None and num != len(labels):
        raise UnsupportedConfigError(f"config.json: num_labels {_show(num)} but id2label has {len(labels)} labels")
    return labels


def spec_from_config(config: dict[str, Any], task: str | None = None) -> ModelSpec:
    if not isinstance(config, dict):
        raise UnsupportedConfigError(f"config.json: must be a JSON object ({{...}}), got {_show(config)}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise UnsupportedConfigError(
            f"config.json: model_type {model_type!r} is not supported; supported: {sorted(ADAPTERS)}"
        )
    f = _Fields(config)
    spec = ADAPTERS[model_type](f)
    head = _task(f, model_type, task)
    token_bias = _bool(f, "token_classification_bias", True)
    if head in ("seq-cls", "token-cls"):
        problem = f.get("problem_type")
        if problem is not None and problem not in PROBLEM_TYPES:
            raise _bad(f, "problem_type", f"one of {list(PROBLEM_TYPES)} or null", problem)
        spec = dataclasses.replace(spec, task=head, id2label=_labels(f), head_bias=head == "token-cls" and token_bias,
                                   problem_type=problem if head == "seq-cls" else None)
    elif head == "qa":
        spec = dataclasses.replace(spec, task=head, head_bias=True)
    f.check_unread()
    return spec


def load_spec(model_dir: str | Path, task: str | None = None) -> ModelSpec:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: checkpoint directory does not exist")
    path = checkpoint_file(Path(model_dir), "config.json")  # a link leading out of the checkpoint is refused
    if path is None:
        raise FileNotFoundError(f"{Path(model_dir) / 'config.json'}: config.json not found in the checkpoint "
                                "directory")
    try:
        config = json_loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UnsupportedConfigError(f"{path}: not valid JSON ({e})") from None
    return spec_from_config(config, task)
