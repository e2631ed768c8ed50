"""Edge bundles: everything an appliance needs to build the TensorRT engine on the device and run it.

What it does: :func:`pack` writes one uncompressed ``.tar`` (atomically: temp file, then rename) holding
``bundle.json`` FIRST (format version, build settings, the size and sha256 of every member), then the artifact's
graph (the ``trt-native`` or ``trt-plugin`` lowering), its external weights, manifest, tokenizer and generation
config as ``artifact/<name>``, and the plugin definitions as ``plugins/<name>.py`` (the trt-plugin graph's nodes
name them). The names it packs come from the artifact's manifest, which is untrusted: each must be a plain
relative name that reaches no symlink (artifacts/paths.py) and is not ``bundle.json`` or under ``plugins/`` (on the
device the artifact's files sit beside those); each file is opened with ``O_NOFOLLOW`` and must be a regular file,
so nothing outside the artifact ends up in a bundle; a file that changes between hashing and packing is refused.

:func:`unpack` does NOT use ``tarfile``'s extraction or its ``data`` filter (which a symlink chain overflowing
``realpath`` bypasses on Pythons before the mid-2025 fixes, CVE-2025-4517). It reads ``bundle.json`` first (at
most :data:`MAX_INDEX_BYTES`, valid JSON, this format and version), then accepts only regular files and
directories whose names are plain relative names listed in that index (``bundle.json``, ``artifact/<name>``,
``plugins/<name>`` and their parent directories): no links of any kind, devices or FIFOs, no duplicates, each
file's size equal to the index's, the total under a limit (:data:`MAX_BUNDLE_BYTES`, or ``max_bytes``). Every
file is created relative to a directory fd of ``dest`` with ``O_NOFOLLOW | O_EXCL`` on every component (a symlink
planted under ``dest`` is refused by the kernel), streamed in chunks while its sha256 is computed and compared with
the index; at the end every indexed member must have been present. ``dest`` must not exist (its parent must); ``unpack``
creates it and, on any failure, removes it again: a destination is complete or absent. Every refusal is an
:class:`ArtifactError` naming the bundle, the member and the problem. ``export/edge_cmd.py`` then builds the engine
there and verifies it against the manifest.

What it does not do: build engines (export/engine.py) or run them (runtime_py); compress bundles or read compressed
ones; keep tar metadata (modes, owners, times: files are written 0644, directories 0755). On the packing side a
directory component swapped for a symlink between the check and the open is not caught (only the final component
is opened with ``O_NOFOLLOW``); the artifact being packed is the user's own, and the device re-checks every
checksum after unpacking.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from artifacts.bundle import (TOKENIZER_FILES, ArtifactError, check_out_name, make_parents, named_templates,
                              open_artifact, remove_empty_dirs, rename_new)
from artifacts.paths import (UnsafePathError, check_name, create_inside, inside, json_loads, mkdir_inside,
                             open_dir)

BUNDLE_FORMAT = "llm-export-edge-bundle"
BUNDLE_VERSION = 2  # v2: the index records {"bytes", "sha256"} per member and comes first in the tar
BUNDLE_JSON = "bundle.json"
BUILDABLE_LOWERINGS = ("trt-native", "trt-plugin", "reference")
MAX_INDEX_BYTES = 1 << 20  # bundle.json is a few KiB; anything over this is not ours
MAX_BUNDLE_BYTES = 64 << 30  # total unpacked size; far above any model an appliance builds, far below a full disk
_ARTIFACT_FILES = ("manifest.json", *TOKENIZER_FILES)
_PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins"
_CHUNK = 1 << 22
# On the device the artifact's files end up beside plugins/ and bundle.json (export/edge_cmd.py), so these are
# not names an artifact file may have.
UNPACK_DIR = "unpacked"  # export/edge_cmd.py's staging name inside the engine artifact's directory
_RESERVED = (BUNDLE_JSON, "plugins", UNPACK_DIR)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _HashingReader:
    """What tarfile reads from a member file, hashed on the way, so pack can tell a file changed under it."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n=-1):
        block = self.f.read(n)
        self.h.update(block)
        return block


def _open_regular(path: Path, what: str):
    """`path` opened for reading without following a final symlink; it must be a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ArtifactError(f"{what}: cannot open it without following links ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ArtifactError(f"{what}: not a regular file")
    return f


def pack(artifact: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the bundle for a buildable artifact to `out` (atomically); returns its absolute path. An existing
    `out` is replaced only with `overwrite` and only when it is a bundle of ours; never a symlink, never a path inside
    the artifact."""
    root = Path(artifact)
    dest = _bundle_out(out, root, overwrite)
    manifest = open_artifact(root)
    graph = manifest.decoder
    graph_file = graph.file
    if graph.lowering not in BUILDABLE_LOWERINGS:
        raise ArtifactError(
            f"{root}: its graph uses the '{graph.lowering}' lowering (ONNX Runtime contrib ops), which "
            f"TensorRT cannot build; export with --backend tensorrt (or --lowering trt-native) and bundle that")
    why = tensorrt_refusal(manifest.kv_mode, graph.lowering, manifest.quantization)
    if why:
        raise ArtifactError(f"{root}: {why}; the device could not build its engine. Export with --backend tensorrt "
                            "and bundle that")
    # The manifest is untrusted: every name must stay inside the artifact and reach no symlink.
    try:
        check_name(graph_file, f"{root}: manifest graphs.decoder.file")
        paths = {m: inside(root, m, f"{root}: bundle member") for m in packed_names(graph_file, manifest.files)}
    except UnsafePathError as e:
        raise ArtifactError(str(e)) from None
    if graph_file.split("/")[0] in _RESERVED:
        raise ArtifactError(f"{root}: graph file '{graph_file}' would collide with the bundle's own "
                            f"{' or '.join(_RESERVED)} on the device; rename it")
    if not paths[graph_file].exists():
        raise ArtifactError(f"{root}: graph file '{graph_file}' named by the manifest does not exist")
    sources = {f"artifact/{m}": p for m, p in paths.items() if m == graph_file or p.exists()}
    plugins = sorted(_PLUGIN_DIR.glob("*.py"))
    sources.update({f"plugins/{p.name}": p for p in plugins})

    opened = {}
    try:
        entries = {}
        for name, path in sources.items():  # pass 1: sizes and digests for the index, which goes first
            f = opened[name] = _open_regular(path, f"{root}: bundle member '{name}'")
            h, size = hashlib.sha256(), 0
            while block := f.read(_CHUNK):
                h.update(block)
                size += len(block)
            entries[name] = {"bytes": size, "sha256": h.hexdigest()}
        info = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
            "lowering": graph.lowering, "precision": manifest.precision, "kv_mode": manifest.kv_mode,
            "max_seq_len": manifest.max_seq_len, "max_batch": manifest.max_batch,
            "files": {n.removeprefix("artifact/"): e for n, e in entries.items() if n.startswith("artifact/")},
            "plugins": {n.removeprefix("plugins/"): e for n, e in entries.items() if n.startswith("plugins/")},
        }
        return _write_tar(dest, info, opened, entries, overwrite)
    finally:
        for f in opened.values():
            f.close()


def packed_names(graph_file: str, files) -> list[str]:
    """The artifact files a bundle carries (those that exist) given its manifest's listed `files`: the graph, its
    external data, the manifest, the tokenizer files and named chat templates. Not an engine or timing cache the
    artifact may hold: the device builds its own."""
    return [graph_file, graph_file + ".data", *_ARTIFACT_FILES, *named_templates(files)]


def tensorrt_refusal(kv_mode: str, lowering: str, quantization: dict | None) -> str | None:
    """Why TensorRT cannot build an artifact of these settings, or None: concat KV has no optimization profile
    here; a reference graph quantized by --quantize holds int8 constants that feed no DequantizeLinear. The same
    two rules `export build` applies to its flags (export/build.py plan, export/quantize.py), said there in terms
    of the flags."""
    if kv_mode != "static":
        return (f"its KV mode is '{kv_mode}'; TensorRT engines are built on the static KV buffers (a concat graph's "
                "mask has no optimization profile here)")
    if lowering == "reference" and isinstance(quantization, dict) and "scheme" in quantization:
        return (f"its reference graph holds --quantize {quantization['scheme']} weights as int8-stored integers "
                "times scales, which TensorRT refuses (a quantized constant must feed a DequantizeLinear)")
    return None


def _bundle_out(out: str | Path, root: Path, overwrite: bool) -> Path:
    """The resolved bundle path, after the rules `export build` applies to --out (artifacts/bundle.py)."""
    given = check_out_name(out, "--out")
    if given.is_symlink():
        raise ArtifactError(f"--out {given} is a symlink; give the real path (links are not followed)")
    dest, art = given.resolve(), root.resolve()
    if dest == art or art in dest.parents:
        raise ArtifactError(f"--out {dest} is inside the artifact being packed ({art}); write the bundle elsewhere")
    if os.path.lexists(dest):
        if not overwrite:
            raise ArtifactError(f"{dest} already exists (pass --overwrite to replace a bundle of ours)")
        if not is_bundle(dest):
            raise ArtifactError(f"--out {dest} exists and is not a bundle this tool wrote; refusing to replace it, "
                                "with or without --overwrite")
    return dest


def is_bundle(path: Path) -> bool:
    """A regular file that is a tar whose first member is our bundle.json."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != BUNDLE_JSON or not first.isfile() or first.size > MAX_INDEX_BYTES:
                return False
            info = json_loads(tar.extractfile(first).read())
        return isinstance(info, dict) and info.get("format") == BUNDLE_FORMAT
    except (OSError, tarfile.TarError, ValueError):
        return False


def _write_tar(out: Path, info: dict, opened: dict, entries: dict, overwrite: bool) -> Path:
    created = []
    try:
        created = make_parents(out)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as e:
        remove_empty_dirs(created)
        raise ArtifactError(f"--out {out}: cannot write beside it ({e.strerror or e}: {e.filename or out.parent})") \
            from None
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(info, indent=2).encode()
            entry = tarfile.TarInfo(BUNDLE_JSON)
            entry.size, entry.mode = len(data), 0o644
            tar.addfile(entry, io.BytesIO(data))
            for name, f in opened.items():  # pass 2: the same bytes, checked against pass 1
                f.seek(0)
                entry = tarfile.TarInfo(name)
                entry.size, entry.mode, entry.mtime = entries[name]["bytes"], 0o644, int(os.fstat(f.fileno()).st_mtime)
                reader = _HashingReader(f)
                tar.addfile(entry, reader)
                if reader.h.hexdigest() != entries[name]["sha256"]:
                    raise ArtifactError(f"bundle member '{name}' changed while it was being packed; pack again")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the device's build user out
        _put(Path(tmp), out, overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty_dirs(created)
        raise
    return out


def _put(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle into place under _bundle_out's rules, checked again now: packing a large model
    takes minutes, and what appeared at `out` meanwhile (a user's file, another pack without --overwrite) is not
    ours to replace. A new name is taken with rename(2)'s NOREPLACE, so even a file created a moment ago wins."""
    if not os.path.lexists(out):
        try:
            rename_new(tmp, out)
            return
        except FileExistsError:
            pass
    if not overwrite:
        raise ArtifactError(f"{out} appeared while the bundle was being packed; refusing to replace it (pass "
                            "--overwrite to replace a bundle of ours)")
    if not is_bundle(out):
        raise ArtifactError(f"--out {out} appeared while the bundle was being packed and is not a bundle this tool "
                            "wrote; refusing to replace it")
    os.replace(tmp, out)


def unpack(bundle: str | Path, dest: str | Path, max_bytes: int = MAX_BUNDLE_BYTES) -> tuple[Path, dict]:
    """Extract into dest (must not exist; its parent must), verify sizes and checksums; returns (dest/"artifact",
    bundle info). On any failure dest is removed again."""
    bundle, dest = Path(bundle), Path(dest)
    if not bundle.is_file():
        raise ArtifactError(f"{bundle}: bundle file not found")
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        raise ArtifactError(f"{dest} already exists") from None
    except FileNotFoundError:
        raise ArtifactError(f"{dest}: its parent directory does not exist") from None
    try:
        root_fd = open_dir(dest)
        try:
            info = _extract(bundle, root_fd, max_bytes)
        finally:
            os.close(root_fd)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # rmtree removes links, never what they point to
        raise
    return dest / "artifact", info


def _extract(bundle: Path, root_fd: int, max_bytes: int) -> dict:
    try:
        with tarfile.open(bundle, "r:") as tar:
            data = _read_index_member(bundle, tar, tar.next())
            info = _check_index(bundle, data)
            expected = {**{f"artifact/{n}": e for n, e in info["files"].items()},
                        **{f"plugins/{n}": e for n, e in info["plugins"].items()}}
            total = sum(e["bytes"] for e in expected.values()) + len(data)
            if total > max_bytes:
                raise ArtifactError(f"{bundle}: {BUNDLE_JSON} lists {total} bytes in all, over the limit of "
                                    f"{max_bytes} bytes; refusing to unpack it")
            dirs = {"artifact", "plugins"} | {p for n in expected for p in _parents(n)}
            for d in ("artifact", "plugins"):  # always present, even when a bundle lists nothing under one
                os.close(mkdir_inside(root_fd, d, f"{bundle}: directory '{d}'"))
            _write_member(bundle, root_fd, BUNDLE_JSON, io.BytesIO(data), len(data), None)
            seen, written = {BUNDLE_JSON}, len(data)
            while (member := tar.next()) is not None:
                name = member.name
                what = f"{bundle}: member '{name}'"
                check_name(name, what)
                if name in seen:
                    raise ArtifactError(f"{what} appears twice in the bundle")
                seen.add(name)
                if member.isdir():
                    if name not in dirs:
                        raise ArtifactError(f"{what} is a directory that {BUNDLE_JSON} does not list")
                    os.close(mkdir_inside(root_fd, name, what))
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise ArtifactError(f"{what} is {_kind(member)}; a bundle holds only regular files and "
                                        "directories")
                if name not in expected:
                    raise ArtifactError(f"{what} is not listed in {BUNDLE_JSON}")
                if member.size != expected[name]["bytes"]:
                    raise ArtifactError(f"{what} is {member.size} bytes but {BUNDLE_JSON} says "
                                        f"{expected[name]['bytes']}")
                written += member.size
                if written > max_bytes:  # cannot happen after the checks above; kept as the last line of defence
                    raise ArtifactError(f"{what}: unpacking it would exceed the limit of {max_bytes} bytes")
                _write_member(bundle, root_fd, name, tar.extractfile(member), member.size,
                              expected[name]["sha256"])
    except UnsafePathError as e:
        raise ArtifactError(str(e)) from None
    except tarfile.TarError as e:
        raise ArtifactError(f"{bundle}: not a readable bundle ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(f"{bundle}: member '{missing[0]}' listed in {BUNDLE_JSON} is missing from the bundle"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return info


def _read_index_member(bundle: Path, tar: tarfile.TarFile, first) -> bytes:
    if first is None or first.name != BUNDLE_JSON:
        raise ArtifactError(f"{bundle}: its first member is not {BUNDLE_JSON}; not an edge bundle (or one packed "
                            f"before format v{BUNDLE_VERSION}; pack it again)")
    if first.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise ArtifactError(f"{bundle}: member '{BUNDLE_JSON}' is {_kind(first)}, not a regular file")
    if first.size > MAX_INDEX_BYTES:
        raise ArtifactError(f"{bundle}: member '{BUNDLE_JSON}' is {first.size} bytes, over the limit of "
                            f"{MAX_INDEX_BYTES}; not an edge bundle")
    return tar.extractfile(first).read()


def _check_index(bundle: Path, data: bytes) -> dict:
    """The parsed bundle.json, with its format, version, settings and member table checked."""
    where = f"{bundle}: member '{BUNDLE_JSON}'"
    try:
        info = json_loads(data)
    except ValueError as e:
        raise ArtifactError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{where} is not an {BUNDLE_FORMAT} index")
    if info.get("format_version") != BUNDLE_VERSION:
        raise ArtifactError(f"{where}: bundle format version {info.get('format_version')!r} is not supported "
                            f"(this version reads {BUNDLE_FORMAT} v{BUNDLE_VERSION}); pack the artifact again with "
                            "this version's `python -m export bundle`")
    if info.get("lowering") not in BUILDABLE_LOWERINGS:
        raise ArtifactError(f"{where}: lowering {info.get('lowering')!r} is not one TensorRT builds")
    for key in ("precision", "kv_mode"):
        if not isinstance(info.get(key), str):
            raise ArtifactError(f"{where}: '{key}' must be a string, got {info.get(key)!r}")
    for key in ("max_seq_len", "max_batch"):
        if type(info.get(key)) is not int or info[key] < 1:
            raise ArtifactError(f"{where}: '{key}' must be a positive integer, got {info.get(key)!r}")
    for key in ("files", "plugins"):
        table = info.get(key)
        if not isinstance(table, dict):
            raise ArtifactError(f"{where}: '{key}' must be an object of name -> {{bytes, sha256}}")
        for name, entry in table.items():
            check_name(name, f"{where}: {key} entry")
            if key == "files" and name.split("/")[0] in _RESERVED:
                raise ArtifactError(f"{where}: files entry '{name}' would collide with the bundle's own "
                                    f"{' or '.join(_RESERVED)}")
            if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
                    and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
                raise ArtifactError(f"{where}: {key} entry '{name}' must be {{\"bytes\": int >= 0, "
                                    f"\"sha256\": 64 hex digits}}, got {entry!r}")
    return info


def _write_member(bundle: Path, root_fd: int, name: str, src, size: int, sha256: str | None) -> None:
    """Create root/name (no link followed, nothing replaced) and copy exactly `size` bytes of src into it."""
    h = hashlib.sha256()
    with create_inside(root_fd, name, f"{bundle}: member '{name}'") as out:
        left = size
        while left:
            block = src.read(min(_CHUNK, left))
            if not block:
                raise ArtifactError(f"{bundle}: member '{name}' is truncated")
            h.update(block)
            out.write(block)
            left -= len(block)
    if sha256 is not None and h.hexdigest() != sha256:
        raise ArtifactError(f"{bundle}: member '{name}' does not match its sha256 in {BUNDLE_JSON} "
                            "(modified or corrupted)")


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (-> '{member.linkname}')"
    if member.islnk():
        return f"a hard link (-> '{member.linkname}')"
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    return f"a tar entry of type {member.type!r}"
