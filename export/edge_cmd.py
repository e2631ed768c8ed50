"""`python -m export bundle ARTIFACT --out FILE` and `python -m export engine BUNDLE [--out DIR]`.

What it does: ``bundle`` packs what an appliance needs (artifacts/edge.py). ``engine`` runs on the device: it
unpacks the bundle into a staging directory, checks every checksum, builds the TensorRT engine there
(export/engine.py: full TensorRT, or TensorRT-RTX which also builds on a CPU-only machine), verifies the
engine's I/O against the manifest's graph contract, records the engine in the manifest and renames the directory
into place: a runnable artifact, or nothing at all.

What it does not do: run the engine.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from artifacts.bundle import read_manifest, staging_dir, write_manifest
from artifacts.edge import BUNDLE_JSON, pack, unpack
from export.engine import build_engine, check_engine_io, load_tensorrt


def bundle(artifact: str, out: str) -> Path:
    return pack(artifact, out)


def engine(bundle_file: str, out: str | None = None, overwrite: bool = False) -> Path:
    load_tensorrt()  # fail before unpacking when TensorRT is missing
    bundle_path = Path(bundle_file)
    dest = out if out is not None else bundle_path.with_name(bundle_path.name.removesuffix(".tar") + "-engine")
    with staging_dir(dest, overwrite=overwrite, protect=[bundle_path]) as tmp:
        unpacked, info = unpack(bundle_path, tmp / "unpacked")
        for item in unpacked.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.move(str(tmp / "unpacked" / "plugins"), tmp / "plugins")
        (tmp / "unpacked" / BUNDLE_JSON).rename(tmp / BUNDLE_JSON)
        shutil.rmtree(tmp / "unpacked")
        manifest = read_manifest(tmp)
        graph = manifest.decoder
        print(f"building the TensorRT engine for {manifest.model_type} ({info['lowering']}, "
              f"{info['precision']}) ...", file=sys.stderr)
        facts = build_engine(tmp / graph.file, tmp / "model.engine", info["kv_mode"], info["max_batch"],
                             info["max_seq_len"], info["precision"])
        check_engine_io(graph.to_dict(), facts["io"])
        write_manifest(tmp, {**manifest.to_dict(), "backend": "tensorrt", "engine": facts})
        tmp.chmod(0o755)
    return Path(dest).expanduser().resolve()
