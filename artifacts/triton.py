"""Triton Inference Server model repositories from an artifact: written atomically, validated before they exist.

What it does: :func:`write_repository` stages a repository in a hidden directory beside ``out`` and renames it into
place only after :func:`validate_repository` accepted it. The repository holds

- ``NAME/``: a decoupled python-backend model (``artifacts/triton_model.py`` as ``1/model.py``) that streams
  runtime_py generations; the artifact is copied into ``1/artifact/`` and the first-party packages runtime_py imports
  (``runtime_py/``, ``artifacts/``, ...: sources only) into ``1/runtime/``, which model.py puts first on
  ``sys.path``. Third-party packages (numpy, onnxruntime, tokenizers, jinja2) come from the Python environment the
  backend's stub runs in (see the repository README);
- ``NAME_graph/``: the raw decoder graph for Triton's ONNX Runtime backend (``1/model.onnx`` + its external data),
  with the KV tensors as inputs/outputs exactly as the artifact manifest lists them (symbolic dims -> -1,
  ``max_batch_size: 0`` so the batch dim is explicit), for clients that run their own generation loop;
- ``README.md``: launch commands and a tritonclient gRPC streaming client.

Files are hard-linked from the artifact when the filesystem allows (artifacts are immutable), copied otherwise.
:func:`validate_repository` parses every ``config.pbtxt`` into tritonclient's ``ModelConfig`` protobuf (unknown
fields, bad enums and syntax errors are rejected with the line) and then checks what the protobuf cannot: names
match directories, dims are valid, the version directory holds the model file, the python model's I/O is the one
model.py reads, the graph model's I/O matches the ONNX graph (names and element types), the copied artifact is
complete. :func:`bundled_server` builds the command line that runs the ``tritonserver`` bundled in nvidia-pytriton
(python backend only) on a repository; ``python -m artifacts.triton serve REPO`` runs it.

What it does not do: TensorRT engines (``tensorrt_plan``): the artifact format has no engine yet, so an artifact
whose backend is not onnxruntime is refused with a clear error. It never imports export/.
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
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx"}


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
    at = next(i for i, line in enumerate(lines) if not line.startswith(("name:", "platform:", "backend:")))
    lines.insert(at, "max_batch_size: 0")
    return "".join(f"# {c}\n" for c in comment.splitlines()) + "\n".join(lines) + "\n"


def _tensor(cls, name: str, data_type: str, dims: list[int], optional: bool = False):
    _, pb = _pb()
    t = cls(name=name, data_type=pb.DataType.Value(data_type), dims=dims)
    if optional:
        t.optional = True
    return t


def _python_config(name: str, instances: int, max_batch: int):
    _, pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for n, (dt, dims, optional) in triton_model.INPUTS.items():
        cfg.input.append(_tensor(pb.ModelInput, n, dt, dims, optional))
    for n, (dt, dims) in triton_model.OUTPUTS.items():
        cfg.output.append(_tensor(pb.ModelOutput, n, dt, dims))
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU))
    params = {**triton_model.DEFAULTS, "max_concurrency": str(max_batch)}
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _graph_config(name: str, graph: dict, instances: int):
    _, pb = _pb()
    cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0)
    for src, cls, dst in ((graph["inputs"], pb.ModelInput, cfg.input), (graph["outputs"], pb.ModelOutput, cfg.output)):
        for t in src:
            if t["dtype"] not in ONNX_TYPES:
                raise ArtifactError(f"graph tensor {t['name']}: dtype {t['dtype']} has no Triton type")
            dst.append(_tensor(cls, t["name"], ONNX_TYPES[t["dtype"]], _dims(t["shape"])))
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.KIND_AUTO))
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
    if manifest.get("backend") != "onnxruntime":
        raise ArtifactError(f"{artifact}: backend {manifest.get('backend')!r}: Triton repositories are written for "
                            "ONNX Runtime artifacts only (TensorRT engines are not in the artifact format yet)")
    graph = manifest["graphs"]["decoder"]
    graph_file = artifact / graph["file"]
    data_files = _external_data(graph_file)
    graph_name = f"{name}_graph"
    with staging_dir(Path(out), overwrite=overwrite) as tmp:
        # (a) the streaming python model
        version = tmp / name / "1"
        for rel in [*manifest["files"], MANIFEST]:
            _link_or_copy(artifact / rel, version / "artifact" / rel)
        pkgs = _copy_sources(version / "runtime")
        shutil.copy2(Path(triton_model.__file__), version / "model.py")
        (tmp / name / "config.pbtxt").write_text(_config_text(
            _python_config(name, instances, max_batch),
            f"Streaming text generation (decoupled) with runtime_py on {artifact.name}.\n"
            f"Written by llm-export; runtime sources in 1/runtime ({', '.join(pkgs)}), artifact in 1/artifact."))
        # (b) the raw graph
        gdir = tmp / graph_name / "1"
        _link_or_copy(version / "artifact" / graph["file"], gdir / "model.onnx")
        for rel in data_files:
            _link_or_copy(version / "artifact" / Path(graph["file"]).parent / rel, gdir / rel)
        (tmp / graph_name / "config.pbtxt").write_text(_config_text(
            _graph_config(graph_name, graph, instances),
            f"Raw decoder graph of {artifact.name} (lowering {graph.get('lowering')}, KV mode {manifest['kv_mode']}, "
            f"{manifest['precision']}).\nOne prefill/decode step per request; the client owns the KV cache."))
        (tmp / "README.md").write_text(repository_readme(name, manifest, instances, max_batch))
        validate_repository(tmp)
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


def _check_python_model(path: Path, cfg, version: Path) -> None:
    if not cfg.model_transaction_policy.decoupled:
        _fail(path, "the streaming model must be decoupled (model_transaction_policy { decoupled: true })")
    if cfg.max_batch_size != 0:
        _fail(path, f"max_batch_size must be 0 (one prompt per request), got {cfg.max_batch_size}")
    _expect_io(path, cfg, {n: (dt, dims) for n, (dt, dims, _) in triton_model.INPUTS.items()},
               triton_model.OUTPUTS, "what model.py reads")
    not_optional = [t.name for t in cfg.input if not t.optional]
    if not_optional:
        _fail(path, f"inputs {not_optional} must be optional (a request sends text_input or messages)")
    for t in cfg.instance_group:
        if t.kind not in (0, 2):  # KIND_AUTO, KIND_CPU: the runtime runs on the CPU
            _fail(path, "instance_group kind must be KIND_CPU for the python model")
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
        backend = cfg.backend or {"onnxruntime_onnx": "onnxruntime"}.get(cfg.platform, "")
        if backend not in MODEL_FILES:
            _fail(cfg_path, f"backend {cfg.backend!r} / platform {cfg.platform!r}: expected one of {sorted(MODEL_FILES)}")
        if cfg.platform and cfg.platform != {"onnxruntime": "onnxruntime_onnx"}.get(backend, cfg.platform):
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
            else:
                _check_graph_model(cfg_path, cfg, v)
    return [d.name for d in models]


# -- README -------------------------------------------------------------------------------------------------------
def repository_readme(name: str, manifest: dict, instances: int, max_batch: int) -> str:
    graph = manifest["graphs"]["decoder"]
    spec = manifest["spec"]
    lowering = graph.get("lowering")
    kv_in = [t for t in graph["inputs"] if t["name"].startswith("past_key_values")]
    other_in = [t["name"] for t in graph["inputs"] if not t["name"].startswith("past_key_values")]
    ops = sorted(op for op in graph.get("op_histogram", {}) if op.startswith("com.microsoft."))
    contrib = (f"The `{lowering}` lowering uses ONNX Runtime contrib ops ({', '.join(ops)}): Triton's ONNX Runtime "
               "backend ships a full ONNX Runtime build that includes them (CPU and CUDA execution providers)."
               if ops else "The graph uses standard ONNX ops only.")
    return f"""# Triton model repository: `{name}` (written by llm-export)

Artifact: `{manifest['model'].get('name')}` ({manifest['model'].get('model_type')}), {manifest['precision']},
KV mode `{manifest['kv_mode']}`, context {manifest['max_seq_len']} tokens, graph lowering `{lowering}`.

| model | backend | what it is |
|---|---|---|
| `{name}` | python (decoupled) | text or chat messages in, streamed text out; runs `runtime_py` (ONNX Runtime, CPU) on `1/artifact` |
| `{name}_graph` | onnxruntime | the raw decoder graph with the KV cache as inputs/outputs, for clients running their own loop |

`{instances}` instance(s) per model; each `{name}` instance streams up to {max_batch} generations at once.

## Launch

With a full Triton install (e.g. the `nvcr.io/nvidia/tritonserver:<yy.mm>-py3` container):

```bash
tritonserver --model-repository $PWD
```

The python backend's stub runs `1/model.py` with the Python environment found first on `PATH` (or the one packed
in `EXECUTION_ENV_PATH`); that environment needs `numpy`, `onnxruntime`, `tokenizers` and `jinja2` (for example
`pip install 'llm-export'`, or just those four). The runtime's own code is not taken from that environment: model.py
puts `1/runtime/` (a copy of the `runtime_py` sources the repository was written with) first on `sys.path`.

With the `tritonserver` bundled in `nvidia-pytriton` (`pip install 'llm-export[triton]'`; CPU only, python backend
only, so `{name}_graph` is not loaded there):

```bash
python -m artifacts.triton serve $PWD --grpc-port 8001 --http-port 8000
```

It runs `pytriton/tritonserver/bin/tritonserver --model-repository $PWD --model-control-mode explicit
--load-model {name} --backend-directory DIR` where DIR holds pytriton's python backend plus the stub built for the
running Python, with `LD_LIBRARY_PATH` set to `nvidia_pytriton.libs` and this Python's `libpython`, and this
Python's `bin/` first on `PATH` (so the stub imports from this environment).

## Streaming client (tritonclient gRPC)

Inputs of `{name}` (all optional, one of `text_input` / `messages` required): `text_input` (STRING [1]),
`messages` (STRING [1], a JSON list of `{{"role", "content"}}` objects rendered with the artifact's chat template),
`max_tokens` (INT32, default {triton_model.DEFAULT_MAX_TOKENS}), `temperature`, `top_p`, `repetition_penalty`
(FP32), `top_k` (INT32), `seed` (INT64), `stop` (STRING [-1]), `ignore_eos` (BOOL). Greedy unless `temperature`,
`top_k > 0` or `top_p != 1` is sent (as `python -m runtime_py generate`). Output: `text_output` (STRING [1]), one
response per text delta, then an empty final response; the deltas join to exactly what
`python -m runtime_py generate` prints for the same prompt, seed and parameters. A bad request gets one error.

```python
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
```

## The raw graph (`{name}_graph`)

Inputs: {', '.join(f'`{n}`' for n in other_in)} and {len(kv_in)} KV tensors `past_key_values.<layer>.key|value`
(dims {_dims(kv_in[0]['shape']) if kv_in else '-'}, {kv_in[0]['dtype'] if kv_in else '-'}); outputs `logits` and
`present.<layer>.key|value`. `max_batch_size` is 0: the batch dim is part of every shape. KV mode
`{manifest['kv_mode']}`: {"the cache is a fixed-length buffer of `max_cache_len` slots (slot = position); each call "
"writes the new tokens' K/V at their positions and returns the whole buffer as `present.*`, which the client "
"sends back as `past_key_values.*` on the next call" if manifest['kv_mode'] == 'static' else
"`present.*` = `past_key_values.*` with the new tokens appended; `attention_mask` covers past + new tokens"}.
{spec.get('num_kv_heads')} KV heads of dim {spec.get('head_dim')}, {len(spec.get('layers', []))} layers,
vocabulary {spec.get('vocab_size')}. {contrib}
"""


# -- the tritonserver bundled with nvidia-pytriton ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                   models: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run nvidia-pytriton's tritonserver on `repo`, bound to 127.0.0.1. `workdir` receives the
    backend directory (python backend + the stub for this Python). Loads `models` (default: every python-backend
    model; the bundled server has no ONNX Runtime backend)."""
    repo, workdir = Path(repo).resolve(), Path(workdir)
    paths = pytriton_paths()
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
            "--disable-auto-complete-config", "--exit-timeout-secs", "10", "--log-verbose", "0"]
    env = dict(os.environ)
    libdirs = [str(paths["libs"])]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub links libpython3.X: use this Python's
        libdirs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return argv, env


def _serve(args) -> int:
    validate_repository(args.repo)
    with tempfile.TemporaryDirectory(prefix="llm-export-tritonserver-") as work:
        argv, env = bundled_server(args.repo, work, args.grpc_port, args.http_port, args.metrics_port,
                                   args.model or None)
        print(" ".join(argv), file=sys.stderr)
        proc = subprocess.Popen(argv, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


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
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print("\n".join(validate_repository(args.repo)))
            return 0
        return _serve(args)
    except (RepositoryError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
