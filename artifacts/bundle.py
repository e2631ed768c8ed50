"""The artifact directory format: ``manifest.json`` plus files, written atomically, verified on open.

What it does: :func:`staging_dir` yields a hidden temporary directory next to the destination and renames it into
place only when the body finished (anything raised, Ctrl-C and SIGTERM included, removes it: no half-written
artifact). It only ever replaces a destination that holds one of ours (``owned``: by default our manifest.json),
refuses a destination equal to, inside or containing a directory it must not touch (the checkpoint, the input
artifact), holds a sibling lock file (``fcntl``) for the whole write so two writers of one destination cannot both
win, renames without replacing anything that appeared meanwhile (``renameat2`` NOREPLACE / EXCHANGE), and removes
stale staging directories of writers that died (SIGKILL). :func:`write_manifest` records the spec, graph I/O, KV
mode, precision, library versions and the sha256 of every file; :func:`open_artifact` checks the format version,
that every path the manifest names is a plain relative name inside the artifact (no absolute path, ``..`` or
symlink), and every checksum, and returns the typed :class:`artifacts.manifest.Manifest`.

What it does not do: build graphs (export/) or run them (runtime_py/). It imports neither.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from artifacts.manifest import FORMAT, FORMAT_VERSION, MANIFEST, ArtifactError, Manifest
from artifacts.paths import UnsafePathError, check_name, inside, json_loads, read_regular

# What a build copies from the checkpoint beside the graph, and what the runtime reads from an artifact, with
# runtime_py.chat's additional_chat_templates/*.jinja (copied too, each listed in the manifest: named_templates).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is KBs (MBs for a many-expert MoE's tensor schemes)


def named_templates(files) -> list[str]:
    """The additional_chat_templates/ files among an artifact's listed `files`, the ones beside the tokenizer."""
    return sorted(rel for rel in files if rel.startswith(CHAT_TEMPLATE_DIR + "/"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    """True when `path` is a directory holding one of our manifests (the only kind of directory a build replaces)."""
    try:  # a manifest.json that is a symlink (to a real one), a FIFO or a device does not make a directory ours
        return json_loads(read_regular(Path(path) / MANIFEST, MAX_MANIFEST_BYTES)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


# -- atomic renames -----------------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with flags; False when the kernel or libc lacks renameat2 (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_new(src: Path, dst: Path) -> None:
    """Rename src to dst, failing with FileExistsError if dst exists (also when it appeared a moment ago)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(str(dst)) from None
        raise
    if os.path.lexists(dst):  # fallback: only writers holding our lock race here, and we hold it
        raise FileExistsError(str(dst))
    os.rename(src, dst)


def _swap(new: Path, old: Path) -> None:
    """Put `new` at `old`'s path and `old`'s contents at `new`'s path, atomically where the kernel can."""
    if _renameat2(new, old, _RENAME_EXCHANGE):
        return
    aside = old.with_name(f"{old.name}.swap-{os.getpid()}")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)


# -- locking and stale staging directories -----------------------------------------------------------------------
MAX_OUT_NAME = 200  # bytes of an output's name: ".NAME.partial-PID-XXXXXXXX" stays under most filesystems' 255


def check_out_name(dest, what: str) -> Path:
    """`dest` as a Path (``~`` expanded), refused when empty or when its name leaves no room for a staging sibling."""
    if not str(dest).strip():
        raise ArtifactError(f"{what} is empty; give a path")
    given = Path(dest).expanduser()
    size = len(os.fsencode(given.name))
    if size > MAX_OUT_NAME:
        raise ArtifactError(f"{what} {given}: its last component has {size} bytes; at most {MAX_OUT_NAME} (the "
                            "staging file or directory and lock file beside it add a suffix)")
    return given


def make_parents(path: Path) -> list[Path]:
    """mkdir -p `path`'s parent; returns the directories it created, deepest first (for remove_empty_dirs)."""
    created = [d for d in (path.parent, *path.parent.parents) if not os.path.lexists(d)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_empty_dirs(created)
        raise
    return created


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove each of `dirs` (deepest first) that is still empty: the parents a failed command created."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty directory: never what someone else wrote meanwhile


def _lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


_LOCK_CONTENT = re.compile(rb"\d{0,20}")  # what a lock file of ours holds: its writer's pid (empty while being made)


def open_lock(path: Path) -> int:
    """A file descriptor on the lock file: made here (O_EXCL), or one of ours already there (a single-link regular
    file holding at most a pid: left by a writer that was killed, or held by one still running). Anything else at
    that name is someone else's: refused, never truncated, written or removed. -1: it went away meanwhile (try
    again)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as e:  # a symlink (ELOOP), a directory, ...; gone meanwhile: the caller tries again
        if isinstance(e, FileNotFoundError):
            return -1
        raise ArtifactError(f"{path}: exists and is not a lock file of ours ({e.strerror or e}); remove it or choose "
                            "another --out") from None
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= 20
            and _LOCK_CONTENT.fullmatch(os.pread(fd, 21, 0).strip())):
        os.close(fd)
        raise ArtifactError(f"{path}: exists and is not a lock file of ours (a file of someone else's, or a link to "
                            "one); remove it or choose another --out")
    return fd


@contextlib.contextmanager
def held_lock(path: Path, busy=None):
    """An exclusive fcntl lock on the lock file `path` (open_lock: made here or one of ours), yielding its file
    descriptor; the file is removed when the lock is released. `busy(holder)`: the exception to raise at once when
    another process holds it (`holder`: what it wrote there); without it, wait for that process."""
    while True:
        fd = open_lock(path)
        if fd < 0:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise busy(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file we opened: lock the new one
            break
        os.close(fd)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _locked(dest: Path):
    """Hold an exclusive fcntl lock on a sibling lock file of `dest`; refuse at once if another writer holds it."""
    def busy(holder: str) -> ArtifactError:
        return ArtifactError(f"{dest}: another process (pid {holder or '?'}) is writing it right now; wait for it "
                             f"to finish or choose another --out")

    with held_lock(_lock_path(dest), busy) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dest: Path) -> list[Path]:
    """Staging directories of `dest` whose writer is gone (we hold the lock, and its pid is dead): removed."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.partial-(\d+)-[A-Za-z0-9_]+$")
    removed = []
    for entry in dest.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_dir(dest: Path, overwrite: bool = False, owned=is_artifact, protect=(), what: str = "--out"):
    """Yield a temp dir beside `dest`; on success put it at `dest`, on any failure delete it.

    `dest` may be replaced (with `overwrite`) only when ``owned(dest)`` says it is one of ours; `protect` lists
    paths `dest` must not equal, lie inside or contain (e.g. the checkpoint being read). Parent directories it
    creates for `dest` are removed again on failure (when still empty)."""
    given = check_out_name(dest, what)
    if given.is_symlink():
        raise ArtifactError(f"{what} {given} is a symlink; give the real directory (links are not followed)")
    dest = given.resolve()
    for p in protect:
        p = Path(p).resolve()
        if _overlaps(dest, p):
            rel = "is" if dest == p else ("is inside" if p in dest.parents else "contains")
            raise ArtifactError(f"{what} {dest} {rel} {p}, which this command reads; choose an --out elsewhere")

    def check_existing():
        if not os.path.lexists(dest):
            return
        if dest.is_symlink() or not dest.is_dir() or not owned(dest):  # said first: --overwrite would not help
            kind = "a file" if dest.is_file() else "a directory"
            raise ArtifactError(f"{what} {dest} exists and is {kind} this tool did not write; refusing to replace "
                                "it, with or without --overwrite. Choose another --out or remove it yourself")
        if not overwrite:
            raise ArtifactError(f"{dest} already exists (pass --overwrite to replace it)")

    check_existing()
    try:
        created = make_parents(dest)
    except OSError as e:
        existing = next(d for d in (dest.parent, *dest.parent.parents) if os.path.lexists(d))
        if not existing.is_dir():
            raise ArtifactError(f"{what} {given}: {existing} is a file, not a directory") from None
        raise ArtifactError(f"{what} {given}: cannot create its parent directory ({e.strerror or e}: "
                            f"{e.filename or dest.parent})") from None
    try:
        with _staged(dest, overwrite, check_existing) as tmp:
            yield tmp
    except BaseException:
        remove_empty_dirs(created)  # the parents this command made for --out, if nothing else was put in them
        raise


@contextlib.contextmanager
def _staged(dest: Path, overwrite: bool, check_existing):
    with _locked(dest):
        _remove_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
        try:
            yield tmp
            check_existing()  # again: the destination may have changed while we wrote
            if overwrite and os.path.lexists(dest):
                _swap(tmp, dest)  # tmp now holds the old artifact
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    rename_new(tmp, dest)
                except FileExistsError:
                    raise ArtifactError(f"{dest} appeared while this command was writing it (another process); "
                                        "nothing was replaced (pass --overwrite to replace an artifact of ours)")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_manifest(root: Path, fields: dict | Manifest) -> Manifest:
    """Hash every file under root (except the manifest) and write manifest.json from `fields` (a Manifest, or its
    dict without format/files). The result is checked as every reader will read it before it is written."""
    raw = fields.to_dict() if isinstance(fields, Manifest) else dict(fields)
    for key in ("format", "format_version", "files"):
        raw.pop(key, None)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **raw, "files": files}, indent=2)
    manifest = Manifest.from_dict(json.loads(text), f"{root / MANIFEST} (being written)")  # as readers will see it
    (root / MANIFEST).write_text(text)
    return manifest


def _named_paths(manifest: dict) -> list[tuple[str, object]]:
    """(where, name) of every path the manifest names: its files, each graph's file, the engine's file."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{MANIFEST}: 'files' must be an object of file name -> {{sha256, bytes}}")
    named = [("files", rel) for rel in files]
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not graphs or not all(isinstance(g, dict) for g in graphs.values()):
        raise ArtifactError(f"{MANIFEST}: 'graphs' must be an object of graph name -> {{file, ...}}")
    named += [(f"graphs.{name}.file", g.get("file")) for name, g in graphs.items()]
    engine = manifest.get("engine")
    if engine is not None:
        named.append(("engine.file", engine.get("file") if isinstance(engine, dict) else engine))
    return named


def _check_paths(root: Path, manifest: dict) -> None:
    """Every path named is a plain relative name, reached without a symlink, and listed (so checksummed)."""
    files = manifest.get("files")
    for where, rel in _named_paths(manifest):
        try:
            inside(root, rel, f"{MANIFEST} {where}")
        except UnsafePathError as e:
            raise ArtifactError(f"{root}: {e}") from None
        if where != "files" and rel not in files:
            raise ArtifactError(f"{root}: {MANIFEST} {where} '{rel}' is not among the checksummed files")
        info = files.get(rel) if where == "files" else {}
        if where == "files" and not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                                     and isinstance(info.get("bytes"), int)):
            raise ArtifactError(f"{root}: {MANIFEST} files['{rel}'] must be {{\"sha256\": str, \"bytes\": int}}")


def read_manifest(root: Path) -> Manifest:
    """The manifest of `root`, its format version, every field's type and every path it names checked (not the
    checksums)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory does not exist")
    if path.is_symlink():
        raise ArtifactError(f"{root}: {MANIFEST} is a symlink; not following it")
    if not path.exists():
        raise ArtifactError(f"{root}: no {MANIFEST}; not an artifact (or an interrupted build)")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a regular file; not an artifact")
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as e:  # replaced by a link, a FIFO or something huge since the checks above
        raise ArtifactError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        manifest = json_loads(data)
    except ValueError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not supported by this "
                            f"runtime (supports {FORMAT_VERSION}); rebuild the artifact")
    _check_paths(root, manifest)
    return Manifest.from_dict(manifest, str(path))


def check_unlisted(root: Path, manifest: Manifest) -> None:
    """ArtifactError when the directory holds a file the runtime would read (a tokenizer file or chat template)
    that the manifest does not list: nothing seals it, so it could change what a checked artifact does."""
    names = [n for n in TOKENIZER_FILES if n not in manifest.files and os.path.lexists(root / n)]
    templates = root / CHAT_TEMPLATE_DIR  # a build copies the checkpoint's named templates there, each listed
    if templates.is_symlink() or (templates.exists() and not templates.is_dir()):
        names.append(CHAT_TEMPLATE_DIR + "/")
    elif templates.is_dir():
        names += sorted(rel for e in os.scandir(templates)
                        if (rel := f"{CHAT_TEMPLATE_DIR}/{e.name}") not in manifest.files)
    if names:
        raise ArtifactError(f"{root}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not listed in the "
                            "manifest, so no checksum covers it, and the runtime would read it; remove it or "
                            "rebuild the artifact from a checkpoint that has it")


def open_artifact(root: Path, verify: bool = True) -> Manifest:
    """Read the manifest (paths checked), refuse unlisted files the runtime would read (check_unlisted), and by
    default check that every listed file has its recorded sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    check_unlisted(root, manifest)
    if verify:
        for rel, info in manifest.files.items():
            path = root / rel
            if not path.is_file():
                raise ArtifactError(f"{root}: file '{rel}' listed in the manifest is missing")
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise ArtifactError(f"{root}: file '{rel}' does not match its sha256 in the manifest "
                                    "(modified or corrupted); rebuild the artifact")
    return manifest
