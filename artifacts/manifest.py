"""What an artifact's manifest records about its graphs, read the same way by every reader.

What it does: :func:`op_key` is the one rule naming an op in histograms (``Op`` for the standard ONNX domain,
``domain.Op`` otherwise); :func:`histogram` counts an onnx_ir or onnx graph's ops with it. The build records the
histogram, ``export inspect`` recounts it from the file, the Triton README lists the contrib ops from it.

What it does not do: read or write manifest files (artifacts/bundle.py does).
"""

from __future__ import annotations

STANDARD_DOMAINS = ("", "ai.onnx")


def op_key(domain: str | None, op_type: str) -> str:
    return op_type if (domain or "") in STANDARD_DOMAINS else f"{domain}.{op_type}"


def histogram(graph_or_model) -> dict[str, int]:
    """Op counts of an onnx_ir Model/Graph or an onnx ModelProto/GraphProto, sorted by key."""
    graph = getattr(graph_or_model, "graph", graph_or_model)
    nodes = graph if callable(getattr(graph, "node", None)) else graph.node  # onnx_ir graphs iterate; protos: .node
    counts: dict[str, int] = {}
    for node in nodes:
        key = op_key(node.domain, node.op_type)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
