"""The Python environment the python-backend stub bundled with nvidia-pytriton runs model.py in (numpy<2).

What it does: :func:`stub_env` returns this environment when it has numpy 1.x; otherwise it makes, once and
atomically, a venv of this Python holding only ``numpy<2`` (pip, binary wheel) that sees this environment's
site-packages after its own (a ``.pth`` file), so model.py gets numpy 1.x and everything else (onnxruntime,
tokenizers, jinja2) from here. The default place is per user, per Python version and per parent environment under
the llm-export cache (:func:`artifacts.paths.cache_root`).

What it does not do: start a server (artifacts/triton_launch.py, artifacts/triton_serve.py), install anything into
this environment, or touch the network beyond that one pip install.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from artifacts.bundle import ArtifactError, held_lock, make_parents, remove_empty_dirs, staging_dir
from artifacts.paths import cache_root
from artifacts.triton_write import publishable


def numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".")[0])


def default_stub_env() -> Path:
    """Per user, per Python version and per parent environment (the stub env reads the parent's packages)."""
    import hashlib

    parent = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:10]
    return cache_root() / f"triton-stub-env-py{sys.version_info[0]}.{sys.version_info[1]}-{parent}"


def stub_env(dest: str | Path | None = None) -> Path:
    """A Python environment the bundled python backend stub can run model.py in; returns its prefix.

    The stub nvidia-pytriton 0.7 bundles (Triton 2.51) is built against numpy 1.x. When this environment has numpy
    1.x it is used as is. Otherwise `dest` (default: a per-user cache) becomes a venv of this Python holding only
    numpy<2 (pip, binary wheel) that sees this environment's site-packages after its own (a .pth file), so model.py
    gets numpy 1.x and everything else (onnxruntime, tokenizers, jinja2) from here. Made once, atomically; a
    process that finds another one making it waits for that one instead of failing."""
    if numpy_major() < 2:
        return Path(sys.prefix)
    dest = Path(dest) if dest is not None else default_stub_env()
    if is_stub_env(dest):
        return dest
    if os.path.lexists(dest):  # an artifact, a user's directory or file: never replaced
        raise ArtifactError(f"{dest} exists and is not a stub environment this tool made; refusing to replace it. "
                            "Choose another DEST or remove it yourself")
    try:
        created = make_parents(dest)
    except OSError as e:  # a parent that is a file, or not writable
        raise ArtifactError(f"{dest}: cannot create its parent directory ({e.strerror or e}: "
                            f"{e.filename or dest.parent})") from None
    try:
        with _one_maker(dest):  # a second process (e.g. another pytest worker) waits for the first one's env
            if not is_stub_env(dest):
                _make(dest)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return dest


def is_stub_env(path: Path) -> bool:
    """A finished environment of :func:`stub_env` (its marker is written last, inside the staging directory)."""
    marker = Path(path) / ".complete"
    return not Path(path).is_symlink() and marker.is_file() and not marker.is_symlink() and \
        (Path(path) / "pyvenv.cfg").is_file()


@contextlib.contextmanager
def _one_maker(dest: Path):
    """A blocking lock on ``.<dest name>.wait`` beside `dest` (staging_dir's own lock refuses a second writer at
    once, which is right for a user's --out but not for a shared cache entry)."""
    with held_lock(dest.with_name(f".{dest.name}.wait")):
        yield


def _make(dest: Path) -> None:
    import site
    import venv

    with staging_dir(dest, owned=is_stub_env, what="DEST") as tmp:
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(tmp)
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(tmp), "platbase": str(tmp)}))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary", ":all:", "--target", str(purelib), "numpy>=1.26,<2"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"could not install numpy<2 for the python backend stub ({' '.join(cmd)}):\n"
                               f"{done.stderr.strip()[-2000:]}")
        here = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"),
                                          sysconfig.get_path("platlib")]) if Path(p).is_dir()]
        (purelib / "zz_llm_export_parent_env.pth").write_text("".join(f"{p}\n" for p in here))
        publishable(tmp)
        (tmp / ".complete").write_text(f"numpy<2 for the tritonserver python backend stub; parent env {sys.prefix}\n")
    # venv scripts name the staging path; only bin/python* (symlinks to the base interpreter) are used.
