"""Which checkpoint tensors the decoder needs, and how each becomes one of its parameters.

What it does: :func:`weight_plan` lists, for a :class:`ModelSpec`, every parameter of ``model.Decoder`` with the
Hugging Face tensor names it comes from and one named transform (``copy``, ``norm`` = add the norm offset and keep
fp32, ``stack_gate_up``/``stack`` = stack per-expert matrices). The rename table is the same Llama-style layout
for all three families except where Gemma2's four norms sit. :func:`check_checkpoint` verifies presence, shape and
dtype (F32, F16 or BF16) of every source tensor and reports unexpected ones; :func:`load_tensor` produces one
parameter at a time so the whole model never has to be materialised twice, and refuses (CheckpointError naming the
tensor and its file) a source tensor holding NaN/Inf, or one whose values overflow the build precision (e.g. 1e6
cast to fp16). Those checks run on each tensor as it streams, so a bad weight is found while the graph is written
(inside the build's staging directory), not at generate time.

:func:`attach_weights` points every meta initializer of a traced graph (export/trace.py) at a lazy loader that
reads its source tensors only when the graph is written, and stores linear weights pre-transposed (``[in, out]``)
so no Transpose runs at inference; :func:`weight_bytes` is what those weights weigh in the build precision.

What it does not do: it does not read config.json (spec.py), open files (checkpoint.py) or write the graph.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import torch

from export.checkpoint import _DTYPES, Checkpoint, CheckpointError
from export.spec import ModelSpec

# The dtypes a weight may be stored in (safetensors names, for messages). F64 is refused rather than narrowed.
FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Weight:
    name: str  # our parameter name (model.Decoder.state_dict key)
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # HF tensor names
    transform: str  # copy | norm | stack | stack_gate_up
    fp32: bool = False  # kept in fp32 whatever the precision (norms)


def weight_plan(spec: ModelSpec) -> list[Weight]:
    H, D, I = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * D, spec.num_kv_heads * D
    plan = [Weight("embed.weight", (spec.vocab_size, H), ("model.embed_tokens.weight",), "copy")]

    def norm(ours: str, hf: str, size: int = H) -> Weight:
        return Weight(ours, (size,), (hf,), "norm", fp32=True)

    # Where each norm lives in HF naming: Qwen's post_attention_layernorm is the pre-MLP norm; Gemma2's is the
    # norm applied to the attention output, and its pre-MLP norm is pre_feedforward_layernorm.
    if spec.sandwich_norm:
        norm_names = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                      "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    else:
        norm_names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}

    for i, layer in enumerate(spec.layers):
        p, hp = f"layers.{i}", f"model.layers.{i}"
        for ours, hf in norm_names.items():
            plan.append(norm(f"{p}.{ours}.weight", f"{hp}.{hf}.weight"))
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            plan.append(Weight(f"{p}.attn.{proj}.weight", (out, H), (f"{hp}.self_attn.{proj}_proj.weight",), "copy"))
            if spec.qkv_bias:
                plan.append(Weight(f"{p}.attn.{proj}.bias", (out,), (f"{hp}.self_attn.{proj}_proj.bias",), "copy"))
        plan.append(Weight(f"{p}.attn.o.weight", (H, q_out), (f"{hp}.self_attn.o_proj.weight",), "copy"))
        if spec.qk_norm:
            plan.append(norm(f"{p}.attn.q_norm.weight", f"{hp}.self_attn.q_norm.weight", D))
            plan.append(norm(f"{p}.attn.k_norm.weight", f"{hp}.self_attn.k_norm.weight", D))
        if layer.mlp == "dense":
            for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                plan.append(Weight(f"{p}.mlp.{proj}.weight", shape, (f"{hp}.mlp.{proj}_proj.weight",), "copy"))
        else:
            E, MI = spec.num_experts, spec.moe_intermediate_size
            ex = f"{hp}.mlp.experts"
            plan.append(Weight(f"{p}.moe.router.weight", (E, H), (f"{hp}.mlp.gate.weight",), "copy"))
            gate_up = tuple(n for e in range(E) for n in (f"{ex}.{e}.gate_proj.weight", f"{ex}.{e}.up_proj.weight"))
            plan.append(Weight(f"{p}.moe.gate_up", (E, 2 * MI, H), gate_up, "stack_gate_up"))
            plan.append(Weight(f"{p}.moe.down", (E, H, MI), tuple(f"{ex}.{e}.down_proj.weight" for e in range(E)),
                               "stack"))
    plan.append(norm("norm.weight", "model.norm.weight"))
    if spec.task == "causal-lm":
        lm_source = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
        plan.append(Weight("lm_head.weight", (spec.vocab_size, H), (lm_source,), "copy"))
    else:  # transformers' task heads: `score` (classification) or `qa_outputs`, on the same body
        hf = "qa_outputs" if spec.task == "qa" else "score"
        plan.append(Weight("head.weight", (spec.num_labels, H), (f"{hf}.weight",), "copy"))
        if spec.head_bias:
            plan.append(Weight("head.bias", (spec.num_labels,), (f"{hf}.bias",), "copy"))
    if spec.task == "qa":  # transformers' QA classes keep the body under their older prefix (base_model_prefix)
        plan = [dataclasses.replace(w, sources=tuple("transformer." + n.removeprefix("model.") if n.startswith("model.")
                                                     else n for n in w.sources))
                for w in plan]
    return plan


def _source_shape(w: Weight) -> tuple[int, ...]:
    if w.transform == "stack":
        return w.shape[1:]
    if w.transform == "stack_gate_up":
        return (w.shape[1] // 2, w.shape[2])
    return w.shape


# Buffers that some checkpoints carry and that we recompute, so they are neither needed nor "unexpected".
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


def check_checkpoint(spec: ModelSpec, ckpt: Checkpoint, plan: list[Weight] | None = None) -> list[str]:
    """Raise CheckpointError on a missing, misshapen or non-float tensor; return the unexpected tensor names."""
    plan = plan or weight_plan(spec)
    problems: list[str] = []
    used: set[str] = set()
    for w in plan:
        want = _source_shape(w)
        for src in w.sources:
            used.add(src)
            info = ckpt.tensors.get(src)
            if info is None:
                problems.append(f"missing tensor '{src}' (needed for {w.name})")
            elif info.shape != want:
                problems.append(f"tensor '{src}' has shape {list(info.shape)}, expected {list(want)} from config.json")
            elif info.dtype not in FLOAT_DTYPES:
                stored = next(k for k, v in _DTYPES.items() if v == info.dtype)
                problems.append(f"tensor '{src}' has dtype {stored} ({info.dtype}); accepted: "
                                f"{', '.join(FLOAT_DTYPES.values())}")
    tied = spec.tie_embeddings and spec.task == "causal-lm"  # a task head has nothing to tie
    if tied and "lm_head.weight" in ckpt.tensors and not problems:
        # A tied checkpoint may still store the head; it must be the embedding. transformers would silently untie
        # (use the stored head) when it differs, while we use the embedding: refuse rather than disagree.
        if not _same_tensor(ckpt, "lm_head.weight", "model.embed_tokens.weight"):
            problems.append("config.json has tie_word_embeddings=true but the checkpoint's 'lm_head.weight' differs "
                            "from 'model.embed_tokens.weight' (set tie_word_embeddings to false if the head is its "
                            "own)")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CheckpointError(f"{ckpt.dir}: checkpoint does not match config.json:\n  " + "\n  ".join(shown))
    if tied:
        used.add("lm_head.weight")  # a tied checkpoint may still store the (identical) head
    return sorted(n for n in ckpt.tensors if n not in used and not n.endswith(_IGNORABLE_SUFFIXES))


def _same_tensor(ckpt: Checkpoint, a: str, b: str) -> bool:
    if ckpt.tensors[a].shape != ckpt.tensors[b].shape:
        return False
    x, y = read_finite(ckpt, a, ckpt.tensors[a].dtype), read_finite(ckpt, b, ckpt.tensors[b].dtype)
    return torch.equal(x, y) if x.dtype == y.dtype else torch.equal(x.float(), y.float())


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """torch.isfinite(t).all() in slices of `chunk` elements: isfinite makes float temporaries of its input's size
    (1.75x a 3.4 GiB embedding), a slice makes them of 64 MiB."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def read_finite(ckpt: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor cast to `dtype`, refused (CheckpointError naming it) if it holds NaN/Inf or if the cast
    overflows (e.g. 1e6 in an fp32 checkpoint built as fp16). The checks run on the tensor already in memory, a slice
    at a time (:func:`_all_finite`)."""
    t = ckpt.get(name)
    where = f"tensor '{name}' ({ckpt.tensors[name].file.name})"
    if not _all_finite(t):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise CheckpointError(f"{where} has {nan + inf} non-finite value(s) of {t.numel()} ({nan} NaN, {inf} Inf); "
                              "refusing to export it (NaN/Inf weights turn the logits into NaN at generate time)")
    out = t.to(dtype)
    if out is not t and not _all_finite(out):
        over = int((~torch.isfinite(out)).sum())
        raise CheckpointError(
            f"{where}: {over} value(s) overflow {_PRECISION.get(dtype, dtype)} (largest magnitude "
            f"{float(t.abs().max()):.6g}; {_PRECISION.get(dtype, dtype)} holds at most {torch.finfo(dtype).max:.6g}); "
            "use a wider precision (e.g. fp32) or fix the checkpoint")
    return out


def load_tensor(w: Weight, ckpt: Checkpoint, dtype: torch.dtype, norm_offset: float) -> torch.Tensor:
    """Read and transform the sources of one parameter; norms come back in fp32, the rest in `dtype`. Every source
    is checked for NaN/Inf before and after the cast (read_finite)."""
    if w.transform == "norm":
        return read_finite(ckpt, w.sources[0], torch.float32) + norm_offset
    if w.transform == "copy":
        return read_finite(ckpt, w.sources[0], dtype)
    if w.transform == "stack":
        return torch.stack([read_finite(ckpt, s, dtype) for s in w.sources])
    if w.transform == "stack_gate_up":
        pairs = zip(w.sources[0::2], w.sources[1::2])
        return torch.stack([torch.cat([read_finite(ckpt, g, dtype), read_finite(ckpt, u, dtype)]) for g, u in pairs])
    raise AssertionError(w.transform)


def warn_unexpected(unexpected: list[str]) -> None:
    if unexpected:
        head = ", ".join(unexpected[:8]) + (f" ... (+{len(unexpected) - 8})" if len(unexpected) > 8 else "")
        print(f"warning: {len(unexpected)} checkpoint tensor(s) not used by the model: {head}", file=sys.stderr)


# -- the traced graph's initializers -------------------------------------------------------------------------
def _ir_tensor(t: torch.Tensor, name: str):
    import onnx_ir as ir

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return ir.Tensor(t.view(torch.uint16).numpy(), dtype=ir.DataType.BFLOAT16, name=name)
    return ir.Tensor(t.numpy(), name=name)


def attach_weights(model, spec: ModelSpec, plan: list[Weight], ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Replace each meta initializer by a lazy tensor read from the checkpoint; fold weight transposes.

    Returns the number of Transpose nodes folded into pre-transposed weights."""
    import onnx_ir as ir

    by_name = {w.name: w for w in plan}  # tied: the exporter names the shared tensor after one of its users
    folded = 0
    for name, value in list(model.graph.initializers.items()):
        if name == "decoder.inv_freq" or name.endswith("inv_freq"):
            inv, _ = spec.rope.inv_freq_and_scale(spec.head_dim)
            value.const_value = _ir_tensor(inv, name)
            continue
        key = name.removeprefix("decoder.")
        if key not in by_name:
            raise RuntimeError(f"exported graph has an initializer '{name}' that no checkpoint tensor fills")
        w = by_name[key]
        transpose = _sole_transpose(value)
        if transpose is not None:  # store [in, out]; consumers of the Transpose read the weight directly
            out = transpose.outputs[0]
            out.replace_all_uses_with(value)
            model.graph.remove(transpose, safe=True)
            folded += 1
        w_dtype = torch.float32 if w.fp32 else dtype  # norms stay fp32 whatever the precision
        shape = (w.shape[1], w.shape[0]) if transpose is not None else w.shape
        value.shape = ir.Shape(shape)

        def load(w=w, name=name, w_dtype=w_dtype, transposed=transpose is not None):
            t = load_tensor(w, ckpt, w_dtype, spec.norm_offset)
            return _ir_tensor(t.t() if transposed else t, name)

        value.const_value = ir.LazyTensor(load, dtype=_ir_dtype(w_dtype), shape=ir.Shape(shape), name=name)
        if hasattr(ckpt, "qsource"):  # a pre-quantized checkpoint: the stored integers go with the float view
            from graphs.quantize import with_qsource

            with_qsource(value, ckpt.qsource(w))
    return folded


def _ir_dtype(dtype: torch.dtype):
    import onnx_ir as ir

    return {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
            torch.bfloat16: ir.DataType.BFLOAT16}[dtype]


def _sole_transpose(value):
    """The Transpose(perm=[1,0]) node that is the only consumer of a 2-D initializer, if any."""
    uses = list(value.uses())
    if len(uses) != 1 or value.shape is None or len(value.shape) != 2:
        return None
    node = uses[0].node if hasattr(uses[0], "node") else uses[0][0]
    perm = node.attributes.get("perm")
    if node.op_type == "Transpose" and perm is not None and list(perm.value) == [1, 0]:
        return node
    return None




def weight_bytes(plan: list[Weight], spec: ModelSpec, dtype: torch.dtype) -> int:
    total = 0
    for w in plan:
        if w.name == "lm_head.weight" and spec.tie_embeddings:
            continue
        total += int(np.prod(w.shape)) * (4 if w.fp32 else torch.empty((), dtype=dtype).element_size())
    return total
