"""Fusion passes: replace each layer's attention region and each sparse layer's MoE region by one fused node.

How regions are found: the decoder's attention core and MoE are torch modules of their own
(``layers.{i}.attn.core``, ``layers.{i}.moe``), and the exporter stamps every ONNX node with its module scope
(``pkg.torch.onnx.name_scopes``). A region is the set of nodes of that scope; its boundary (values it reads from
outside, values read outside it) must be exactly the expected one, or the region is left untouched and reported,
never half-rewritten. The fused node carries every attribute the kernel needs (plugins/attention.py,
plugins/moe.py). Each pass returns a :class:`Report` and the caller checks the count (attention = layers,
MoE = sparse layers) when it requires full fusion.

These passes work on ``onnx_ir`` models, the exporter's own IR: its initializers are lazy tensors that read the
checkpoint only when the graph is written, so a pass never loads the weights (onnx-graphsurgeon would have to
materialise them to rebuild the graph).

What it does not do: lower the fused nodes to a target (lower.py).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from plugins import attention as attn_plugin
from plugins import moe as moe_plugin

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class Report:
    name: str
    fused: int = 0
    skipped: list[str] = field(default_factory=list)  # "layer 3: why"

    def require(self, expected: int) -> None:
        if self.fused != expected:
            why = "; ".join(self.skipped) or "no region found"
            raise FusionError(f"{self.name}: fused {self.fused} region(s), expected {expected} ({why})")


class FusionError(RuntimeError):
    """A pass that had to fire a known number of times did not."""


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small constant initializer, created once per name and shared by every pass that asks for it."""
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def lazy_initializer(graph: ir.Graph, name: str, like: ir.Value, shape, load) -> ir.Value:
    """An initializer whose data `load()` (-> numpy array) computes only when the graph is written."""
    shape = ir.Shape(shape)
    tensor = ir.LazyTensor(lambda: ir.Tensor(load(), name=name), dtype=like.dtype, shape=shape, name=name)
    value = ir.Value(name=name, shape=shape, type=like.type, const_value=tensor)
    graph.register_initializer(value)
    return value


def scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get(SCOPES_KEY)
    return ast.literal_eval(raw) if raw else []


def region_nodes(graph: ir.Graph, scope: str) -> list[ir.Node]:
    return [n for n in graph if scope in scopes(n)]


@dataclass
class Region:
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # read from outside (graph inputs, initializers, other nodes), in first-use order
    outputs: list[ir.Value]  # produced inside, read outside or graph outputs


def boundary(graph: ir.Graph, nodes: list[ir.Node]) -> Region:
    inside = set(id(n) for n in nodes)
    graph_outputs = set(id(v) for v in graph.outputs)
    inputs, outputs, seen = [], [], set()
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in seen:
                continue
            producer = v.producer()
            if producer is None or id(producer) not in inside:
                seen.add(id(v))
                inputs.append(v)
        for v in n.outputs:
            if id(v) in graph_outputs or any(id(u.node) not in inside for u in v.uses()):
                outputs.append(v)
    return Region(nodes, inputs, outputs)


def trim_shape_outputs(graph: ir.Graph, region: Region, expected: set[int]) -> tuple[Region, list[str]]:
    """The exporter shares shape arithmetic (sizes, reshape targets) between layers, so a region can export
    integer values that later layers read. Keep the nodes computing those outside the region (they only touch
    shapes); any other unexpected output is a real mismatch and is returned as a problem."""
    extra = [v for v in region.outputs if id(v) not in expected]
    keep: dict[int, ir.Node] = {}
    stack = [v.producer() for v in extra]
    inside = {id(n) for n in region.nodes}
    while stack:
        node = stack.pop()
        if node is None or id(node) not in inside or id(node) in keep:
            continue
        keep[id(node)] = node
        stack += [v.producer() for v in node.inputs if v is not None]
    bad = [v.name for n in keep.values() for v in n.outputs if v.dtype is not None and v.dtype.is_floating_point()]
    if bad:
        return region, [f"unexpected float outputs {sorted(set(bad))}"]
    if not keep:
        return region, []
    return boundary(graph, [n for n in region.nodes if id(n) not in keep]), []


def _from_scope(v: ir.Value, scope: str) -> bool:
    return _in_scope(v.producer(), scope)


def _in_scope(node: ir.Node | None, scope: str) -> bool:
    return node is not None and scope in scopes(node)


def _replace(graph: ir.Graph, region: Region, node: ir.Node, old: list[ir.Value]) -> None:
    """Swap the region for `node`, whose outputs take over the names and uses of `old`."""
    last = max(region.nodes, key=lambda n: _index(graph, n))
    ir.convenience.replace_nodes_and_values(graph, last, region.nodes, [node], old, list(node.outputs))


def _index(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    raise KeyError(node)


# ---- attention ---------------------------------------------------------------------------------------------------

def rope_caches(model: ir.Model, spec, max_seq_len: int, dtype) -> tuple[ir.Value, ir.Value]:
    """Shared cos/sin caches [max_seq_len, head_dim/2] (yarn's attention factor folded in), made once."""
    graph = model.graph
    if "rope.cos_cache" in graph.initializers:
        return graph.initializers["rope.cos_cache"], graph.initializers["rope.sin_cache"]
    import torch

    inv_freq, scale = spec.rope.inv_freq_and_scale(spec.head_dim)
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None]  # [L, D/2]
    cos, sin = ((fn(freqs) * scale).numpy().astype(dtype) for fn in (torch.cos, torch.sin))
    return initializer(graph, "rope.cos_cache", cos), initializer(graph, "rope.sin_cache", sin)


def attention_attrs(spec, layer: int, kv_mode: str) -> dict:
    return {
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "scale": float(spec.attn_scale),
        "softcap": float(spec.attn_softcap or 0.0),
        "window": int(spec.layers[layer].window or 0),
        "kv_mode": kv_mode,
        "qk_norm": int(spec.qk_norm),
        "rms_eps": float(spec.rms_norm_eps),
    }


def fuse_attention(model: ir.Model, spec, kv_mode: str, max_seq_len: int, np_dtype,
                   supports: Callable[[dict], str | None] = lambda attrs: None) -> Report:
    """Fuse layers.{i}.attn.core into llm_export.Attention. `supports(attrs)` returns a reason to skip, or None."""
    graph = model.graph
    report = Report("attention fusion")
    inputs = {v.name: v for v in graph.inputs}
    for i in range(spec.num_layers):
        prefix = f"decoder.layers.{i}.attn"
        nodes = region_nodes(graph, f"{prefix}.core")
        if not nodes:
            report.skipped.append(f"layer {i}: no nodes in scope {prefix}.core")
            continue
        region = boundary(graph, nodes)
        present_names = (f"present.{i}.key", f"present.{i}.value")
        attn_out = [v for v in region.outputs if v.name not in present_names
                    and any(_in_scope(u.node, f"{prefix}.o") for u in v.uses())]
        region, problems = trim_shape_outputs(graph, region, {id(v) for v in region.outputs
                                                              if v.name in present_names} | {id(v) for v in attn_out})
        attrs = attention_attrs(spec, i, kv_mode)
        why = supports(attrs)
        if why:
            report.skipped.append(f"layer {i}: {why}")
            continue
        q = [v for v in region.inputs if _from_scope(v, f"{prefix}.q")]
        k = [v for v in region.inputs if _from_scope(v, f"{prefix}.k")]
        v_ = [v for v in region.inputs if _from_scope(v, f"{prefix}.v")]
        norms = [v for v in region.inputs if v.name in (f"{prefix}.q_norm.weight", f"{prefix}.k_norm.weight")]
        past_k, past_v = inputs.get(f"past_key_values.{i}.key"), inputs.get(f"past_key_values.{i}.value")
        present = {v.name: v for v in region.outputs if v.name and v.name.startswith("present.")}
        others = [v for v in region.outputs if v.name not in (f"present.{i}.key", f"present.{i}.value")]
        if not (len(q) == len(k) == len(v_) == 1):
            problems.append(f"expected one q/k/v projection input each, found {len(q)}/{len(k)}/{len(v_)}")
        if past_k not in region.inputs or past_v not in region.inputs:
            problems.append("the region does not read this layer's past_key_values")
        if set(present) != {f"present.{i}.key", f"present.{i}.value"} or len(others) != 1:
            problems.append(f"unexpected outputs {[v.name for v in region.outputs]}")
        if spec.qk_norm and len(norms) != 2:
            problems.append("q/k norm weights not found")
        if problems:
            report.skipped.append(f"layer {i}: " + "; ".join(problems))
            continue
        cos, sin = rope_caches(model, spec, max_seq_len, np_dtype)
        by_name = {v.name: v for v in norms}
        node_inputs = [q[0], k[0], v_[0], past_k, past_v, inputs["position_ids"], inputs.get("attention_mask"),
                       cos, sin, by_name.get(f"{prefix}.q_norm.weight"), by_name.get(f"{prefix}.k_norm.weight")]
        node = ir.node(attn_plugin.OP, node_inputs, attrs, domain=attn_plugin.DOMAIN, num_outputs=3,
                       name=f"layers.{i}.attention")
        _replace(graph, region, node, [others[0], present[f"present.{i}.key"], present[f"present.{i}.value"]])
        report.fused += 1
    return report


# ---- MoE -------------------------------------------------------------------------------------------------------

def fuse_moe(model: ir.Model, spec) -> Report:
    graph = model.graph
    report = Report("MoE fusion")
    for i in spec.sparse_layers:
        scope = f"decoder.layers.{i}.moe"
        nodes = region_nodes(graph, scope)
        if not nodes:
            report.skipped.append(f"layer {i}: no nodes in scope {scope}")
            continue
        region = boundary(graph, nodes)
        out = [v for v in region.outputs if v.dtype is not None and v.dtype.is_floating_point()]
        region, problems = trim_shape_outputs(graph, region, {id(v) for v in out})
        weights = {v.name: v for v in region.inputs if v.const_value is not None and v.name.startswith(scope)}
        # The activation: the one non-constant float input (the others are shape arithmetic done outside).
        hidden = [v for v in region.inputs if v.const_value is None and v.dtype is not None
                  and v.dtype.is_floating_point()]
        router = weights.get(f"{scope}.router.weight")
        gate_up, down = weights.get(f"{scope}.gate_up"), weights.get(f"{scope}.down")
        if len(hidden) != 1:
            problems.append(f"expected one activation input, found {[v.name for v in hidden]}")
        if None in (router, gate_up, down):
            problems.append(f"weights not found among {sorted(weights)}")
        if len(region.outputs) != 1:
            problems.append(f"expected one output, found {len(region.outputs)}")
        if problems:
            report.skipped.append(f"layer {i}: " + "; ".join(problems))
            continue
        router_hE = _router_as_h_by_e(graph, router, spec)
        attrs = {"num_experts": spec.num_experts, "top_k": spec.top_k, "norm_topk_prob": int(spec.norm_topk_prob),
                 "moe_intermediate_size": spec.moe_intermediate_size, "activation": spec.hidden_act}
        node = ir.node(moe_plugin.OP, [hidden[0], router_hE, gate_up, down], attrs, domain=moe_plugin.DOMAIN,
                       num_outputs=1, name=f"layers.{i}.moe")
        _replace(graph, region, node, region.outputs)
        report.fused += 1
    return report


def _router_as_h_by_e(graph: ir.Graph, router: ir.Value, spec) -> ir.Value:
    """The router weight as [H, E]: the exporter may keep nn.Linear's [E, H] (for Gemm transB); then wrap it
    in a lazy transpose (tiny: E x H)."""
    shape = tuple(router.shape)
    if shape == (spec.hidden_size, spec.num_experts) and spec.hidden_size != spec.num_experts:
        return router
    src = router.const_value
    return lazy_initializer(graph, router.name + ".t", router, (shape[1], shape[0]),
                            lambda: np.ascontiguousarray(src.numpy().T))


def remove_unused(model: ir.Model) -> None:
    """Drop nodes and initializers nothing reads any more (the old regions' shared rope/mask inputs)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
