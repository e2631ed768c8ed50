"""Trace a few decoder layers, then copy the traced layers' subgraphs to make the rest.

What it does: tracing costs about a second per layer (torch.export's fake-tensor tracing and decompositions), and
the layers of one kind (same window, same MLP kind: the spec's ``LayerSpec``) trace to the same subgraph up to
names. :func:`traced_layers` picks the shortest prefix of the model that holds, for every kind, a *template*: a
layer of that kind that is not the first of its kind (the exporter attributes shape computations that all layers
share to the first layer that needs them, so a first-of-kind subgraph is not self-contained). :func:`replicate`
then appends layers ``T..N-1`` to the traced graph, each a copy of its kind's template with the layer index
replaced everywhere it appears: initializer names (``decoder.layers.i.*``, still meta: ``attach_weights`` fills
them by name), the KV inputs/outputs (``past_key_values.i.*``, ``present.i.*``), node names and the name-scope
metadata the fusion passes read (graphs/scopes.py: ``decoder.layers.i.attn.core`` ...). A template's input is the residual stream, the output of
the last node of the layer before it; every other value it reads from outside (positions, RoPE tables, masks,
shared shape values) is read by the copy as is. The final norm is rewired to the last copy's output.

What it does not do: decide anything about the maths (the copies are the traced nodes), or apply to models whose
layers are all different kinds (then the whole model is traced, as before).
"""

from __future__ import annotations

import re

from export.spec import ModelSpec
from graphs import scopes


def traced_layers(spec: ModelSpec) -> int:
    """How many leading layers to trace: the shortest prefix that holds a template for every kind of the layers
    after it (all of them when no shorter prefix does)."""
    kinds = spec.layers
    for n in range(1, len(kinds)):
        templates = {k for t, k in enumerate(kinds[:n]) if k in kinds[:t]}
        if set(kinds[n:]) <= templates:
            return n
    return len(kinds)


def _layer_of(node) -> int | None:
    m = re.search(r"layers\.(\d+)\b", node.metadata_props.get(scopes.KEY, ""))
    return int(m.group(1)) if m else None


def _renamed(text: str, src: int, dst: int) -> str:
    return re.sub(rf"(layers|past_key_values|present)\.{src}\b", rf"\g<1>.{dst}", text)


def replicate(model, spec: ModelSpec, traced: int) -> int:
    """Append layers ``traced..N-1`` to `model` (an onnx_ir Model traced with the first `traced` layers);
    returns how many layers were copied."""
    import onnx_ir as ir

    graph = model.graph
    n_layers = spec.num_layers
    if traced >= n_layers:
        return 0
    nodes_of: dict[int, list] = {}
    for node in graph:
        layer = _layer_of(node)
        if layer is not None:
            nodes_of.setdefault(layer, []).append(node)
    if sorted(nodes_of) != list(range(traced)):
        raise RuntimeError(f"layer copy: expected nodes of layers 0..{traced - 1}, found {sorted(nodes_of)}")
    template = {}
    for t in range(traced):
        kind = spec.layers[t]
        if kind in spec.layers[:t]:
            template[kind] = t
    last_out = lambda layer: nodes_of[layer][-1].outputs[0]  # noqa: E731  the residual stream after `layer`
    for t in set(template.values()):
        if not any(_layer_of(n) == t for n, _ in last_out(t - 1).uses()):
            raise RuntimeError(f"layer copy: layer {t} does not read the last output of layer {t - 1}")
    final_hidden = last_out(traced - 1)
    consumers_after = [(n, i) for n, i in final_hidden.uses() if _layer_of(n) is None]
    if not consumers_after:
        raise RuntimeError("layer copy: nothing after the last traced layer reads its output")
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    anchor = nodes_of[traced - 1][-1]
    hidden = final_hidden
    for j in range(traced, n_layers):
        t = template[spec.layers[j]]
        mapping = {id(last_out(t - 1)): hidden}
        for name in (f"past_key_values.{t}.key", f"past_key_values.{t}.value"):
            if name in inputs:
                new = ir.Value(name=_renamed(name, t, j), type=inputs[name].type, shape=inputs[name].shape)
                graph.inputs.append(new)
                mapping[id(inputs[name])] = new
        copies = []
        for node in nodes_of[t]:
            new_inputs = []
            for v in node.inputs:
                if v is None:
                    new_inputs.append(None)
                elif id(v) in mapping:
                    new_inputs.append(mapping[id(v)])
                elif v.is_initializer() and f"layers.{t}." in v.name:
                    init = ir.Value(name=_renamed(v.name, t, j), type=v.type, shape=v.shape,
                                    const_value=v.const_value)
                    graph.register_initializer(init)
                    mapping[id(v)] = init
                    new_inputs.append(init)
                else:  # shared: positions, RoPE tables, masks, shape values
                    new_inputs.append(v)
            attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
            meta = {k: _renamed(val, t, j) for k, val in node.metadata_props.items()}
            name = _renamed(node.name or "", t, j)
            copy = ir.Node(node.domain, node.op_type, new_inputs, attrs, overload=node.overload,
                           num_outputs=len(node.outputs), version=node.version, metadata_props=meta,
                           name=name if name != node.name else f"{node.name}__layer{j}")
            for old, new in zip(node.outputs, copy.outputs):
                new.name = f"{old.name}__layer{j}"
                new.type, new.shape = old.type, None if old.shape is None else old.shape.copy()
                mapping[id(old)] = new
            copies.append(copy)
        graph.insert_after(anchor, copies)
        anchor = copies[-1]
        for name in (f"present.{t}.key", f"present.{t}.value"):
            if name in outputs:
                if id(outputs[name]) not in mapping:
                    raise RuntimeError(f"layer copy: {name} is not produced inside layer {t}")
                new = mapping[id(outputs[name])]
                new.name = _renamed(name, t, j)
                graph.outputs.append(new)
        hidden = mapping[id(last_out(t))]
    for node, index in consumers_after:
        node.replace_input_with(index, hidden)
    return n_layers - traced
