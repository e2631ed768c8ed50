"""Triton repositories for task-head artifacts (seq-cls, token-cls, qa): the non-decoupled classification model with
dynamic batching (runtime_py/triton_classify_model.py), its validated config, and the real tritonserver.

- Writing + validation: each task's config (not decoupled, dynamic_batching, max_batch_size = the artifact's
  max_batch, the I/O model.py declares with the artifact's label count, ragged input_ids), the raw graph model,
  the README; hand-broken configs are rejected with the reason; writer limits (max_batch, no pad_token_id).
- The model's batch logic without Triton (:func:`parse_request`, :func:`encode`, :func:`infer`): several requests,
  good and bad, in one batch give row for row what ``Classifier.classify`` / ``Classifier.answer`` give.
- End to end (seq-cls): concurrent requests (text and ragged input_ids, one of two rows) are merged by the dynamic
  batcher (the server's statistics say so; eight input_ids requests of eight lengths run as one execution) and
  answered with Classifier's logits (1e-5) and transformers' Qwen2ForSequenceClassification logits (1e-4,
  attention_mask with right padding); bad requests in the same batch get their own errors; the README's client
  example runs. The server and the stub environment are tests/triton_helpers.py's (the bundled tritonserver of
  nvidia-pytriton).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from artifacts.bundle import open_artifact, write_manifest
from artifacts.triton_check import validate_repository
from artifacts.triton_contract import CLASSIFY_MODEL_SOURCE, MODEL_SOURCE, RepositoryError, protobuf
from artifacts.triton_write import write_repository
from runtime_py.classify import Classifier
from runtime_py.triton_classify_model import INPUTS, OUTPUTS, RequestError, encode, infer, parse_request
from tests.conftest import randomize
from tests.triton_helpers import NAME, assert_broken_config_rejected, server, stub_python  # noqa: F401 - fixtures

LABELS = {0: "neg", 1: "pos", 2: "mid"}
HEADS = {"seq-cls": "Qwen2ForSequenceClassification", "token-cls": "Qwen2ForTokenClassification",
         "qa": "Qwen2ForQuestionAnswering"}
TEXTS = ["Hello world", "The quick brown fox jumps over", "a", "Once upon a time there was", "lazy dog", "Hi"]


def _pb():
    pytest.importorskip("tritonclient.grpc")
    return protobuf()


def _checkpoint(task: str, out):
    import transformers

    from export.tiny import write_tokenizer

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   id2label=LABELS, tie_word_embeddings=False)
    model = randomize(getattr(transformers, HEADS[task])(cfg).eval(), "qwen2")  # labels and spans not near-ties
    model.save_pretrained(out)
    write_tokenizer(out, 256)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """task -> (checkpoint, artifact), built once per module on demand."""
    from export.build import build

    root, made = tmp_path_factory.mktemp("task-artifacts"), {}

    def get(task: str):
        if task not in made:
            ckpt = _checkpoint(task, root / f"ckpt-{task}")
            made[task] = ckpt, build(str(ckpt), out=root / f"art-{task}", max_seq_len=64, max_batch=8,
                                     progress=False)
        return made[task]

    return get


@pytest.fixture(scope="module")
def artifact(built):
    return built("seq-cls")[1]


@pytest.fixture(scope="module")
def written(artifact, tmp_path_factory):
    _pb()
    return write_repository(artifact, tmp_path_factory.mktemp("triton-cls") / "repo", name=NAME)


@pytest.fixture(scope="module")
def repo(written, tmp_path_factory):
    """The repository the server runs: `written` with a long batcher delay, so that the concurrent requests of a
    test are merged for certain (eight one-row requests fill max_batch_size and go at once)."""
    copy = tmp_path_factory.mktemp("triton-cls-served") / "repo"
    shutil.copytree(written, copy)
    cfg = copy / NAME / "config.pbtxt"
    text = cfg.read_text()
    assert "max_queue_delay_microseconds: 1000\n" in text
    cfg.write_text(text.replace("max_queue_delay_microseconds: 1000\n", "max_queue_delay_microseconds: 500000\n"))
    validate_repository(copy)
    return copy.resolve()


@pytest.fixture(scope="module")
def classifier(artifact):
    return Classifier(artifact, threads=1)


def _parse(path):
    text_format, pb = _pb()
    cfg = pb.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def _io(tensors):
    _, pb = _pb()
    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in tensors}


# -- the repository --------------------------------------------------------------------------------------------------

def test_seq_cls_repository(written, artifact):
    _, pb = _pb()
    assert validate_repository(written) == [NAME, f"{NAME}_graph"]
    manifest = open_artifact(artifact)
    cfg = _parse(written / NAME / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.model_transaction_policy.decoupled
    assert "decoupled: false" in (written / NAME / "config.pbtxt").read_text()
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    assert cfg.max_batch_size == manifest.max_batch == 8
    assert _io(cfg.input) == {"text_input": ("TYPE_STRING", [1]), "input_ids": ("TYPE_INT64", [-1])}
    assert all(t.optional for t in cfg.input)
    assert {t.name for t in cfg.input if t.allow_ragged_batch} == {"input_ids"}
    assert _io(cfg.output) == {"logits": ("TYPE_FP32", [3]), "label": ("TYPE_STRING", [1]),
                               "score": ("TYPE_FP32", [1])}
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert "max_answer_len" not in cfg.parameters and cfg.parameters["artifact"].string_value == "artifact"
    version = written / NAME / "1"
    assert (version / "model.py").read_text() == CLASSIFY_MODEL_SOURCE.read_text()
    assert (version / "runtime" / "runtime_py" / "classify.py").is_file()
    open_artifact(version / "artifact")  # a complete copy: every checksum holds
    graph = _parse(written / f"{NAME}_graph" / "config.pbtxt")
    assert graph.platform == "onnxruntime_onnx" and graph.max_batch_size == 0
    assert _io(graph.input) == {"input_ids": ("TYPE_INT64", [-1, -1])}
    assert _io(graph.output) == {"logits": ("TYPE_FP32", [-1, 3])}
    assert (written / f"{NAME}_graph" / "1" / "model.onnx").is_file()
    readme = (written / "README.md").read_text()
    assert "dynamic_batching { max_queue_delay_microseconds: 1000 }" in readme and "client.infer" in readme
    assert "`logits` (FP32 [3])" in readme and "'neg', 'pos', 'mid'" in readme


@pytest.mark.parametrize("task", ["token-cls", "qa"])
def test_token_cls_and_qa_repositories(built, tmp_path, task):
    _pb()
    repo = write_repository(built(task)[1], tmp_path / "repo", name="clf", max_batch=4)
    assert validate_repository(repo) == ["clf", "clf_graph"]
    cfg = _parse(repo / "clf" / "config.pbtxt")
    assert not cfg.model_transaction_policy.decoupled and cfg.HasField("dynamic_batching")
    assert cfg.max_batch_size == 4
    expected_in = {"text_input": ("TYPE_STRING", [1]), "input_ids": ("TYPE_INT64", [-1])} if task == "token-cls" \
        else {"question": ("TYPE_STRING", [1]), "context": ("TYPE_STRING", [1]), "input_ids": ("TYPE_INT64", [-1])}
    assert _io(cfg.input) == expected_in
    graph = _parse(repo / "clf_graph" / "config.pbtxt")
    if task == "token-cls":
        assert _io(cfg.output) == {"logits": ("TYPE_FP32", [-1, 3]), "labels": ("TYPE_STRING", [-1]),
                                   "num_tokens": ("TYPE_INT64", [1])}
        assert _io(graph.output) == {"logits": ("TYPE_FP32", [-1, -1, 3])}
    else:
        assert _io(cfg.output) == {"start_logits": ("TYPE_FP32", [-1]), "end_logits": ("TYPE_FP32", [-1]),
                                   "num_tokens": ("TYPE_INT64", [1]), "answer": ("TYPE_STRING", [1]),
                                   "answer_start": ("TYPE_INT64", [1]), "answer_end": ("TYPE_INT64", [1]),
                                   "answer_score": ("TYPE_FP32", [1])}
        assert cfg.parameters["max_answer_len"].string_value == "15"
        assert _io(graph.output) == {"start_logits": ("TYPE_FP32", [-1, -1]), "end_logits": ("TYPE_FP32", [-1, -1])}
    readme = (repo / "README.md").read_text()
    assert ('"question"' in readme) == (task == "qa") and "client.infer(\"clf\"" in readme


BROKEN = [  # (old text, new text, expected error)
    ("decoupled: false", "decoupled: true", "must not be decoupled"),
    ("dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n", "", "needs dynamic_batching"),
    ("max_batch_size: 8", "max_batch_size: 9", "max_batch_size must be in [1, 8]"),
    ('name: "logits"\n  data_type: TYPE_FP32\n  dims: 3', 'name: "logits"\n  data_type: TYPE_FP32\n  dims: 4',
     "'logits' has dims [4]"),
    ('name: "label"\n  data_type: TYPE_STRING', 'name: "label"\n  data_type: TYPE_FP32',
     "'label' has data_type TYPE_FP32"),
    ('name: "score"', 'name: "probability"', "unexpected ['probability']"),
    ("  allow_ragged_batch: true\n", "", "'input_ids' must set allow_ragged_batch"),
    ('dims: 1\n  optional: true', 'dims: 1', "'text_input' must be optional"),
    ('string_value: "0"', 'string_value: "-1"', "ort_threads"),
]


@pytest.mark.parametrize("old,new,error", BROKEN, ids=[b[2] for b in BROKEN])
def test_hand_broken_classify_config_is_rejected(written, tmp_path, old, new, error):
    assert_broken_config_rejected(written, tmp_path, NAME, old, new, error)


def test_model_kinds_must_fit_the_artifact(written, tmp_path):
    """The streaming model on a task artifact, or the classify model on another task's I/O, is refused."""
    broken = tmp_path / "repo"
    shutil.copytree(written, broken)
    shutil.copy2(MODEL_SOURCE, broken / NAME / "1" / "model.py")  # the LM's model.py, the LM's rules
    with pytest.raises(RepositoryError, match="must be decoupled"):
        validate_repository(broken)
    src = CLASSIFY_MODEL_SOURCE.read_text()
    seq_cls_inputs = '    "seq-cls": {"text_input"'
    (broken / NAME / "1" / "model.py").write_text(src.replace(seq_cls_inputs, '    "other": {"text_input"', 1))
    with pytest.raises(RepositoryError, match="is a seq-cls artifact"):
        validate_repository(broken)
    (broken / NAME / "1" / "model.py").write_text(src.replace('KIND = "classify"', 'KIND = "embed"'))
    with pytest.raises(RepositoryError, match="KIND 'embed'"):
        validate_repository(broken)


def test_writer_limits(artifact, tmp_path):
    _pb()
    with pytest.raises(ValueError, match="--max-batch 9 > the artifact's 8"):
        write_repository(artifact, tmp_path / "r1", max_batch=9)
    nopad = tmp_path / "nopad"
    shutil.copytree(artifact, nopad)
    manifest = json.loads((nopad / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    manifest["spec"]["pad_token_id"] = None
    write_manifest(nopad, manifest)
    with pytest.raises(ValueError, match="without pad_token_id"):
        write_repository(nopad, tmp_path / "r2", max_batch=2)
    repo = write_repository(nopad, tmp_path / "r3")
    assert _parse(repo / NAME / "config.pbtxt").max_batch_size == 1
    assert "no `pad_token_id`" in (repo / "README.md").read_text()
    cfg = repo / NAME / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 1", "max_batch_size: 2"))
    with pytest.raises(RepositoryError, match="max_batch_size must be 1"):
        validate_repository(repo)


def test_cli_writes_a_task_repository(artifact, tmp_path, capsys):
    _pb()
    from export import triton_cmd

    parser = argparse.ArgumentParser()
    triton_cmd.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "repo"
    assert triton_cmd.run(parser.parse_args(["triton", str(artifact), "--out", str(out), "--max-batch", "4"])) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())
    assert validate_repository(out) == ["llm", "llm_graph"]
    assert _parse(out / "llm" / "config.pbtxt").max_batch_size == 4


# -- the model's batch logic, without Triton -------------------------------------------------------------------------

def _getter(values: dict):
    arrays = {}
    for name, rows in values.items():
        if name == "input_ids":
            arrays[name] = np.array(rows, dtype=np.int64)
        else:
            arrays[name] = np.array([[r if isinstance(r, bytes) else r.encode()] for r in rows], dtype=np.object_)
    return arrays.get


def _run(clf, task, requests):
    parsed = []
    for r in requests:
        try:
            parsed.append(encode(clf, parse_request(_getter(r), task)))
        except RequestError as e:
            parsed.append(e)
    return infer(clf, parsed)


def test_parse_request_rules(classifier):
    assert parse_request(_getter({"text_input": ["a", "b"]}), "seq-cls") == [("text", "a"), ("text", "b")]
    assert parse_request(_getter({"input_ids": [[1, 2]]}), "token-cls") == [("ids", [1, 2])]
    assert parse_request(_getter({"question": ["q"], "context": ["c"]}), "qa") == [("pair", ("q", "c"))]
    for values, task, match in [({}, "seq-cls", "exactly one of"),
                                ({"text_input": ["a"], "input_ids": [[1]]}, "seq-cls", "exactly one of"),
                                ({"text_input": [b"\xff"]}, "seq-cls", "UTF-8"),
                                ({"text_input": [""]}, "token-cls", "empty"),
                                ({"question": ["q"]}, "qa", "go together"),
                                ({"question": ["q", "r"], "context": ["c"]}, "qa", "2 'question' rows"),
                                ({"question": ["q"], "context": ["c"], "input_ids": [[1]]}, "qa", "either")]:
        with pytest.raises(RequestError, match=match):
            parse_request(_getter(values), task)
    with pytest.raises(RequestError, match="context length"):
        encode(classifier, [("text", "x" * 100)])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        encode(classifier, [("ids", [1, 256])])


def test_infer_seq_cls_equals_classifier(classifier):
    requests = [{"text_input": [TEXTS[0]]}, {"text_input": [b"\xff"]}, {"text_input": TEXTS[1:3]},
                {"input_ids": [[5, 9, 200]]}, {"text_input": ["x" * 100]}]
    results = _run(classifier, "seq-cls", requests)
    assert [isinstance(r, Exception) for r in results] == [False, True, False, False, True]
    rows = [classifier.encode(t) for t in TEXTS[:3]] + [[5, 9, 200]]
    ref = classifier.classify(rows)
    got = np.concatenate([results[i]["logits"] for i in (0, 2, 3)])
    np.testing.assert_allclose(got, np.array(ref.logits), atol=1e-5)
    labels = [x[0].decode() for i in (0, 2, 3) for x in results[i]["label"]]
    assert labels == ref.labels
    np.testing.assert_allclose([s for i in (0, 2, 3) for s in results[i]["score"][:, 0]], ref.scores, atol=1e-6)


def test_infer_token_cls_equals_classifier(built):
    clf = Classifier(built("token-cls")[1], threads=1)
    requests = [{"text_input": [TEXTS[1], TEXTS[2]]}, {"input_ids": [[7, 8, 9, 10]]}, {"text_input": [""]}]
    results = _run(clf, "token-cls", requests)
    assert isinstance(results[2], RequestError)
    rows = [clf.encode(TEXTS[1]), clf.encode(TEXTS[2]), [7, 8, 9, 10]]
    ref = clf.classify(rows)
    out = [(results[0], 0), (results[0], 1), (results[1], 0)]
    assert results[0]["logits"].shape == (2, len(rows[0]), 3)  # padded to the request's longest row
    for k, (res, b) in enumerate(out):
        n = int(res["num_tokens"][b, 0])
        assert n == len(rows[k])
        np.testing.assert_allclose(res["logits"][b, :n], np.array(ref.logits[k]), atol=1e-5)
        assert [x.decode() for x in res["labels"][b, :n]] == ref.labels[k]
        assert not res["logits"][b, n:].any() and all(x == b"" for x in res["labels"][b, n:])


def test_infer_qa_equals_classifier(built):
    clf = Classifier(built("qa")[1], threads=1)
    pairs = [("Who jumps?", "The quick brown fox jumps over the lazy dog."), ("Where?", "Once upon a time")]
    requests = [{"question": [pairs[0][0]], "context": [pairs[0][1]]}, {"question": ["q"], "context": [""]},
                {"question": [pairs[1][0]], "context": [pairs[1][1]]}, {"input_ids": [[40, 41, 42, 43, 44]]}]
    results = _run(clf, "qa", requests)
    assert isinstance(results[1], RequestError)
    ref = clf.answer(pairs=pairs)
    ref_ids = clf.answer(inputs=[[40, 41, 42, 43, 44]])
    for res, start, end, ans in [(results[0], ref.start_logits[0], ref.end_logits[0], ref.answers[0]),
                                 (results[2], ref.start_logits[1], ref.end_logits[1], ref.answers[1]),
                                 (results[3], ref_ids.start_logits[0], ref_ids.end_logits[0], ref_ids.answers[0])]:
        assert int(res["num_tokens"][0, 0]) == len(start)
        np.testing.assert_allclose(res["start_logits"][0], start, atol=1e-5)
        np.testing.assert_allclose(res["end_logits"][0], end, atol=1e-5)
        assert res["answer"][0, 0].decode() == ans["text"]
        assert (int(res["answer_start"][0, 0]), int(res["answer_end"][0, 0])) == \
            ((ans["start"], ans["end"]) if ans["start"] is not None else (-1, -1))
        assert float(res["answer_score"][0, 0]) == pytest.approx(ans["score"], abs=1e-6)


# -- end to end: the real tritonserver -------------------------------------------------------------------------------

def _infer(url: str, values: dict):
    """One request on its own client: (outputs, None) or (None, error)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, arr in ((n, _getter(values)(n)) for n in values):
        t = grpcclient.InferInput(name, list(arr.shape), "INT64" if name == "input_ids" else "BYTES")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(NAME, inputs, client_timeout=60)
        return {n: result.as_numpy(n) for n in OUTPUTS["seq-cls"]}, None
    except InferenceServerException as e:
        return None, e
    finally:
        client.close()


def _concurrently(url: str, requests: list[dict]) -> list:
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def one(i):
        barrier.wait(timeout=30)
        results[i] = _infer(url, requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    return results


def _stats(url: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        s = client.get_inference_statistics(NAME).model_stats[0]
        return s.inference_count, s.execution_count
    finally:
        client.close()


def test_concurrent_requests_are_batched_and_equal_classifier_and_transformers(server, classifier, built):
    from transformers import Qwen2ForSequenceClassification

    assert INPUTS["seq-cls"].keys() == {"text_input", "input_ids"}
    requests = [{"text_input": [t]} for t in TEXTS[:5]] + [{"input_ids": [[5, 9, 200]]},
                                                           {"input_ids": [[17, 33, 81, 99, 120, 3, 4]]}]
    requests[2] = {"text_input": TEXTS[2:4]}  # one request of two rows: 8 rows in all = max_batch_size
    requests.append({"text_input": [TEXTS[5]]})
    rows = [r for req in requests for r in (req.get("input_ids") or [classifier.encode(t) for t in req["text_input"]])]
    assert len(rows) == 9 and len(requests) == 8
    inferences, executions = _stats(server)
    results = _concurrently(server, requests)
    for i, (out, error) in enumerate(results):
        assert error is None, f"request {i}: {error}"
    got = np.concatenate([out["logits"] for out, _ in results])
    labels = [x[0].decode() for out, _ in results for x in out["label"]]
    scores = np.concatenate([out["score"][:, 0] for out, _ in results])
    after = _stats(server)
    # 9 rows, max_batch_size 8: merged into at most a few executions, never one per request
    assert after[0] - inferences == 9 and after[1] - executions < len(requests), (after, inferences, executions)

    ref = classifier.classify(rows)
    np.testing.assert_allclose(got, np.array(ref.logits), atol=1e-5)
    assert labels == ref.labels
    np.testing.assert_allclose(scores, ref.scores, atol=1e-6)

    hf = Qwen2ForSequenceClassification.from_pretrained(str(built("seq-cls")[0]), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # right padding with pad_token_id 0
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert labels == [LABELS[int(i)] for i in expected.argmax(-1)]


def test_ragged_input_ids_requests_run_as_one_batch(server, classifier):
    """input_ids of eight lengths (allow_ragged_batch): one execution of eight rows (max_batch_size)."""
    rows = [[(7 * i + 3 * j) % 250 + 3 for j in range(i + 2)] for i in range(8)]
    before = _stats(server)
    results = _concurrently(server, [{"input_ids": [r]} for r in rows])
    after = _stats(server)
    assert (after[0] - before[0], after[1] - before[1]) == (8, 1)
    assert all(error is None for _, error in results), results
    ref = classifier.classify(rows)
    np.testing.assert_allclose(np.concatenate([out["logits"] for out, _ in results]), np.array(ref.logits),
                               atol=1e-5)


def test_bad_requests_in_a_batch_get_their_own_errors(server, classifier):
    bad = [({"text_input": [""]}, "'text_input' row 0 is empty"),
           ({"text_input": [b"\xff\xfe"]}, "not valid UTF-8"),
           ({"text_input": ["x" * 100]}, "context length 64"),
           ({"input_ids": [[5, 999]]}, "outside the vocabulary"),
           ({"text_input": ["a"], "input_ids": [[5]]}, "exactly one of")]
    good = [{"text_input": [t]} for t in TEXTS[:3]]
    before = _stats(server)
    results = _concurrently(server, good + [b for b, _ in bad])
    # the text requests, good and bad, share executions: the bad ones are answered with errors from inside a batch
    assert _stats(server)[1] - before[1] < len(good) + len(bad)
    ref = classifier.classify([classifier.encode(t) for t in TEXTS[:3]])
    for i, (out, error) in enumerate(results[:3]):
        assert error is None, error
        np.testing.assert_allclose(out["logits"][0], ref.logits[i], atol=1e-5)
    for (out, error), (_, message) in zip(results[3:], bad):
        assert out is None and error is not None and message in str(error), (message, error)
    out, error = _infer(server, {"text_input": [TEXTS[0]]})  # still serving
    assert error is None and out["label"][0, 0].decode() == ref.labels[0]


def test_readme_client_example_runs(server, written, classifier, capsys):
    readme = (written / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:8001"' in code
    scope: dict = {}
    exec(compile(code.replace('"localhost:8001"', repr(server)), "README.md", "exec"), scope)  # noqa: S102
    ref = classifier.classify([classifier.encode(t) for t in scope["texts"]])
    assert scope["labels"] == ref.labels
    np.testing.assert_allclose(scope["logits"], np.array(ref.logits), atol=1e-5)
    assert capsys.readouterr().out.count("\n") == len(scope["texts"])
