"""What a Triton model repository written by llm-export is made of, as data shared by its writer and its checker.

What it does: names the model files (backend -> model file, platform -> backend) and the ONNX element type ->
Triton type map (from the one dtype table, artifacts/manifest.py DTYPES), maps manifest shapes to Triton dims, locates the python-backend
models' sources (``runtime_py/triton_model.py`` for causal-LM artifacts, ``runtime_py/triton_classify_model.py``
for task heads, beside this package) and reads the constants they declare (:data:`INPUTS`, :data:`OUTPUTS`,
:data:`DEFAULTS`; the classify model's ``KIND``, per-task I/O with ``"num_labels"`` dims, ``RAGGED``, ``BATCHING``)
from that source with ``ast``, resolves a task artifact's label count (:func:`num_labels`, :func:`row_dims`), and
loads Triton's ``ModelConfig`` protobuf (tritonclient) behind a clear error.

What it does not do: write (artifacts/triton_write.py) or check (artifacts/triton_check.py) a repository, or import
``runtime_py``: the model is runtime code, and artifacts never imports the runtime. Its constants are read as
literals from its source, which is also how the checker reads the copy inside a repository (what will run).
"""

from __future__ import annotations

import ast
from pathlib import Path

from artifacts.manifest import DTYPES

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding runtime_py/ and artifacts/
MODEL_SOURCE = PACKAGE_ROOT / "runtime_py" / "triton_model.py"  # copied into a repository as NAME/1/model.py
# The task-head (seq-cls, token-cls, qa) model, copied as NAME/1/model.py instead for those artifacts.
CLASSIFY_MODEL_SOURCE = PACKAGE_ROOT / "runtime_py" / "triton_classify_model.py"
OPTIONAL_CONSTANTS = ("DEFAULTS", "KIND", "RAGGED", "BATCHING")  # read when literals; KIND defaults to "generate"

# onnx.TensorProto element type -> Triton type, for checking the graph model's config against the graph.
ONNX_ELEM = {d.onnx: d.triton for d in DTYPES.values()}
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


class RepositoryError(ValueError):
    """The model repository (or one config.pbtxt in it) is invalid."""


def protobuf():
    """(google.protobuf.text_format, tritonclient's model_config_pb2); RepositoryError naming the extra when absent."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise RepositoryError(f"validating Triton configs needs tritonclient ({e}); "
                              "install it with: pip install 'llm-export[triton]'") from None
    return text_format, model_config_pb2


def triton_dims(shape: list) -> list[int]:
    """A manifest shape as Triton dims: symbolic or non-positive dims -> -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def model_constants(model_py: Path) -> dict | None:
    """INPUTS, OUTPUTS and (when literals) DEFAULTS, KIND ("generate" when absent: runtime_py/triton_model.py),
    RAGGED and BATCHING as written in a python model's source, or None when the file is not ours (no ``class
    TritonPythonModel``, or INPUTS/OUTPUTS missing or not literals). Never imports it."""
    found = {}
    try:
        tree = ast.parse(Path(model_py).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{model_py}: not valid Python ({e})") from None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in ("INPUTS", "OUTPUTS", *OPTIONAL_CONSTANTS) \
                and node.value is not None:
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:
                if target.id not in OPTIONAL_CONSTANTS:  # e.g. DEFAULTS: an older model.py computed it
                    return None
    if not {"INPUTS", "OUTPUTS"} <= set(found) or "class TritonPythonModel" not in ast.unparse(tree):
        return None
    found.setdefault("KIND", "generate")
    return found


def num_labels(manifest) -> int:
    """The label count of a task-head artifact: the last dim of its graph's ``logits`` output when concrete (seq-cls,
    token-cls), else the length of ``id2label``; qa has two per-token outputs and no labels (0)."""
    if manifest.task == "qa":
        return 0
    for t in manifest.decoder.outputs:
        if t.name == "logits" and t.shape and isinstance(t.shape[-1], int) and t.shape[-1] > 0:
            return t.shape[-1]
    return len(manifest.spec.get("id2label") or [])


def row_dims(dims: list, labels: int) -> list[int]:
    """A classify model's declared dims of one row with ``"num_labels"`` replaced by the artifact's label count."""
    return [labels if d == "num_labels" else d for d in dims]
