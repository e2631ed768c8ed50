"""Export the decoder to one ONNX graph (prefill + decode) with explicit KV inputs/outputs, weights streamed.

What it does: builds the ``Decoder`` with its parameters on the *meta* device (no weight memory), exports it with
``torch.onnx.export(dynamo=True)`` using meta example inputs (only the first few layers: the rest are copies of the
traced ones, export/replicate.py, since tracing costs about a second a layer), then points every initializer at a lazy
loader that reads its source tensors from the safetensors files only when the graph is written. Linear weights are
stored pre-transposed (``[in, out]``) so no Transpose runs at inference. ``onnx_ir.save`` writes the external-data
file tensor by tensor, so the model is never held in memory, let alone twice. Each tensor is checked as it streams
(weights.load_tensor): NaN/Inf, or values the cast to the build precision overflows, raise a CheckpointError naming
the tensor, and the build stops (its staging directory removes itself).

Graph contract (DESIGN.md section 2; names as Optimum / onnxruntime-genai):
inputs ``input_ids [batch, sequence] int64``, ``position_ids [batch, sequence] int64``, in concat mode
``attention_mask [batch, total_sequence] int64``, and ``past_key_values.{i}.key|value [batch, kv_heads,
past_sequence | max_cache_len, head_dim]``; outputs ``logits float32`` and ``present.{i}.key|value``.
``logits`` is ``[batch, 1, vocab]`` (the last position of each call; the default, ``--logits last``: the runtime
only samples from it, and a 128-token prefill skips 127/128 of the LM head) or ``[batch, sequence, vocab]``
(``--logits all``, for scoring every position). Static mode has no attention_mask: position_ids are also the
cache slots.

With a quantization config (``build --quantize``) the lowered graph's linears are rewritten by
graphs/quantize.py before it is written; the quantized tensors are lazy too (quantized as they stream).

What it does not do: fuse anything (graphs/ passes do) or write the artifact directory (build.py does).
"""

from __future__ import annotations

import warnings
from pathlib import Path
import numpy as np
import torch

from export.checkpoint import Checkpoint, CheckpointError
from export.model import Decoder
from export.spec import ModelSpec
from export.weights import Weight, load_tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_TYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def io_names(spec: ModelSpec, kv_mode: str) -> tuple[list[str], list[str]]:
    kv_in = [f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids"] + (["attention_mask"] if kv_mode == "concat" else []) + kv_in
    return inputs, ["logits"] + kv_out


def io_description(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str = "last") -> dict:
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


def trace_graph(spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str = "last"):
    """The exported graph (an onnx_ir Model) whose initializers still hold meta tensors. Only the first few layers
    are traced; the rest are copies of them (export/replicate.py)."""
    import dataclasses

    from export.replicate import replicate, traced_layers

    full = spec
    traced = traced_layers(spec)
    spec = dataclasses.replace(spec, layers=spec.layers[:traced])
    decoder = Decoder(spec, kv_mode, dtype, logits)
    if spec.tie_embeddings:
        decoder.lm_head.weight = decoder.embed.weight
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
    return program.model


def _name_dims(model, spec: ModelSpec, kv_mode: str, logits: str) -> None:
    """Give the exporter's symbolic dims (s10, s70, ...) the contract's names."""
    import onnx_ir as ir

    desc = io_description(spec, kv_mode, torch.float32, logits)
    by_name = {d["name"]: d["shape"] for d in desc["inputs"] + desc["outputs"]}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        want = by_name[value.name]
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in want])


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


def export_onnx(spec: ModelSpec, ckpt: Checkpoint, plan: list[Weight], out_path: Path, kv_mode: str,
                dtype: torch.dtype, progress: bool = True, lowering: str = "reference",
                max_seq_len: int = 4096, logits: str = "last", quant=None) -> dict:
    """Trace, attach lazy weights and write `out_path` + `out_path.data`. Returns facts for the manifest."""
    import contextlib
    import sys

    import onnx_ir as ir
    from tqdm import tqdm

    if progress:
        print("tracing the decoder (torch.export, meta weights) ...", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its own progress lines to stdout
        model = trace_graph(spec, kv_mode, dtype, logits)
    _name_dims(model, spec, kv_mode, logits)
    folded = attach_weights(model, spec, plan, ckpt, dtype)
    from graphs.lower import lower

    import ml_dtypes

    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}[dtype]
    lowered = lower(model, spec, lowering, kv_mode, max_seq_len, np_dtype)
    _fold_constants(model)
    quantization = None
    if quant is not None:  # after folding: the optimizer must not fold a dequantize back into a float weight
        from graphs.quantize import quantize_graph

        quantization = quantize_graph(model, quant, lowering, np_dtype)
    model.producer_name = "llm-export"
    initializers = list(model.graph.initializers.values())
    with tqdm(total=len(initializers), unit="tensor", desc="writing weights", disable=not progress,
              file=sys.stderr) as bar:
        ir.save(model, out_path, external_data=out_path.name + ".data", max_workers=1,
                callback=lambda tensor, info: bar.update(1))
        bar.update(bar.total - bar.n)  # tensors small enough to stay inside model.onnx have no callback
    if quant is not None:
        from graphs.quantize import release

        release()  # drop the last quantized tensor the pass kept for its scales
    return {"transposes_folded": folded, "nodes": len(list(model.graph)),
            "op_histogram": op_histogram(model), "fusion": lowered, "quantization": quantization}


def _fold_constants(model) -> None:
    """Constant folding and dead-code removal (onnxscript's optimizer). Only small tensors are folded
    (input_size_limit), so the large lazy weights are not read here; small ones (norm weights, biases) are, by the
    initializer-deduplication pass. TensorRT's parser needs it: it wants e.g. ReduceMean axes as constants, not as
    a Reshape of constants."""
    import logging

    import onnxscript.optimizer

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(model, num_iterations=2, input_size_limit=1024, output_size_limit=1 << 16,
                                         inline=False)
    except Exception as e:  # noqa: BLE001 - the passes wrap what a lazy weight raised (a NaN norm) in PassError
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, CheckpointError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if not node.domain else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def weight_bytes(plan: list[Weight], spec: ModelSpec, dtype: torch.dtype) -> int:
    total = 0
    for w in plan:
        if w.name == "lm_head.weight" and spec.tie_embeddings:
            continue
        total += int(np.prod(w.shape)) * (4 if w.fp32 else torch.empty((), dtype=dtype).element_size())
    return total
