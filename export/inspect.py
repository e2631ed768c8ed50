"""`python -m export inspect ARTIFACT`: what is in an artifact's graphs.

What it does: reads the manifest (checksums verified), loads each graph without its external weights, counts
ops (``domain.op`` for non-standard domains) and reports the fusion counts recorded at build time next to the
ones counted in the graph, so a mismatch between the two is visible.

What it does not do: run anything.
"""

from __future__ import annotations

from pathlib import Path

from artifacts.bundle import open_artifact


def inspect_artifact(path: str | Path) -> dict:
    import onnx

    root = Path(path)
    manifest = open_artifact(root)
    spec = manifest["spec"]
    out = {"artifact": str(root), "layers": len(spec["layers"]),
           "sparse_layers": sum(1 for layer in spec["layers"] if layer["mlp"] == "moe"), "graphs": {}}
    for name, g in manifest["graphs"].items():
        model = onnx.load(str(root / g["file"]), load_external_data=False)
        ops: dict[str, int] = {}
        for node in model.graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            ops[key] = ops.get(key, 0) + 1
        out["graphs"][name] = {"file": g["file"], "lowering": g.get("lowering"),
                               "logits": g.get("logits", "all"), "ops": ops,
                               "fusion": g.get("fusion", {})}
    return out
