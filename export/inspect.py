"""`python -m export inspect ARTIFACT`: what is in an artifact's graphs.

What it does: reads the manifest (checksums verified), loads each graph without its external weights, counts
ops (``domain.op`` for non-standard domains) and reports the fusion counts recorded at build time next to the
ones counted in the graph, so a mismatch between the two is visible, and the weight quantization the build recorded
(scheme, group size, how many tensors are quantized and how many stay float).

What it does not do: run anything.
"""

from __future__ import annotations

from pathlib import Path

from artifacts.bundle import ArtifactError, open_artifact
from artifacts.manifest import histogram


def inspect_artifact(path: str | Path) -> dict:
    """The report; ArtifactError for an artifact whose checksums hold but whose graph or records are not ours
    (a graph that is not ONNX, a quantization or fusion record of the wrong shape)."""
    import onnx
    from google.protobuf.message import DecodeError

    root = Path(path)
    manifest = open_artifact(root)
    out = {"artifact": str(root), "layers": manifest.num_layers, "sparse_layers": manifest.sparse_layers,
           "quantization": _quantization_summary(root, manifest.quantization), "graphs": {}}
    for name, g in manifest.graphs.items():
        fusion = g.fusion
        _expect(root, f"graphs.{name}.fusion", isinstance(fusion, dict)
                and all(type(fusion.get(k, 0)) is int for k in ("attention_fused", "moe_fused"))
                and isinstance(fusion.get("skipped", []), list)
                and all(isinstance(line, str) for line in fusion.get("skipped", [])),
                "an object of fused counts and skipped lines")
        try:
            ops = histogram(onnx.load(str(root / g.file), load_external_data=False))
        except (DecodeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{root}: graph '{g.file}' is not a readable ONNX model ({e})") from None
        out["graphs"][name] = {"file": g.file, "lowering": g.lowering, "logits": g.logits, "ops": ops,
                               "fusion": fusion}
    return out


def _expect(root: Path, field: str, ok: bool, what: str) -> None:
    if not ok:
        raise ArtifactError(f"{root}: manifest field '{field}' must be {what}; not an artifact this tool wrote")


def _quantization_summary(root: Path, quantization: dict | None) -> dict | None:
    """The scheme and how many tensors carry it, from the manifest's per-tensor record (None: no quantization)."""
    if not quantization:
        return None
    for key in ("tensors", "counts", "forms"):
        _expect(root, f"quantization.{key}", isinstance(quantization.get(key, {}), dict), "an object")
    if "source" in quantization:
        src = quantization["source"]
        _expect(root, "quantization.source", isinstance(src, dict) and isinstance(src.get("method"), str)
                and type(src.get("bits")) is int and type(src.get("group_size", 0)) is int,
                "an object with 'method', 'bits' and 'group_size'")
        _expect(root, "quantization.dequantized", isinstance(quantization.get("dequantized", []), list), "a list")
    tensors = quantization.get("tensors", {})
    return {"scheme": quantization.get("scheme"), "group_size": quantization.get("group_size"),
            "counts": quantization.get("counts", {}),
            # a pre-quantized checkpoint's own scheme, and how many weights took each graph form
            **({"source": quantization["source"], "forms": quantization.get("forms", {}),
                "dequantized": quantization.get("dequantized", [])} if "source" in quantization else {}),
            "quantized_tensors": sum(1 for t in tensors.values() if isinstance(t, dict) and "bits" in t),
            "float_tensors": sum(1 for t in tensors.values() if isinstance(t, dict) and "bits" not in t)}
