"""RMSNorm fusion: each decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) becomes one
opset-23 ``RMSNormalization``; where a residual ``Add`` feeds the norm and the target has the fused op (ONNX
Runtime, fp32), the pair becomes ``com.microsoft.SkipSimplifiedLayerNormalization`` whose 4th output carries the
residual sum on.

Regions are found like the attention and MoE regions (graphs/fuse.py): by the exporter's module scopes
(``layers.{i}.attn_norm`` ...). A region whose boundary is not exactly (activation, weight) -> one output is left
untouched and reported. Norm weights are fp32 (the decoder keeps norms in fp32, as HF computes them); a non-fp32
activation is cast to fp32 first and the result cast back, which is the decoder's own order of operations.

What it does not do: the per-head q/k norms inside attention (the attention lowerings handle those).
"""

from __future__ import annotations

import onnx_ir as ir

from graphs import fuse, scopes

OPSET = 23
MS = "com.microsoft"


def fuse_rmsnorm(model: ir.Model, spec, skip_fusion: bool) -> dict:
    graph = model.graph
    report = fuse.Report("RMSNorm fusion")
    skipped_adds = 0
    for scope in scopes.norms(spec):
        nodes = [n for n in fuse.region_nodes(graph, scope)
                 if not any(s.startswith(scope + ".") for s in fuse.scopes(n))]  # not nested modules
        if not nodes:
            report.skipped.append(f"{scope}: no nodes")
            continue
        region = fuse.boundary(graph, nodes)
        out = [v for v in region.outputs if v.dtype is not None and v.dtype.is_floating_point()]
        region, problems = fuse.trim_shape_outputs(graph, region, {id(v) for v in out})
        acts = [v for v in region.inputs if v.const_value is None and v.dtype is not None
                and v.dtype.is_floating_point()]
        weight = graph.initializers.get(f"{scope}.weight")
        if len(acts) != 1 or weight not in region.inputs or len(region.outputs) != 1:
            problems.append(f"boundary is {[v.name for v in region.inputs]} -> {[v.name for v in region.outputs]}")
        if problems:
            report.skipped.append(f"{scope}: " + "; ".join(problems))
            continue
        x, y = acts[0], region.outputs[0]
        new, result = [], None
        add = x.producer()
        if (skip_fusion and x.dtype == ir.DataType.FLOAT and add is not None and add.op_type == "Add"
                and all(i is not None and i.const_value is None for i in add.inputs)):
            a, b = add.inputs
            skip = ir.node("SkipSimplifiedLayerNormalization", [a, b, weight], {"epsilon": spec.rms_norm_eps},
                           domain=MS, num_outputs=4, name=f"{scope}.skip_rmsnorm")
            new.append(skip)
            result = skip.outputs[0]
            add.outputs[0].replace_all_uses_with(skip.outputs[3], replace_graph_outputs=True)
            skipped_adds += 1
        else:
            src = x
            if x.dtype != ir.DataType.FLOAT:
                cast = ir.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{scope}.to_f32")
                new.append(cast)
                src = cast.outputs[0]
            norm = ir.node("RMSNormalization", [src, weight], {"axis": -1, "epsilon": spec.rms_norm_eps,
                                                               "stash_type": 1}, name=f"{scope}.rmsnorm")
            new.append(norm)
            result = norm.outputs[0]
            if x.dtype != ir.DataType.FLOAT:
                back = ir.node("Cast", [result], {"to": x.dtype}, name=f"{scope}.from_f32")
                new.append(back)
                result = back.outputs[0]
        last = max(region.nodes, key=lambda n: fuse._index(graph, n))
        ir.convenience.replace_nodes_and_values(graph, last, region.nodes, new, [y], [result])
        if new and new[0].op_type == "SkipSimplifiedLayerNormalization":
            graph.remove(add, safe=True)
        report.fused += 1
    if report.fused:
        model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
        model.opset_imports.setdefault(MS, 1)
    return {"rmsnorm_fused": report.fused, "skip_rmsnorm": skipped_adds, "rmsnorm_skipped": report.skipped}
