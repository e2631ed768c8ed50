"""The artifact manifest as one typed object, and the tables every reader of it shares.

What it does: :class:`Manifest` (with :class:`Graph`, :class:`Engine` and :class:`TensorInfo`) is what
``manifest.json`` holds, checked field by field when read (:meth:`Manifest.from_dict`: a wrong type or a missing
field is an :class:`ArtifactError` naming it) and written back by :meth:`Manifest.to_dict`. Every default a
reader needs is decided here, once: an artifact built before ``--logits`` existed returns every position's
logits (``logits="all"``), one built before in-place GQA buffers binds KV by ``swap`` (static) or ``grow``
(concat). The sessions, generate, score, inspect, edge bundles and Triton all read this object, never the JSON.

:data:`DTYPES` is the one dtype table: a manifest dtype name (ONNX's, ``float32``) -> its ONNX element type,
numpy name, Triton type, TensorRT name and size. :func:`op_key` is the one rule naming an op in histograms (``Op`` for the standard
ONNX domain, ``domain.Op`` otherwise); :func:`histogram` counts a graph's ops with it.

What it does not do: read, write or checksum files (artifacts/bundle.py: ``read_manifest``, ``open_artifact``,
``write_manifest``), or check paths (artifacts/paths.py, called by bundle.py before this module sees the JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT = "llm-export-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
KV_MODES = ("static", "concat")
LOGITS = ("last", "all")
TASKS = ("causal-lm", "seq-cls", "token-cls", "qa")  # the head on the decoder body (export/spec.py reads it)
KV_BINDINGS = ("in_place", "swap", "grow", "none")  # present aliases past / a second set swapped in / a growing
# cache / no KV I/O (a task head's sealed graph: graphs/task.py)


class ArtifactError(ValueError):
    """The artifact is missing, incomplete, tampered with or from an incompatible version."""


@dataclass(frozen=True)
class DType:
    onnx: int  # onnx.TensorProto element type
    numpy: str | None  # None: numpy has no such type (bf16 runs only on TensorRT here)
    triton: str
    tensorrt: str  # str(trt.DataType.X).split(".")[-1].lower(), what export/engine.py records
    itemsize: int


DTYPES = {
    "float32": DType(1, "float32", "TYPE_FP32", "float", 4),
    "float16": DType(10, "float16", "TYPE_FP16", "half", 2),
    "bfloat16": DType(16, None, "TYPE_BF16", "bf16", 2),
    "float64": DType(11, "float64", "TYPE_FP64", "double", 8),
    "int64": DType(7, "int64", "TYPE_INT64", "int64", 8),
    "int32": DType(6, "int32", "TYPE_INT32", "int32", 4),
    "int8": DType(3, "int8", "TYPE_INT8", "int8", 1),
    "uint8": DType(2, "uint8", "TYPE_UINT8", "uint8", 1),
    "bool": DType(9, "bool", "TYPE_BOOL", "bool", 1),
}
TENSORRT_DTYPES = {d.tensorrt: name for name, d in DTYPES.items()}  # engine I/O dtype -> manifest dtype


def _fail(where: str, message: str):
    raise ArtifactError(f"{where}: {message}")


def _get(d: dict, key: str, kind, where: str, default=...):
    """d[key] checked against `kind` (a type or tuple of types; bool is never an int here)."""
    if key not in d or d[key] is None:
        if default is ...:
            _fail(where, f"'{key}' is missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        _fail(where, f"'{key}' must be {names}, got {type(value).__name__} {value!r}"[:300])
    return value


MAX_SIZE = 1 << 40  # any size a manifest holds (context, batch, vocabulary, dims); past it, arithmetic on it is absurd


def _positive(d: dict, key: str, where: str) -> int:
    """d[key], an int in [1, MAX_SIZE] (a size: a hand-edited 0 or 10**400 would only fail later, with a stranger
    message or an OverflowError)."""
    value = _get(d, key, int, where)
    if not 1 <= value <= MAX_SIZE:
        _fail(where, f"'{key}' must be in [1, 2^40], got {str(value)[:40]}")
    return value


def _token_ids(spec: dict, where: str) -> None:
    """spec's eos_token_ids (a list) and pad_token_id (or null): ids inside the vocabulary."""
    vocab = spec["vocab_size"]
    eos = _get(spec, "eos_token_ids", list, where, [])
    pad = _get(spec, "pad_token_id", int, where, None)
    for key, ids in (("eos_token_ids", eos), ("pad_token_id", [] if pad is None else [pad])):
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            _fail(where, f"'{key}' must hold token ids in [0, {vocab}), got {str(ids)[:80]}")


def _choice(d: dict, key: str, choices: tuple[str, ...], where: str, default=...) -> str:
    value = _get(d, key, str, where, default)
    if value not in choices:
        _fail(where, f"'{key}' is {value!r}; this runtime knows {list(choices)}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints and symbolic dim names
    dtype: str  # a DTYPES key for graph I/O; the TensorRT name for engine I/O

    @classmethod
    def from_dict(cls, d, where: str) -> "TensorInfo":
        if not isinstance(d, dict):
            _fail(where, "must be an object {name, shape, dtype}")
        shape = _get(d, "shape", list, where)
        if not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in shape):
            _fail(where, f"'shape' must hold ints and dim names, got {shape!r}"[:300])
        return cls(_get(d, "name", str, where), tuple(shape), _get(d, "dtype", str, where))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _tensors(d: dict, key: str, where: str) -> tuple[TensorInfo, ...]:
    items = _get(d, key, list, where)
    return tuple(TensorInfo.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(items))


@dataclass(frozen=True)
class Graph:
    file: str
    lowering: str
    logits: str  # "last": [B, 1, V] per call; "all": [B, S, V]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    kv_binding: str  # KV_BINDINGS
    op_histogram: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str, kv_mode: str, task: str = "causal-lm") -> "Graph":
        if not isinstance(d, dict):
            _fail(where, "must be an object {file, lowering, inputs, outputs, ...}")
        graph = cls(file=_get(d, "file", str, where), lowering=_get(d, "lowering", str, where),
                    logits=_choice(d, "logits", LOGITS, where, default="all"),
                    inputs=_tensors(d, "inputs", where), outputs=_tensors(d, "outputs", where),
                    kv_binding=_choice(d, "kv_binding", KV_BINDINGS, where,
                                       default="swap" if kv_mode == "static" else "grow"),
                    op_histogram=_get(d, "op_histogram", dict, where, default={}),
                    fusion=_get(d, "fusion", dict, where, default={}))
        for t in graph.inputs + graph.outputs:
            if t.dtype not in DTYPES:
                _fail(f"{where} {t.name}", f"dtype {t.dtype!r} is not one of {sorted(DTYPES)}")
        if task == "causal-lm" and not graph.kv_inputs:
            _fail(where, "no past_key_values.* inputs")
        logits = next((t for t in graph.outputs if t.name == "logits"), None)
        if task == "causal-lm" and (logits is None or len(logits.shape) != 3
                                    or (logits.shape[1] == 1) != (graph.logits == "last")):
            _fail(where, f"'logits' is {graph.logits!r}, but the logits output is "
                         f"{list(logits.shape) if logits else 'missing'} ([B, 1, V] for 'last', [B, S, V] for 'all')")
        if task != "causal-lm" and (graph.kv_inputs or graph.kv_binding != "none"):
            _fail(where, f"a {task} graph has no KV I/O (kv_binding 'none')")
        return graph

    def to_dict(self) -> dict:
        return {"file": self.file, "lowering": self.lowering, "logits": self.logits,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "op_histogram": self.op_histogram, "fusion": self.fusion, "kv_binding": self.kv_binding}

    @property
    def kv_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.inputs if t.name.startswith("past_key_values."))

    @property
    def kv_dtype(self) -> str:
        return self.kv_inputs[0].dtype


def _check_against_spec(graph: Graph, spec: dict, kv_mode: str, task: str, where: str) -> None:
    """The graph's listed I/O agrees with the spec and kv_mode the runtimes size their buffers from: the logits'
    vocabulary, every KV tensor [B, num_kv_heads, T, head_dim] in one dtype, an attention_mask input exactly in
    concat mode. A hand-edited field otherwise surfaced as ONNX Runtime's shape or type error mid-run."""
    if task != "causal-lm":
        return
    vocab = next(t for t in graph.outputs if t.name == "logits").shape[2]
    if isinstance(vocab, int) and vocab != spec["vocab_size"]:
        _fail(where, f"the logits output has {vocab} entries a position, but spec.vocab_size is {spec['vocab_size']}")
    kv = [t for t in graph.inputs + graph.outputs if t.name.startswith(("past_key_values.", "present."))]
    for t in kv:
        dims = dict(zip(("num_kv_heads", "head_dim"), (t.shape[1], t.shape[3]))) if len(t.shape) == 4 else None
        if dims is None:
            _fail(f"{where} {t.name}", f"a KV tensor is [batch, kv_heads, length, head_dim], got {list(t.shape)}")
        for key, dim in dims.items():
            if isinstance(dim, int) and dim != spec[key]:
                _fail(f"{where} {t.name}", f"shape {list(t.shape)} does not match spec.{key} {spec[key]}")
        if t.dtype != kv[0].dtype:
            _fail(f"{where} {t.name}", f"dtype {t.dtype} differs from {kv[0].name}'s {kv[0].dtype}")
    has_mask = any(t.name == "attention_mask" for t in graph.inputs)
    if has_mask != (kv_mode == "concat"):
        _fail(where, f"kv_mode is {kv_mode!r}, but the graph {'has' if has_mask else 'has no'} attention_mask input "
                     "(concat graphs take one, static graphs do not)")


@dataclass(frozen=True)
class Engine:
    """What export/engine.py recorded about the TensorRT engine; I/O dtypes in TensorRT's names."""

    file: str
    flavour: str  # tensorrt | tensorrt_rtx
    version: str
    profiles: dict  # optimization profile name ("prefill", "decode", in build order) -> its input shapes
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    device_cc: object = None  # [major, minor] of the build GPU (full TensorRT) or None
    compute_capabilities: tuple = ()
    facts: dict = field(default_factory=dict)  # the rest (build seconds, timing cache, ...), kept as recorded

    @classmethod
    def from_dict(cls, d, where: str) -> "Engine":
        if not isinstance(d, dict):
            _fail(where, "must be an object {file, flavour, version, profiles, io, ...}")
        io = _get(d, "io", dict, where)
        known = {"file", "flavour", "version", "profiles", "io", "device_cc", "compute_capabilities"}
        return cls(file=_get(d, "file", str, where), flavour=_choice(d, "flavour", ("tensorrt", "tensorrt_rtx"), where),
                   version=_get(d, "version", str, where), profiles=_get(d, "profiles", dict, where),
                   inputs=_tensors(io, "inputs", f"{where}.io"), outputs=_tensors(io, "outputs", f"{where}.io"),
                   device_cc=d.get("device_cc"),
                   compute_capabilities=tuple(_get(d, "compute_capabilities", list, where, default=[])),
                   facts={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        return {"file": self.file, "flavour": self.flavour, "version": self.version, "device_cc": self.device_cc,
                "compute_capabilities": list(self.compute_capabilities), "profiles": self.profiles,
                "io": {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]},
                **self.facts}

    @property
    def io(self) -> dict:
        """{"inputs": [...], "outputs": [...]} as dicts (export/engine.py check_engine_io's form)."""
        return self.to_dict()["io"]


_KNOWN = {"format", "format_version", "model", "spec", "backend", "precision", "kv_mode", "max_seq_len", "max_batch",
          "graphs", "quantization", "engine", "versions", "build", "files"}


@dataclass(frozen=True)
class Manifest:
    model: dict  # {"source", "name", "model_type"}
    spec: dict  # export.spec.ModelSpec.to_dict(): the model's shape and quirks, as data
    backend: str
    precision: str
    kv_mode: str
    max_seq_len: int
    max_batch: int
    graphs: dict[str, Graph]
    files: dict[str, dict]  # relative path -> {"sha256", "bytes"}
    quantization: dict | None = None  # None: every weight in `precision`
    engine: Engine | None = None
    versions: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # other top-level fields, kept as written (sliding_window_cache)

    @classmethod
    def from_dict(cls, d, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            _fail(where, f"not an {FORMAT} manifest")
        if d.get("format_version") != FORMAT_VERSION:
            _fail(where, f"format version {d.get('format_version')} is not supported by this runtime (supports "
                         f"{FORMAT_VERSION}); rebuild the artifact")
        kv_mode = _choice(d, "kv_mode", KV_MODES, where)
        graphs = _get(d, "graphs", dict, where)
        if "decoder" not in graphs:
            _fail(where, "'graphs' has no 'decoder' graph")
        spec = _get(d, "spec", dict, where)
        for key in ("vocab_size", "num_kv_heads", "head_dim", "hidden_size"):
            _positive(spec, key, f"{where} spec")
        _get(spec, "layers", list, f"{where} spec")
        _token_ids(spec, f"{where} spec")
        task = _choice(spec, "task", TASKS, f"{where} spec", default="causal-lm")
        engine = d.get("engine")
        built = {name: Graph.from_dict(g, f"{where} graphs.{name}", kv_mode, task) for name, g in graphs.items()}
        for name, graph in built.items():
            _check_against_spec(graph, spec, kv_mode, task, f"{where} graphs.{name}")
        return cls(model=_get(d, "model", dict, where), spec=spec, backend=_choice(d, "backend", BACKENDS, where),
                   precision=_get(d, "precision", str, where), kv_mode=kv_mode,
                   max_seq_len=_positive(d, "max_seq_len", where), max_batch=_positive(d, "max_batch", where),
                   graphs=built,
                   files=_get(d, "files", dict, where), quantization=_get(d, "quantization", dict, where, None),
                   engine=None if engine is None else Engine.from_dict(engine, f"{where} engine"),
                   versions=_get(d, "versions", dict, where, {}), build=_get(d, "build", dict, where, {}),
                   notes={k: v for k, v in d.items() if k not in _KNOWN})

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model, "spec": self.spec,
               "backend": self.backend, "precision": self.precision, "kv_mode": self.kv_mode,
               "max_seq_len": self.max_seq_len, "max_batch": self.max_batch,
               "graphs": {name: g.to_dict() for name, g in self.graphs.items()}, "quantization": self.quantization,
               **self.notes}
        if self.engine is not None:
            out["engine"] = self.engine.to_dict()
        return {**out, "versions": self.versions, "build": self.build, "files": self.files}

    # -- what readers ask ---------------------------------------------------------------------------------------
    @property
    def decoder(self) -> Graph:
        return self.graphs["decoder"]

    @property
    def task(self) -> str:
        """The head (export/options.py TASKS): causal-lm artifacts generate, the others classify."""
        return self.spec.get("task", "causal-lm")

    @property
    def model_type(self) -> str:
        return str(self.model.get("model_type") or self.spec.get("model_type") or "")

    @property
    def vocab_size(self) -> int:
        return self.spec["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.spec["hidden_size"]

    @property
    def num_layers(self) -> int:
        return len(self.spec["layers"])

    @property
    def sparse_layers(self) -> int:
        return sum(1 for layer in self.spec["layers"] if isinstance(layer, dict) and layer.get("mlp") == "moe")

    @property
    def num_kv_heads(self) -> int:
        return self.spec["num_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.spec["head_dim"]

    @property
    def tie_embeddings(self) -> bool:
        return bool(self.spec.get("tie_embeddings"))

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.spec.get("eos_token_ids") or [])

    @property
    def pad_token_id(self) -> int | None:
        return self.spec.get("pad_token_id")


def op_key(domain: str | None, op_type: str) -> str:
    return op_type if (domain or "") in ("", "ai.onnx") else f"{domain}.{op_type}"


def histogram(graph_or_model) -> dict[str, int]:
    """Op counts of an onnx_ir Model/Graph or an onnx ModelProto/GraphProto, sorted by key."""
    graph = getattr(graph_or_model, "graph", graph_or_model)
    nodes = graph if callable(getattr(graph, "node", None)) else graph.node  # onnx_ir graphs iterate; protos: .node
    counts: dict[str, int] = {}
    for node in nodes:
        key = op_key(node.domain, node.op_type)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
