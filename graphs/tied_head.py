"""The float LM head of a tied model, rewritten for ONNX Runtime so the table is held once, not twice.

What it does: the exporter writes the tied head as ``MatMul(h, Transpose(E))`` with ``E`` [V, H] the embedding
table the Gather also reads. ONNX Runtime's CPU provider prepacks the constant right-hand side of a MatMul into a
buffer of its own while the mapped E stays resident for the Gather (a gemma-2-9b int4 session, /proc/self/smaps
right after it opened: the 3.42 GiB table mapped and resident, a 4.06 GiB anonymous block beside it; `generate`
peaked at 1.66x the weight bytes). :func:`share_tied_head` computes the transposed product instead,

    logits = Reshape(Transpose(MatMul(E, Reshape(Transpose(h, [2, 0, 1]), [H, -1]))), [B, S, V])

where E is the left-hand side, which the provider never prepacks: the head reads the mapped table itself. Measured
on the Qwen2-0.5B head alone (V 151936, H 896, fp32, 2 threads): peak 574 MiB instead of 1091 MiB, 17.6 ms instead
of 23.4 ms a token at batch 1, 31 ms instead of 25 ms at batch 8 (an unpacked table costs more for a few columns).

What it does not do: touch a quantized head (MatMulNBits reads its integers; graphs/quantize.py), an untied head
(its own weight is not shared, prepacking it costs nothing extra), or TensorRT graphs (it builds its own weights).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse
from graphs.quantize import LM_HEAD


def share_tied_head(model: ir.Model) -> int:
    """Rewrite ``MatMul(h, Transpose(E))`` with E the tied table (an initializer a Gather also reads); returns how
    many heads were rewritten (0 or 1)."""
    graph = model.graph
    table = graph.initializers.get(LM_HEAD)
    if table is None or not any(u.node.op_type == "Gather" for u in table.uses()):
        return 0
    done = 0
    for use in list(table.uses()):
        transpose = use.node
        perm = transpose.attributes.get("perm")
        if transpose.op_type != "Transpose" or perm is None or list(perm.value) != [1, 0]:
            continue
        for mm_use in list(transpose.outputs[0].uses()):
            matmul = mm_use.node
            h = matmul.inputs[0]
            if matmul.op_type != "MatMul" or mm_use.idx != 1 or h.shape is None or len(h.shape) != 3:
                continue
            V, H = table.shape
            tag = "decoder.lm_head.shared"
            hk = fuse.initializer(graph, f"tied_head.shape_{H}x-1", np.array([H, -1], np.int64))
            lead = [fuse.initializer(graph, f"tied_head.{n}", np.array([v], np.int64))
                    for n, v in (("zero", 0), ("two", 2), (f"v{V}", V))]
            h_t = ir.node("Transpose", [h], {"perm": [2, 0, 1]}, name=f"{tag}.h_t")
            columns = ir.node("Reshape", [h_t.outputs[0], hk], name=f"{tag}.columns")  # [H, B*S]
            product = ir.node("MatMul", [table, columns.outputs[0]], name=f"{tag}.matmul")  # [V, B*S]
            rows = ir.node("Transpose", [product.outputs[0]], {"perm": [1, 0]}, name=f"{tag}.rows")  # [B*S, V]
            shape = ir.node("Shape", [h], name=f"{tag}.shape")
            batch_seq = ir.node("Slice", [shape.outputs[0], lead[0], lead[1]], name=f"{tag}.batch_seq")
            out_shape = ir.node("Concat", [batch_seq.outputs[0], lead[2]], {"axis": 0}, name=f"{tag}.out_shape")
            out = ir.node("Reshape", [rows.outputs[0], out_shape.outputs[0]], name=f"{tag}.logits")  # [B, S, V]
            out.outputs[0].type, out.outputs[0].shape = matmul.outputs[0].type, matmul.outputs[0].shape
            nodes = [h_t, columns, product, rows, shape, batch_seq, out_shape, out]
            ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], nodes, list(matmul.outputs),
                                                    list(out.outputs))
            done += 1
    if done:
        fuse.remove_unused(model)
    return done
