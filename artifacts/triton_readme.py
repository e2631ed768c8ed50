"""The README.md of a Triton model repository: launch commands, a streaming client, the raw graph's KV rules.

What it does: :func:`repository_readme` fills the template ``triton_readme.md`` (beside this file, installed as
package data; ``str.format`` fields, literal braces doubled) with what the artifact's manifest says: models and
backends, how the raw graph is served (ONNX Runtime, a TensorRT plan, or why a TensorRT-RTX engine is not), the
contrib ops its lowering uses, and the KV-cache rule of its KV mode. :func:`graph_opsets` reads a graph's opsets.

What it does not do: write files (artifacts/triton_write.py puts the text in the repository) or check that the
commands it shows work (tests/test_triton.py runs its client example against the real server).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from artifacts.manifest import Manifest
from artifacts.triton_contract import triton_dims

TEMPLATE = "triton_readme.md"


def graph_opsets(graph_path: Path) -> str:
    """"ai.onnx 18, com.microsoft 1": the opsets a graph imports (read without its external data)."""
    import onnx

    model = onnx.load_model(str(graph_path), load_external_data=False)
    return ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)


def repository_readme(name: str, manifest: Manifest, instances: int, max_batch: int, opsets: str,
                      default_max_tokens: int) -> str:
    """The README text for a repository whose streaming model is `name` (see artifacts/triton_write.py for the
    other arguments; `default_max_tokens`: the python model's max_tokens when a request sends none)."""
    graph, engine = manifest.decoder, manifest.engine
    plan = engine is not None and engine.flavour == "tensorrt"
    graph_backend = "tensorrt (plan)" if plan else "onnxruntime"
    runtime = "`runtime_py` (TensorRT engine on a GPU, else ONNX Runtime on the CPU)" if engine else \
        "`runtime_py` (ONNX Runtime, CPU)"
    if plan:
        served = (f"`{name}_graph` is the TensorRT {engine.version} engine (`1/model.plan`): the Triton "
                  "release must ship the same TensorRT version, and the GPU must be the architecture it was built "
                  "on; engines are not portable.")
    elif engine:
        served = (f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime: the engine "
                  f"is a TensorRT-RTX {engine.version} engine (targets "
                  f"{', '.join(engine.compute_capabilities)}), which Triton's TensorRT backend cannot "
                  f"load; it runs inside `{name}` through runtime_py on an RTX GPU.")
    else:
        served = f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime."
    lowering = graph.lowering
    kv_in = graph.kv_inputs
    other_in = ", ".join(f"`{t.name}`" for t in graph.inputs if not t.name.startswith("past_key_values"))
    kv = f"dims {triton_dims(kv_in[0].shape)}, {kv_in[0].dtype}" if kv_in else "none"
    ops = sorted(op for op in graph.op_histogram if op.startswith("com.microsoft."))
    contrib = (f"The `{lowering}` lowering uses ONNX Runtime contrib ops ({', '.join(ops)}); Triton's ONNX Runtime\n"
               "backend runs a full ONNX Runtime build, which includes them (CPU and CUDA execution providers)."
               if ops else "The graph uses standard ONNX ops only.")
    if manifest.kv_mode == "static":
        kv_rule = ("the cache is a fixed-length buffer of `max_cache_len` slots (slot = position). Start with zeros\n"
                   "of length prompt + new tokens; each call writes the new tokens' K/V at their `position_ids` and\n"
                   "returns the whole buffer as `present.*`, which goes back as `past_key_values.*` on the next call.")
    else:
        kv_rule = ("`present.*` is `past_key_values.*` with the new tokens appended (start with length 0);\n"
                   "`attention_mask` covers past + new tokens.")
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return template.format(
        name=name, model_name=manifest.model.get("name"), model_type=manifest.model.get("model_type"),
        precision=manifest.precision, kv_mode=manifest.kv_mode, max_seq_len=manifest.max_seq_len,
        lowering=lowering, runtime=runtime, graph_backend=graph_backend, instances=instances, max_batch=max_batch,
        served=served, default_max_tokens=default_max_tokens, other_in=other_in, kv_count=len(kv_in), kv=kv,
        kv_rule=kv_rule, layers=manifest.num_layers, num_kv_heads=manifest.num_kv_heads,
        head_dim=manifest.head_dim, vocab_size=manifest.vocab_size, contrib=contrib)
