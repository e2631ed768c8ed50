"""The command line that runs the tritonserver bundled with nvidia-pytriton on a model repository.

What it does: :func:`pytriton_paths` finds nvidia-pytriton's ``tritonserver`` binary, its python backend, the stub
built for this Python and its shared libraries; :func:`bundled_server` lays out a backend directory (python backend +
that stub) and returns the ``(argv, env)`` that serve a repository's python models on 127.0.0.1 (explicit model
control, ``--exit-timeout-secs`` :data:`SERVER_EXIT_TIMEOUT_S`, ``PATH`` led by the stub's Python environment,
``LD_LIBRARY_PATH`` with this Python's libpython); :func:`free_ports` picks loopback ports.

What it does not do: start or stop the server (artifacts/triton_serve.py does, and the tests do), make the stub's
environment (artifacts/triton_stub_env.py), or load the raw graph model (the bundled server has no ONNX Runtime
backend). A full Triton install needs none of this: ``tritonserver --model-repository REPO``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

from artifacts.triton_check import RepositoryError, parse_config
from artifacts.triton_stub_env import stub_env

SERVER_EXIT_TIMEOUT_S = 10  # tritonserver --exit-timeout-secs: how long it waits for in-flight work on a stop


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pytriton_paths() -> dict[str, Path]:
    """tritonserver binary, python backend dir, stub for this Python, shared libs dir of nvidia-pytriton."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (pip install 'llm-export[triton]')")
    pkg = Path(list(spec.submodule_search_locations)[0])
    dist = pkg / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    paths = {"server": dist / "bin" / "tritonserver", "python_backend": dist / "backends" / "python",
             "stub": dist / "python_backend_stubs" / version / "triton_python_backend_stub",
             "libs": pkg.parent / "nvidia_pytriton.libs"}
    for key, p in paths.items():
        if not p.exists():
            raise RuntimeError(f"nvidia-pytriton install has no {key} at {p}")
    return paths


def bundled_server(repo: str | Path, workdir: str | Path, grpc_port: int, http_port: int, metrics_port: int,
                   models: list[str] | None = None,
                   python_env: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run nvidia-pytriton's tritonserver on `repo`, bound to 127.0.0.1. `workdir` receives the
    backend directory (python backend + the stub for this Python). Loads `models` (default: every python-backend
    model; the bundled server has no ONNX Runtime backend). `python_env`: the environment whose bin/ goes first on
    PATH, which is where the stub's embedded Python finds its packages (default: :func:`stub_env`)."""
    repo, workdir = Path(repo).resolve(), Path(workdir)
    paths = pytriton_paths()
    if python_env is not None and not (Path(python_env) / "bin").is_dir():
        raise RepositoryError(f"--python-env {python_env}: not a Python environment (no bin/ directory)")
    python_env = Path(python_env) if python_env is not None else stub_env()
    if models is not None:
        known = sorted(d.name for d in repo.iterdir() if (d / "config.pbtxt").is_file())
        unknown = [m for m in models if m not in known]
        if unknown:
            raise RepositoryError(f"{repo}: no model named {', '.join(map(repr, unknown))}; it has {known}")
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for f in paths["python_backend"].iterdir():
        if f.is_file():
            shutil.copy2(f, backend / f.name)
    shutil.copy2(paths["stub"], backend / "triton_python_backend_stub")
    if models is None:
        models = [d.name for d in sorted(repo.iterdir()) if (d / "config.pbtxt").is_file()
                  and parse_config(d / "config.pbtxt").backend == "python"]
    argv = [str(paths["server"]), "--model-repository", str(repo), "--backend-directory", str(workdir / "backends"),
            "--model-control-mode", "explicit", *[a for m in models for a in ("--load-model", m)],
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--http-address", "127.0.0.1", "--http-port", str(http_port),
            "--metrics-port", str(metrics_port), "--allow-gpu-metrics", "false",
            "--disable-auto-complete-config", "--exit-timeout-secs", str(SERVER_EXIT_TIMEOUT_S),
            "--log-verbose", "0"]
    env = dict(os.environ)
    libdirs = [str(paths["libs"])]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub links libpython3.X: use this Python's
        libdirs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(python_env / "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return argv, env
