"""`python -m artifacts.triton {validate,serve,stub-env}`: the command line over the Triton repository modules.

What it does: parses flags and calls one function, printing ``error: ...`` and exiting 2 on a bad repository or
artifact, or a missing nvidia-pytriton. The work is done, one stage per file, by

- artifacts/triton_contract.py: what a repository is made of (types, model files, the python model's declared I/O);
- artifacts/triton_write.py: :func:`write_repository` (``python -m export triton`` calls it), staged and validated;
- artifacts/triton_readme.py + triton_readme.md: the repository's README (launch commands, a streaming client);
  triton_classify_readme.md for a task-head artifact's repository (its I/O, dynamic batching, a client);
- artifacts/triton_check.py: ``validate``: every config.pbtxt against Triton's ModelConfig and the files it names;
- artifacts/triton_stub_env.py: ``stub-env``: the numpy<2 environment the bundled python backend stub needs;
- artifacts/triton_launch.py: the bundled tritonserver's command line (nvidia-pytriton, python backend only);
- artifacts/triton_serve.py: ``serve``: run it until stopped, nothing of its process group left behind;
- runtime_py/triton_model.py: the python-backend model itself (runtime code, copied into a repository as model.py);
  runtime_py/triton_classify_model.py for task-head artifacts (seq-cls, token-cls, qa: not decoupled, dynamic
  batching).

What it does not do: anything beyond parsing flags. It never imports export/ or runtime_py.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before any import: a Ctrl-C while the imports run exits 130, no traceback
    from artifacts.cli import quiet_startup

    quiet_startup()

import argparse
import sys

from artifacts.bundle import ArtifactError
from artifacts.triton_check import validate_repository
from artifacts.triton_contract import RepositoryError
from artifacts.triton_serve import serve
from artifacts.triton_stub_env import default_stub_env, stub_env


def _port(text: str) -> int:
    """argparse type: a TCP port, 1..65535 (tritonserver takes any int and binds it modulo 65536)."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [1, 65535], got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m artifacts.triton")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate every config.pbtxt of a repository")
    v.add_argument("repo")
    s = sub.add_parser("serve", help="run the tritonserver bundled with nvidia-pytriton on a repository")
    s.add_argument("repo")
    s.add_argument("--grpc-port", type=_port, default=8001)
    s.add_argument("--http-port", type=_port, default=8000)
    s.add_argument("--metrics-port", type=_port, default=8002)
    s.add_argument("--model", action="append", default=[], help="model to load (default: the python models)")
    s.add_argument("--python-env", default=None,
                   help="Python environment for the backend stub (default: this one if it has numpy<2, else the "
                        "stub-env cache)")
    e = sub.add_parser("stub-env", help="make the numpy<2 environment the bundled python backend stub needs")
    e.add_argument("dest", nargs="?", default=None, help=f"directory (default: {default_stub_env()})")
    args = parser.parse_args(argv)
    if args.command == "serve":
        ports = {"--grpc-port": args.grpc_port, "--http-port": args.http_port, "--metrics-port": args.metrics_port}
        if len(set(ports.values())) < len(ports):  # tritonserver would print its whole usage text and exit 1
            parser.error("--grpc-port, --http-port and --metrics-port must differ, got "
                         + ", ".join(f"{k} {v}" for k, v in ports.items()))
    from artifacts.cli import restore_interrupts

    restore_interrupts()
    try:
        if args.command == "validate":
            print("\n".join(validate_repository(args.repo)))
            return 0
        if args.command == "stub-env":
            print(stub_env(args.dest))
            return 0
        return serve(args.repo, args.grpc_port, args.http_port, args.metrics_port, args.model or None,
                     python_env=args.python_env)
    except (RepositoryError, RuntimeError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from artifacts.cli import run

    run(main)
