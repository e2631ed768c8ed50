"""Fusion passes: replace each layer's attention region and each sparse layer's MoE region by one fused node.

How regions are found: the decoder's attention core and MoE are torch modules of their own
(``layers.{i}.attn.core``, ``layers.{i}.moe``), and the exporter stamps every ONNX node with its module scope
(``pkg.torch.onnx.name_scopes``). A region is the set of nodes of that scope; its boundary (values it reads from
outside, values read outside it) must be exactly the expected one, or the region is left untouched and reported,
never half-rewritten. The fused node carries every attribute the kernel needs (plugins/attention.py,
plugins/moe.py: ``ATTRS`` names them, ``VALUES`` the values a string attribute may take); a node whose attributes
differ from that definition is never built. Each pass returns a :class:`Report` and the caller checks the count
(attention = layers, MoE = sparse layers) when it requires full fusion.

Each lowering declares what it does with every attribute of every fused node in a table (attribute ->
:class:`Consumed` / :class:`Matches` / :class:`Needs`; the tables live with the lowerings: lower.py, native.py,
quantize.py); the vocabulary and its two checks are here. :func:`supports` turns a table into the passes'
``supports`` hook (a value the target cannot express leaves the region decomposed, reported, or refuses the build),
and :func:`lowered_attrs` checks a fused node against the table when the lowering rewrites it. Both raise
:class:`LoweringError` for an attribute the table does not name, so a new attribute must be taught to every lowering.

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

from graphs import scopes as scopes_  # fuse.scopes(node) below is a node's scope list
from plugins import attention as attn_plugin
from plugins import moe as moe_plugin

SCOPES_KEY = scopes_.KEY


@dataclass
class Report:
    name: str
    fused: int = 0
    skipped: list[str] = field(default_factory=list)  # "layer 3: why"
    unsupported: int = 0  # regions left decomposed on purpose: the target cannot express an attribute value

    def require(self, expected: int) -> None:
        """Every one of `expected` regions was fused or left decomposed on purpose (a region that did not match is
        the failure)."""
        if self.fused + self.unsupported != expected:
            why = "; ".join(self.skipped) or "no region found"
            raise FusionError(f"{self.name}: fused {self.fused} region(s), expected {expected - self.unsupported} "
                              f"({why})")


class FusionError(RuntimeError):
    """A pass that had to fire a known number of times did not."""


class LoweringError(ValueError):
    """A fused node attribute (or value) that a lowering does not handle or cannot express; names the lowering,
    the node, the attribute and the value. A ValueError: the CLI reports it as ``error: ...`` with exit status 2."""


# ---- what each lowering does with each attribute of a fused node ---------------------------------------------------

@dataclass(frozen=True)
class Consumed:
    """Every value the fused node defines is expressed by the lowering; `how` says where it goes."""
    how: str


@dataclass(frozen=True)
class Matches:
    """The target takes this value from the node's inputs instead (e.g. the expert count from a weight's shape):
    `infer(node)` gives it, and a fused node whose attribute differs is refused (it would be silently ignored)."""
    infer: Callable[[ir.Node], object]
    what: str


@dataclass(frozen=True)
class Needs:
    """Values with `ok(value)` are expressed; any other value is `why` the target cannot. Before fusion such a region
    stays decomposed (reported; the exporter's standard ops compute every value) when `fallback`, else the build is
    refused; a fused node that already carries such a value is always refused."""
    ok: Callable[[object], bool]
    why: str
    fallback: bool = True


Rules = dict  # attribute name -> Consumed | Matches | Needs


def _op(plugin) -> str:
    return f"{plugin.DOMAIN}.{plugin.OP}"


def _known(lowering: str, rules: Rules, op: str, node_name: str, attrs: dict) -> None:
    unknown = [name for name in attrs if name not in rules]
    if unknown:
        raise LoweringError(f"lowering {lowering} does not handle attribute {unknown[0]!r} "
                            f"(= {attrs[unknown[0]]!r}) of node {node_name} ({op}): add it to that lowering's "
                            "attribute table (consume it, check it, or refuse its values)")
    missing = [name for name in rules if name not in attrs]
    if missing:
        raise LoweringError(f"node {node_name} ({op}) has no attribute {missing[0]!r}, which lowering {lowering} "
                            "reads")


def _refused(lowering: str, node_name: str, name: str, value, why: str) -> LoweringError:
    return LoweringError(f"lowering {lowering} cannot express attribute {name}={value!r} of node {node_name}: {why}")


def supports(lowering: str, plugin, rules: Rules) -> Callable[[str, dict], str | None]:
    """The fusion passes' hook for `lowering`: ``(node name, attrs) -> None`` when the lowering expresses every value,
    else why the region stays decomposed. Raises LoweringError for an attribute the table does not name and for
    a value it refuses (``Needs(fallback=False)``)."""

    def check(node_name: str, attrs: dict) -> str | None:
        _known(lowering, rules, _op(plugin), node_name, attrs)
        reasons = []
        for name, value in attrs.items():
            rule = rules[name]
            if isinstance(rule, Needs) and not rule.ok(value):
                if not rule.fallback:
                    raise _refused(lowering, node_name, name, value, rule.why)
                reasons.append(f"{name}={value!r}: {rule.why}")
        return "; ".join(reasons) or None

    return check


def lowered_attrs(lowering: str, rules: Rules, node: ir.Node) -> dict:
    """The attributes of fused `node` as a dict, once every one is checked against the lowering's table: raises
    LoweringError for an unknown or missing attribute, a value the target cannot express, or one that disagrees
    with what the target infers from the inputs."""
    attrs = {k: v.value for k, v in node.attributes.items()}
    _known(lowering, rules, f"{node.domain}.{node.op_type}", node.name, attrs)
    for name, value in attrs.items():
        rule = rules[name]
        if isinstance(rule, Needs) and not rule.ok(value):
            raise _refused(lowering, node.name, name, value, rule.why)
        if isinstance(rule, Matches):
            inferred = rule.infer(node)
            if inferred != value:
                raise _refused(lowering, node.name, name, value, f"{rule.what} gives {inferred!r}")
    return attrs


def _definition(plugin, node_name: str, attrs: dict) -> dict:
    """`attrs`, checked against the fused node's definition (plugin.ATTRS names and types, plugin.VALUES)."""
    if set(attrs) != set(plugin.ATTRS):
        raise LoweringError(f"node {node_name} ({_op(plugin)}): attributes {sorted(attrs)} differ from the node's "
                            f"definition {sorted(plugin.ATTRS)}")
    for name, value in attrs.items():
        kind = plugin.ATTRS[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LoweringError(f"node {node_name}: attribute {name}={value!r} is not a {kind.__name__}")
        allowed = plugin.VALUES.get(name)
        if allowed is not None and value not in allowed:
            raise LoweringError(f"node {node_name}: attribute {name}={value!r} is not one of {allowed}")
    return attrs


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
                   supports: Callable[[str, dict], str | None] = lambda name, attrs: None) -> Report:
    """Fuse layers.{i}.attn.core into llm_export.Attention. `supports(node name, attrs)` returns a reason to leave
    the region decomposed, or None (see :func:`supports`)."""
    graph = model.graph
    report = Report("attention fusion")
    inputs = {v.name: v for v in graph.inputs}
    for i in range(spec.num_layers):
        prefix = scopes_.attn(i)
        nodes = region_nodes(graph, scopes_.attn_core(i))
        if not nodes:
            report.skipped.append(f"layer {i}: no nodes in scope {scopes_.attn_core(i)}")
            continue
        region = boundary(graph, nodes)
        present_names = (f"present.{i}.key", f"present.{i}.value")
        attn_out = [v for v in region.outputs if v.name not in present_names
                    and any(_in_scope(u.node, f"{prefix}.o") for u in v.uses())]
        region, problems = trim_shape_outputs(graph, region, {id(v) for v in region.outputs
                                                              if v.name in present_names} | {id(v) for v in attn_out})
        name = f"layers.{i}.attention"
        attrs = _definition(attn_plugin, name, attention_attrs(spec, i, kv_mode))
        why = supports(name, attrs)
        if why:
            report.skipped.append(f"layer {i}: {why}")
            report.unsupported += 1
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
        node = ir.node(attn_plugin.OP, node_inputs, attrs, domain=attn_plugin.DOMAIN, num_outputs=3, name=name)
        _replace(graph, region, node, [others[0], present[f"present.{i}.key"], present[f"present.{i}.value"]])
        report.fused += 1
    return report


# ---- MoE -------------------------------------------------------------------------------------------------------

def moe_attrs(spec) -> dict:
    return {"num_experts": spec.num_experts, "top_k": spec.top_k, "norm_topk_prob": int(spec.norm_topk_prob),
            "moe_intermediate_size": spec.moe_intermediate_size, "activation": spec.hidden_act}


def fuse_moe(model: ir.Model, spec, supports: Callable[[str, dict], str | None] = lambda name, attrs: None) -> Report:
    """Fuse each sparse layer's layers.{i}.moe into llm_export.MoE. `supports(node name, attrs)` returns a reason to
    leave the region decomposed, or None (see :func:`supports`)."""
    graph = model.graph
    report = Report("MoE fusion")
    for i in spec.sparse_layers:
        scope = scopes_.moe(i)
        nodes = region_nodes(graph, scope)
        if not nodes:
            report.skipped.append(f"layer {i}: no nodes in scope {scope}")
            continue
        name = f"layers.{i}.moe"
        attrs = _definition(moe_plugin, name, moe_attrs(spec))
        why = supports(name, attrs)
        if why:
            report.skipped.append(f"layer {i}: {why}")
            report.unsupported += 1
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
        node = ir.node(moe_plugin.OP, [hidden[0], router_hE, gate_up, down], attrs, domain=moe_plugin.DOMAIN,
                       num_outputs=1, name=name)
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
