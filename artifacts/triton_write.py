"""Writing a Triton Inference Server model repository from an artifact: staged, validated, then renamed into place.

What it does: :func:`write_repository` stages a repository in a hidden directory beside ``out`` and renames it into
place only after :func:`artifacts.triton_check.validate_repository` accepted it. The repository holds

- ``NAME/``: a decoupled python-backend model (``runtime_py/triton_model.py`` as ``1/model.py``) that streams
  runtime_py generations; the artifact is copied into ``1/artifact/`` and the first-party packages the model
  imports (``runtime_py/``, ``artifacts/``, ...: :func:`runtime_packages`, sources only) into ``1/runtime/``, which
  model.py puts first on ``sys.path``. Third-party packages (numpy, onnxruntime, tokenizers, jinja2) come from the
  Python environment the backend's stub runs in (see the repository README). For a task-head artifact (manifest
  ``spec.task`` seq-cls, token-cls or qa), ``NAME/`` is instead the classification model
  (``runtime_py/triton_classify_model.py`` as ``1/model.py``, same copies): not decoupled, ``dynamic_batching``,
  ``max_batch_size`` = the artifact's max_batch (rows per batch), the I/O of its task;
- ``NAME_graph/``: the raw decoder for Triton's ONNX Runtime backend (``1/model.onnx`` + its external data),
  with the KV tensors as inputs/outputs exactly as the artifact manifest lists them (symbolic dims -> -1,
  ``max_batch_size: 0`` so the batch dim is explicit), for clients that run their own generation loop; for a
  full-TensorRT engine, ``tensorrt_plan`` (``1/model.plan``) instead (a TensorRT-RTX engine has no Triton backend:
  the ONNX graph is served, the engine runs inside ``NAME`` through runtime_py). A task head's graph has no KV
  I/O (``input_ids`` in, ``logits`` or ``start_logits``/``end_logits`` out), served the same way;
- ``config.pbtxt`` of each, written from Triton's ``ModelConfig`` protobuf; the python model's I/O and parameter
  defaults are the ones ``runtime_py/triton_model.py`` declares (read from its source, never imported);
- ``README.md`` (artifacts/triton_readme.py) and a marker file that lets ``overwrite`` replace only our repositories.

Files are hard-linked from the artifact when the filesystem allows (artifacts are immutable), copied otherwise.

What it does not do: validate (artifacts/triton_check.py), serve (artifacts/triton_serve.py), build engines, or
import runtime_py or export/: the runtime is copied as files.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

from artifacts.bundle import MANIFEST, ArtifactError, open_artifact, staging_dir
from artifacts.triton_check import external_data, validate_repository
from artifacts.manifest import DTYPES
from artifacts.paths import json_loads, read_regular
from artifacts.triton_contract import (CLASSIFY_MODEL_SOURCE, MODEL_SOURCE, PACKAGE_ROOT, RepositoryError,
                                       model_constants, num_labels, protobuf, row_dims, triton_dims)
from artifacts.triton_readme import TASK_NAMES, classify_readme, graph_opsets, repository_readme

MAX_MODEL_NAME = 128  # bytes of --name
FIRST_PARTY = ("runtime_py", "artifacts", "plugins", "graphs", "export")
REPOSITORY_MARKER = ".llm-export-repository.json"  # what lets --overwrite replace a repository: only ours
REPOSITORY_FORMAT = "llm-export-triton-repository"


def is_repository(path: Path) -> bool:
    """True when `path` is a model repository this module wrote (its marker file names our format)."""
    try:  # a marker that is a symlink (to a real one), a FIFO or a device does not make a directory ours
        return json_loads(read_regular(Path(path) / REPOSITORY_MARKER, 1 << 20)).get("format") == REPOSITORY_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _first_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(FIRST_PARTY)


def runtime_packages(source: Path = MODEL_SOURCE) -> list[str]:
    """The first-party packages the python model `source` needs: the one holding it (runtime_py), what it imports,
    and what those import in turn (today runtime_py and artifacts)."""
    todo, seen = [source.parent.name, *sorted(_first_party_imports(source))], set()
    while todo:
        pkg = todo.pop()
        if pkg in seen or not (PACKAGE_ROOT / pkg).is_dir():
            continue
        seen.add(pkg)
        for f in (PACKAGE_ROOT / pkg).rglob("*.py"):
            todo.extend(_first_party_imports(f) - seen)
    return sorted(seen)


def _copy_sources(dst: Path, source: Path = MODEL_SOURCE) -> list[str]:
    pkgs = runtime_packages(source)
    for pkg in pkgs:
        shutil.copytree(PACKAGE_ROOT / pkg, dst / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.cu", "*.o"))
    return pkgs


def _config_text(cfg, comment: str) -> str:
    text_format, _ = protobuf()
    body = text_format.MessageToString(cfg)
    # proto3 omits zero values; max_batch_size 0 is a decision worth seeing in the file ...
    lines = body.splitlines()
    if cfg.max_batch_size == 0:
        at = next(i for i, line in enumerate(lines) if not line.startswith(("name:", "platform:", "backend:")))
        lines.insert(at, "max_batch_size: 0")
    body = "\n".join(lines) + "\n"
    # ... and so is decoupled: false (the classification model answers each request once).
    body = body.replace("model_transaction_policy {\n}", "model_transaction_policy {\n  decoupled: false\n}")
    return "".join(f"# {c}\n" for c in comment.splitlines()) + body


def _tensor(cls, name: str, data_type: str, dims: list[int], optional: bool = False):
    _, pb = protobuf()
    t = cls(name=name, data_type=pb.DataType.Value(data_type), dims=dims)
    if optional:
        t.optional = True
    return t


def _model_constants(source: Path = MODEL_SOURCE) -> dict:
    """INPUTS, OUTPUTS and DEFAULTS (and the classify model's KIND, RAGGED, BATCHING) of the python model this
    writer copies (from its source)."""
    if not source.is_file():
        raise RepositoryError(f"the python-backend model {source} is missing: writing a repository needs "
                              "runtime_py installed beside artifacts/")
    declared = model_constants(source)
    if declared is None or not isinstance(declared.get("DEFAULTS"), dict):
        raise RepositoryError(f"{source}: INPUTS, OUTPUTS and DEFAULTS must be literals")
    batching = declared.get("BATCHING")
    if source == CLASSIFY_MODEL_SOURCE and (declared["KIND"] != "classify" or not isinstance(batching, dict)):
        raise RepositoryError(f"{source}: KIND must be 'classify' and BATCHING a literal dict")
    return declared


def _python_config(name: str, instances: int, max_batch: int, has_engine: bool, model: dict):
    _, pb = protobuf()
    # max_batch_size 1: one prompt per request with the batch dim first ([1, 1] scalars), as TensorRT-LLM's models
    # take it and Triton's OpenAI-compatible frontend sends it; requests batch in the engine, not in Triton
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=1)
    cfg.model_transaction_policy.decoupled = True
    for n, (dt, dims, optional) in model["INPUTS"].items():
        cfg.input.append(_tensor(pb.ModelInput, n, dt, dims, optional))
    for n, (dt, dims) in model["OUTPUTS"].items():
        cfg.output.append(_tensor(pb.ModelOutput, n, dt, dims))
    # An engine runs on a GPU when there is one (runtime_py picks it), the ONNX graph on the CPU otherwise.
    kind = pb.ModelInstanceGroup.KIND_AUTO if has_engine else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=kind))
    params = {**model["DEFAULTS"], "max_concurrency": str(max_batch)}
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def _classify_config(name: str, instances: int, max_batch: int, model: dict, manifest):
    """The task-head model: not decoupled, Triton's dynamic batcher merging requests into batches of up to
    `max_batch` rows, the I/O of the artifact's task (runtime_py/triton_classify_model.py), on the CPU (ONNX
    Runtime)."""
    _, pb = protobuf()
    task, labels = manifest.task, num_labels(manifest)
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    cfg.model_transaction_policy.decoupled = False
    cfg.dynamic_batching.SetInParent()  # present even when every field is at its default
    for k, v in model["BATCHING"].items():
        setattr(cfg.dynamic_batching, k, v)
    ragged = set(model.get("RAGGED") or ())
    for n, (dt, dims, optional) in model["INPUTS"][task].items():
        t = _tensor(pb.ModelInput, n, dt, row_dims(dims, labels), optional)
        if n in ragged:
            t.allow_ragged_batch = True
        cfg.input.append(t)
    for n, (dt, dims) in model["OUTPUTS"][task].items():
        cfg.output.append(_tensor(pb.ModelOutput, n, dt, row_dims(dims, labels)))
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU))
    for k, v in model["DEFAULTS"].items():
        if k != "max_answer_len" or task == "qa":
            cfg.parameters[k].string_value = v
    return cfg


def _graph_config(name: str, graph: dict, instances: int, plan: bool):
    """The raw graph model: the ONNX graph on Triton's ONNX Runtime backend, or (`plan`) the TensorRT engine on its
    TensorRT backend. The engine's I/O is the graph's (checked when the engine was built)."""
    _, pb = protobuf()
    if plan:
        cfg = pb.ModelConfig(name=name, platform="tensorrt_plan", backend="tensorrt", max_batch_size=0)
    else:
        cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0)
    for src, cls, dst in ((graph.inputs, pb.ModelInput, cfg.input), (graph.outputs, pb.ModelOutput, cfg.output)):
        for t in src:
            dst.append(_tensor(cls, t.name, DTYPES[t.dtype].triton, triton_dims(t.shape)))
    kind = pb.ModelInstanceGroup.KIND_GPU if plan else pb.ModelInstanceGroup.KIND_AUTO
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=kind))
    return cfg


def write_repository(artifact: str | Path, out: str | Path, name: str = "llm", instances: int = 1,
                     max_batch: int | None = None, overwrite: bool = False) -> Path:
    """Write a validated Triton model repository for `artifact` at `out`; returns its path.

    `instances`: instance_group count of each model (each python instance loads its own session). `max_batch`: the
    KV slots of one python instance, the requests its engine batches together (default and upper bound: the
    artifact's max_batch, the static buffers it was built for). For a task-head artifact (seq-cls, token-cls, qa)
    `max_batch` is the classification model's max_batch_size, the rows the dynamic batcher puts in one batch (same
    default and bound; 1 for a seq-cls artifact without pad_token_id, which classifies one input at a time)."""
    artifact = Path(artifact)
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name.startswith(("-", ".")):
        raise ValueError(f"model name must be letters, digits, '_' or '-', got {name[:80]!r}")
    if len(name.encode()) > MAX_MODEL_NAME:  # NAME_graph and the staging names must stay under 255 bytes
        raise ValueError(f"model name must be at most {MAX_MODEL_NAME} bytes, got {len(name.encode())}")
    for flag, value in (("instances", instances), ("max_batch", max_batch)):
        if value is None and flag == "max_batch":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    manifest = open_artifact(artifact)  # checksums verified once, here
    task = manifest.task
    limit = manifest.max_batch
    if task == "seq-cls" and manifest.spec.get("pad_token_id") is None:
        limit = 1  # pooling finds each row's last token by pad_token_id: one input at a time (runtime_py.classify)
        if max_batch is not None and max_batch > 1:
            raise ValueError(f"--max-batch {max_batch}: {artifact} is a seq-cls artifact without pad_token_id, "
                             "which classifies one input at a time (max_batch 1)")
    if max_batch is None:
        max_batch = limit
    elif max_batch > manifest.max_batch:
        what = "its static KV buffers" if task == "causal-lm" else "the batch its graph was built and checked for"
        raise ValueError(f"--max-batch {max_batch} > the artifact's {manifest.max_batch} ({what}); "
                         f"rebuild it with `python -m export build ... --max-batch {max_batch}`")
    if task != "causal-lm" and manifest.decoder.lowering == "trt-plugin":
        raise ArtifactError(f"{artifact}: a {task} artifact with the trt-plugin graph: the classification model runs "
                            "the ONNX graph on ONNX Runtime, which cannot run our TensorRT plugins; rebuild it with "
                            "another --lowering")
    engine = manifest.engine
    if manifest.backend == "tensorrt" and engine is None:
        raise ArtifactError(f"{artifact}: a tensorrt artifact without an engine in its manifest; rebuild it")
    plan = engine is not None and engine.flavour == "tensorrt"  # TensorRT-RTX engines: no Triton backend
    graph = manifest.decoder
    graph_file = artifact / graph.file
    data_files = external_data(graph_file)
    unlisted = [rel for rel in data_files if (Path(graph.file).parent / rel).as_posix() not in manifest.files]
    if unlisted:
        raise ArtifactError(f"{artifact}: the graph's external data {unlisted} is not among the manifest's "
                            "checksummed files")
    graph_name = f"{name}_graph"
    source = MODEL_SOURCE if task == "causal-lm" else CLASSIFY_MODEL_SOURCE
    model = _model_constants(source)
    with staging_dir(out, overwrite=overwrite, owned=is_repository, protect=[artifact]) as tmp:
        marker = {"format": REPOSITORY_FORMAT, "artifact": str(artifact.resolve()), "models": [name, graph_name]}
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(marker, indent=2))
        # (a) the python model: streaming generation, or the task head behind the dynamic batcher
        version = tmp / name / "1"
        for rel in [*manifest.files, MANIFEST]:
            _link_or_copy(artifact / rel, version / "artifact" / rel)
        pkgs = _copy_sources(version / "runtime", source)
        shutil.copy2(source, version / "model.py")
        written = f"Written by llm-export; runtime sources in 1/runtime ({', '.join(pkgs)}), artifact in 1/artifact."
        if task == "causal-lm":
            cfg = _python_config(name, instances, max_batch, engine is not None, model)
            what = f"Streaming text generation (decoupled) with runtime_py on {artifact.name}."
        else:
            cfg = _classify_config(name, instances, max_batch, model, manifest)
            what = (f"{TASK_NAMES[task].capitalize()} with runtime_py on {artifact.name}: one response per request, "
                    f"dynamic batching of up to {max_batch} rows.")
        (tmp / name / "config.pbtxt").write_text(_config_text(cfg, f"{what}\n{written}"))
        # (b) the raw graph
        gdir = tmp / graph_name / "1"
        if plan:
            _link_or_copy(version / "artifact" / engine.file, gdir / "model.plan")
            what = f"TensorRT {engine.version} engine"
        else:
            _link_or_copy(version / "artifact" / graph.file, gdir / "model.onnx")
            for rel in data_files:
                _link_or_copy(version / "artifact" / Path(graph.file).parent / rel, gdir / rel)
            what = "ONNX decoder graph"
        if task == "causal-lm":
            about = (f"Raw {what} of {artifact.name} (lowering {graph.lowering}, KV mode {manifest.kv_mode}, "
                     f"{manifest.precision}).\nOne prefill/decode step per request; the client owns the KV cache.")
        else:
            about = (f"Raw {what} of {artifact.name} ({task} head, lowering {graph.lowering}, {manifest.precision}).\n"
                     f"One full-sequence forward per request: input_ids right-padded with pad_token_id.")
        (tmp / graph_name / "config.pbtxt").write_text(_config_text(
            _graph_config(graph_name, graph, instances, plan), about))
        if task == "causal-lm":
            readme = repository_readme(name, manifest, instances, max_batch, graph_opsets(graph_file),
                                       int(model["DEFAULTS"]["default_max_tokens"]))
        else:
            readme = classify_readme(name, manifest, instances, max_batch, graph_opsets(graph_file), model)
        (tmp / "README.md").write_text(readme)
        validate_repository(tmp)
        publishable(tmp)
    return Path(out).expanduser().resolve()


def publishable(path: Path) -> None:
    """mkdtemp makes 0700 directories; give the staged tree the permissions a plain mkdir would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)

