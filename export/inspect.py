"""`python -m export inspect ARTIFACT`: what is in an artifact's graphs.

What it does: reads the manifest (checksums verified), loads each graph without its external weights, counts
ops (``domain.op`` for non-standard domains) and reports the fusion counts recorded at build time next to the
ones counted in the graph, so a mismatch between the two is visible, and the weight quantization the build recorded
(scheme, group size, how many tensors are quantized and how many stay float).

What it does not do: run anything.
"""

from __future__ import annotations

from pathlib import Path

from artifacts.bundle import open_artifact
from artifacts.manifest import histogram


def inspect_artifact(path: str | Path) -> dict:
    import onnx

    root = Path(path)
    manifest = open_artifact(root)
    out = {"artifact": str(root), "layers": manifest.num_layers, "sparse_layers": manifest.sparse_layers,
           "quantization": _quantization_summary(manifest.quantization), "graphs": {}}
    for name, g in manifest.graphs.items():
        ops = histogram(onnx.load(str(root / g.file), load_external_data=False))
        out["graphs"][name] = {"file": g.file, "lowering": g.lowering, "logits": g.logits, "ops": ops,
                               "fusion": g.fusion}
    return out


def _quantization_summary(quantization: dict | None) -> dict | None:
    """The scheme and how many tensors carry it, from the manifest's per-tensor record (None: no quantization)."""
    if not quantization:
        return None
    tensors = quantization.get("tensors", {})
    return {"scheme": quantization.get("scheme"), "group_size": quantization.get("group_size"),
            "counts": quantization.get("counts", {}),
            # a pre-quantized checkpoint's own scheme, and how many weights took each graph form
            **({"source": quantization["source"], "forms": quantization.get("forms", {}),
                "dequantized": quantization.get("dequantized", [])} if "source" in quantization else {}),
            "quantized_tensors": sum(1 for t in tensors.values() if isinstance(t, dict) and "bits" in t),
            "float_tensors": sum(1 for t in tensors.values() if isinstance(t, dict) and "bits" not in t)}
