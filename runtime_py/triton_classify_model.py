"""The Triton python-backend model for task-head artifacts: classification and extractive QA (copied as
``NAME/1/model.py``).

What it does: :class:`TritonPythonModel` is a *non-decoupled* model with Triton's dynamic batcher in front of it
(``dynamic_batching``, ``max_batch_size`` = the artifact's ``--max-batch``). ``initialize`` opens the artifact
copied next to this file (``./artifact``, checksums verified) with :class:`runtime_py.classify.Classifier` (its ONNX
graph on ONNX Runtime, CPU); ``execute`` gets the requests the batcher merged, parses each one
(:func:`parse_request`), tokenizes it with the artifact's tokenizer and runs the rows of all of them as ONE batch
through the classifier (:func:`infer`), then answers each request with its own rows. A bad request (no input or
two kinds of input, empty text, text that is not UTF-8, more tokens than the artifact's context, token ids outside
the vocabulary) gets an error response of its own; the other requests of the same batch are answered, and the model
keeps serving. Like ``runtime_py/triton_model.py``, it imports the runtime copied into ``./runtime``.

Every tensor has the batch dim first (``max_batch_size`` > 0): a request holds one or more *rows*, one input per
row, and the dims below are those of one row. Inputs (:data:`INPUTS`, all optional, exactly one kind per request):

* seq-cls and token-cls: ``text_input`` (STRING [1], one text per row, encoded as ``python -m runtime_py classify
  --text`` does), or ``input_ids`` (INT64 [-1], one input of token ids per row, no padding: inputs of other lengths
  go in other requests, the batcher merges them: ``allow_ragged_batch``);
* qa: ``question`` and ``context`` (STRING [1] each, one pair per row, encoded as a pair by the tokenizer's
  post-processor; only context tokens can be in the answer), or ``input_ids`` (every token can be in the answer).

Triton's batcher merges requests that send the same inputs: text requests with text requests, ``input_ids``
requests (of any lengths) with ``input_ids`` requests; a text request and an ``input_ids`` request go in separate
executions.

Outputs (:data:`OUTPUTS`; ``num_labels`` = the artifact's label count, ``id2label``):

* seq-cls: ``logits`` (FP32 [num_labels], pooled at the row's last token), ``label`` (STRING [1], the argmax
  label), ``score`` (FP32 [1], its score: classify.label_scores);
* token-cls: ``logits`` (FP32 [-1, num_labels]), ``labels`` (STRING [-1], one label per token) and ``num_tokens``
  (INT64 [1]); a request of several rows is padded to its longest row (logits 0, labels ""), ``num_tokens`` says
  how many entries of each row are its tokens;
* qa: ``start_logits`` / ``end_logits`` (FP32 [-1], per token, padded like token-cls), ``num_tokens`` (INT64 [1]),
  ``answer`` (STRING [1]: the span's text, cut from the context by the tokenizer's offsets; decoded from the tokens
  for an ``input_ids`` row), ``answer_start`` / ``answer_end`` (INT64 [1]: the span's first and last token index,
  inclusive, into ``start_logits``; -1 when there is no answer in the context) and ``answer_score`` (FP32 [1]),
  chosen by transformers' QA pipeline rule (runtime_py.classify.best_span, parameter ``max_answer_len``).

The numbers are runtime_py's: :func:`infer` returns, row for row, what ``Classifier.classify`` (seq-cls, token-cls)
and ``Classifier.answer`` (qa) return for the same inputs.

What it does not do: run a TensorRT engine (the artifact's ONNX graph runs, as in ``python -m runtime_py
classify``), truncate or stride long inputs, or stream.

Importable without Triton (pb_utils is None then): the tests call :func:`parse_request` and :func:`infer` directly.
The repository writer (artifacts/triton_write.py) never imports this module: it reads :data:`KIND`,
:data:`INPUTS`, :data:`OUTPUTS`, :data:`RAGGED`, :data:`DEFAULTS` and :data:`BATCHING` from this file's source, so
they must stay plain literals.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_RUNTIME = _HERE / "runtime"  # runtime_py/ + artifacts/ sources, copied by artifacts.triton_write
if _RUNTIME.is_dir() and str(_RUNTIME) not in sys.path:
    sys.path.insert(0, str(_RUNTIME))

from runtime_py.triton_model import (RequestError, _check_stub_numpy, _error, _log, _text,  # noqa: E402
                                     model_parameters, pb_utils)

KIND = "classify"  # what the repository checker keys on (runtime_py/triton_model.py is the "generate" kind)
# task -> input name -> (Triton data type, dims of one row, optional).
INPUTS = {
    "seq-cls": {"text_input": ("TYPE_STRING", [1], True), "input_ids": ("TYPE_INT64", [-1], True)},
    "token-cls": {"text_input": ("TYPE_STRING", [1], True), "input_ids": ("TYPE_INT64", [-1], True)},
    "qa": {"question": ("TYPE_STRING", [1], True), "context": ("TYPE_STRING", [1], True),
           "input_ids": ("TYPE_INT64", [-1], True)},
}
# task -> output name -> (Triton data type, dims of one row); "num_labels": the artifact's label count.
OUTPUTS = {
    "seq-cls": {"logits": ("TYPE_FP32", ["num_labels"]), "label": ("TYPE_STRING", [1]),
                "score": ("TYPE_FP32", [1])},
    "token-cls": {"logits": ("TYPE_FP32", [-1, "num_labels"]), "labels": ("TYPE_STRING", [-1]),
                  "num_tokens": ("TYPE_INT64", [1])},
    "qa": {"start_logits": ("TYPE_FP32", [-1]), "end_logits": ("TYPE_FP32", [-1]), "num_tokens": ("TYPE_INT64", [1]),
           "answer": ("TYPE_STRING", [1]), "answer_start": ("TYPE_INT64", [1]), "answer_end": ("TYPE_INT64", [1]),
           "answer_score": ("TYPE_FP32", [1])},
}
RAGGED = ["input_ids"]  # allow_ragged_batch: requests of different lengths are merged (each keeps its own shape)
# config.pbtxt parameters and their values when absent; max_answer_len only for qa (transformers' pipeline default).
DEFAULTS = {"artifact": "artifact", "ort_threads": "0", "max_answer_len": "15"}
BATCHING = {"max_queue_delay_microseconds": 1000}  # dynamic_batching: how long the first request waits for others


@dataclass
class Row:
    """One input: its token ids; for a QA pair also which tokens are context, their offsets and the context."""
    ids: list[int]
    allowed: np.ndarray | None = None
    offsets: list | None = None
    context: str | None = None


def _strings(name: str, array) -> list[str]:
    a = np.asarray(array)
    if a.ndim == 0 or a.ndim > 2 or (a.ndim == 2 and a.shape[1] != 1):
        raise RequestError(f"input '{name}' must be [rows, 1] (one text per row), got shape {list(a.shape)}")
    texts = [_text(name, v) for v in a.reshape(-1)]
    for i, t in enumerate(texts):
        if not t:
            raise RequestError(f"'{name}' row {i} is empty")
    return texts


def _id_rows(array) -> list[list[int]]:
    a = np.asarray(array)
    if a.ndim != 2:
        raise RequestError(f"input 'input_ids' must be [rows, tokens], got shape {list(a.shape)}")
    if a.shape[1] == 0:
        raise RequestError("'input_ids' is empty (no tokens)")
    return [[int(t) for t in row] for row in a]


def parse_request(get, task: str) -> list[tuple]:
    """The rows of one request: ("ids", [int, ...]), ("text", str) or ("pair", (question, context)) each.

    `get(name)` returns the input as a numpy array (batch dim first) or None when absent."""
    ids = get("input_ids")
    if task == "qa":
        q, c = get("question"), get("context")
        if (ids is None) == (q is None and c is None):
            raise RequestError("send either 'question' with 'context' (one pair per row) or 'input_ids'")
        if ids is not None:
            return [("ids", r) for r in _id_rows(ids)]
        if q is None or c is None:
            raise RequestError("'question' and 'context' go together (one pair per row)")
        questions, contexts = _strings("question", q), _strings("context", c)
        if len(questions) != len(contexts):
            raise RequestError(f"{len(questions)} 'question' rows but {len(contexts)} 'context' rows")
        return [("pair", qc) for qc in zip(questions, contexts)]
    text = get("text_input")
    if (ids is None) == (text is None):
        raise RequestError("send exactly one of 'text_input' (one text per row) or 'input_ids' (token ids per row)")
    if ids is not None:
        return [("ids", r) for r in _id_rows(ids)]
    return [("text", t) for t in _strings("text_input", text)]


def encode(clf, rows: list[tuple]) -> list[Row]:
    """Tokenize a request's rows and check them against the artifact (RequestError: this request only)."""
    out = []
    for i, (kind, value) in enumerate(rows):
        if kind == "ids":
            row = Row(value)
        elif kind == "text":
            row = Row(clf.encode(value))
        else:
            ids, allowed, offsets = clf.encode_pair(*value)
            row = Row(ids, allowed, offsets, value[1])
        if not row.ids:
            raise RequestError(f"row {i} has no tokens")
        if len(row.ids) > clf.max_seq_len:
            raise RequestError(f"row {i} has {len(row.ids)} tokens > the artifact's context length {clf.max_seq_len} "
                               "(inputs are not truncated)")
        bad = [t for t in row.ids if not 0 <= t < clf.vocab_size]
        if bad:
            raise RequestError(f"row {i}: token ids {bad[:5]} outside the vocabulary [0, {clf.vocab_size})")
        out.append(row)
    return out


def _pad(rows: list, fill, dtype) -> np.ndarray:
    """Rows of different lengths (each [tokens] or [tokens, labels]) as one array, padded at the end."""
    first = np.asarray(rows[0], dtype=dtype)
    out = np.full((len(rows), max(len(r) for r in rows), *first.shape[1:]), fill, dtype=dtype)
    for b, r in enumerate(rows):
        if len(r):
            out[b, :len(r)] = np.asarray(r, dtype=dtype)
    return out


def _outputs(clf, task: str, rows: list[Row], max_answer_len: int) -> dict[str, np.ndarray]:
    """The output arrays of a list of rows, from one batch through the classifier."""
    from runtime_py.classify import best_span

    ids = [r.ids for r in rows]
    if task == "seq-cls":
        res = clf.classify(ids)
        return {"logits": np.asarray(res.logits, dtype=np.float32),
                "label": np.array([[s.encode("utf-8")] for s in res.labels], dtype=np.object_),
                "score": np.asarray(res.scores, dtype=np.float32).reshape(-1, 1)}
    n = np.array([[len(i)] for i in ids], dtype=np.int64)
    if task == "token-cls":
        res = clf.classify(ids)
        return {"logits": _pad(res.logits, 0.0, np.float32),
                "labels": _pad([[s.encode("utf-8") for s in row] for row in res.labels], b"", np.object_),
                "num_tokens": n}
    raw = clf.forward(ids)  # [tokens, 2] per row; the span rule of Classifier.answer
    answers, starts, ends, scores = [], [], [], []
    for r, row in zip(rows, raw):
        allowed = r.allowed if r.allowed is not None else np.ones(len(row), dtype=bool)
        span = best_span(row[:, 0], row[:, 1], allowed, max_answer_len)
        if span is None:
            s, e, score, text = -1, -1, 0.0, ""
        else:
            s, e, score = span
            if r.offsets is not None:
                text = r.context[r.offsets[s][0]:r.offsets[e][1]]
            else:
                text = clf.tokenizer.decode(r.ids[s:e + 1]) if clf.tokenizer else ""
        answers.append([text.encode("utf-8")])
        starts.append([s])
        ends.append([e])
        scores.append([score])
    return {"start_logits": _pad([row[:, 0] for row in raw], 0.0, np.float32),
            "end_logits": _pad([row[:, 1] for row in raw], 0.0, np.float32), "num_tokens": n,
            "answer": np.array(answers, dtype=np.object_), "answer_start": np.array(starts, dtype=np.int64),
            "answer_end": np.array(ends, dtype=np.int64), "answer_score": np.array(scores, dtype=np.float32)}


def _split(outputs: dict[str, np.ndarray], counts: list[int], task: str) -> list[dict[str, np.ndarray]]:
    """Per request: its rows of every output; per-token outputs trimmed to the request's longest row."""
    per, at = [], 0
    for k in counts:
        mine = {name: a[at:at + k] for name, a in outputs.items()}
        if task != "seq-cls":
            width = int(mine["num_tokens"].max())
            for name in ("logits", "labels", "start_logits", "end_logits"):
                if name in mine:
                    mine[name] = mine[name][:, :width]
        per.append(mine)
        at += k
    return per


def infer(clf, requests: list, max_answer_len: int = 15) -> list:
    """Outputs for each request: `requests` holds a list of Row (encode) or an Exception per request; returns, in
    the same order, a dict name -> array (batch dim = the request's rows) or the Exception to answer with.

    The rows of every good request run as one batch; if that batch fails as a whole, each request is run alone,
    so that only the request that fails gets the error."""
    task = clf.task
    good = [i for i, r in enumerate(requests) if not isinstance(r, Exception)]
    results: list = list(requests)
    if not good:
        return results
    try:
        flat = [row for i in good for row in requests[i]]
        per = _split(_outputs(clf, task, flat, max_answer_len), [len(requests[i]) for i in good], task)
        for i, out in zip(good, per):
            results[i] = out
    except Exception:  # noqa: BLE001 - find the culprit: one request at a time
        for i in good:
            try:
                results[i] = _outputs(clf, task, requests[i], max_answer_len)
            except Exception as e:  # noqa: BLE001
                results[i] = e
    return results


class TritonPythonModel:
    def initialize(self, args):
        from runtime_py.classify import Classifier

        _check_stub_numpy()
        config, p, artifact = model_parameters(args, DEFAULTS, _HERE)
        self.classifier = Classifier(artifact, threads=int(p["ort_threads"]) or None)
        self.max_answer_len = int(p["max_answer_len"])
        self.task = self.classifier.task
        self.outputs = list(OUTPUTS[self.task])
        import runtime_py

        _log(f"{args.get('model_name')}: runtime_py from {Path(runtime_py.__file__).parent}, artifact {artifact} "
             f"({self.task}, {len(self.classifier.id2label)} labels) on ONNX Runtime, numpy {np.__version__}, "
             f"dynamic batching up to {config.get('max_batch_size')} rows")

    def execute(self, requests):
        parsed = []
        for request in requests:
            def get(name, request=request):
                t = pb_utils.get_input_tensor_by_name(request, name)
                return None if t is None else t.as_numpy()

            try:
                parsed.append(encode(self.classifier, parse_request(get, self.task)))
            except Exception as e:  # noqa: BLE001 - every bad request becomes its own error response
                parsed.append(e)
        responses = []
        for result in infer(self.classifier, parsed, self.max_answer_len):
            if isinstance(result, Exception):
                message = str(result) if isinstance(result, ValueError) else f"{type(result).__name__}: {result}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(message)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, result[n]) for n in self.outputs]))
        return responses

    def finalize(self):
        self.classifier = None
