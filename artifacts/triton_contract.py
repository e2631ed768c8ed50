"""What a Triton model repository written by llm-export is made of, as data shared by its writer and its checker.

What it does: names the model files (backend -> model file, platform -> backend) and the ONNX element type ->
Triton type map (from the one dtype table, artifacts/manifest.py DTYPES), maps manifest shapes to Triton dims, locates the python-backend
model's source (``runtime_py/triton_model.py``, beside this package) and reads the constants it declares
(:data:`INPUTS`, :data:`OUTPUTS`, :data:`DEFAULTS`) from that source with ``ast``, and loads Triton's
``ModelConfig`` protobuf (tritonclient) behind a clear error.

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
    """INPUTS, OUTPUTS and (when a literal) DEFAULTS as written in a python model's source, or None when the file is
    not ours (no ``class TritonPythonModel``, or INPUTS/OUTPUTS missing or not literals). Never imports it."""
    found = {}
    try:
        tree = ast.parse(Path(model_py).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{model_py}: not valid Python ({e})") from None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in ("INPUTS", "OUTPUTS", "DEFAULTS") and node.value is not None:
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:
                if target.id != "DEFAULTS":  # DEFAULTS: optional (an older model.py computed it)
                    return None
    if not {"INPUTS", "OUTPUTS"} <= set(found) or "class TritonPythonModel" not in ast.unparse(tree):
        return None
    return found
