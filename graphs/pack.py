"""Projection packing: run projections that read the same activation as one MatMul.

* q/k/v: ``MatMul(x, Wq) (+ bq)``, ``MatMul(x, Wk) (+ bk)``, ``MatMul(x, Wv) (+ bv)`` feeding one fused attention
  node become ``MatMul(x, [Wq|Wk|Wv]) (+ [bq|bk|bv])``; the attention node then takes the packed tensor as its query
  and no key/value (GroupQueryAttention's packed-QKV form).
* gate/up: ``MatMul(x, Wg)`` and ``MatMul(x, Wu)`` of a dense MLP become ``MatMul(x, [Wg|Wu])`` and a ``Split``.

On a CPU decode step every projection is a matrix-vector product limited by memory bandwidth; one product over
the concatenated weight reads the same bytes with a third (or half) of the kernel launches and thread-pool
synchronisations. The concatenated weights are lazy tensors: read from the checkpoint only when the graph is
written. A projection that does not have exactly this shape is left alone; each pass returns how many groups it
packed.

A pre-quantized checkpoint's integers (graphs/quantize.py QSource) are concatenated with the weights; projections
stored in different schemes, or with act-order, are not packed.

What it does not do: change any result (concatenation is exact), or touch MoE experts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse, quantize, scopes


def _linear(value: ir.Value):
    """(x, weight, bias or None, nodes) when value = MatMul(x, W) [+ b] with constant W (and b), else None."""
    node = value.producer()
    bias, nodes = None, []
    if node is not None and node.op_type == "Add":
        a, b = node.inputs
        if b is not None and b.const_value is not None and a.producer() is not None:
            bias, nodes, node = b, [node], a.producer()
    if node is None or node.op_type != "MatMul" or node.inputs[1].const_value is None:
        return None
    return node.inputs[0], node.inputs[1], bias, [node] + nodes


def _lazy_concat(graph: ir.Graph, name: str, parts: list[ir.Value], axis: int) -> ir.Value:
    srcs = [p.const_value for p in parts]
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    value = fuse.lazy_initializer(graph, name, parts[0], shape,
                                  lambda: np.concatenate([s.numpy() for s in srcs], axis=axis))
    if axis == 1 and quantize.qsource(parts[0]) is not None:  # a pre-quantized checkpoint's integers, along N
        quantize.with_qsource(value, quantize.qsource(parts[0]).concat([quantize.qsource(p) for p in parts[1:]]))
    return value


def _packable(weights: list[ir.Value]) -> bool:
    """Weights of a pre-quantized checkpoint pack only when they share one stored scheme (no act-order: each has
    its own input order); float weights pack with float weights only."""
    sources = [quantize.qsource(w) for w in weights]
    if all(s is None for s in sources):
        return True
    return all(s is not None for s in sources) and sources[0].concat(sources[1:]) is not None


def pack_qkv(model: ir.Model, node_filter) -> int:
    """Pack q/k/v of every fused attention node accepted by node_filter(node). Returns how many were packed."""
    graph = model.graph
    packed = 0
    for node in list(graph):
        if node.domain != fuse.attn_plugin.DOMAIN or node.op_type != fuse.attn_plugin.OP or not node_filter(node):
            continue
        parts = [_linear(v) for v in node.inputs[:3]]
        if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
            continue
        if len({p[2] is None for p in parts}) != 1 or not _packable([p[1] for p in parts]):
            continue
        x = parts[0][0]
        weight = _lazy_concat(graph, f"{node.name}.qkv.weight", [p[1] for p in parts], axis=1)
        new = [ir.node("MatMul", [x, weight], name=f"{node.name}.qkv")]
        if parts[0][2] is not None:
            bias = _lazy_concat(graph, f"{node.name}.qkv.bias", [p[2] for p in parts], axis=0)
            new.append(ir.node("Add", [new[-1].outputs[0], bias], name=f"{node.name}.qkv_bias"))
        graph.insert_before(node, new)
        node.replace_input_with(0, new[-1].outputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for p in parts:
            for old in reversed(p[3]):  # the bias Add first, then the MatMul it read
                if not any(list(o.uses()) for o in old.outputs):
                    graph.remove(old, safe=True)
        packed += 1
    return packed


def pack_gate_up(model: ir.Model, spec) -> int:
    graph = model.graph
    packed = 0
    for i, layer in enumerate(spec.layers):
        if layer.mlp != "dense":
            continue
        scope = f"{scopes.layer(i)}.mlp"
        gate = [n for n in fuse.region_nodes(graph, f"{scope}.gate") if n.op_type == "MatMul"]
        up = [n for n in fuse.region_nodes(graph, f"{scope}.up") if n.op_type == "MatMul"]
        if len(gate) != 1 or len(up) != 1 or gate[0].inputs[0] is not up[0].inputs[0]:
            continue
        g, u = gate[0], up[0]
        if g.inputs[1].const_value is None or u.inputs[1].const_value is None or \
                not _packable([g.inputs[1], u.inputs[1]]):
            continue
        weight = _lazy_concat(graph, f"{scope}.gate_up.weight", [g.inputs[1], u.inputs[1]], axis=1)
        width = g.inputs[1].shape[1]
        split = fuse.initializer(graph, f"pack.split_{width}", np.array([width, width], dtype=np.int64))
        mm = ir.node("MatMul", [g.inputs[0], weight], name=f"{scope}.gate_up")
        sp = ir.node("Split", [mm.outputs[0], split], {"axis": -1}, num_outputs=2, name=f"{scope}.gate_up_split")
        graph.insert_before(g, [mm, sp])
        g.outputs[0].replace_all_uses_with(sp.outputs[0])
        u.outputs[0].replace_all_uses_with(sp.outputs[1])
        graph.remove([g, u], safe=True)
        packed += 1
    return packed
