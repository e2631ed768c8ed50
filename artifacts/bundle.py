"""The artifact directory format: ``manifest.json`` plus files, written atomically, verified on open.

What it does: :func:`staging_dir` yields a hidden temporary directory next to the destination and renames it into
place only when the body finished (anything raised, Ctrl-C included, removes it: no half-written artifact).
:func:`write_manifest` records the spec, graph I/O, KV mode, precision, library versions and the sha256 of every
file; :func:`open_artifact` checks the format version and every checksum and returns the manifest.

What it does not do: build graphs (export/) or run them (runtime_py/). It imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT = "llm-export-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """The artifact is missing, incomplete, tampered with or from an incompatible version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staging_dir(dest: Path, overwrite: bool = False):
    """Yield a temp dir beside `dest`; on success replace `dest` with it, on any failure delete it."""
    dest = Path(dest).resolve()
    if dest.exists() and not overwrite:
        raise ArtifactError(f"{dest} already exists (pass --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: dict) -> dict:
    """Hash every file under root (except the manifest) and write manifest.json. Returns the manifest."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(root: Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory does not exist")
    if not path.exists():
        raise ArtifactError(f"{root}: no {MANIFEST}; not an artifact (or an interrupted build)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not supported by this "
                            f"runtime (supports {FORMAT_VERSION}); rebuild the artifact")
    return manifest


def open_artifact(root: Path, verify: bool = True) -> dict:
    """Read the manifest and (by default) check that every listed file exists with its recorded sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        for rel, info in manifest["files"].items():
            path = root / rel
            if not path.exists():
                raise ArtifactError(f"{root}: file '{rel}' listed in the manifest is missing")
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise ArtifactError(f"{root}: file '{rel}' does not match its sha256 in the manifest "
                                    "(modified or corrupted); rebuild the artifact")
    return manifest
