"""Checking a Triton model repository before anything serves it: every config.pbtxt, and what it points at.

What it does: :func:`validate_repository` parses every ``config.pbtxt`` into tritonclient's ``ModelConfig`` protobuf
(:func:`parse_config`: unknown fields, bad enums and syntax errors are rejected with the line) and then checks what
the protobuf cannot: names match directories, dims are valid, the version directory holds the model file, the python
model's I/O is the one its ``model.py`` declares (read from the copy in the repository, which is what will run;
somebody else's python model gets the generic checks only), its parameters are usable, the copied runtime and
artifact are complete, and the graph model's I/O matches the ONNX graph (names and element types) with every
external-data file present. The python model comes in two kinds (its ``KIND``): the streaming model of a causal-LM
artifact (decoupled, ``max_batch_size`` 0), and the classification model of a task-head artifact (not decoupled,
``dynamic_batching``, ``max_batch_size`` in [1, the artifact's max_batch], the I/O of the artifact's task with its
label count, ``allow_ragged_batch`` on the inputs model.py lists in ``RAGGED``). :func:`external_data` lists a
graph's external-data files (the writer copies them).

What it does not do: write or repair anything, read a TensorRT plan's I/O (that needs TensorRT; the engine's I/O was
checked against the graph contract when it was built), or import runtime_py.
"""

from __future__ import annotations

from pathlib import Path

from artifacts.bundle import ArtifactError, open_artifact
from artifacts.triton_contract import (MODEL_FILES, ONNX_ELEM, PLATFORMS, RepositoryError, model_constants, num_labels,
                                       protobuf, row_dims)


def load_proto(graph_path: Path, error=ArtifactError):
    """The ONNX ModelProto at graph_path without its external data; `error` (a message naming the file) when it
    is not a readable ONNX model (truncated, corrupt)."""
    import onnx

    try:
        return onnx.load_model(str(graph_path), load_external_data=False)
    except OSError as e:
        raise error(f"{graph_path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors share no base class
        raise error(f"{graph_path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None


def external_data(graph_path: Path) -> list[str]:
    """Relative locations of the graph's external-data files."""
    import onnx

    model = load_proto(graph_path)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    for loc in locations:
        if Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise ArtifactError(f"{graph_path}: external data location {loc!r} is not a file beside the graph")
    return sorted(locations)


def _fail(path: Path, message: str):
    raise RepositoryError(f"{path}: {message}")


def parse_config(path: Path):
    """config.pbtxt -> ModelConfig; RepositoryError naming the file and line on any parse error."""
    text_format, pb = protobuf()
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(encoding="utf-8"), cfg)
    except text_format.ParseError as e:
        _fail(path, f"not a valid Triton ModelConfig: {e}")
    return cfg


def _type_name(value: int) -> str:
    _, pb = protobuf()
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


def _param(cfg, defaults: dict, key: str) -> str | None:
    """A parameter as model.py reads it (runtime_py/triton_model.py model_parameters): an empty or absent value
    is the default model.py declares (None when it declares none)."""
    value = cfg.parameters[key].string_value if key in cfg.parameters else ""
    return value or defaults.get(key)


def _positive(path: Path, cfg, defaults: dict, keys: tuple, zero_ok: tuple = ()) -> dict:
    """{key: int value} of the integer parameters set or defaulted, each checked."""
    values = {}
    for key in keys:
        value = _param(cfg, defaults, key)
        if value is None:  # absent, and model.py declares no default for it: model.py's own code decides
            continue
        if not value.isdigit() or (key not in zero_ok and int(value) < 1):
            _fail(path, f"parameter {key} must be a {'non-negative' if key in zero_ok else 'positive'} integer, "
                        f"got {value!r}")
        values[key] = int(value)
    return values


def _check_copies(path: Path, cfg, version: Path):
    """The runtime sources and the artifact copied beside model.py; returns the artifact's manifest."""
    if not (version / "runtime" / "runtime_py").is_dir():
        _fail(path, f"{version / 'runtime' / 'runtime_py'} is missing (model.py imports the runtime from there)")
    art = cfg.parameters["artifact"].string_value if "artifact" in cfg.parameters else "artifact"
    art = Path(art) if Path(art).is_absolute() else version / art
    try:
        manifest = open_artifact(art, verify=False)
    except ArtifactError as e:
        _fail(path, f"the model's artifact is unusable: {e}")
    for rel, info in manifest.files.items():
        f = art / rel
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            _fail(path, f"artifact file {f} is missing or has the wrong size")
    return manifest


def _check_classify_model(path: Path, cfg, version: Path, declared: dict) -> None:
    """runtime_py/triton_classify_model.py: one response per request, the dynamic batcher merging requests, the I/O
    of the artifact's task as model.py declares it (``num_labels`` dims = the artifact's label count)."""
    if cfg.model_transaction_policy.decoupled:
        _fail(path, "the classification model must not be decoupled (one response per request: "
                    "model_transaction_policy { decoupled: false })")
    if not cfg.HasField("dynamic_batching"):
        _fail(path, "the classification model needs dynamic_batching (the requests it merges run as one batch)")
    manifest = _check_copies(path, cfg, version)
    task, what = manifest.task, f"what {version.name}/model.py reads"
    inputs, outputs = declared["INPUTS"].get(task), declared["OUTPUTS"].get(task)
    if inputs is None or outputs is None:
        _fail(path, f"the artifact is a {task} artifact; {version.name}/model.py serves "
                    f"{sorted(declared['INPUTS'])} (a causal-lm artifact gets the streaming model)")
    if not 1 <= cfg.max_batch_size <= manifest.max_batch:
        _fail(path, f"max_batch_size must be in [1, {manifest.max_batch}] (the artifact's max_batch: rows of one "
                    f"batch), got {cfg.max_batch_size}")
    if task == "seq-cls" and manifest.spec.get("pad_token_id") is None and cfg.max_batch_size != 1:
        _fail(path, "max_batch_size must be 1: the artifact has no pad_token_id, so sequence classification runs "
                    "one input at a time")
    labels = num_labels(manifest)
    _expect_io(path, cfg, {n: (dt, row_dims(dims, labels)) for n, (dt, dims, _) in inputs.items()},
               {n: (dt, row_dims(dims, labels)) for n, (dt, dims) in outputs.items()}, what)
    ragged = set(declared.get("RAGGED") or ())
    for t in cfg.input:
        if t.optional != inputs[t.name][2]:
            _fail(path, f"input '{t.name}' must {'' if inputs[t.name][2] else 'not '}be optional ({what})")
        if t.allow_ragged_batch != (t.name in ragged):
            _fail(path, f"input '{t.name}' must {'' if t.name in ragged else 'not '}set allow_ragged_batch ({what})")
    _positive(path, cfg, declared.get("DEFAULTS") or {}, ("ort_threads", "max_answer_len"), zero_ok=("ort_threads",))


def _check_python_model(path: Path, cfg, version: Path) -> None:
    declared = model_constants(version / "model.py")
    if declared is None:  # somebody else's python model: the generic checks are all we can do
        return
    if declared["KIND"] == "classify":
        _check_classify_model(path, cfg, version, declared)
        return
    if declared["KIND"] != "generate":
        _fail(path, f"{version.name}/model.py declares KIND {declared['KIND']!r}: expected 'generate' or 'classify'")
    inputs, outputs, defaults = declared["INPUTS"], declared["OUTPUTS"], declared.get("DEFAULTS") or {}
    if not cfg.model_transaction_policy.decoupled:
        _fail(path, "the streaming model must be decoupled (model_transaction_policy { decoupled: true })")
    if cfg.max_batch_size != 1:
        _fail(path, f"max_batch_size must be 1 (one prompt per request, the batch dim first), got "
                    f"{cfg.max_batch_size}")
    _expect_io(path, cfg, {n: (dt, dims) for n, (dt, dims, _) in inputs.items()},
               {n: (dt, dims) for n, (dt, dims) in outputs.items()}, f"what {version.name}/model.py reads")
    not_optional = [t.name for t in cfg.input if not t.optional]
    if not_optional:
        _fail(path, f"inputs {not_optional} must be optional (a request sends text_input or messages)")
    backend = _param(cfg, defaults, "runtime_backend") or "auto"
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        _fail(path, f"parameter runtime_backend must be auto, onnxruntime or tensorrt, got {backend!r}")
    ints = _positive(path, cfg, defaults, ("max_concurrency", "default_max_tokens", "ort_threads", "max_queue"),
                     zero_ok=("ort_threads", "max_queue"))
    manifest = _check_copies(path, cfg, version)
    if manifest.task != "causal-lm":
        _fail(path, f"the artifact is a {manifest.task} artifact: the streaming model generates text; a task head "
                    "gets the classification model (runtime_py/triton_classify_model.py)")
    # what the engine refuses when the model loads, or every request without max_tokens would be refused for
    if ints.get("max_concurrency", 1) > manifest.max_batch:
        _fail(path, f"parameter max_concurrency {ints['max_concurrency']} is more KV slots than the artifact has "
                    f"(built with --max-batch {manifest.max_batch})")
    if ints.get("default_max_tokens", 1) >= manifest.max_seq_len:
        _fail(path, f"parameter default_max_tokens {ints['default_max_tokens']} leaves no room for a prompt in the "
                    f"artifact's {manifest.max_seq_len}-token context")
    if backend == "tensorrt" and manifest.engine is None:
        _fail(path, "parameter runtime_backend is tensorrt, but the artifact has no TensorRT engine (build it with "
                    "--backend tensorrt), use auto or onnxruntime")


def _check_graph_model(path: Path, cfg, version: Path) -> None:
    if cfg.max_batch_size != 0:
        _fail(path, f"max_batch_size must be 0 (the graph's batch dim is explicit), got {cfg.max_batch_size}")
    graph = version / (cfg.default_model_filename or "model.onnx")
    model = load_proto(graph, RepositoryError)
    for loc in external_data(graph):
        if not (graph.parent / loc).is_file():
            _fail(path, f"external data file {graph.parent / loc} is missing")

    def io(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (ONNX_ELEM.get(t.elem_type, f"onnx elem_type {t.elem_type}"), dims)
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

