"""The README.md of a Triton model repository: launch commands, a streaming client, the raw graph's KV rules.

What it does: :func:`repository_readme` fills the template ``triton_readme.md`` (beside this file, installed as
package data; ``str.format`` fields, literal braces doubled) with what the artifact's manifest says: models and
backends, how the raw graph is served (ONNX Runtime, a TensorRT plan, or why a TensorRT-RTX engine is not), the
contrib ops its lowering uses, and the KV-cache rule of its KV mode. :func:`classify_readme` does the same for a
task-head artifact with ``triton_classify_readme.md``: the dynamic batching, the I/O of its task (from the constants
of runtime_py/triton_classify_model.py) and a tritonclient example for that task. :func:`graph_opsets` reads a
graph's opsets.

What it does not do: write files (artifacts/triton_write.py puts the text in the repository) or check that the
commands it shows work (tests/test_triton.py runs its client example against the real server).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from artifacts.manifest import Manifest
from artifacts.triton_contract import num_labels, row_dims, triton_dims

TEMPLATE = "triton_readme.md"
CLASSIFY_TEMPLATE = "triton_classify_readme.md"  # task-head artifacts (runtime_py/triton_classify_model.py)
TASK_NAMES = {"seq-cls": "sequence classification", "token-cls": "token classification",
              "qa": "extractive question answering"}
_TYPES = {"TYPE_STRING": "STRING", "TYPE_FP32": "FP32", "TYPE_INT64": "INT64"}
_ABOUT = {  # what each input / output of the classification model holds (runtime_py/triton_classify_model.py)
    "text_input": "one text per row, encoded with the artifact's tokenizer as `python -m runtime_py classify --text`",
    "input_ids": "or one input of token ids per row, unpadded (inputs of other lengths go in other requests: the "
                 "batcher merges them, `allow_ragged_batch`)",
    "question": "one question per row, with",
    "context": "its context (encoded as a pair by the tokenizer's post-processor; only context tokens can be in the "
               "answer)",
    "logits": "the head's logits",
    "seq-cls logits": "the head's logits, pooled at the row's last token",
    "token-cls logits": "the head's logits of each token",
    "label": "the argmax label (`id2label`)",
    "score": "its softmax probability",
    "labels": "the argmax label of each token",
    "num_tokens": "the row's token count: a request of several rows is padded to its longest row (0 / \"\")",
    "start_logits": "per token",
    "end_logits": "per token",
    "answer": "the best span's text (cut from the context by the tokenizer's offsets; decoded for an `input_ids` row)",
    "answer_start": "its first token index into `start_logits` (-1: no answer in the context)",
    "answer_end": "its last token index, inclusive (-1: no answer)",
    "answer_score": "p_start x p_end of the span (transformers' QA pipeline rule, parameter `max_answer_len`)",
}
_CLIENTS = {
    "seq-cls": """import numpy as np
import tritonclient.grpc as grpcclient

texts = ["Hello world", "The quick brown fox"]
text_input = grpcclient.InferInput("text_input", [len(texts), 1], "BYTES")  # [rows, 1]
text_input.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
client = grpcclient.InferenceServerClient("localhost:8001")
result = client.infer("{name}", [text_input])
logits = result.as_numpy("logits")  # [rows, num_labels] float32
labels = [row[0].decode() for row in result.as_numpy("label")]
scores = result.as_numpy("score")[:, 0]
client.close()
for text, label, score in zip(texts, labels, scores):
    print(f"{text!r}: {label} ({score:.3f})")""",
    "token-cls": """import numpy as np
import tritonclient.grpc as grpcclient

texts = ["Hello world", "The quick brown fox"]
text_input = grpcclient.InferInput("text_input", [len(texts), 1], "BYTES")  # [rows, 1]
text_input.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
client = grpcclient.InferenceServerClient("localhost:8001")
result = client.infer("{name}", [text_input])
counts = result.as_numpy("num_tokens")[:, 0]
logits = [row[:n] for row, n in zip(result.as_numpy("logits"), counts)]  # [tokens, num_labels] per row
labels = [[x.decode() for x in row[:n]] for row, n in zip(result.as_numpy("labels"), counts)]
client.close()
for text, row in zip(texts, labels):
    print(f"{text!r}: {' '.join(row)}")""",
    "qa": """import numpy as np
import tritonclient.grpc as grpcclient

def strings(name, values):
    t = grpcclient.InferInput(name, [len(values), 1], "BYTES")  # [rows, 1]
    t.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=np.object_))
    return t

questions = ["Who jumps?"]
contexts = ["The quick brown fox jumps over the lazy dog."]
client = grpcclient.InferenceServerClient("localhost:8001")
result = client.infer("{name}", [strings("question", questions), strings("context", contexts)])
answers = [row[0].decode() for row in result.as_numpy("answer")]
spans = list(zip(result.as_numpy("answer_start")[:, 0], result.as_numpy("answer_end")[:, 0]))
scores = result.as_numpy("answer_score")[:, 0]
client.close()
for question, answer, (start, end), score in zip(questions, answers, spans, scores):
    print(f"{question!r}: {answer!r} (tokens {start}..{end}, score {score:.3f})")""",
}


def graph_opsets(graph_path: Path) -> str:
    """"ai.onnx 18, com.microsoft 1": the opsets a graph imports (read without its external data)."""
    from artifacts.triton_check import load_proto

    model = load_proto(graph_path)
    return ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)


def _contrib(graph) -> str:
    ops = sorted(op for op in graph.op_histogram if op.startswith("com.microsoft."))
    return (f"The `{graph.lowering}` lowering uses ONNX Runtime contrib ops ({', '.join(ops)}); Triton's ONNX Runtime\n"
            "backend runs a full ONNX Runtime build, which includes them (CPU and CUDA execution providers)."
            if ops else "The graph uses standard ONNX ops only.")


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
    contrib = _contrib(graph)
    other_in = ", ".join(f"`{t.name}`" for t in graph.inputs if not t.name.startswith("past_key_values"))
    kv = f"dims {triton_dims(kv_in[0].shape)}, {kv_in[0].dtype}" if kv_in else "none"
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


def _io_lines(tensors: dict, labels: int, task: str) -> str:
    lines = []
    for n, decl in tensors.items():
        dt, dims = decl[0], row_dims(decl[1], labels)
        about = _ABOUT.get(f"{task} {n}", _ABOUT.get(n, ""))
        lines.append(f"- `{n}` ({_TYPES.get(dt, dt)} {dims}): {about}".rstrip(": "))
    return "\n".join(lines)


def classify_readme(name: str, manifest: Manifest, instances: int, max_batch: int, opsets: str, model: dict) -> str:
    """The README text for a task-head artifact's repository: `model` holds the constants of
    runtime_py/triton_classify_model.py (INPUTS, OUTPUTS, BATCHING: read from its source by the writer)."""
    graph, engine, task = manifest.decoder, manifest.engine, manifest.task
    labels = num_labels(manifest)
    inputs, outputs = model["INPUTS"][task], model["OUTPUTS"][task]
    plan = engine is not None and engine.flavour == "tensorrt"
    if plan:
        served = (f"`{name}_graph` is the TensorRT {engine.version} engine (`1/model.plan`): the Triton release must "
                  f"ship the same TensorRT version, and the GPU must be the architecture it was built on. `{name}` "
                  "runs the ONNX graph.")
    elif engine:
        served = (f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime: the "
                  f"artifact's TensorRT-RTX {engine.version} engine has no Triton backend, and `{name}` runs the ONNX "
                  "graph too.")
    else:
        served = f"`{name}_graph` is the ONNX graph (`1/model.onnx`, opsets {opsets}) on ONNX Runtime."
    id2label = list(manifest.spec.get("id2label") or [])
    labels_line = f"{labels} labels {id2label}, " if task != "qa" else ""
    pad = manifest.spec.get("pad_token_id")
    pooling = {"seq-cls": "`logits` is pooled at each row's last token that is not `pad_token_id` (as transformers "
                          "does): pad on the right only.",
               "token-cls": "Right padding changes no real token's logits (causal attention).",
               "qa": "Right padding changes no real token's logits (causal attention)."}[task]
    if task == "seq-cls" and pad is None:
        pooling = ("The artifact has no `pad_token_id`: one input per call (`max_batch_size` of the python model is "
                   "1, as transformers refuses larger batches without a pad token).")
    template = resources.files(__package__).joinpath(CLASSIFY_TEMPLATE).read_text(encoding="utf-8")
    short = lambda names: " / ".join(f"`{n}`" for n in names)  # noqa: E731
    graph_outputs = ", ".join(f"`{t.name}` ({t.dtype} {triton_dims(t.shape)})" for t in graph.outputs)
    return template.format(
        name=name, model_name=manifest.model.get("name"), model_type=manifest.model.get("model_type"),
        precision=manifest.precision, task=task, task_name=TASK_NAMES[task], labels_line=labels_line,
        max_seq_len=manifest.max_seq_len, lowering=graph.lowering, vocab_size=manifest.vocab_size,
        graph_backend="tensorrt (plan)" if plan else "onnxruntime", inputs_short=short(inputs),
        outputs_short=short(outputs), graph_outputs=graph_outputs, instances=instances, max_batch=max_batch,
        delay_us=model["BATCHING"].get("max_queue_delay_microseconds", 0), served=served,
        inputs=_io_lines(inputs, labels, task), outputs=_io_lines(outputs, labels, task),
        client=_CLIENTS[task].replace("{name}", name),
        pad_token_id=pad, pooling=pooling, contrib=_contrib(graph))
