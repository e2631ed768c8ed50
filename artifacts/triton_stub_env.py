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
import fcntl
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from artifacts.bundle import staging_dir
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
    if (dest / ".complete").is_file():
        return dest
    with _one_maker(dest):  # a second process (e.g. another pytest worker) waits for the first one's env
        if not (dest / ".complete").is_file():
            _make(dest)
    return dest


@contextlib.contextmanager
def _one_maker(dest: Path):
    """A blocking fcntl lock on ``.<dest name>.wait`` beside `dest` (staging_dir's own lock refuses a second writer
    at once, which is right for a user's --out but not for a shared cache entry)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.with_name(f".{dest.name}.wait"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make(dest: Path) -> None:
    import site
    import venv

    with staging_dir(dest, overwrite=True) as tmp:
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
