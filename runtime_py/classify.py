"""`python -m runtime_py classify`: run a task-head artifact (seq-cls, token-cls, qa) over one batch of inputs.

What it does: :class:`Classifier` opens the artifact (checksums verified, memory checked), tokenizes texts with the
artifact's tokenizer (question/context pairs for QA, as the tokenizer's post-processor pairs them), right-pads the
batch with the model's ``pad_token_id`` (what the graph's sequence pooling looks for: the rightmost token that is
not ``pad_token_id``, as transformers does; a batch of more than one input without a pad token is refused, as
transformers refuses it) and runs the sealed graph (graphs/task.py) once per ``max_batch`` inputs. Results:

* seq-cls: ``logits`` [labels] per input, the argmax label (config ``id2label``) and its score (:func:`label_scores`:
  softmax, sigmoid for multi-label or one label, the raw value for regression, as config ``problem_type`` says);
* token-cls: ``logits`` [tokens][labels] per input (its own tokens only, never the padding) and a label per token;
* qa: ``start_logits`` / ``end_logits`` per token of each input and the best span by the rule transformers' QA
  pipeline uses (:func:`best_span`: softmax over the allowed tokens, the best start x end product with
  ``start <= end < start + max_answer_len``), with its text cut from the context by the tokenizer's offsets.

What it does not do: run a TensorRT engine (the ONNX graph of any lowering ONNX Runtime runs is used; a
``trt-plugin`` graph needs TensorRT), truncate or stride long inputs (an input longer than ``max_seq_len`` is
refused), or generate text (generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts.bundle import ArtifactError, open_artifact
from runtime_py.memory import check_fits
from runtime_py.session import check_graph_io, open_session, session_options
from runtime_py.tokenizer import Tokenizer

ORT_LOWERINGS = ("reference", "ort", "trt-native")
MAX_ANSWER_LEN = 15  # transformers' QA pipeline default
NO_PAD = "Cannot handle batch sizes > 1 if no padding token is defined."  # transformers' own words


@dataclass
class Result:
    task: str
    tokens: list[list[int]]
    logits: list = field(default_factory=list)  # seq-cls: [labels] per input; token-cls: [tokens][labels]
    labels: list = field(default_factory=list)  # seq-cls: a label per input; token-cls: a label per token
    scores: list = field(default_factory=list)  # seq-cls: the label's score (label_scores)
    start_logits: list = field(default_factory=list)  # qa: per token
    end_logits: list = field(default_factory=list)
    answers: list = field(default_factory=list)  # qa: {"start", "end" (token indices, inclusive), "score", "text"}

    def to_json(self) -> dict:
        if self.task == "qa":
            return {"start_logits": self.start_logits, "end_logits": self.end_logits, "answers": self.answers}
        return {"logits": self.logits, "labels": self.labels}


def label_scores(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    """A seq-cls row's scores as transformers' text-classification pipeline gives them: the raw value for
    regression, a sigmoid per label for multi-label (or a single label), else the softmax."""
    x = logits.astype(np.float64)
    if problem_type == "regression":
        return x
    if problem_type == "multi_label_classification" or x.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-x))
    return softmax(x)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray,
              max_answer_len: int = MAX_ANSWER_LEN) -> tuple[int, int, float] | None:
    """transformers' QA rule (pipelines' select_starts_ends + decode_spans, top 1): tokens not `allowed` get
    -10000, softmax each, score(s, e) = p_start[s] * p_end[e] over s <= e < s + max_answer_len; the best pair, or
    None when it falls outside the allowed tokens. (The pipeline also zeroes position 0, BERT's CLS; an encoded
    (question, context) pair never allows it, while `--ids` input allows every token, 0 included.)

    The pipeline takes the argmax of the whole L x L outer product (8 GiB of float64 for a 32k context, three times
    over); here only its band is made, as [L, K] with K = min(max_answer_len, L) and band[s, d] = score(s, s + d)
    (0 past the end). Row-major order over (s, d) is row-major order over (s, e) within the band, and every entry
    outside it is 0, so the first maximum, ties included, is the same pair."""
    start = softmax(np.where(allowed, start_logits, -10000.0).astype(np.float64))
    end = softmax(np.where(allowed, end_logits, -10000.0).astype(np.float64))
    k = min(max_answer_len, len(start))
    shifted = np.lib.stride_tricks.sliding_window_view(np.concatenate([end, np.zeros(k - 1)]), k)  # [s, d]: end[s+d]
    band = start[:, None] * shifted
    s, d = np.unravel_index(int(np.argmax(band)), band.shape)
    e = s + d
    if not (allowed[s] and allowed[e]):
        return None
    return int(s), int(e), float(band[s, d])


class Classifier:
    def __init__(self, artifact: str | Path, threads: int | None = None, verify: bool = True,
                 check_memory: bool = True):
        self.root = Path(artifact)
        self.manifest = open_artifact(self.root, verify=verify)
        self.task = self.manifest.task
        if self.task == "causal-lm":
            raise ArtifactError(f"{self.root}: a causal-lm artifact has no task head; use `python -m runtime_py "
                                "generate` (or build a ForSequenceClassification/ForTokenClassification/"
                                "ForQuestionAnswering checkpoint)")
        graph = self.manifest.decoder
        if graph.lowering not in ORT_LOWERINGS:
            raise ArtifactError(f"{self.root}: the '{graph.lowering}' graph needs TensorRT with our plugins; "
                                f"classify runs the {', '.join(ORT_LOWERINGS)} lowerings on ONNX Runtime")
        spec = self.manifest.spec
        self.id2label = list(spec.get("id2label") or [])
        self.problem_type = spec.get("problem_type")
        self.pad_id = spec.get("pad_token_id")
        self.max_seq_len, self.max_batch = self.manifest.max_seq_len, self.manifest.max_batch
        self.vocab_size = self.manifest.vocab_size
        self.tokenizer = Tokenizer(self.root) if (self.root / "tokenizer.json").is_file() else None
        options = session_options(threads)
        if check_memory:
            check_fits(self.manifest, batch=self.max_batch, where=self.root)
        self.session = open_session(self.root, graph.file, options)
        check_graph_io(self.session, graph, self.root)

    # -- inputs ---------------------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.root} has no tokenizer.json; pass --prompt-ids")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text)

    def encode_pair(self, question: str, context: str) -> tuple[list[int], np.ndarray, list]:
        """QA input: the tokenizer's pair encoding; (ids, which tokens belong to the context, their offsets in it)."""
        ids, seq, offsets = self._need_tokenizer().encode_pair(question, context)
        return ids, np.array([sid == 1 for sid in seq], dtype=bool), offsets

    def _check(self, inputs: list[list[int]]) -> None:
        if not inputs:
            raise ValueError("no input: pass --text, --prompt-ids or --question/--context")
        for i, ids in enumerate(inputs):
            if not ids:
                raise ValueError(f"input {i} is empty (no tokens)")
            if len(ids) > self.max_seq_len:
                raise ValueError(f"input {i} has {len(ids)} tokens > the artifact's context length "
                                 f"{self.max_seq_len} (it is not truncated)")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"input {i}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if self.task == "seq-cls" and self.pad_id is None and len(inputs) > 1:
            raise ValueError(f"{NO_PAD} (config.json has no pad_token_id: classify one input at a time)")

    def forward(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Raw outputs for each input: seq-cls [labels]; token-cls [tokens, labels]; qa [tokens, 2] (start, end)."""
        self._check(inputs)
        rows: list[np.ndarray] = []
        pad = self.pad_id if self.pad_id is not None else 0
        for at in range(0, len(inputs), self.max_batch):
            chunk = inputs[at:at + self.max_batch]
            ids = np.full((len(chunk), max(len(p) for p in chunk)), pad, dtype=np.int64)
            for b, p in enumerate(chunk):
                ids[b, :len(p)] = p
            out = self.session.run(None, {"input_ids": ids})
            for b, p in enumerate(chunk):
                if self.task == "seq-cls":
                    rows.append(out[0][b])
                elif self.task == "token-cls":
                    rows.append(out[0][b, :len(p)])
                else:
                    rows.append(np.stack([out[0][b, :len(p)], out[1][b, :len(p)]], axis=-1))
        return rows

    # -- tasks ----------------------------------------------------------------------------------------------
    def _label(self, i: int) -> str:
        return self.id2label[i] if i < len(self.id2label) else f"LABEL_{i}"

    def classify(self, inputs: list[list[int]]) -> Result:
        """seq-cls or token-cls over token-id inputs."""
        if self.task == "qa":
            raise ValueError("this is a question-answering artifact: pass --question and --context")
        rows = self.forward(inputs)
        result = Result(self.task, [list(p) for p in inputs])
        for row in rows:
            result.logits.append(row.tolist())
            if self.task == "seq-cls":
                scores = label_scores(row, self.problem_type)
                best = int(np.argmax(row))
                result.labels.append(self._label(best))
                result.scores.append(float(scores[best]))
            else:
                result.labels.append([self._label(int(i)) for i in np.argmax(row, axis=-1)])
        return result

    def answer(self, pairs: list[tuple[str, str]] | None = None, inputs: list[list[int]] | None = None,
               max_answer_len: int = MAX_ANSWER_LEN) -> Result:
        """QA: (question, context) pairs, or token ids (every token may then be in the answer)."""
        if self.task != "qa":
            raise ValueError(f"this is a {self.task} artifact: --question/--context are for question answering")
        if pairs:
            encoded = [self.encode_pair(q, c) for q, c in pairs]
            inputs = [e[0] for e in encoded]
        else:
            encoded = None
            inputs = inputs or []
        rows = self.forward(inputs)
        result = Result("qa", [list(p) for p in inputs])
        for i, row in enumerate(rows):
            result.start_logits.append(row[:, 0].tolist())
            result.end_logits.append(row[:, 1].tolist())
            allowed = encoded[i][1] if encoded else np.ones(len(row), dtype=bool)
            span = best_span(row[:, 0], row[:, 1], allowed, max_answer_len)
            if span is None:
                result.answers.append({"start": None, "end": None, "score": 0.0, "text": ""})
                continue
            s, e, score = span
            if encoded:
                offsets, context = encoded[i][2], pairs[i][1]
                text = context[offsets[s][0]:offsets[e][1]]
            else:
                text = self.tokenizer.decode(inputs[i][s:e + 1]) if self.tokenizer else ""
            result.answers.append({"start": s, "end": e, "score": score, "text": text})
        return result
