"""Triton Inference Server model repositories from an artifact: written atomically, validated before they exist.

What it does: :func:`write_repository` stages a repository in a hidden directory beside ``out`` and renames it into
place only after :func:`validate_repository` accepted it. The repository holds

- ``NAME/``: a decoupled python-backend model (``artifacts/triton_model.py`` as ``1/model.py``) that streams
  runtime_py generations; the artifact is copied into ``1/artifact/`` and the first-party packages runtime_py imports
  (``runtime_py/``, ``artifacts/``, ...: sources only) into ``1/runtime/``, which model.py puts first on
  ``sys.path``. Third-party packages (numpy, onnxruntime, tokenizers, jinja2) come from the Python environment the
  backend's stub runs in (see the repository README);
- ``NAME_graph/``: the raw decoder for Triton's ONNX Runtime backend (``1/model.onnx`` + its external data),
  with the KV tensors as inputs/outputs exactly as the artifact manifest lists them (symbolic dims -> -1,
  ``max_batch_size: 0`` so the batch dim is explicit), for clients that run their own generation loop;
- ``README.md``: launch commands and a tritonclient gRPC streaming client.

Files are hard-linked from the artifact when the filesystem allows (artifacts are immutable), copied otherwise.
:func:`validate_repository` parses every ``config.pbtxt`` into tritonclient's ``ModelConfig`` protobuf (unknown
fields, bad enums and syntax errors are rejected with the line) and then checks what the protobuf cannot: names
match directories, dims are valid, the version directory holds the model file, the python model's I/O is the one
model.py reads, the graph model's I/O matches the ONNX graph (names and element types), the copied artifact is
complete. :func:`bundled_server` builds the command line that runs the ``tritonserver`` bundled in nvidia-pytriton
(python backend only) on a repository; ``python -m artifacts.triton serve REPO`` runs it and stops it on SIGINT,
SIGTERM or SIGHUP with nothing of the server's process group left behind (see ``_serve``).

TensorRT artifacts: the python model runs the engine through runtime_py when a GPU is present; the raw model is
``tensorrt_plan`` (``1/model.plan``) for a full-TensorRT engine and the ONNX graph on ONNX Runtime for a TensorRT-RTX
engine (Triton has no TensorRT-RTX backend).

What it does not do: read a plan's I/O (that needs TensorRT; the engine's I/O was checked against the graph contract
when it was built), build engines, or start a full Triton. It never imports export/.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from artifacts import triton_model
from artifacts.bundle import MANIFEST, ArtifactError, open_artifact, staging_dir

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding runtime_py/ and artifacts/
FIRST_PARTY = ("runtime_py", "artifacts", "plugins", "graphs", "export")
ONNX_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
              "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
              "bool": "TYPE_BOOL"}
# onnx.TensorProto element type -> Triton type, for checking the graph model's config against the graph.
_ONNX_ELEM = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
              3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


class RepositoryError(ValueError):
    """The model repository (or one config.pbtxt in it) is invalid."""


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise RepositoryError(f"validating Triton configs needs tritonclient ({e}); "
                              "install it with: pip install 'llm-export[triton]'") from None
    return text_format, model_config_pb2


# -- writing ------------------------------------------------------------------------------------------------------
REPOSITORY_MARKER = ".llm-export-repository.json"  # what lets --overwrite replace a repository: only ours
REPOSITORY_FORMAT = "llm-export-triton-repository"


def is_repository(path: Path) -> bool:
    """True when `path` is a model repository this module wrote (its marker file names our format)."""
    try:
        return json.loads((Path(path) / REPOSITORY_MARKER).read_text()).get("format") == REPOSITORY_FORMAT
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


def runtime_packages() -> list[str]:
    """The first-party packages the python model needs: runtime_py, artifacts and whatever they import."""
    todo, seen = ["runtime_py", "artifacts"], set()
    while todo:
        pkg = todo.pop()
        if pkg in seen or not (PACKAGE_ROOT / pkg).is_dir():
            continue
        seen.add(pkg)
        for f in (PACKAGE_ROOT / pkg).rglob("*.py"):
            todo.extend(_first_party_imports(f) - seen)
    return sorted(seen)


def _copy_sources(dst: Path) -> list[str]:
    pkgs = runtime_packages()
    for pkg in pkgs:
        shutil.copytree(PACKAGE_ROOT / pkg, dst / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.cu", "*.o"))
    return pkgs


def _config_text(cfg, comment: str) -> str:
    text_format, _ = _pb()
    body = text_format.MessageToString(cfg)
    # proto3 omits zero values; max_batch_size 0 is a decision worth seeing in the file.
    lines = body.splitlines()
    if cfg.max_batch_size == 0:
        at = next(i for i, line in enumerate(lines) if not line.startswith(("name:", "platform:", "backend:")))
        lines.insert(at, "max_batch_size: 0")
    return "".join(f"# {c}\n" for c in comment.splitlines()) + "\n".join(lines) + "\n"


def _tensor(cls, name: str, data_type: str, dims: list[int], optional: bool = False):
    _, pb = _pb()
    t = cls(name=name, data_type=pb.DataType.Value(data_type), dims=dims)
    if optional:
        t.optional = True
    return t


def _python_config(name: str, instances: int, max_batch: int, has_engine: bool):
    _, pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for n, (dt, dims, optional) in triton_model.INPUTS.items():
        cfg.input.append(_tensor(pb.ModelInput, n, dt, dims, optional))
    for n, (dt, dims) in triton_model.OUTPUTS.items():
        cfg.output.append(_tensor(pb.ModelOutput, n, dt, dims))
    # An engine runs on a GPU when there is one (runtime_py picks it), the ONNX graph on the CPU otherwise.
    kind = pb.ModelInstanceGroup.KIND_AUTO if has_engine else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=kind))
    params = {**triton_model.DEFAULTS, "max_concurrency": str(max_batch)}
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _graph_config(name: str, graph: dict, instances: int, plan: bool):
    """The raw graph model: the ONNX graph on Triton's ONNX Runtime backend, or (`plan`) the TensorRT engine on its
    TensorRT backend. The engine's I/O is the graph's (checked when the engine was built)."""
    _, pb = _pb()
    if plan:
        cfg = pb.ModelConfig(name=name, platform="tensorrt_plan", backend="tensorrt", max_batch_size=0)
    else:
        cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0)
    for src, cls, dst in ((graph["inputs"], pb.ModelInput, cfg.input), (graph["outputs"], pb.ModelOutput, cfg.output)):
        for t in src:
            if t["dtype"] not in ONNX_TYPES:
                raise ArtifactError(f"graph tensor {t['name']}: dtype {t['dtype']} has no Triton type")
            dst.append(_tensor(cls, t["name"], ONNX_TYPES[t["dtype"]], _dims(t["shape"])))
    kind = pb.ModelInstanceGroup.KIND_GPU if plan else pb.ModelInstanceGroup.KIND_AUTO
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=kind))
    return cfg


def _external_data(graph_path: Path) -> list[str]:
    """Relative locations of the graph's external-data files."""
    import onnx

    model = onnx.load_model(str(graph_path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    for loc in locations:
        if Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise ArtifactError(f"{graph_path}: external data location {loc!r} is not a file beside the graph")
    return sorted(locations)


def write_repository(artifact: str | Path, out: str | Path, name: str = "llm", instances: int = 1,
                     max_batch: int = 8, overwrite: bool = False) -> Path:
    """Write a validated Triton model repository for `artifact` at `out`; returns its path.

    `instances`: instance_group count of each model (each python instance loads its own session). `max_batch`: how
    many generations one python instance streams at once (each on its own thread; more requests wait)."""
    artifact = Path(artifact)
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name.startswith(("-", ".")):
        raise ValueError(f"model name must be letters, digits, '_' or '-', got {name!r}")
    for flag, value in (("instances", instances), ("max_batch", max_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    manifest = open_artifact(artifact)  # checksums verified once, here
    if manifest.get("backend") not in ("onnxruntime", "tensorrt"):
        raise ArtifactError(f"{artifact}: backend {manifest.get('backend')!r}: expected onnxruntime or tensorrt")
    engine = manifest.get("engine")
    if manifest["backend"] == "tensorrt" and not engine:
        raise ArtifactError(f"{artifact}: a tensorrt artifact without an engine in its manifest; rebuild it")
    plan = bool(engine) and engine.get("flavour") == "tensorrt"  # TensorRT-RTX engines: no Triton backend
    graph = manifest["graphs"]["decoder"]
    graph_file = artifact / graph["file"]
    data_files = _external_data(graph_file)
    unlisted = [rel for rel in data_files if (Path(graph["file"]).parent / rel).as_posix() not in manifest["files"]]
    if unlisted:
        raise ArtifactError(f"{artifact}: the graph's external data {unlisted} is not among the manifest's "
                            "checksummed files")
    graph_name = f"{name}_graph"
    with staging_dir(Path(out), overwrite=overwrite, owned=is_repository, protect=[artifact]) as tmp:
        marker = {"format": REPOSITORY_FORMAT, "artifact": str(artifact.resolve()), "models": [name, graph_name]}
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(marker, indent=2))
        # (a) the streaming python model
        version = tmp / name / "1"
        for rel in [*manifest["files"], MANIFEST]:
            _link_or_copy(artifact / rel, version / "artifact" / rel)
        pkgs = _copy_sources(version / "runtime")
        shutil.copy2(Path(triton_model.__file__), version / "model.py")
        (tmp / name / "config.pbtxt").write_text(_config_text(
            _python_config(name, instances, max_batch, bool(engine)),
            f"Streaming text generation (decoupled) with runtime_py on {artifact.name}.\n"
            f"Written by llm-export; runtime sources in 1/runtime ({', '.join(pkgs)}), artifact in 1/artifact."))
        # (b) the raw graph
        gdir = tmp / graph_name / "1"
        if plan:
            _link_or_copy(version / "artifact" / engine["file"], gdir / "model.plan")
            what = f"TensorRT {engine.get('version')} engine"
        else:
            _link_or_copy(version / "artifact" / graph["file"], gdir / "model.onnx")
            for rel in data_files:
                _link_or_copy(version / "artifact" / Path(graph["file"]).parent / rel, gdir / rel)
            what = "ONNX decoder graph"
        (tmp / graph_name / "config.pbtxt").write_text(_config_text(
            _graph_config(graph_name, graph, instances, plan),
            f"Raw {what} of {artifact.name} (lowering {graph.get('lowering')}, KV mode {manifest['kv_mode']}, "
            f"{manifest['precision']}).\nOne prefill/decode step per request; the client owns the KV cache."))
        (tmp / "README.md").write_text(repository_readme(name, manifest, instances, max_batch, _opsets(graph_file)))
        validate_repository(tmp)
        _publishable(tmp)
    return Path(out).resolve()


# -- validation ---------------------------------------------------------------------------------------------------
def _fail(path: Path, message: str):
    raise RepositoryError(f"{path}: {message}")


def parse_config(path: Path):
    """config.pbtxt -> ModelConfig; RepositoryError naming the file and line on any parse error."""
    text_format, pb = _pb()
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(encoding="utf-8"), cfg)
    except text_format.ParseError as e:
        _fail(path, f"not a valid Triton ModelConfig: {e}")
    return cfg


def _type_name(value: int) -> str:
    _, pb = _pb()
    return pb.DataType.Name(value)


def _check_tensors(path: Path, cfg) -> None:
    names = set()
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        if not tensors:
            _fail(path, f"model '{cfg.name}' has no {kind}s")
        for t in tensors:
            if not t.name:
                _fail(path, f"an {kind} has no name")
            if t.name in names:
                _fail(path, f"{kind} name '{t.name}' is used twice")
            names.add(t.name)
            if t.data_type == 0:
                _fail(path, f"{kind} '{t.name}' has no data_type (TYPE_INVALID)")
            if not t.dims:
                _fail(path, f"{kind} '{t.name}' has no dims")
            bad = [d for d in t.dims if d == 0 or d < -1]
            if bad:
                _fail(path, f"{kind} '{t.name}' has invalid dims {list(t.dims)} (each must be > 0 or -1)")


def _expect_io(path: Path, cfg, inputs: dict, outputs: dict, what: str) -> None:
    """inputs/outputs: name -> (type name, dims or None to skip dims)."""
    for kind, tensors, expected in (("input", cfg.input, inputs), ("output", cfg.output, outputs)):
        got = {t.name: t for t in tensors}
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        if missing or extra:
            _fail(path, f"{kind}s do not match {what}: missing {missing}, unexpected {extra}")
        for n, (dt, dims) in expected.items():
            if _type_name(got[n].data_type) != dt:
                _fail(path, f"{kind} '{n}' has data_type {_type_name(got[n].data_type)}, {what} has {dt}")
            if dims is not None and list(got[n].dims) != list(dims):
                _fail(path, f"{kind} '{n}' has dims {list(got[n].dims)}, {what} has {list(dims)}")


def _declared_io(model_py: Path) -> tuple[dict, dict] | None:
    """INPUTS and OUTPUTS as written in a repository's model.py (the copy, which is what will run), or None when
    model.py is not ours."""
    found = {}
    try:
        tree = ast.parse(model_py.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{model_py}: not valid Python ({e})") from None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in ("INPUTS", "OUTPUTS") and node.value is not None:
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:
                return None
    if set(found) != {"INPUTS", "OUTPUTS"} or "class TritonPythonModel" not in ast.unparse(tree):
        return None
    return found["INPUTS"], found["OUTPUTS"]


def _check_python_model(path: Path, cfg, version: Path) -> None:
    io = _declared_io(version / "model.py")
    if io is None:  # somebody else's python model: the generic checks are all we can do
        return
    inputs, outputs = io
    if not cfg.model_transaction_policy.decoupled:
        _fail(path, "the streaming model must be decoupled (model_transaction_policy { decoupled: true })")
    if cfg.max_batch_size != 0:
        _fail(path, f"max_batch_size must be 0 (one prompt per request), got {cfg.max_batch_size}")
    _expect_io(path, cfg, {n: (dt, dims) for n, (dt, dims, _) in inputs.items()},
               {n: (dt, dims) for n, (dt, dims) in outputs.items()}, f"what {version.name}/model.py reads")
    not_optional = [t.name for t in cfg.input if not t.optional]
    if not_optional:
        _fail(path, f"inputs {not_optional} must be optional (a request sends text_input or messages)")
    backend = cfg.parameters["runtime_backend"].string_value if "runtime_backend" in cfg.parameters else "auto"
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        _fail(path, f"parameter runtime_backend must be auto, onnxruntime or tensorrt, got {backend!r}")
    for key in ("max_concurrency", "default_max_tokens", "ort_threads"):
        value = cfg.parameters[key].string_value if key in cfg.parameters else triton_model.DEFAULTS[key]
        if not value.isdigit() or (key != "ort_threads" and int(value) < 1):
            _fail(path, f"parameter {key} must be a positive integer, got {value!r}")
    if not (version / "runtime" / "runtime_py").is_dir():
        _fail(path, f"{version / 'runtime' / 'runtime_py'} is missing (model.py imports the runtime from there)")
    art = cfg.parameters["artifact"].string_value if "artifact" in cfg.parameters else "artifact"
    art = Path(art) if Path(art).is_absolute() else version / art
    try:
        manifest = open_artifact(art, verify=False)
    except ArtifactError as e:
        _fail(path, f"the model's artifact is unusable: {e}")
    for rel, info in manifest["files"].items():
        f = art / rel
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            _fail(path, f"artifact file {f} is missing or has the wrong size")


def _check_graph_model(path: Path, cfg, version: Path) -> None:
    import onnx

    if cfg.max_batch_size != 0:
        _fail(path, f"max_batch_size must be 0 (the graph's batch dim is explicit), got {cfg.max_batch_size}")
    graph = version / (cfg.default_model_filename or "model.onnx")
    model = onnx.load_model(str(graph), load_external_data=False)
    for loc in _external_data(graph):
        if not (graph.parent / loc).is_file():
            _fail(path, f"external data file {graph.parent / loc} is missing")

    def io(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (_ONNX_ELEM.get(t.elem_type, f"onnx elem_type {t.elem_type}"), dims)
        return out

    initializers = {i.name for i in model.graph.initializer}
    _expect_io(path, cfg, io(v for v in model.graph.input if v.name not in initializers), io(model.graph.output),
               f"the ONNX graph {graph.name}")


def validate_repository(path: str | Path) -> list[str]:
    """Check every model in a repository; returns the model names. Raises RepositoryError on the first problem."""
    root = Path(path)
    if not root.is_dir():
        raise RepositoryError(f"{root}: not a directory")
    models = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise RepositoryError(f"{root}: no model directories")
    for d in models:
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            _fail(d, "no config.pbtxt")
        cfg = parse_config(cfg_path)
        if cfg.name != d.name:
            _fail(cfg_path, f"name {cfg.name!r} must equal the directory name {d.name!r}")
        backend = cfg.backend or PLATFORMS.get(cfg.platform, "")
        if backend not in MODEL_FILES:
            _fail(cfg_path, f"backend {cfg.backend!r} / platform {cfg.platform!r}: expected one of "
                            f"{sorted(MODEL_FILES)}")
        if cfg.platform and PLATFORMS.get(cfg.platform) != backend:
            _fail(cfg_path, f"platform {cfg.platform!r} does not match backend {cfg.backend!r}")
        if cfg.max_batch_size < 0:
            _fail(cfg_path, f"max_batch_size must be >= 0, got {cfg.max_batch_size}")
        for g in cfg.instance_group:
            if g.count < 1:
                _fail(cfg_path, f"instance_group count must be >= 1, got {g.count}")
        _check_tensors(cfg_path, cfg)
        versions = sorted(v for v in d.iterdir() if v.is_dir() and v.name.isdigit())
        if not versions:
            _fail(d, "no numeric version directory (expected 1/)")
        for v in versions:
            model_file = v / (cfg.default_model_filename or MODEL_FILES[backend])
            if not model_file.is_file():
                _fail(v, f"{model_file.name} is missing")
            if backend == "python":
                _check_python_model(cfg_path, cfg, v)
            elif backend == "onnxruntime":
                _check_graph_model(cfg_path, cfg, v)
            elif cfg.max_batch_size != 0:  # a plan: its I/O can only be read with TensorRT; the writer took it
                _fail(cfg_path, f"max_batch_size must be 0 (the engine's batch dim is explicit), got "
                                f"{cfg.max_batch_size}")
    return [d.name for d in models]


# -- README -------------------------------------------------------------------------------------------------------
def _opsets(graph_path: Path) -> str:
    import onnx

    model = onnx.load_model(str(graph_path), load_external_data=False)
    return ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)


def repository_readme(name: str, manifest: dict, instances: int, max_batch: int, opsets: str) -> str:
    graph = manifest["graphs"]["decoder"]
    engine = manifest.get("engine") or {}
    plan = engine.get("flavour") == "tensorrt"
    graph_backend = "tensorrt (plan)" if plan else "onnxruntime"
    runtime = "`runtime_py` (TensorRT engine on a GPU, else ONNX Runtime on the CPU)" if engine else \
        "`runtime_py` (ONNX Runtime, CPU)"
    if plan:
        served = (f"`{name}_graph` is the TensorRT {engine.get('version')} engine (`1/model.plan`): the Triton "
                  "release must ship the same TensorRT version, and the GPU must be the architecture it was built "
                  "on; engines are not portable.")
    elif engine:
        served = (f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime: the engine "
                  f"is a TensorRT-RTX {engine.get('version')} engine (targets "
                  f"{', '.join(engine.get('compute_capabilities', []))}), which Triton's TensorRT backend cannot "
                  f"load; it runs inside `{name}` through runtime_py on an RTX GPU.")
    else:
        served = f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime."
    spec = manifest["spec"]
    lowering = graph.get("lowering")
    kv_in = [t for t in graph["inputs"] if t["name"].startswith("past_key_values")]
    other_in = ", ".join(f"`{t['name']}`" for t in graph["inputs"] if not t["name"].startswith("past_key_values"))
    kv = f"dims {_dims(kv_in[0]['shape'])}, {kv_in[0]['dtype']}" if kv_in else "none"
    ops = sorted(op for op in graph.get("op_histogram", {}) if op.startswith("com.microsoft."))
    contrib = (f"The `{lowering}` lowering uses ONNX Runtime contrib ops ({', '.join(ops)}); Triton's ONNX Runtime\n"
               "backend runs a full ONNX Runtime build, which includes them (CPU and CUDA execution providers)."
               if ops else "The graph uses standard ONNX ops only.")
    if manifest["kv_mode"] == "static":
        kv_rule = ("the cache is a fixed-length buffer of `max_cache_len` slots (slot = position). Start with zeros\n"
                   "of length prompt + new tokens; each call writes the new tokens' K/V at their `position_ids` and\n"
                   "returns the whole buffer as `present.*`, which goes back as `past_key_values.*` on the next call.")
    else:
        kv_rule = ("`present.*` is `past_key_values.*` with the new tokens appended (start with length 0);\n"
                   "`attention_mask` covers past + new tokens.")
    return f"""# Triton model repository: `{name}` (written by llm-export)

Artifact `{manifest['model'].get('name')}` ({manifest['model'].get('model_type')}, {manifest['precision']}, KV mode
`{manifest['kv_mode']}`, context {manifest['max_seq_len']} tokens, graph lowering `{lowering}`).

| model | backend | what it is |
|---|---|---|
| `{name}` | python, decoupled | text or chat messages in, streamed text out: {runtime} on `1/artifact` |
| `{name}_graph` | {graph_backend} | the raw decoder, KV cache as inputs/outputs, for clients running their own loop |

{instances} instance(s) of each model; each `{name}` instance streams up to {max_batch} generations at once. {served}

## Launch

With a full Triton install (e.g. the `nvcr.io/nvidia/tritonserver:<yy.mm>-py3` container):

```bash
tritonserver --model-repository $PWD
```

The python backend's stub runs `{name}/1/model.py` in the Python environment whose `python3` comes first on `PATH`
(or the one packed in `EXECUTION_ENV_PATH`). That environment needs `numpy`, `onnxruntime`, `tokenizers` and
`jinja2` (and `tensorrt` or `tensorrt_rtx` + `torch` to run an engine), with the numpy major version the stub was
built against (numpy<2 for Triton 2.51; model.py checks at load time and refuses to load on a mismatch, saying
why). The runtime's own code does not come from that environment:
model.py puts `1/runtime/` (a copy of the `runtime_py` sources this repository was written with) first on `sys.path`.

With the `tritonserver` bundled in `nvidia-pytriton` (CPU only, python backend only, so `{name}_graph` is not loaded
there), from the Python environment that has llm-export installed:

```bash
pip install --no-deps 'nvidia-pytriton>=0.7,<0.8'   # only its tritonserver binary is used
python -m artifacts.triton serve $PWD --grpc-port 8001 --http-port 8000
```

That runs `pytriton/tritonserver/bin/tritonserver --model-repository $PWD --model-control-mode explicit
--load-model {name} --backend-directory DIR`, where DIR holds pytriton's python backend plus the stub built for the
running Python, with `LD_LIBRARY_PATH` = this Python's `libpython` directory + `nvidia_pytriton.libs`. The stub is
built against numpy 1.x: when this environment has numpy 2, `serve` puts a small venv first on `PATH` that holds only
`numpy<2` and sees this environment's packages after its own (`python -m artifacts.triton stub-env [DIR]` makes it,
once, with pip).

## Streaming client (tritonclient gRPC)

Inputs of `{name}`, all optional, exactly one of `text_input` / `messages` required: `text_input` (STRING [1]),
`messages` (STRING [1]: a JSON list of `{{"role", "content"}}` objects, rendered with the artifact's chat template),
`max_tokens` (INT32, default {triton_model.DEFAULT_MAX_TOKENS}), `temperature`, `top_p`, `repetition_penalty` (FP32),
`top_k` (INT32), `seed` (INT64), `stop` (STRING [-1]), `ignore_eos` (BOOL). Greedy unless `temperature`, `top_k > 0`
or `top_p != 1` is sent, as in `python -m runtime_py generate`. Output `text_output` (STRING [1]): one response per
text delta, then an empty response flagged final; the deltas join to exactly the text runtime_py generates for the
same prompt, seed and parameters. A bad request gets one error response; the model keeps serving.

```python
import json
import queue
import numpy as np
import tritonclient.grpc as grpcclient

def tensor(name, value, dtype, triton_type):
    t = grpcclient.InferInput(name, [len(value)], triton_type)
    t.set_data_from_numpy(np.array(value, dtype=dtype))
    return t

inputs = [tensor("text_input", ["Hello world".encode()], np.object_, "BYTES"),
          tensor("max_tokens", [32], np.int32, "INT32"),
          tensor("temperature", [0.7], np.float32, "FP32"),
          tensor("seed", [1], np.int64, "INT64")]
# chat instead: tensor("messages", [json.dumps([{{"role": "user", "content": "Hi"}}]).encode()], np.object_, "BYTES")
results = queue.Queue()
client = grpcclient.InferenceServerClient("localhost:8001")
client.start_stream(callback=lambda result, error: results.put((result, error)))
client.async_stream_infer("{name}", inputs, enable_empty_final_response=True)
text = ""
while True:
    result, error = results.get(timeout=60)
    if error is not None:
        raise error
    delta = result.as_numpy("text_output")
    if delta is not None:
        text += delta[0].decode()
        print(delta[0].decode(), end="", flush=True)
    if result.get_response().parameters["triton_final_response"].bool_param:
        break
client.stop_stream()
client.close()
```

## The raw graph (`{name}_graph`)

One prefill or decode step per request. Inputs {other_in} and {len(kv_in)} KV tensors
`past_key_values.<layer>.key|value` ({kv}); outputs `logits` and `present.<layer>.key|value`. `max_batch_size` is 0:
the batch dim is part of every shape. KV mode `{manifest['kv_mode']}`: {kv_rule}
{len(spec.get('layers', []))} layers, {spec.get('num_kv_heads')} KV heads of dim {spec.get('head_dim')}, vocabulary
{spec.get('vocab_size')}. {contrib}
"""


# -- the tritonserver bundled with nvidia-pytriton ------------------------------------------------------------------
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


def numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".")[0])


def default_stub_env() -> Path:
    """Per user, per Python version and per parent environment (the stub env reads the parent's packages)."""
    import hashlib

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parent = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:10]
    return cache / "llm-export" / f"triton-stub-env-py{sys.version_info[0]}.{sys.version_info[1]}-{parent}"


def _publishable(path: Path) -> None:
    """mkdtemp makes 0700 directories; give the staged tree the permissions a plain mkdir would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def stub_env(dest: str | Path | None = None) -> Path:
    """A Python environment the bundled python backend stub can run model.py in; returns its prefix.

    The stub nvidia-pytriton 0.7 bundles (Triton 2.51) is built against numpy 1.x. When this environment has numpy
    1.x it is used as is. Otherwise `dest` (default: a per-user cache) becomes a venv of this Python holding only
    numpy<2 (pip, binary wheel) that sees this environment's site-packages after its own (a .pth file), so model.py
    gets numpy 1.x and everything else (onnxruntime, tokenizers, jinja2) from here. Made once, atomically."""
    if numpy_major() < 2:
        return Path(sys.prefix)
    dest = Path(dest) if dest is not None else default_stub_env()
    if (dest / ".complete").is_file():
        return dest
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
        _publishable(tmp)
        (tmp / ".complete").write_text(f"numpy<2 for the tritonserver python backend stub; parent env {sys.prefix}\n")
    # venv scripts name the staging path; only bin/python* (symlinks to the base interpreter) are used.
    return dest


def bundled_server(repo: str | Path, workdir: str | Path, grpc_port: int, http_port: int, metrics_port: int,
                   models: list[str] | None = None,
                   python_env: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run nvidia-pytriton's tritonserver on `repo`, bound to 127.0.0.1. `workdir` receives the
    backend directory (python backend + the stub for this Python). Loads `models` (default: every python-backend
    model; the bundled server has no ONNX Runtime backend). `python_env`: the environment whose bin/ goes first on
    PATH, which is where the stub's embedded Python finds its packages (default: :func:`stub_env`)."""
    repo, workdir = Path(repo).resolve(), Path(workdir)
    paths = pytriton_paths()
    python_env = Path(python_env) if python_env is not None else stub_env()
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


# -- serve: run the bundled server until it exits or is asked to stop -----------------------------------------------
SERVER_EXIT_TIMEOUT_S = 10  # tritonserver --exit-timeout-secs: how long it waits for in-flight work on a stop
STOP_GRACE_S = 5  # beyond that, before the server's whole process group is killed
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _die_with(parent: int):
    """preexec_fn for the server: SIGKILL when the serve process dies without cleaning up (it was SIGKILLed)."""
    import signal

    def run():
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
            os._exit(1)

    return run


def _group_pids(pgid: int) -> list[int]:
    """Pids of every process (zombies included) in process group `pgid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:  # fields after "(comm)": state ppid pgrp
            pids.append(int(entry))
    return pids


def _exited(pid: int) -> bool:
    """Has child `pid` exited? Does not reap it, so its pid (= the group id) cannot be reused meanwhile."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGKILL what is left of the server's process group (its python backend stubs, the server if still running),
    reap the server and the stubs this process adopted (child subreaper), and wait until the group is empty."""
    import signal
    import time

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while (left := _group_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)  # an adopted stub's zombie is ours to reap
            except ChildProcessError:
                pass  # not our child (its own parent or init reaps it)
        time.sleep(0.05)
    if left:
        print(f"warning: processes {left} of tritonserver's group {proc.pid} are still there", file=sys.stderr)


def _serve(args) -> int:
    """Run the bundled tritonserver on a repository until it exits or this process is asked to stop.

    The server runs in its own session (a terminal's Ctrl-C reaches only this process, never tritonserver or its
    python backend stubs directly). SIGINT, SIGTERM or SIGHUP forwards one SIGTERM to the server and waits up to
    its exit timeout plus STOP_GRACE_S; a second signal, or the time running out, kills the server's whole process
    group. Whatever ended the server, nothing of its process group is left when this returns (stubs orphaned by
    the server are adopted and reaped: child subreaper). A server that exits by itself is never restarted.

    Returns 0 after a requested stop (with a warning when the server could not finish it cleanly: Triton waits up to
    its exit timeout for in-flight requests and for clients' open HTTP keep-alive connections and gRPC streams, and
    never exits while a gRPC stream stays open), 130 when the stop came before the server was started, and otherwise
    the server's own exit status (128 + N when a signal N it did not get from us ended it)."""
    import signal
    import time

    requests: list[int] = []

    def on_signal(signum, _frame):
        requests.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        validate_repository(args.repo)
        with tempfile.TemporaryDirectory(prefix="llm-export-tritonserver-") as work:
            argv, env = bundled_server(args.repo, work, args.grpc_port, args.http_port, args.metrics_port,
                                       args.model or None, python_env=args.python_env)
            print(f"PATH={env['PATH'].split(os.pathsep)[0]}:... LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} "
                  + " ".join(argv), file=sys.stderr)
            if requests:
                return 130
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
            forced, deadline, seen = False, None, 0
            try:
                while not _exited(proc.pid):
                    if requests and deadline is None:
                        print(f"stopping tritonserver (pid {proc.pid}; a second Ctrl-C kills it now)",
                              file=sys.stderr)
                        os.kill(proc.pid, signal.SIGTERM)  # not send_signal: it may reap the server
                        deadline, seen = time.monotonic() + SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S, len(requests)
                    elif deadline is not None and (len(requests) > seen or time.monotonic() > deadline):
                        forced = True
                        break
                    time.sleep(0.05)
            finally:
                _kill_group(proc)
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)
            if not requests:
                return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            if not forced and proc.returncode in (0, -signal.SIGTERM):  # -SIGTERM: stopped while starting up
                print("tritonserver stopped", file=sys.stderr)
                return 0
            if forced:
                how = "was killed on a second signal" if len(requests) > seen else \
                    f"was killed, not gone {SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S} s after the stop request"
            else:
                how = f"gave up after its {SERVER_EXIT_TIMEOUT_S} s exit timeout (exit {proc.returncode})"
            print(f"warning: tritonserver {how}: it waits for in-flight requests, model unloads, clients' open HTTP "
                  "keep-alive connections and gRPC streams, and whatever was still open was cut. It and its python "
                  "backend stubs are gone.", file=sys.stderr)
            return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m artifacts.triton")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate every config.pbtxt of a repository")
    v.add_argument("repo")
    s = sub.add_parser("serve", help="run the tritonserver bundled with nvidia-pytriton on a repository")
    s.add_argument("repo")
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--model", action="append", default=[], help="model to load (default: the python models)")
    s.add_argument("--python-env", default=None,
                   help="Python environment for the backend stub (default: this one if it has numpy<2, else the "
                        "stub-env cache)")
    e = sub.add_parser("stub-env", help="make the numpy<2 environment the bundled python backend stub needs")
    e.add_argument("dest", nargs="?", default=None, help=f"directory (default: {default_stub_env()})")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print("\n".join(validate_repository(args.repo)))
            return 0
        if args.command == "stub-env":
            print(stub_env(args.dest))
            return 0
        return _serve(args)
    except (RepositoryError, RuntimeError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
