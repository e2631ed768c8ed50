"""Trace the decoder to one ONNX graph (prefill + decode) with explicit KV inputs/outputs: the graph contract.

What it does: :func:`io_names` and :func:`io_description` define the contract's inputs and outputs (names, symbolic
shapes, dtypes; the manifest records them and export/engine.py checks engines against them). :func:`trace_graph`
builds the ``Decoder`` with its parameters on the *meta* device (no weight memory) and exports it with
``torch.onnx.export(dynamo=True)`` using meta example inputs (only the first few layers: the rest are copies of the
traced ones, export/replicate.py, since tracing costs about a second a layer), then names the symbolic dims as the
contract does. The graph it returns still holds meta initializers: export/weights.py ``attach_weights`` points
them at the checkpoint.

Graph contract (DESIGN.md section 2; names as Optimum / onnxruntime-genai):
inputs ``input_ids [batch, sequence] int64``, ``position_ids [batch, sequence] int64``, in concat mode
``attention_mask [batch, total_sequence] int64``, and ``past_key_values.{i}.key|value [batch, kv_heads,
past_sequence | max_cache_len, head_dim]``; outputs ``logits float32`` and ``present.{i}.key|value``.
``logits`` is ``[batch, 1, vocab]`` (the last position of each call; the default, ``--logits last``: the runtime
only samples from it, and a 128-token prefill skips 127/128 of the LM head) or ``[batch, sequence, vocab]``
(``--logits all``, for scoring every position). Static mode has no attention_mask: position_ids are also the
cache slots.

Task heads (``spec.task`` seq-cls / token-cls / qa): the same decoder is traced in static mode with the KV I/O above
(so fusion and lowering see the contract they know), and graphs/task.py then seals it into one full-sequence
forward: ``input_ids [batch, sequence] int64`` in (right-padded; positions 0..S-1 and zero KV buffers are made
inside), outputs ``logits [batch, labels]`` (seq-cls, pooled), ``logits [batch, sequence, labels]`` (token-cls) or
``start_logits``, ``end_logits [batch, sequence]`` (qa), all float32. :func:`io_description` gives the sealed I/O.

What it does not do: read weights (export/weights.py), fuse, lower, fold or quantize (graphs/), or write files
(export/build.py orchestrates those stages).
"""

from __future__ import annotations

import logging
import warnings

import ml_dtypes
import numpy as np
import torch

from export.model import Decoder
from export.spec import ModelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_TYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}


def head_outputs(spec: ModelSpec, logits: str) -> list[dict]:
    """The head's outputs (float32), names and symbolic shapes."""
    if spec.task == "causal-lm":
        return [{"name": "logits", "shape": ["batch", "sequence" if logits == "all" else 1, spec.vocab_size]}]
    if spec.task == "seq-cls":
        return [{"name": "logits", "shape": ["batch", spec.num_labels]}]
    if spec.task == "token-cls":
        return [{"name": "logits", "shape": ["batch", "sequence", spec.num_labels]}]
    return [{"name": "start_logits", "shape": ["batch", "sequence"]}, {"name": "end_logits", "shape": ["batch", "sequence"]}]


def io_names(spec: ModelSpec, kv_mode: str) -> tuple[list[str], list[str]]:
    """The traced graph's I/O names (a task graph is traced with KV I/O, then sealed: graphs/task.py)."""
    kv_in = [f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids"] + (["attention_mask"] if kv_mode == "concat" else []) + kv_in
    return inputs, [o["name"] for o in head_outputs(spec, "all")] + kv_out


def io_description(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str) -> dict:
    """Names, symbolic shapes and dtypes of the graph's inputs and outputs (for the manifest): the sealed I/O for
    a task head."""
    desc = _traced_description(spec, kv_mode, dtype, logits)
    if spec.task != "causal-lm":
        desc = {"inputs": [d for d in desc["inputs"] if d["name"] == "input_ids"],
                "outputs": [d for d in desc["outputs"] if not d["name"].startswith("present.")]}
    return desc


def _traced_description(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str) -> dict:
    kv_len = "past_sequence" if kv_mode == "concat" else "max_cache_len"
    out_len = "total_sequence" if kv_mode == "concat" else "max_cache_len"
    kv_shape = lambda n: ["batch", spec.num_kv_heads, n, spec.head_dim]  # noqa: E731
    ins, outs = io_names(spec, kv_mode)
    desc = {"inputs": [], "outputs": []}
    for name in ins:
        if name.startswith("past_key_values"):
            desc["inputs"].append({"name": name, "shape": kv_shape(kv_len), "dtype": ONNX_TYPE[dtype]})
        elif name == "attention_mask":
            desc["inputs"].append({"name": name, "shape": ["batch", "total_sequence"], "dtype": "int64"})
        else:
            desc["inputs"].append({"name": name, "shape": ["batch", "sequence"], "dtype": "int64"})
    desc["outputs"] = [{**o, "dtype": "float32"} for o in head_outputs(spec, logits)]
    for name in outs[len(desc["outputs"]):]:
        desc["outputs"].append({"name": name, "shape": kv_shape(out_len), "dtype": ONNX_TYPE[dtype]})
    return desc


class _ExportWrapper(torch.nn.Module):
    """Fixed positional signature per KV mode (static mode takes no attention_mask)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, *rest):
        if self.decoder.kv_mode == "concat":
            return self.decoder(input_ids, position_ids, rest[0], *rest[1:])
        return self.decoder(input_ids, position_ids, None, *rest)


def trace_graph(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str):
    """The exported graph (an onnx_ir Model) whose initializers still hold meta tensors, its I/O dims named as the
    contract's. Only the first few layers are traced; the rest are copies of them (export/replicate.py)."""
    import dataclasses

    from export.replicate import replicate, traced_layers

    full = spec
    traced = traced_layers(spec)
    spec = dataclasses.replace(spec, layers=spec.layers[:traced])
    decoder = Decoder(spec, kv_mode, dtype, logits)
    if spec.tie_embeddings and spec.task == "causal-lm":
        decoder.lm_head.weight = decoder.embed.weight
    # the exporter warns once per torchvision op it cannot register (torchvision is not a dependency of ours)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    decoder.inv_freq = decoder.inv_freq.to("meta")
    B, S, P = 2, 3, 5  # >= 2 each, or the exporter freezes the dims
    meta = dict(device="meta")
    ids = torch.zeros(B, S, dtype=torch.int64, **meta)
    past = [torch.zeros(B, spec.num_kv_heads, P if kv_mode == "concat" else 8, spec.head_dim, dtype=dtype, **meta)
            for _ in range(2 * spec.num_layers)]
    D = torch.export.Dim.DYNAMIC
    args = [ids, ids.clone()]
    shapes: list = [{0: D, 1: D}, {0: D, 1: D}]
    if kv_mode == "concat":
        args.append(torch.ones(B, P + S, dtype=torch.int64, **meta))
        shapes.append({0: D, 1: D})
    args += past
    shapes += [{0: D, 2: D}] * len(past)
    ins, outs = io_names(spec, kv_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _ExportWrapper(decoder), tuple(args), dynamo=True, optimize=False, verbose=False,
            dynamic_shapes=(shapes[0], shapes[1], tuple(shapes[2:])), input_names=ins, output_names=outs,
        )
    replicate(program.model, full, traced)
    _name_dims(program.model, full, kv_mode, logits)
    return program.model


def _name_dims(model, spec: ModelSpec, kv_mode: str, logits: str) -> None:
    """Give the exporter's symbolic dims (s10, s70, ...) the contract's names."""
    import onnx_ir as ir

    desc = _traced_description(spec, kv_mode, torch.float32, logits)
    by_name = {d["name"]: d["shape"] for d in desc["inputs"] + desc["outputs"]}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        want = by_name[value.name]
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in want])
