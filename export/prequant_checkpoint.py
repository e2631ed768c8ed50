"""A pre-quantized checkpoint seen as a float one, plus the stored integers of each of its linears.

What it does: :func:`load_prequant` reads ``quantization_config`` (config.json, or AutoGPTQ's quantize_config.json)
through export/prequant.py. :class:`PreQuantCheckpoint` is an :class:`export.checkpoint.Checkpoint` whose quantized
linears appear as one virtual float tensor ``PREFIX.weight`` [out, in] (float32, the format's exact dequantization,
export/prequant.py ``dequantize``) instead of their stored tensors (``qweight``/``qzeros``/``scales``/``g_idx``,
``weight_packed``..., the FP8 ``weight``/``weight_scale_inv``). Everything that reads a float checkpoint (the shape
and dtype checks, the streaming loaders, the torch reference decoder) therefore works on it unchanged, and the
layers the config leaves float are read as they are. Every linear-looking tensor is resolved against the config
at open (export/prequant.py ``resolve_linear``): a linear the config quantizes whose tensors are missing, or one it
leaves float that holds quantized tensors, is refused naming it.

:meth:`PreQuantCheckpoint.qsource` gives, for one decoder parameter (export/weights.py ``Weight``), the
``graphs.quantize.QSource`` of its integers -- the weight in the graph is then stored as those integers (MatMulNBits,
DequantizeLinear or the standard-op dequantization, graphs/quantize.py), not as the float tensor. For MoE expert
stacks every expert must share one scheme; act-order experts (each its own input order) and FP8 blocks that do not
tile the weight get no QSource and stay float (their dequantization), reported by the build.

What it does not do: decide the graph form (graphs/quantize.py) or requantize anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from artifacts.paths import json_loads
from export import prequant as pq
from export.checkpoint import Checkpoint, CheckpointError, TensorInfo, checkpoint_file
from graphs.quantize import QInfo, QSource, QWeight, concat_rows

# The last component of a module that is a linear layer in the three families (and their task heads).
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "score",
            "qa_outputs")


def _is_linear(prefix: str) -> bool:
    return prefix.rsplit(".", 1)[-1] in _LINEARS or prefix.endswith(".mlp.gate")


def load_prequant(model_dir: Path) -> pq.PreQuant | None:
    """The checkpoint's quantization scheme, None for a float checkpoint (PreQuantError on a bad config)."""
    config = json_loads(checkpoint_file(Path(model_dir), "config.json").read_text(encoding="utf-8"))
    legacy = checkpoint_file(Path(model_dir), "quantize_config.json")
    quantize_config = None
    if legacy is not None and "quantization_config" not in config:
        try:
            quantize_config = json_loads(legacy.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{legacy}: not valid JSON ({e})") from None
        if not isinstance(quantize_config, dict):
            raise CheckpointError(f"{legacy}: expected a JSON object")
    return pq.detect(config, quantize_config)


def describe(p: pq.PreQuant) -> str:
    """One line for logs and errors, e.g. 'GPTQ v2 4-bit, group 128, asymmetric, act-order'."""
    if p.method == "fp8":
        block = p.default.block
        return f"FP8 (e4m3) weights, {f'blocks {block[0]}x{block[1]}' if block else 'one scale per tensor'}"
    name = {"gptq": f"GPTQ v{p.format_version}", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}[p.method]
    group = "per channel" if p.group_size in (-1, None) or p.default.strategy in ("channel", "tensor") \
        else f"group {p.group_size}"
    return f"{name} {p.bits}-bit, {group}, {'symmetric' if p.sym else 'asymmetric'}" + \
        (", act-order" if p.desc_act else "")


class PreQuantCheckpoint(Checkpoint):
    """See the module docstring. ``tensors`` holds the float view; ``stored`` the tensors as the files hold them."""

    def __init__(self, model_dir: str | Path, prequant: pq.PreQuant):
        super().__init__(model_dir)
        self.prequant = prequant
        self.stored: dict[str, TensorInfo] = dict(self.tensors)
        self.linears: dict[str, pq.LinearScheme] = {}  # prefix -> scheme, the quantized linears only
        self.dequantized: dict[str, str] = {}  # decoder parameter -> why its integers have no QSource (qsource)
        names = set(self.stored)
        markers = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] in pq._QUANT_MARKERS}
        floats = {n.removesuffix(".weight") for n in names if n.endswith(".weight")}
        for prefix in sorted(markers | {p for p in floats if _is_linear(p)}):
            scheme = pq.resolve_linear(prequant, prefix, names)
            if scheme is None:
                continue
            parts = [n for n in pq.tensor_names(prequant, prefix) + pq.optional_tensor_names(prequant, prefix)
                     if n in names]
            if prefix in markers and scheme.method != "fp8" and f"{prefix}.weight" in names:  # fp8's is quantized
                raise pq.PreQuantError(f"'{prefix}' has both a float tensor '{prefix}.weight' and its "
                                       f"{scheme.method.upper()} tensors ({', '.join(parts)}); a checkpoint holds "
                                       "one or the other, so which one is meant is unknown")
            shape = self._stored_shape(prefix, scheme)
            for n in parts:
                del self.tensors[n]
            self.tensors[f"{prefix}.weight"] = TensorInfo(self.stored[parts[0]].file, shape, torch.float32)
            self.linears[prefix] = scheme

    def _stored_shape(self, prefix: str, s: pq.LinearScheme) -> tuple[int, int]:
        """[out, in] of a quantized linear from the stored headers (the values are checked when it is unpacked)."""
        if s.method == "fp8":
            return tuple(self.stored[f"{prefix}.weight"].shape)
        if s.method == "compressed-tensors":
            shape = self._read(f"{prefix}.weight_shape")
            if shape.dim() != 1 or shape.numel() != 2:
                raise pq.PreQuantError(f"tensor '{prefix}.weight_shape' has shape {list(shape.shape)} and holds "
                                       f"{shape.flatten().tolist()[:8]}; expected [out, in] (2 values)")
            return tuple(int(v) for v in shape.tolist())
        stored = self.stored[f"{prefix}.qweight"].shape
        if len(stored) != 2:
            raise pq.PreQuantError(f"tensor '{prefix}.qweight' ({s.method.upper()} qweight) has shape {list(stored)}; "
                                   "expected 2 dimensions")
        rows, cols = stored
        per = 32 // s.bits
        return (cols, rows * per) if s.method == "gptq" else (cols * per, rows)  # gptq [in/per, out]; awq [in, out/per]

    def _read(self, name: str) -> torch.Tensor:
        return self.read(self.stored[name], name)

    def unpacked(self, prefix: str) -> pq.Unpacked | pq.UnpackedFP8:
        """The stored integers (or FP8 values) of one quantized linear, checked (PreQuantError naming the tensor)."""
        p = self.prequant
        parts = [n for n in pq.tensor_names(p, prefix) + pq.optional_tensor_names(p, prefix) if n in self.stored]
        return pq.unpack(p, {n: self._read(n) for n in parts}, prefix, self.tensors[f"{prefix}.weight"].shape)

    def get(self, name: str) -> torch.Tensor:
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix in self.linears:
            return torch.from_numpy(pq.dequantize(self.unpacked(prefix)))
        return super().get(name)

    # -- the integers, for graphs/quantize.py -------------------------------------------------------------------
    def qsource(self, w) -> QSource | None:
        """The QSource of decoder parameter `w` (export.weights.Weight), None when it stays float."""
        prefixes = [s.removesuffix(".weight") for s in w.sources]
        quantized = [p in self.linears for p in prefixes]
        if not any(quantized):
            return None
        infos = {self._info(p) if q else None for p, q in zip(prefixes, quantized)}
        if len(infos) != 1 or None in infos:
            return self._dequantized(w, "its sources are stored in different schemes (or some float)"
                                     if len(infos) != 1 else "its FP8 blocks do not tile the input dimension")
        info = infos.pop()
        if w.transform == "copy":
            return QSource(info, lambda: self._qweight(prefixes[0], info))
        if info.perm:  # each expert has its own input order, which one fused expert node cannot take
            return self._dequantized(w, "act-order experts")
        if w.transform == "stack":
            return QSource(info, lambda: _stack([self._qweight(p, info) for p in prefixes]))
        if w.transform == "stack_gate_up":
            def load():
                pairs = zip(prefixes[0::2], prefixes[1::2])
                return _stack([concat_rows([self._qweight(g, info), self._qweight(u, info)]) for g, u in pairs])
            return QSource(info, load)
        return None

    def _dequantized(self, w, why: str) -> None:
        """Record a parameter stored as its dequantization (float) although its sources are quantized."""
        self.dequantized[w.name] = why
        return None

    def _info(self, prefix: str) -> QInfo | None:
        s = self.linears[prefix]
        N, K = self.tensors[f"{prefix}.weight"].shape
        if s.method == "fp8":
            b = s.block[1] if s.block else K
            if K % b and K > b:  # blocks that do not tile the input dim: no blocked form, stays float
                return None
            return QInfo("fp8", 0 if b >= K else b, label="block" if s.block else "tensor")
        per_channel = s.group_size in (-1, None) or s.group_size > K or s.strategy in ("channel", "tensor")
        label = {"gptq": f"gptq-v{s.format_version}", "awq": "awq", "compressed-tensors": "compressed-tensors"}
        return QInfo(f"int{s.bits}", 0 if per_channel else s.group_size, zeros=not s.sym,
                     perm=s.desc_act and not self._sorted_g_idx(prefix),
                     label=f"{label[s.method]}-{'symmetric' if s.sym else 'asymmetric'}")

    def _sorted_g_idx(self, prefix: str) -> bool:
        """Act-order declared, but the stored g_idx never decreases (AutoGPTQ static_groups, any group_size -1
        checkpoint: all zeros): its inputs are already in group order, so the graph needs no Gather of the
        activation and experts keep their quantized form. Reads only the g_idx ([in] int32), at plan time."""
        name = next((f"{prefix}.{n}" for n in ("g_idx", "weight_g_idx") if f"{prefix}.{n}" in self.stored), None)
        if name is None:  # missing: unpack refuses it, naming the tensor
            return False
        g_idx = self._read(name)
        return g_idx.dim() == 1 and bool((g_idx[1:] >= g_idx[:-1]).all())

    def _qweight(self, prefix: str, info: QInfo) -> QWeight:
        u = self.unpacked(prefix)
        if isinstance(u, pq.UnpackedFP8):
            N, K = u.shape
            s = np.repeat(u.scales, u.block[0], axis=0)[:N]  # one row of block multipliers per output
            return QWeight(u.q, np.ascontiguousarray(s[:, :math.ceil(K / (info.group or K))], dtype=np.float32))
        perm, u = pq.sort_by_group(u) if self.linears[prefix].desc_act else (None, u)
        if not info.perm:  # a g_idx already in group order (_sorted_g_idx): the permutation is the identity
            perm = None
        if u.g_idx is not None:
            raise pq.PreQuantError(f"linear '{prefix}': its g_idx is not the plain i // group_size order but "
                                   "quantization_config does not say act-order (desc_act / actorder)")
        zeros = u.zeros
        if info.zeros and zeros is None:
            zeros = np.zeros(u.scales.shape, np.int8)  # every zero point is the midpoint
        if not info.zeros and zeros is not None:
            raise pq.PreQuantError(f"linear '{prefix}': quantization_config says symmetric (sym: true) but its zero "
                                   "points are not all 2^(bits-1)")
        return QWeight(u.q, u.scales.astype(np.float32), zeros, perm)


def _stack(ws: list[QWeight]) -> QWeight:
    return QWeight(np.stack([w.q for w in ws]), np.stack([w.scales for w in ws]),
                   None if ws[0].zeros is None else np.stack([w.zeros for w in ws]))
