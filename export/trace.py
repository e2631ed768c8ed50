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


def io_names(spec: ModelSpec, kv_mode: str) -> tuple[list[str], list[str]]:
    kv_in = [f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids"] + (["attention_mask"] if kv_mode == "concat" else []) + kv_in
    return inputs, ["logits"] + kv_out


def io_description(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str) -> dict:
    """Names, symbolic shapes and dtypes of the graph's inputs and outputs (for the manifest)."""
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
    for name in outs:
        if name == "logits":
            desc["outputs"].append({"name": name, "shape": ["batch", "sequence" if logits == "all" else 1,
                                                            spec.vocab_size],
                                    "dtype": "float32"})
        else:
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
    if spec.tie_embeddings:
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

    desc = io_description(spec, kv_mode, torch.float32, logits)
    by_name = {d["name"]: d["shape"] for d in desc["inputs"] + desc["outputs"]}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        want = by_name[value.name]
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in want])
