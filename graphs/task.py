"""Seal a task-head graph: the decoder traced with KV I/O becomes one full-sequence forward.

What it does: a sequence/token classification or QA graph is traced, fused and lowered exactly as a causal LM in
static KV mode (export/trace.py), so every lowering sees the contract it knows. :func:`seal` then removes that
contract's generation plumbing: ``position_ids`` becomes ``0..S-1`` for every row (what transformers uses when none
is given; inputs are right-padded, so a real token's position is its index and no real token attends to padding,
which comes after it), each ``past_key_values.{i}.*`` input becomes its own zero buffer ``[B, KV, S, D]`` made from
``input_ids``' shape (its own, so no two attention nodes share a buffer an in-place kernel may write), and the
``present.*`` outputs are dropped with whatever only they needed. The sealed graph's only input is ``input_ids``.

What it does not do: build the head (export/model.py) or refuse what it does not recognise beyond the checks below.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs import fuse


def seal(model: ir.Model) -> dict:
    """Rewrite in place; returns counts: {"kv_inputs_sealed", "present_outputs_dropped"}."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    ids, positions = inputs.get("input_ids"), inputs.get("position_ids")
    past = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    if ids is None or positions is None or not past or "attention_mask" in inputs:
        raise ValueError("graphs.task.seal: expected a static-mode graph (input_ids, position_ids, past_key_values.*)")

    def const(name: str, array: np.ndarray) -> ir.Value:
        return fuse.initializer(graph, name, array)

    nodes: list[ir.Node] = []

    def add(op: str, ins: list, attrs: dict | None = None, name: str = "") -> ir.Value:
        node = ir.node(op, ins, attrs or {}, name=f"task.{name or op.lower()}")
        nodes.append(node)
        return node.outputs[0]

    shape = add("Shape", [ids], name="ids_shape")  # [B, S]
    batch = add("Shape", [ids], {"start": 0, "end": 1}, name="batch")  # [1]
    seq = add("Shape", [ids], {"start": 1, "end": 2}, name="seq")  # [1]
    seq_scalar = add("Squeeze", [seq, const("task.axis0", np.array([0], dtype=np.int64))], name="seq_scalar")
    steps = add("Range", [const("task.zero", np.array(0, dtype=np.int64)), seq_scalar,
                          const("task.one", np.array(1, dtype=np.int64))], name="range")  # [S]
    row = add("Unsqueeze", [steps, const("task.axis0", np.array([0], dtype=np.int64))], name="row")  # [1, S]
    new_positions = add("Expand", [row, shape], name="positions")  # [B, S]
    positions.replace_all_uses_with(new_positions)

    for value in past:
        _, heads, _, dim = value.shape  # [B, KV, cache, D]: static ints from the trace
        kv_shape = add("Concat", [batch, const(f"task.heads_{heads}", np.array([heads], dtype=np.int64)), seq,
                                  const(f"task.dim_{dim}", np.array([dim], dtype=np.int64))], {"axis": 0},
                       name=f"{value.name}.shape")
        zero = ir.tensor(np.zeros(1, dtype=value.dtype.numpy()))
        buffer = add("ConstantOfShape", [kv_shape], {"value": zero}, name=f"{value.name}.zeros")
        value.replace_all_uses_with(buffer)

    if len(graph):
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.extend(nodes)
    kept = [v for v in graph.inputs if v.name == "input_ids"]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    dropped = [v for v in graph.outputs if v.name.startswith("present.")]
    outputs = [v for v in graph.outputs if not v.name.startswith("present.")]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    fuse.remove_unused(model)
    return {"kv_inputs_sealed": len(past), "present_outputs_dropped": len(dropped)}
