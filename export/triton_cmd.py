"""`python -m export triton ARTIFACT --out REPO [--name NAME] [--instances N] [--max-batch B] [--overwrite]`.

Writes a Triton model repository (artifacts/triton_write.py): a decoupled python-backend model NAME streaming runtime_py
generations (for a task-head artifact: a non-decoupled classification model with dynamic batching), the raw graph
model NAME_graph, and a README with launch and client commands. Every config.pbtxt is
validated against Triton's ModelConfig protobuf before the repository appears; prints its path last.
"""

from __future__ import annotations

import argparse
import sys

from export.options import MAX_BATCH, MAX_INSTANCES, int_in


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("triton", help="write a Triton Inference Server model repository for an artifact",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("artifact", help="artifact directory (python -m export build)")
    t.add_argument("--out", required=True, help="model repository directory to create")
    t.add_argument("--name", default="llm", help="name of the streaming model (the graph model is NAME_graph)")
    t.add_argument("--instances", type=int_in(1, MAX_INSTANCES), default=1,
                   help=f"instances of each model (instance_group count), 1..{MAX_INSTANCES}")
    t.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=None,
                   help="KV slots of one instance of the streaming model: requests batched together (continuous "
                        "batching); at most, and by default, the artifact's --max-batch")
    t.add_argument("--overwrite", action="store_true", help="replace an existing repository directory")
    t.set_defaults(func=run)
    return t


def run(args) -> int:
    from artifacts.bundle import ArtifactError
    from artifacts.triton_contract import RepositoryError
    from artifacts.triton_write import write_repository

    try:
        path = write_repository(args.artifact, args.out, name=args.name, instances=args.instances,
                                max_batch=args.max_batch, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ArtifactError, RepositoryError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from artifacts.bundle import open_artifact

    task = open_artifact(path / args.name / "1" / "artifact", verify=False).task
    kind = "decoupled streaming" if task == "causal-lm" else f"{task}, dynamic batching"
    print(f"models: {args.name} (python, {kind}), {args.name}_graph (onnxruntime); see {path}/README.md",
          file=sys.stderr)
    print(path)
    return 0
