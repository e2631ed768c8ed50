"""Pre-quantized Hugging Face checkpoints: read their ``quantization_config`` and unpack their tensors exactly.

What it does:

* :func:`detect` turns ``config.json``'s ``quantization_config`` (or an AutoGPTQ ``quantize_config.json``) into a
  frozen, validated :class:`PreQuant`: the method (``gptq``, ``awq``, ``compressed-tensors``, ``fp8``), bits, group
  size, symmetry, act-order, the GPTQ format version, the layers left in float (``modules_to_not_convert``, the LM
  head, the MoE router, GPTQModel's ``dynamic`` ``-:`` rules, compressed-tensors' ``ignore``) and the per-layer
  overrides (GPTQModel's ``dynamic``, compressed-tensors' ``config_groups``). :meth:`PreQuant.scheme_for` gives the
  :class:`LinearScheme` of one linear (None = float), :func:`resolve_linear` checks that against the tensors the
  checkpoint holds, and :func:`tensor_names` lists what one linear needs.
* :func:`unpack` turns the stored tensors of one linear into :class:`Unpacked` -- the integers ``q [out, in]`` and
  zero points ``[out, groups]`` as int8 *signed* values (stored value - 2^(bits-1), the form of
  ``graphs.quantize.quantize_rtn``, so ``graphs.quantize.pack_nbits`` gives MatMulNBits' ``B`` directly), the scales
  ``[out, groups]`` and ``g_idx [in]`` -- or, for FP8, :class:`UnpackedFP8` (the float8 values and the block
  multipliers). :func:`dequantize` is each format's own dequantization, ``(q - z) * s[g_idx]`` (FP8:
  ``w * scale_inv`` per block), in float32: exact, because every product of a small integer (or an e4m3 value) and an
  fp16/bf16 scale is representable in float32, so rounding it to fp16/bf16 gives bit for bit what the libraries
  compute in those dtypes. :func:`sort_by_group` and :func:`matmul_nbits_zero_points` give the remaining
  MatMulNBits inputs (its ``g_idx`` input is deprecated: act-order columns are permuted instead).

The layouts (each cross-checked in tests/test_prequant.py against the library that writes it):

* GPTQ (AutoGPTQ, GPTQModel): ``qweight`` int32 ``[in*bits/32, out]``, value j of word r is input ``(32/bits)*r + j``
  at bits ``bits*j``; ``qzeros`` int32 ``[groups, out*bits/32]`` packed the same way along the output dim; ``scales``
  ``[groups, out]``; ``g_idx`` int32 ``[in]``. Format v1 (``checkpoint_format`` ``gptq``) stores zero - 1; it is
  undone on the whole int32 word (+0x11111111 for 4 bits, +0x01010101 for 8, modulo 2^32) as GPTQModel does
  (``convert_gptq_v1_to_v2_format_module``), which also undoes the borrow its v2 -> v1 writer makes for a zero of 0.
  The zero points are returned whatever ``sym`` says (they are what every kernel uses); they come back as None only
  when every one is the midpoint 2^(bits-1).
* AWQ (AutoAWQ GEMM): ``qweight`` int32 ``[in, out/8]``, nibble i of word c is output ``8c + (0,2,4,6,1,3,5,7)[i]``;
  ``qzeros`` int32 ``[groups, out/8]`` likewise; ``scales`` ``[groups, out]``; always asymmetric.
* compressed-tensors ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` (value k at bits
  ``bits*(k % (32/bits))`` of word ``k // (32/bits)``, offset binary), ``weight_shape`` ``[out, in]``,
  ``weight_scale`` ``[out, groups]`` (``[out, 1]`` per channel, one value per tensor), ``weight_zero_point``
  (asymmetric: int32 packed along the *output* dim ``[ceil(out*bits/32), groups]``, or unpacked int8 ``[out,
  groups]`` from older writers), optional ``weight_g_idx [in]`` (act-order ``group``; every group must then hold
  exactly ``group_size`` columns, which the old compressed-tensors dequantization assumed).
* FP8 (``quant_method: fp8``, Qwen/DeepSeek block-wise): ``weight`` F8_E4M3 ``[out, in]`` and ``weight_scale_inv``
  ``[ceil(out/b0), ceil(in/b1)]`` for ``weight_block_size [b0, b1]`` (one value when the block size is null), a
  *multiplier* despite its name.

Every refusal is a :class:`PreQuantError` (a :class:`export.checkpoint.CheckpointError`) naming the config field
(``quantization_config.bits``) or the tensor and what about it is wrong (missing, dtype, shape, values).

What it does not do: read files (the caller passes tensors, e.g. from ``Checkpoint.get``), requantize anything,
choose a lowering or write a graph (graphs/quantize.py does). Activation quantization (compressed-tensors
``input_activations``, FP8 ``activation_scheme: static``), KV-cache schemes, sparsity, rotations/transforms, adapters,
2/3-bit and the kernel-specific repacked layouts (Marlin, BitBLAS, AWQ GEMV/exllama) are refused, not approximated.
FP8 ``activation_scheme: dynamic`` is accepted: the weights are exact, but the activations are not quantized (HF's
FP8 kernels quantize them per token group on the fly). Calibration-only fields (``damp_percent``, ``true_sequential``,
``dataset``, ``meta``, ...) do not change the stored maths; they are ignored and listed in
:attr:`PreQuant.ignored_fields`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np
import torch

from export.checkpoint import CheckpointError

METHODS = ("gptq", "awq", "compressed-tensors", "fp8")
_FIELD = "quantization_config"


class PreQuantError(CheckpointError):
    """A pre-quantized checkpoint we refuse: an unsupported or invalid quantization_config field, or a quantized
    tensor that is missing, of the wrong dtype or shape, or holding impossible values."""


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is stored. group_size is along the input dim; -1 = one group spanning the whole input dim
    (per output channel). FP8: group_size = block[1]."""

    method: str  # gptq | awq | compressed-tensors | fp8
    bits: int  # 4 | 8
    group_size: int
    sym: bool
    desc_act: bool = False  # GPTQ act-order / compressed-tensors actorder "group": g_idx expected
    format_version: int = 0  # GPTQ: 1 (stored zero - 1) or 2 (exact zero); 0 elsewhere
    strategy: str = "group"  # group | channel | tensor (compressed-tensors); block (fp8)
    block: tuple[int, int] | None = None  # fp8 weight_block_size (None: one scale per tensor)


@dataclass(frozen=True)
class DynamicRule:
    """One GPTQModel ``dynamic`` entry: the first rule whose pattern re.match-es a module name decides it."""

    pattern: str
    skip: bool  # "-:" prefix: the module is not quantized
    scheme: LinearScheme | None  # the override (None when skip)


@dataclass(frozen=True)
class TargetGroup:
    """One compressed-tensors ``config_groups`` entry."""

    name: str
    targets: tuple[str, ...]
    scheme: LinearScheme


@dataclass(frozen=True)
class PreQuant:
    """The validated quantization_config. bits/group_size/sym/desc_act are the default scheme's (compressed-tensors:
    the first config group's); :meth:`scheme_for` resolves one linear."""

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    format_version: int  # GPTQ 1 | 2, else 0
    default: LinearScheme
    modules_to_not_convert: tuple[str, ...] = ()  # transformers' should_convert_module patterns
    dynamic: tuple[DynamicRule, ...] = ()  # GPTQModel per-layer overrides, in config order
    lm_head: bool = False  # GPTQModel lm_head: true (the LM head is quantized too)
    modules_in_block_to_quantize: tuple[str, ...] | None = None  # GPTQ (optimum): names relative to a layer
    groups: tuple[TargetGroup, ...] = ()  # compressed-tensors config_groups
    ignore: tuple[str, ...] = ()  # compressed-tensors ignore
    ignored_fields: tuple[str, ...] = ()  # config fields that do not change the stored maths (not applied)

    def scheme_for(self, linear: str) -> LinearScheme | None:
        """The scheme of the linear named `linear` (checkpoint prefix, e.g. 'model.layers.0.self_attn.q_proj'),
        None when the config leaves it in float."""
        return self._decide(linear)[0]

    def _decide(self, name: str) -> tuple[LinearScheme | None, str]:
        """(scheme or None, why), following each writer's own rules."""
        if self.method == "compressed-tensors":
            for pattern in self.ignore:
                if _ct_match(name, pattern):
                    return None, f"matched by {_FIELD}.ignore entry '{pattern}'"
            # compressed-tensors' match_targets: exact names first, then regexes, then class names ("Linear").
            hits = []
            for group in self.groups:
                for t in group.targets:
                    rank = 0 if t == name else 1 if t.startswith("re:") and _ct_match(name, t) else \
                        2 if t == "Linear" else None
                    if rank is not None:
                        hits.append((rank, t, group))
            if not hits:
                return None, f"no {_FIELD}.config_groups target matches it"
            rank, target, group = min(hits, key=lambda h: (h[0], h[1]))
            return group.scheme, f"{_FIELD}.config_groups.{group.name} (target '{target}')"
        for pattern in self.modules_to_not_convert:
            if _not_converted(name, pattern):
                return None, f"matched by {_FIELD}.modules_to_not_convert entry '{pattern}'"
        scheme = self.default
        if self.method == "gptq":
            for rule in self.dynamic:
                if re.match(rule.pattern, name):
                    if rule.skip:
                        return None, f"{_FIELD}.dynamic rule '-:{rule.pattern}'"
                    scheme = rule.scheme
                    break
        if name == "lm_head" or name.endswith(".lm_head"):
            if self.method == "gptq" and self.lm_head:
                return scheme, f"{_FIELD}.lm_head is true"
            return None, ("the LM head stays float (GPTQ lm_head is false)" if self.method == "gptq" else
                          f"the LM head stays float ({self.method})")
        if self.method in ("gptq", "awq", "fp8") and _is_router(name):
            return None, ("the MoE router stays float (GPTQ/AWQ writers never quantize it; transformers' FP8 "
                          "converts nn.Linear and the experts, and Qwen3-MoE's router is neither)")
        if self.method in ("gptq", "awq") and not re.search(r"\blayers\.\d+\.", name):
            return None, "outside the decoder layers (GPTQ/AWQ quantize the layers' linears, and the LM head only " \
                         "when asked)"
        if self.method == "gptq" and self.modules_in_block_to_quantize is not None:
            rel = re.sub(r"^.*?\blayers\.\d+\.", "", name)
            if rel not in self.modules_in_block_to_quantize:
                return None, f"'{rel}' is not in {_FIELD}.modules_in_block_to_quantize"
        return scheme, f"{_FIELD} ({self.method})"


@dataclass(frozen=True)
class Unpacked:
    """One integer-quantized linear, W[o, i] = (q[o, i] - zeros[o, g]) * scales[o, g] with g = g_idx[i]
    (g_idx None: g = i // group_size; zeros None: 0). q and zeros are signed (stored value - 2^(bits-1))."""

    name: str
    bits: int
    group_size: int  # resolved: the input dim when the format says per channel
    q: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float32 [out, groups] (exactly the stored values)
    zeros: np.ndarray | None  # int8 [out, groups]
    g_idx: np.ndarray | None  # int32 [in]
    scale_dtype: str  # the stored dtype of the scales: F16 | BF16 | F32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


@dataclass(frozen=True)
class UnpackedFP8:
    """One FP8 block-quantized linear, W[o, i] = q[o, i] * scales[o // block[0], i // block[1]]."""

    name: str
    q: np.ndarray  # ml_dtypes.float8_e4m3fn [out, in]
    scales: np.ndarray  # float32 [ceil(out / block[0]), ceil(in / block[1])]
    block: tuple[int, int]
    scale_dtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


# ---- config ----------------------------------------------------------------------------------------------------

def detect(config: Mapping[str, Any], quantize_config: Mapping[str, Any] | None = None) -> PreQuant | None:
    """The checkpoint's quantization scheme, or None for a float checkpoint. `quantize_config` is an AutoGPTQ
    ``quantize_config.json``, used when config.json has no quantization_config."""
    qc = config.get(_FIELD)
    field = _FIELD
    if qc is None and quantize_config is not None:
        qc, field = dict(quantize_config), "quantize_config.json"
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise PreQuantError(f"config.json: field '{_FIELD}' must be an object, got {_show(qc)}")
    f = _Fields(qc, f"{field}.")
    method = f.str("quant_method").lower().replace("_", "-")
    if method not in METHODS:
        raise PreQuantError(f"config.json: field '{field}.quant_method' is {qc.get('quant_method')!r}: not a "
                            f"supported pre-quantized format; supported: {', '.join(METHODS)}")
    read = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _fp8}[method]
    return read(f)


class _Fields:
    """Typed readers over one JSON object; every value is checked where it is read and a bad one raises a
    PreQuantError naming the field. JSON types are taken literally (true is not 1, "4" is not 4)."""

    def __init__(self, d: Mapping[str, Any], prefix: str, parent: _Fields | None = None):
        self.d, self.prefix, self.read, self.children = d, prefix, set(), []
        if parent is not None:
            parent.children.append(self)

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.d.get(key)
        return default if value is None else value

    def bad(self, key: str, want: str, value: Any = None) -> PreQuantError:
        value = self.d.get(key) if value is None else value
        return PreQuantError(f"config.json: field '{self.prefix}{key}' must be {want}, got {_show(value)}")

    def int(self, key: str, default: Any = ..., *, allowed: Collection[int] | None = None) -> int:
        value = self.raw(key, None)
        if value is None:
            if default is ...:
                raise PreQuantError(f"config.json: required field '{self.prefix}{key}' is missing")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or (allowed is not None and value not in allowed):
            raise self.bad(key, "an integer" + (f" in {sorted(allowed)}" if allowed is not None else ""))
        return value

    def group_size(self, key: str, default: int | None) -> int | None:
        value = self.int(key, default)
        if value is not None and value != -1 and value < 1:
            raise self.bad(key, "-1 (one group per output channel) or an integer >= 1")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, None)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def str(self, key: str, default: Any = ..., *, allowed: Collection[str] | None = None, lower: bool = True) -> str:
        value = self.raw(key, None)
        if value is None:
            if default is ...:
                raise PreQuantError(f"config.json: required field '{self.prefix}{key}' is missing")
            return default
        if not isinstance(value, str):
            raise self.bad(key, "a string")
        norm = value.lower() if lower else value
        if allowed is not None and norm not in allowed:
            raise PreQuantError(f"config.json: field '{self.prefix}{key}' is {value!r}; supported: "
                                f"{', '.join(allowed)}")
        return norm

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.raw(key, None)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "a list of strings or null")
        return tuple(value)

    def refuse_if_set(self, key: str, why: str) -> None:
        value = self.raw(key, None)
        if value not in (None, False, {}, [], ""):
            raise PreQuantError(f"config.json: field '{self.prefix}{key}' is set ({_show(value)}): {why}; "
                                "refusing rather than ignore it")

    def rest(self) -> tuple[str, ...]:
        """The fields nobody read, nested objects included (what PreQuant.ignored_fields lists)."""
        mine = [self.prefix + k for k in self.d if k not in self.read]
        return tuple(sorted(mine + [n for c in self.children for n in c.rest()]))


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


def _gptq(f: _Fields) -> PreQuant:
    bits = f.int("bits", allowed=(4, 8))
    group = f.group_size("group_size", 128)
    sym, desc_act = f.bool("sym", True), f.bool("desc_act", False)
    # GPTQModel writes `format`, transformers `checkpoint_format`; both name the zero-point convention.
    formats = {k: f.str(k, None, allowed=("gptq", "gptq_v2")) for k in ("checkpoint_format", "format")}
    given = {k: v for k, v in formats.items() if v is not None}
    if len(set(given.values())) > 1:
        raise PreQuantError(f"config.json: fields '{f.prefix}checkpoint_format' and '{f.prefix}format' disagree "
                            f"({given['checkpoint_format']!r} vs {given['format']!r})")
    version = 2 if "gptq_v2" in given.values() else 1
    if f.bool("is_marlin_format", False):
        raise PreQuantError(f"config.json: field '{f.prefix}is_marlin_format' is true: Marlin-repacked GPTQ "
                            "weights are not supported (use the plain GPTQ checkpoint)")
    pack = f.str("pack_dtype", "int32")
    if pack not in ("int32", "torch.int32"):
        raise PreQuantError(f"config.json: field '{f.prefix}pack_dtype' is {pack!r}; only int32 packing is supported")
    f.refuse_if_set("adapter", "a GPTQModel adapter (e.g. EoRA) adds a low-rank correction we do not export")
    f.refuse_if_set("rotation", "a rotated (e.g. Hadamard) model needs online rotations we do not export")
    lm_head = f.bool("lm_head", False)
    default = LinearScheme("gptq", bits, group, sym, desc_act, version)
    dynamic = _dynamic(f, default)
    blocks = f.raw("modules_in_block_to_quantize", None)
    in_block = None
    if blocks is not None:
        if not isinstance(blocks, list) or not all(isinstance(b, list) and all(isinstance(n, str) for n in b)
                                                   for b in blocks):
            raise f.bad("modules_in_block_to_quantize", "a list of lists of module names or null")
        in_block = tuple(n for b in blocks for n in b)
    f.raw("block_name_to_quantize")  # where the blocks are: our families' layers are always model.layers
    not_convert = _not_convert_list(f, "modules_to_not_convert")
    return PreQuant("gptq", bits, group, sym, desc_act, version, default, not_convert, dynamic, lm_head, in_block,
                    ignored_fields=f.rest())


def _dynamic(f: _Fields, default: LinearScheme) -> tuple[DynamicRule, ...]:
    """GPTQModel ``dynamic``: {"-:REGEX": {}} skips a module, {"+:REGEX" or "REGEX": {bits, group_size, sym,
    desc_act}} overrides its scheme; the first pattern (in config order) that re.match-es the name decides."""
    value = f.raw("dynamic", None)
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise f.bad("dynamic", "an object {pattern: overrides} or null")
    rules = []
    for key, overrides in value.items():
        skip = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise PreQuantError(f"config.json: field '{f.prefix}dynamic' has an invalid pattern {key!r}: {e}") from None
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, Mapping):
            raise PreQuantError(f"config.json: field '{f.prefix}dynamic.{key}' must be an object of overrides, "
                                f"got {_show(overrides)}")
        sub = _Fields(overrides, f"{f.prefix}dynamic.{key}.", f)
        scheme = None
        if not skip:
            scheme = replace(default, bits=sub.int("bits", default.bits, allowed=(4, 8)),
                             group_size=sub.group_size("group_size", default.group_size),
                             sym=sub.bool("sym", default.sym), desc_act=sub.bool("desc_act", default.desc_act))
            sub.refuse_if_set("adapter", "a per-layer adapter adds a low-rank correction we do not export")
        rules.append(DynamicRule(pattern, skip, scheme))
    return tuple(rules)


def _awq(f: _Fields) -> PreQuant:
    bits = f.int("bits", None, allowed=(4,))
    bits = f.int("w_bit", 4, allowed=(4,)) if bits is None else bits  # AutoAWQ's own quant_config names
    group = f.group_size("group_size", None)
    group = f.group_size("q_group_size", 128) if group is None else group
    version = f.str("version", None, allowed=("gemm",))
    fmt = f.str("format", None, allowed=("gemm",))
    if version is None and fmt is None:
        version = "gemm"
    if not f.bool("zero_point", True):
        raise PreQuantError(f"config.json: field '{f.prefix}zero_point' is false; AutoAWQ's GEMM layout always "
                            "stores zero points (a symmetric AWQ checkpoint is not a format we know)")
    default = LinearScheme("awq", bits, group, False)
    not_convert = _not_convert_list(f, "modules_to_not_convert")
    return PreQuant("awq", bits, group, False, False, 0, default, not_convert, ignored_fields=f.rest())


def _compressed_tensors(f: _Fields) -> PreQuant:
    top_format = f.str("format", None)
    status = f.str("quantization_status", "compressed")
    if status != "compressed":
        raise PreQuantError(f"config.json: field '{f.prefix}quantization_status' is {status!r}: only 'compressed' "
                            "checkpoints store packed weights")
    f.refuse_if_set("kv_cache_scheme", "a quantized KV cache is not exported")
    f.refuse_if_set("sparsity_config", "sparse compressed weights are not supported")
    f.refuse_if_set("transform_config", "transforms (rotations) change the maths and are not exported")
    groups_raw = f.raw("config_groups", None)
    if not isinstance(groups_raw, Mapping) or not groups_raw:
        raise f.bad("config_groups", "a non-empty object of quantization groups")
    groups = []
    for gname, g in groups_raw.items():
        if not isinstance(g, Mapping):
            raise PreQuantError(f"config.json: field '{f.prefix}config_groups.{gname}' must be an object, "
                                f"got {_show(g)}")
        gf = _Fields(g, f"{f.prefix}config_groups.{gname}.", f)
        targets = gf.str_list("targets")
        if not targets:
            raise gf.bad("targets", "a non-empty list of module names, 're:' regexes or class names")
        for t in targets:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise PreQuantError(f"config.json: field '{gf.prefix}targets' has an invalid regex {t!r}: "
                                        f"{e}") from None
        gf.refuse_if_set("input_activations", "activation quantization is not exported (weight-only schemes only)")
        gf.refuse_if_set("output_activations", "activation quantization is not exported (weight-only schemes only)")
        fmt = gf.str("format", top_format)
        if fmt != "pack-quantized":
            where = f"{gf.prefix}format" if gf.has("format") else f"{f.prefix}format"
            raise PreQuantError(f"config.json: field '{where}' is {fmt!r}; supported: pack-quantized")
        w = gf.raw("weights", None)
        if not isinstance(w, Mapping):
            raise gf.bad("weights", "an object (the weight quantization arguments)")
        wf = _Fields(w, f"{gf.prefix}weights.", gf)
        bits = wf.int("num_bits", 8, allowed=(4, 8))
        wf.str("type", "int", allowed=("int",))
        sym = wf.bool("symmetric", True)
        group = wf.raw("group_size", None)
        if group is not None:
            group = wf.group_size("group_size", None)
        strategy = wf.str("strategy", None, allowed=("group", "channel", "tensor"))
        if strategy is None:  # compressed-tensors QuantizationArgs' inference
            strategy = "tensor" if group is None else "group" if group > 0 else "channel"
        if strategy == "group" and (group is None or group < 1):
            raise wf.bad("group_size", "an integer >= 1 for strategy 'group'")
        if strategy != "group":
            group = -1
        if wf.raw("dynamic", False) not in (False,):
            raise wf.bad("dynamic", "false (dynamic weight quantization has no stored scales)")
        wf.refuse_if_set("block_structure", "block-wise integer weights are not supported")
        actorder = wf.raw("actorder", None)
        if actorder not in (None, False, "group", "weight", "static", "dynamic"):
            raise wf.bad("actorder", "null, 'group', 'weight', 'static' or 'dynamic'")
        desc_act = actorder in ("group", "dynamic")  # the orderings that store weight_g_idx
        groups.append(TargetGroup(str(gname), targets, LinearScheme("compressed-tensors", bits, group, sym, desc_act,
                                                                     0, strategy)))
    ignore = f.str_list("ignore")
    for t in ignore:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise PreQuantError(f"config.json: field '{f.prefix}ignore' has an invalid regex {t!r}: {e}") from None
    first = groups[0].scheme
    return PreQuant("compressed-tensors", first.bits, first.group_size, first.sym, first.desc_act, 0, first,
                    groups=tuple(groups), ignore=ignore, ignored_fields=f.rest())


def _fp8(f: _Fields) -> PreQuant:
    f.str("fmt", "e4m3", allowed=("e4m3", "float8_e4m3fn"))
    f.str("activation_scheme", "dynamic", allowed=("dynamic",))
    f.str("scale_fmt", "float", allowed=("float",))
    f.str("expert_dtype", "fp8", allowed=("fp8",))
    f.refuse_if_set("modules_to_convert", "FP8 embeddings are not supported")
    block = None
    raw = f.raw("weight_block_size", None)
    if raw is not None:
        if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and v >= 1 for v in raw):
            raise f.bad("weight_block_size", "a list of two integers >= 1 [out_block, in_block] or null")
        block = (raw[0], raw[1])
    key = "modules_to_not_convert" if f.has("modules_to_not_convert") or not f.has("ignored_layers") \
        else "ignored_layers"  # MiniMax's alias (transformers FineGrainedFP8Config)
    not_convert = _not_convert_list(f, key)
    f.raw("ignored_layers")
    default = LinearScheme("fp8", 8, block[1] if block else -1, True, strategy="block", block=block)
    return PreQuant("fp8", 8, default.group_size, True, False, 0, default, not_convert, ignored_fields=f.rest())


def _not_convert_list(f: _Fields, key: str) -> tuple[str, ...]:
    patterns = f.str_list(key)
    for p in patterns:
        try:
            re.compile(rf"(?:{p})")
        except re.error as e:
            raise PreQuantError(f"config.json: field '{f.prefix}{key}' has an invalid pattern {p!r}: {e}") from None
    return patterns


def _not_converted(name: str, pattern: str) -> bool:
    """transformers' quantizers_utils.should_convert_module: a pattern matches from the start up to a module
    boundary, as a regex with the same boundary ('mlp.gate' does not match 'mlp.gate_proj'), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", name) is not None or name.endswith(pattern)


def _ct_match(name: str, target: str) -> bool:
    """compressed-tensors match_name: 're:' regex (re.match) or the exact module name; the class name 'Linear'
    matches every linear."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def _is_router(name: str) -> bool:
    """The MoE router (Qwen3-MoE 'mlp.gate'; Qwen2-MoE's 'shared_expert_gate')."""
    return re.search(r"(^|\.)mlp\.gate$", name) is not None or name.endswith(".shared_expert_gate")


# ---- which tensors ---------------------------------------------------------------------------------------------

_REQUIRED = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
             "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape"),
             "fp8": ("weight", "weight_scale_inv")}
_QUANT_MARKERS = ("qweight", "qzeros", "weight_packed", "weight_scale_inv", "weight_zero_point", "weight_shape")
_FMT = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors", "fp8": "FP8"}


def tensor_names(prequant: PreQuant, linear_prefix: str) -> list[str]:
    """The checkpoint tensors the linear needs (its float ``weight`` when the config leaves it unquantized). The bias,
    if any, is a float tensor read as for a float checkpoint."""
    s = prequant.scheme_for(linear_prefix)
    if s is None:
        return [f"{linear_prefix}.weight"]
    names = list(_REQUIRED[s.method])
    if s.method == "gptq" and s.desc_act:
        names.append("g_idx")
    if s.method == "compressed-tensors":
        if not s.sym:
            names.append("weight_zero_point")
        if s.desc_act:
            names.append("weight_g_idx")
    return [f"{linear_prefix}.{n}" for n in names]


def optional_tensor_names(prequant: PreQuant, linear_prefix: str) -> list[str]:
    """Tensors the linear uses when present (GPTQ g_idx without act-order; compressed-tensors weight_g_idx, and a
    symmetric scheme's all-zero weight_zero_point)."""
    s = prequant.scheme_for(linear_prefix)
    if s is None:
        return []
    names = []
    if s.method == "gptq" and not s.desc_act:
        names.append("g_idx")
    if s.method == "compressed-tensors":
        if s.sym:
            names.append("weight_zero_point")
        if not s.desc_act:
            names.append("weight_g_idx")
    return [f"{linear_prefix}.{n}" for n in names]


def resolve_linear(prequant: PreQuant, linear_prefix: str, available: Collection[str]) -> LinearScheme | None:
    """scheme_for(linear), checked against the checkpoint's tensor names: a linear the config quantizes must have
    all its tensors, one it leaves float must have its float weight and no quantized tensors."""
    scheme, why = prequant._decide(linear_prefix)
    if scheme is None:
        found = [f"{linear_prefix}.{m}" for m in _QUANT_MARKERS if f"{linear_prefix}.{m}" in available]
        if found:
            raise PreQuantError(f"linear '{linear_prefix}' stays float by config.json ({why}) but the checkpoint "
                                f"holds quantized tensors {found}")
        if f"{linear_prefix}.weight" not in available:
            raise PreQuantError(f"missing tensor '{linear_prefix}.weight' (linear '{linear_prefix}' stays float: "
                                f"{why})")
        return None
    missing = [n for n in tensor_names(prequant, linear_prefix) if n not in available]
    if missing:
        raise PreQuantError(f"missing tensor(s) {missing}: config.json quantizes linear '{linear_prefix}' "
                            f"({_FMT[scheme.method]} {scheme.bits}-bit, {why})")
    return scheme


# ---- unpacking -------------------------------------------------------------------------------------------------

def unpack(prequant: PreQuant, tensors: Mapping[str, np.ndarray | torch.Tensor], name: str,
           shape: tuple[int, int] | None = None) -> Unpacked | UnpackedFP8:
    """Unpack the quantized linear `name` (its prefix) from `tensors` (full checkpoint names -> arrays), checking
    dtypes, shapes and values; `shape` (out, in), when given, is what config.json says the linear is."""
    scheme = prequant.scheme_for(name)
    if scheme is None:
        raise PreQuantError(f"linear '{name}' is not quantized by config.json ({prequant._decide(name)[1]})")
    t = _Tensors(tensors, name, _FMT[scheme.method])
    fn = {"gptq": _unpack_gptq, "awq": _unpack_awq, "compressed-tensors": _unpack_ct, "fp8": _unpack_fp8}
    u = fn[scheme.method](scheme, t)
    if shape is not None and tuple(u.shape) != tuple(shape):
        raise PreQuantError(f"linear '{name}': its {t.fmt} tensors hold a [{u.shape[0]}, {u.shape[1]}] weight "
                            f"([out, in]), config.json expects [{shape[0]}, {shape[1]}]")
    return u


class _Tensors:
    """The tensors of one linear, converted to numpy on read, with messages naming the tensor."""

    def __init__(self, tensors: Mapping[str, Any], prefix: str, fmt: str):
        self.tensors, self.prefix, self.fmt = tensors, prefix, fmt

    def full(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def err(self, suffix: str, what: str) -> PreQuantError:
        return PreQuantError(f"tensor '{self.full(suffix)}' ({self.fmt} {suffix}) {what}")

    def get(self, suffix: str, kind: str, ndim: int | None, *, required: bool = True) -> np.ndarray | None:
        value = self.tensors.get(self.full(suffix))
        if value is None:
            if required:
                raise PreQuantError(f"missing tensor '{self.full(suffix)}' ({self.fmt} {suffix}, needed to "
                                    f"unpack '{self.prefix}')")
            return None
        a, stored = _to_numpy(value)
        ok = {"int32": a.dtype == np.int32, "int": a.dtype.kind in "iu",
              "float": a.dtype in (np.float16, np.float32) and stored in ("F16", "BF16", "F32"),
              "fp8": a.dtype == ml_dtypes.float8_e4m3fn}[kind]
        if not ok:
            want = {"int32": "I32", "int": "an integer dtype", "float": "F16, BF16 or F32", "fp8": "F8_E4M3"}[kind]
            raise self.err(suffix, f"has dtype {stored}; expected {want}")
        if ndim is not None and a.ndim != ndim:
            raise self.err(suffix, f"has shape {list(a.shape)}; expected {ndim} dimensions")
        if kind in ("float", "fp8"):  # e4m3fn has no inf and two NaN codes, 0x7f and 0xff: read off the bytes
            finite = (a.view(np.uint8) & 0x7F) != 0x7F if kind == "fp8" else np.isfinite(a)
            if not finite.all():
                raise self.err(suffix, f"holds {int((~finite).sum())} non-finite value(s)")
        return a

    def stored_dtype(self, suffix: str) -> str:
        return _to_numpy(self.tensors[self.full(suffix)])[1]

    def shape(self, suffix: str, a: np.ndarray, want: tuple[int, ...], why: str) -> None:
        if tuple(a.shape) != tuple(want):
            raise self.err(suffix, f"has shape {list(a.shape)}; expected {list(want)} ({why})")


_TORCH_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.float64: "F64",
                torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL"}


def _to_numpy(value) -> tuple[np.ndarray, str]:
    """(numpy array, safetensors dtype name). bf16 becomes float32 (exact); F8_E4M3 becomes ml_dtypes' float8."""
    if isinstance(value, torch.Tensor):
        stored = _TORCH_NAMES.get(value.dtype, str(value.dtype))
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.float().numpy(), stored
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), stored
        return t.numpy(), stored
    a = np.asarray(value)
    if a.dtype == ml_dtypes.bfloat16:
        return a.astype(np.float32), "BF16"
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
             np.dtype(np.float64): "F64", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}
    return a, names.get(a.dtype, str(a.dtype))


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> unsigned values along `axis`: value j of a word sits at bits [bits*j, bits*(j+1)) and is
    element (32/bits)*w + j of that axis."""
    per = 32 // bits
    u = words.view(np.uint32)
    vals = np.stack([(u >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1) for j in range(per)], axis=axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return vals.reshape(shape).astype(np.int16)


def _resolve_group(t: _Tensors, scheme: LinearScheme, K: int, suffix: str) -> int:
    g = K if scheme.group_size == -1 else scheme.group_size
    if K % g:
        raise t.err(suffix, f"describes an input dimension of {K}, which quantization_config.group_size {g} does "
                            "not divide")
    return g


def _check_g_idx(t: _Tensors, suffix: str, g_idx: np.ndarray | None, K: int, G: int, g: int,
                 equal_groups: bool) -> np.ndarray | None:
    """g_idx validated; None when it is the trivial i // g."""
    if g_idx is None:
        return None
    t.shape(suffix, g_idx, (K,), "one group index per input")
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= G):
        raise t.err(suffix, f"holds group indices in [{int(g_idx.min())}, {int(g_idx.max())}]; there are {G} groups")
    g_idx = g_idx.astype(np.int32)
    if np.array_equal(g_idx, np.arange(K, dtype=np.int32) // g):
        return None
    if equal_groups:
        counts = np.bincount(g_idx, minlength=G)
        if (counts != g).any():
            bad = int(np.argmax(counts != g))
            raise t.err(suffix, f"puts {int(counts[bad])} inputs in group {bad}; every group must hold group_size "
                                f"{g} inputs")
    return g_idx


def _signed(u: np.ndarray, bits: int) -> np.ndarray:
    return (u - (1 << (bits - 1))).astype(np.int8)


def _unpack_gptq(s: LinearScheme, t: _Tensors) -> Unpacked:
    bits, per = s.bits, 32 // s.bits
    qweight = t.get("qweight", "int32", 2)
    scales = t.get("scales", "float", 2)
    qzeros = t.get("qzeros", "int32", 2)
    K, N = qweight.shape[0] * per, qweight.shape[1]
    g = _resolve_group(t, s, K, "qweight")
    G = K // g
    t.shape("scales", scales, (G, N), f"[in/group_size, out] with in = {K} from qweight, group_size {g}")
    if N % per:
        raise t.err("qzeros", f"cannot hold the zero points of {N} outputs: {per} per int32 word along the output dim")
    t.shape("qzeros", qzeros, (G, N // per), f"[in/group_size, out*{bits}/32]")
    words = qzeros.view(np.uint32)
    if s.format_version == 1:  # v1 stored zero - 1: undo it on the word, as GPTQModel does (carry included)
        words = words + np.uint32(0x11111111 if bits == 4 else 0x01010101)  # wraps modulo 2^32
    q_u = _unpack_words(qweight, bits, axis=0)  # [K, N]
    z_u = _unpack_words(words.view(np.int32), bits, axis=1)  # [G, N]
    g_idx = t.get("g_idx", "int", 1, required=s.desc_act)
    g_idx = _check_g_idx(t, "g_idx", g_idx, K, G, g, equal_groups=False)
    zeros = _signed(z_u.T, bits)
    return Unpacked(t.prefix, bits, g, np.ascontiguousarray(_signed(q_u.T, bits)), np.ascontiguousarray(
        scales.T.astype(np.float32)), None if not zeros.any() else np.ascontiguousarray(zeros), g_idx,
        t.stored_dtype("scales"))


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: word nibble i holds output 8c + _AWQ_ORDER[i]
_AWQ_REVERSE = tuple(int(i) for i in np.argsort(_AWQ_ORDER))  # = (0, 4, 1, 5, 2, 6, 3, 7), AWQ_REVERSE_ORDER


def _unpack_awq(s: LinearScheme, t: _Tensors) -> Unpacked:
    qweight = t.get("qweight", "int32", 2)
    scales = t.get("scales", "float", 2)
    qzeros = t.get("qzeros", "int32", 2)
    K, N = qweight.shape[0], qweight.shape[1] * 8
    g = _resolve_group(t, s, K, "qweight")
    G = K // g
    t.shape("scales", scales, (G, N), f"[in/group_size, out] with in = {K}, out = {N} from qweight")
    t.shape("qzeros", qzeros, (G, N // 8), "[in/group_size, out/8]")

    def natural(words: np.ndarray) -> np.ndarray:
        v = _unpack_words(words, 4, axis=1).reshape(words.shape[0], -1, 8)
        return v[..., list(_AWQ_REVERSE)].reshape(words.shape[0], -1)

    q_u, z_u = natural(qweight), natural(qzeros)  # [K, N], [G, N]
    zeros = _signed(z_u.T, 4)
    return Unpacked(t.prefix, 4, g, np.ascontiguousarray(_signed(q_u.T, 4)), np.ascontiguousarray(
        scales.T.astype(np.float32)), None if not zeros.any() else np.ascontiguousarray(zeros), None,
        t.stored_dtype("scales"))


def _unpack_ct(s: LinearScheme, t: _Tensors) -> Unpacked:
    bits, per = s.bits, 32 // s.bits
    shape = t.get("weight_shape", "int", 1)
    if shape.shape != (2,) or (shape < 1).any():
        raise t.err("weight_shape", f"is {shape.tolist()}; expected [out, in]")
    N, K = int(shape[0]), int(shape[1])
    packed = t.get("weight_packed", "int32", 2)
    t.shape("weight_packed", packed, (N, math.ceil(K / per)), f"[out, ceil(in*{bits}/32)] for weight_shape "
                                                               f"[{N}, {K}]")
    scale = t.get("weight_scale", "float", None)
    if s.strategy == "tensor":
        if scale.size != 1:
            raise t.err("weight_scale", f"has shape {list(scale.shape)}; strategy 'tensor' has one scale")
        scale = np.broadcast_to(scale.reshape(1, 1), (N, 1))
    g = _resolve_group(t, s, K, "weight_shape")
    G = K // g
    if s.strategy != "tensor":
        t.shape("weight_scale", scale, (N, G), f"[out, in/group_size] ({s.strategy})")
    q_u = _unpack_words(packed, bits, axis=1)[:, :K]
    zp = t.get("weight_zero_point", "int", None, required=not s.sym)
    zeros = None
    if zp is not None:
        if s.strategy == "tensor" or zp.shape == (N, G):  # unpacked (tensor strategy never packs it)
            if zp.size == 1:
                zp = np.broadcast_to(zp.reshape(1, 1), (N, 1))
            t.shape("weight_zero_point", zp, (N, G), "[out, groups], unpacked")
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if zp.min() < lo or zp.max() > hi:
                raise t.err("weight_zero_point", f"holds values outside the signed {bits}-bit range [{lo}, {hi}]")
            zeros = zp.astype(np.int8)
        else:
            if zp.dtype != np.int32:
                raise t.err("weight_zero_point", f"has shape {list(zp.shape)}; expected [{N}, {G}] unpacked or "
                                                 f"int32 [{math.ceil(N / per)}, {G}] packed along the output dim")
            t.shape("weight_zero_point", zp, (math.ceil(N / per), G), "[ceil(out*bits/32), groups], packed along "
                                                                        "the output dim")
            zeros = _signed(_unpack_words(zp, bits, axis=0)[:N], bits)
        if s.sym:
            if zeros.any():
                raise t.err("weight_zero_point", "holds non-zero values but the scheme is symmetric")
            zeros = None
    g_idx = t.get("weight_g_idx", "int", 1, required=s.desc_act)
    g_idx = _check_g_idx(t, "weight_g_idx", g_idx, K, G, g, equal_groups=True)
    if zeros is not None and not zeros.any():
        zeros = None
    return Unpacked(t.prefix, bits, g, np.ascontiguousarray(_signed(q_u, bits)),
                    np.ascontiguousarray(scale.astype(np.float32)), None if zeros is None else
                    np.ascontiguousarray(zeros), g_idx, t.stored_dtype("weight_scale"))


def _unpack_fp8(s: LinearScheme, t: _Tensors) -> UnpackedFP8:
    w = t.get("weight", "fp8", 2)
    scale = t.get("weight_scale_inv", "float", None)
    N, K = w.shape
    if s.block is None:
        if scale.size != 1:
            raise t.err("weight_scale_inv", f"has shape {list(scale.shape)}; weight_block_size is null: one scale")
        block, scale = (N, K), scale.reshape(1, 1)
    else:
        block = s.block
        want = (math.ceil(N / block[0]), math.ceil(K / block[1]))
        t.shape("weight_scale_inv", scale, want, f"[ceil(out/{block[0]}), ceil(in/{block[1]})] for a [{N}, {K}] "
                                                 "weight")
    return UnpackedFP8(t.prefix, np.ascontiguousarray(w), np.ascontiguousarray(scale.astype(np.float32)), block,
                       t.stored_dtype("weight_scale_inv"))


# ---- maths -----------------------------------------------------------------------------------------------------

def dequantize(u: Unpacked | UnpackedFP8) -> np.ndarray:
    """The format's dequantized weight [out, in], float32 (exact: see the module docstring)."""
    if isinstance(u, UnpackedFP8):
        N, K = u.shape
        s = np.repeat(np.repeat(u.scales, u.block[0], axis=0)[:N], u.block[1], axis=1)[:, :K]
        return u.q.astype(np.float32) * s
    K = u.shape[1]
    gi = u.g_idx if u.g_idx is not None else np.arange(K) // u.group_size
    q = u.q.astype(np.float32)
    if u.zeros is not None:
        q = q - u.zeros[:, gi].astype(np.float32)
    return q * u.scales[:, gi]


def sort_by_group(u: Unpacked) -> tuple[np.ndarray | None, Unpacked]:
    """(perm, u') with contiguous groups: x @ dequantize(u).T == x[..., perm] @ dequantize(u').T. perm is None when
    u has no g_idx. Every group must hold group_size inputs (GPTQ act-order and compressed-tensors do)."""
    if u.g_idx is None:
        return None, u
    counts = np.bincount(u.g_idx, minlength=u.scales.shape[1])
    if (counts != u.group_size).any():
        raise PreQuantError(f"linear '{u.name}': g_idx groups hold {sorted(set(counts.tolist()))} inputs, not "
                            f"{u.group_size} each; the act-order permutation cannot make them contiguous")
    perm = np.argsort(u.g_idx, kind="stable")
    return perm, replace(u, q=np.ascontiguousarray(u.q[:, perm]), g_idx=None)


def matmul_nbits_zero_points(u: Unpacked) -> np.ndarray | None:
    """com.microsoft.MatMulNBits' packed ``zero_points`` uint8 [out, ceil(groups*bits/8)] (unsigned, two 4-bit
    values a byte, low nibble first, as its B), or None for a symmetric weight (its default zero point
    2^(bits-1) is our signed 0)."""
    if u.zeros is None:
        return None
    z = (u.zeros.astype(np.int16) + (1 << (u.bits - 1))).astype(np.uint8)
    if u.bits == 8:
        return z
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
