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

from artifacts.bundle import ArtifactError, read_manifest, staging_dir, write_manifest
from artifacts.edge import BUNDLE_JSON, UNPACK_DIR, pack, packed_names, tensorrt_refusal, unpack
from artifacts.manifest import MANIFEST
from export.engine import build_engine, check_engine_io, has_fp8_weights, load_tensorrt
from export.options import PRECISIONS


def bundle(artifact: str, out: str, overwrite: bool = False) -> Path:
    return pack(artifact, out, overwrite=overwrite)


def check_settings(bundle_path: Path, info: dict, manifest) -> None:
    """The build settings bundle.json records must be the bundled manifest's (the engine is built from the
    manifest's: an edited index must not leave a manifest that promises shapes the engine does not take)."""
    theirs = {"lowering": manifest.decoder.lowering, "precision": manifest.precision, "kv_mode": manifest.kv_mode,
              "max_seq_len": manifest.max_seq_len, "max_batch": manifest.max_batch}
    wrong = [f"{k} {info.get(k)!r} (the manifest says {v!r})" for k, v in theirs.items() if info.get(k) != v]
    if wrong:
        raise ArtifactError(f"{bundle_path}: {BUNDLE_JSON} does not match the bundled manifest: {'; '.join(wrong)}; "
                            "pack the artifact again")
    if manifest.precision not in PRECISIONS:
        raise ArtifactError(f"{bundle_path}: precision {manifest.precision!r} is not one of {', '.join(PRECISIONS)}")
    why = tensorrt_refusal(manifest.kv_mode, manifest.decoder.lowering, manifest.quantization)
    if why:
        raise ArtifactError(f"{bundle_path}: the bundled artifact cannot be built by TensorRT: {why}")


def check_contents(bundle_path: Path, info: dict, manifest) -> None:
    """The bundle's artifact files must be exactly what the bundled manifest lists, with its checksums: unpack
    checked every member against bundle.json, and the engine artifact's new manifest re-hashes what is there, so a
    file the manifest does not list (a chat template, say) or one that differs from its record would otherwise be
    sealed in as if the build had written it, and a listed file missing from the bundle silently dropped."""
    files, carried = info["files"], set(packed_names(manifest.decoder.file, manifest.files))
    for rel, entry in manifest.files.items():
        got = files.get(rel)
        if got is None and rel not in carried:  # an engine or timing cache of the packed artifact: rebuilt here
            continue
        if got is None:
            raise ArtifactError(f"{bundle_path}: file '{rel}' listed in the bundled manifest is missing from the "
                                "bundle; pack the artifact again")
        if not isinstance(entry, dict) or (got["bytes"], got["sha256"]) != (entry.get("bytes"), entry.get("sha256")):
            raise ArtifactError(f"{bundle_path}: file '{rel}' does not match its sha256 in the bundled manifest "
                                "(modified after the build); pack the artifact again")
    extra = sorted(set(files) - set(manifest.files) - {MANIFEST})
    if extra:
        raise ArtifactError(f"{bundle_path}: '{extra[0]}' is in the bundle but not in the bundled manifest, so no "
                            "checksum of the build covers it; pack the artifact again")


def engine(bundle_file: str, out: str | None = None, overwrite: bool = False) -> Path:
    load_tensorrt()  # fail before unpacking when TensorRT is missing
    bundle_path = Path(bundle_file)
    dest = out if out is not None else bundle_path.with_name(bundle_path.name.removesuffix(".tar") + "-engine")
    with staging_dir(dest, overwrite=overwrite, protect=[bundle_path]) as tmp:
        unpacked, info = unpack(bundle_path, tmp / UNPACK_DIR)  # no artifact file has that name (bundle.json)
        for item in unpacked.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.move(str(tmp / UNPACK_DIR / "plugins"), tmp / "plugins")
        (tmp / UNPACK_DIR / BUNDLE_JSON).rename(tmp / BUNDLE_JSON)
        shutil.rmtree(tmp / UNPACK_DIR)
        manifest = read_manifest(tmp)
        graph = manifest.decoder
        check_settings(bundle_path, info, manifest)
        check_contents(bundle_path, info, manifest)
        print(f"building the TensorRT engine for {manifest.model_type} ({graph.lowering}, "
              f"{manifest.precision}) ...", file=sys.stderr)
        facts = build_engine(tmp / graph.file, tmp / "model.engine", manifest.kv_mode, manifest.max_batch,
                             manifest.max_seq_len, manifest.precision,
                             fp8_weights=has_fp8_weights(manifest.quantization))
        check_engine_io(graph.to_dict(), facts["io"])
        write_manifest(tmp, {**manifest.to_dict(), "backend": "tensorrt", "engine": facts})
        tmp.chmod(0o755)
    return Path(dest).expanduser().resolve()
