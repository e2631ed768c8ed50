"""Confinement: names read from untrusted files (manifests, bundle indexes, checkpoint indexes) stay inside their
directory.

What it does: :func:`check_name` accepts only a plain relative POSIX name (no absolute path, no ``..`` or ``.``
component, no empty component, no backslash, no NUL). :func:`inside` maps such a name to a path under a root and
refuses it when any component under the root is a symlink (a link may lead anywhere, now or later).
:func:`create_inside` creates a new file under a root with every directory component opened relative to the one
above it (``dir_fd``) with ``O_NOFOLLOW``, so a symlink planted anywhere on the way is refused by the kernel, not
by a check that a race could defeat. :func:`real_inside` says whether a path's real location lies under one of
some roots (for files that may legitimately be links, such as an HF cache snapshot pointing into its blobs/).
And :func:`cache_root`: the one directory llm-export caches in (``$LLM_EXPORT_CACHE``, else
``$XDG_CACHE_HOME/llm-export``, else ``~/.cache/llm-export``). And :func:`json_loads`: ``json.loads`` for untrusted
text, where nesting deeper than Python's recursion limit is a ValueError like any other bad JSON, not a
RecursionError that escapes every ``except ValueError``. And :func:`read_regular`: a small file's bytes, refused
unless it is a regular file reached without a symlink at its last component and under a size bound (a FIFO, a
device or a link to /dev/zero in its place would block or never end).

What it does not do: decide which names a format lists (artifacts/bundle.py, artifacts/edge.py do).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath


class UnsafePathError(ValueError):
    """A name from an untrusted file would leave its directory (absolute, '..', a symlink on the way)."""


def check_name(rel, what: str) -> str:
    """`rel` if it is a plain relative name like 'model.onnx' or 'plugins/attention.py'; else UnsafePathError."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{what}: expected a relative file name, got {rel!r}")
    if "\\" in rel or "\0" in rel:
        raise UnsafePathError(f"{what}: {rel!r} contains a backslash or NUL")
    if rel.startswith("/") or PurePosixPath(rel).is_absolute():
        raise UnsafePathError(f"{what}: {rel!r} is an absolute path; only names inside the directory are allowed")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{what}: {rel!r} is not a plain relative name (no '..', '.' or empty components)")
    return rel


def inside(root: str | Path, rel, what: str) -> Path:
    """root/rel, refusing unsafe names and any symlink among the components under root (root itself may be one)."""
    check_name(rel, what)
    root = Path(root).resolve()
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(f"{what}: '{rel}' goes through a symlink ({path.relative_to(root)} -> "
                                  f"{os.readlink(path)}); symlinks are not followed")
    return path


def real_inside(path: str | Path, roots: list[str | Path]) -> bool:
    """True when the real location of `path` (every link resolved) is under one of `roots`."""
    real = Path(os.path.realpath(path))
    for root in roots:
        root = Path(os.path.realpath(root))
        if real == root or root in real.parents:
            return True
    return False


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def mkdir_inside(root_fd: int, rel: str, what: str) -> int:
    """Open (creating as needed) directory root/rel component by component, never following a link. Returns an
    fd the caller closes."""
    check_name(rel, what)
    fd = os.dup(root_fd)
    try:
        for part in rel.split("/"):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise UnsafePathError(f"{what}: cannot enter '{part}' of '{rel}' ({e.strerror}: a symlink or not "
                                      "a directory)") from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def create_inside(root_fd: int, rel: str, what: str):
    """A new file root/rel opened for binary writing (O_EXCL: never replaces anything, never follows a link)."""
    check_name(rel, what)
    parent, _, name = rel.rpartition("/")
    dir_fd = mkdir_inside(root_fd, parent, what) if parent else os.dup(root_fd)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o644, dir_fd=dir_fd)
    except FileExistsError:
        raise UnsafePathError(f"{what}: '{rel}' is listed twice or already exists") from None
    finally:
        os.close(dir_fd)
    return os.fdopen(fd, "wb")


def open_dir(path: str | Path) -> int:
    """An fd for directory `path` (the caller closes it); `path` itself may be reached through links."""
    return os.open(str(path), os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def cache_root() -> Path:
    """The one directory llm-export caches in: tiny checkpoints (``tiny/``), default artifact directories, bench
    models and results, the Triton python backend stub's environment (``triton-stub-env-*``).

    ``$LLM_EXPORT_CACHE`` when set (used as is: no ``llm-export`` appended), else ``$XDG_CACHE_HOME/llm-export``,
    else ``~/.cache/llm-export``. An empty variable counts as unset, as does a relative ``XDG_CACHE_HOME`` (the XDG
    spec says to ignore it)."""
    own = os.environ.get("LLM_EXPORT_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "llm-export"


def json_loads(data: str | bytes):
    """json.loads, but JSON nested too deeply to parse raises ValueError (bad input) instead of RecursionError.
    Undecodable bytes raise UnicodeDecodeError and bad JSON json.JSONDecodeError, both ValueErrors."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply to parse (arrays or objects inside each other past Python's "
                         "recursion limit)") from None


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of `path`, at most `limit` of them. ValueError when it is not a regular file (a FIFO, a device, a
    directory) or is larger; OSError when it cannot be opened, also when it is a symlink (``O_NOFOLLOW``; opening
    with ``O_NONBLOCK`` keeps a FIFO from blocking the open, fstat then refuses it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit:,} bytes")
    return data
