"""Edge bundles: everything an appliance needs to build the TensorRT engine on the device and run it.

What it does: :func:`pack` writes one ``.tar`` (atomically: temp file, then rename) holding an artifact's graph
(the ``trt-native`` or ``trt-plugin`` lowering), its external weights, manifest, tokenizer and generation config,
the plugin definitions (``plugins/*.py``: the trt-plugin graph's nodes name them) and ``bundle.json`` (format
version, build settings, sha256 of every member). :func:`unpack` extracts a bundle safely (no absolute paths or
``..``), checks every member's sha256 and returns the artifact directory; ``export/edge_cmd.py`` then builds the
engine there and verifies it against the manifest.

What it does not do: build engines (export/engine.py) or run them (runtime_py).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from artifacts.bundle import ArtifactError, open_artifact, sha256_file

BUNDLE_FORMAT = "llm-export-edge-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
BUILDABLE_LOWERINGS = ("trt-native", "trt-plugin", "reference")
_ARTIFACT_FILES = ("manifest.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def pack(artifact: str | Path, out: str | Path) -> Path:
    root = Path(artifact)
    manifest = open_artifact(root)
    graph = manifest["graphs"]["decoder"]
    if graph.get("lowering") not in BUILDABLE_LOWERINGS:
        raise ArtifactError(
            f"{root}: its graph uses the '{graph.get('lowering')}' lowering (ONNX Runtime contrib ops), which "
            f"TensorRT cannot build; export with --backend tensorrt (or --lowering trt-native) and bundle that")
    members = [graph["file"], graph["file"] + ".data"] + [f for f in _ARTIFACT_FILES if (root / f).exists()]
    members = [m for m in members if (root / m).exists()]
    plugin_dir = Path(__file__).resolve().parent.parent / "plugins"
    plugins = sorted(p for p in plugin_dir.glob("*.py"))
    info = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
        "lowering": graph["lowering"], "precision": manifest["precision"], "kv_mode": manifest["kv_mode"],
        "max_seq_len": manifest["max_seq_len"], "max_batch": manifest["max_batch"],
        "files": {m: sha256_file(root / m) for m in members},
        "plugins": {f"plugins/{p.name}": sha256_file(p) for p in plugins},
    }
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for m in members:
                tar.add(root / m, arcname=f"artifact/{m}")
            for p in plugins:
                tar.add(p, arcname=f"plugins/{p.name}")
            data = json.dumps(info, indent=2).encode()
            entry = tarfile.TarInfo(BUNDLE_JSON)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def unpack(bundle: str | Path, dest: str | Path) -> tuple[Path, dict]:
    """Extract into dest (must not exist), verify checksums; returns (artifact dir, bundle info)."""
    bundle, dest = Path(bundle), Path(dest)
    if not bundle.is_file():
        raise ArtifactError(f"{bundle}: bundle file not found")
    if dest.exists():
        raise ArtifactError(f"{dest} already exists")
    try:
        with tarfile.open(bundle, "r") as tar:
            names = tar.getnames()
            bad = [n for n in names if n.startswith("/") or ".." in Path(n).parts]
            if bad:
                raise ArtifactError(f"{bundle}: unsafe member paths {bad[:3]}")
            if BUNDLE_JSON not in names:
                raise ArtifactError(f"{bundle}: no {BUNDLE_JSON}; not an edge bundle")
            tar.extractall(dest, filter="data")
    except tarfile.TarError as e:
        raise ArtifactError(f"{bundle}: not a readable bundle ({e})") from None
    info = json.loads((dest / BUNDLE_JSON).read_text())
    if info.get("format") != BUNDLE_FORMAT or info.get("format_version") != BUNDLE_VERSION:
        raise ArtifactError(f"{bundle}: bundle format {info.get('format')} v{info.get('format_version')} "
                            f"is not supported (need {BUNDLE_FORMAT} v{BUNDLE_VERSION})")
    for rel, digest in {**{f"artifact/{k}": v for k, v in info["files"].items()}, **info["plugins"]}.items():
        path = dest / rel
        if not path.exists() or sha256_file(path) != digest:
            raise ArtifactError(f"{bundle}: member '{rel}' is missing or does not match its sha256")
    return dest / "artifact", info
