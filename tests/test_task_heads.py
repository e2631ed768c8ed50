"""Task heads (issue #15): sequence classification, token classification and extractive QA on every family.

Each case is a tiny random transformers ``*ForSequenceClassification`` / ``*ForTokenClassification`` /
``*ForQuestionAnswering`` checkpoint (save_pretrained) on a trap body of conftest.CASES (windows shorter than the
inputs, softcaps that bite, head_dim 24, MQA, MoE dense + sparse, tied-embedding configs). The artifact is built
with `export build` and run through runtime_py.classify (ONNX Runtime): for a right-padded batch of different-length
inputs its logits must be within 1e-4 of transformers' fp32 ones, the pooled token, labels (id2label) and QA spans
(transformers' own span rule, pipelines.document_question_answering.select_starts_ends) equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.spec import UnsupportedConfigError, spec_from_config
from tests.conftest import CASES, hf_config, randomize
from tests.helpers import needs_trt

LABELS = {0: "neg", 1: "pos", 2: "mid"}
HF_CLASS = {"seq-cls": "ForSequenceClassification", "token-cls": "ForTokenClassification",
            "qa": "ForQuestionAnswering"}
PREFIX = {"qwen2": "Qwen2", "gemma2": "Gemma2", "qwen3_moe": "Qwen3Moe"}

# every family x every head transformers defines for it (Gemma2 has no QA head), each on a trap body
HEADS = [
    ("qwen2_window", "seq-cls"),  # window 5 < the inputs, GQA, qkv bias
    ("qwen2_mqa_tied_linear", "token-cls"),  # MQA, tie_word_embeddings=true (nothing to tie), linear RoPE
    ("qwen2_yarn", "qa"),
    ("gemma2", "seq-cls"),  # softcaps that bite, head_dim 24, window 5
    ("gemma2_mqa_untied", "token-cls"),  # MQA, GQA kernel with softcap; token_classification_bias false below
    ("qwen3_moe_mixed", "seq-cls"),  # dense + sparse layers, renormalised top-k
    ("qwen3_moe_nonorm", "token-cls"),
    ("qwen3_moe_mixed", "qa"),
]
# A second lowering on one case per family (the first is the default, ort): reference (unfused) and trt-native
OTHER = [("qwen2_mqa_tied_linear", "token-cls", "reference"), ("gemma2", "seq-cls", "trt-native"),
         ("qwen3_moe_mixed", "seq-cls", "reference"), ("qwen2_yarn", "qa", "trt-native")]

LENGTHS = (9, 5, 7)  # different lengths, longer than the windows (5)


def _fields(case: str, task: str, pad: int | None = 0, **extra) -> tuple[str, dict]:
    family, fields = CASES[case]
    fields = dict(fields, pad_token_id=pad, **extra)
    if task != "qa":
        fields["id2label"] = LABELS
    if case == "gemma2_mqa_untied" and task == "token-cls":
        fields["token_classification_bias"] = False
    return family, fields


def save_task_checkpoint(out: Path, case: str, task: str, seed: int = 0, **kw) -> Path:
    import transformers

    from export.tiny import write_tokenizer

    family, fields = _fields(case, task, **kw)
    cls = getattr(transformers, PREFIX[family] + HF_CLASS[task])
    torch.manual_seed(seed)
    model = randomize(cls(hf_config(family, fields)).eval(), family)
    model.save_pretrained(str(out))
    write_tokenizer(out, 256)
    return out


@pytest.fixture(scope="module")
def task_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_ckpt")
    made = {}

    def get(case: str, task: str) -> Path:
        if (case, task) not in made:
            made[case, task] = save_task_checkpoint(root / f"{case}-{task}", case, task)
        return made[case, task]

    return get


@pytest.fixture(scope="module")
def task_artifact(task_ckpt, tmp_path_factory):
    from export.build import build

    root = tmp_path_factory.mktemp("task_art")
    made = {}

    def get(case: str, task: str, lowering: str | None = None, **kw) -> Path:
        key = (case, task, lowering, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = build(str(task_ckpt(case, task)), out=root / f"{case}-{task}-{lowering}-{len(made)}",
                              lowering=lowering, max_seq_len=64, progress=False, **kw)
        return made[key]

    return get


def hf_task_model(path: Path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def _batch(pad: int = 0, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _hf_run(model, inputs: list[list[int]], pad: int):
    S = max(len(p) for p in inputs)
    ids = torch.full((len(inputs), S), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), S), dtype=torch.long)
    for b, p in enumerate(inputs):
        ids[b, :len(p)], mask[b, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


def _check_against_hf(artifact: Path, ckpt: Path, task: str):
    from runtime_py.classify import Classifier

    clf = Classifier(artifact)
    hf = hf_task_model(ckpt)
    inputs = _batch()
    if task == "seq-cls":
        inputs[1] = inputs[1][:-1] + [0]  # a row whose last token is the pad id: pooled one token earlier, as HF
    out = _hf_run(hf, inputs, pad=0)
    if task == "qa":
        res = clf.answer(inputs=inputs)
        for b, p in enumerate(inputs):
            np.testing.assert_allclose(res.start_logits[b], out.start_logits[b, :len(p)].numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(res.end_logits[b], out.end_logits[b, :len(p)].numpy(), atol=1e-4, rtol=0)
        return
    res = clf.classify(inputs)
    if task == "seq-cls":
        np.testing.assert_allclose(np.array(res.logits), out.logits.numpy(), atol=1e-4, rtol=0)
        assert res.labels == [LABELS[int(i)] for i in out.logits.argmax(-1)]
        probs = torch.softmax(out.logits, -1).max(-1).values.numpy()
        np.testing.assert_allclose(res.scores, probs, atol=1e-5)
    else:
        for b, p in enumerate(inputs):
            np.testing.assert_allclose(np.array(res.logits[b]), out.logits[b, :len(p)].numpy(), atol=1e-4, rtol=0)
            assert res.labels[b] == [LABELS[int(i)] for i in out.logits[b, :len(p)].argmax(-1)]


@pytest.mark.parametrize("case,task", HEADS, ids=[f"{c}-{t}" for c, t in HEADS])
def test_head_matches_transformers(case, task, task_ckpt, task_artifact):
    """Default lowering (ort: fused GQA / MoE where the shapes allow): logits, pooling and labels equal HF's."""
    art = task_artifact(case, task)
    m = json.loads((art / "manifest.json").read_text())
    graph = m["graphs"]["decoder"]
    assert [i["name"] for i in graph["inputs"]] == ["input_ids"] and graph["kv_binding"] == "none"
    assert m["spec"]["task"] == task and graph["fusion"]["sealed"]["present_outputs_dropped"] == 2 * len(
        m["spec"]["layers"])
    _check_against_hf(art, task_ckpt(case, task), task)


@pytest.mark.parametrize("case,task,lowering", OTHER, ids=["-".join(o) for o in OTHER])
def test_head_other_lowering_matches_transformers(case, task, lowering, task_ckpt, task_artifact):
    """The same heads through the reference (unfused) and trt-native (opset-23 Attention) graphs."""
    art = task_artifact(case, task, lowering)
    assert json.loads((art / "manifest.json").read_text())["graphs"]["decoder"]["lowering"] == lowering
    _check_against_hf(art, task_ckpt(case, task), task)


def test_qa_span_is_the_pipeline_rule(task_ckpt, task_artifact):
    """A question/context pair: the pair encoding of the tokenizer, the span transformers' QA rule picks from HF's
    logits (context tokens only, max_answer_len 15) and its text cut from the context."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    from runtime_py.classify import Classifier

    art = task_artifact("qwen3_moe_mixed", "qa")
    clf = Classifier(art)
    hf = hf_task_model(task_ckpt("qwen3_moe_mixed", "qa"))
    pairs = [("Who is fine?", "I am fine, thank you. Numbers: 0 1 2 3"), ("How are you?", "Hello world! How are "
                                                                                           "you today?")]
    res = clf.answer(pairs=pairs)
    for b, (q, c) in enumerate(pairs):
        ids, seq, offsets = clf.tokenizer.encode_pair(q, c)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]))
        p_mask = np.array([[0 if s == 1 else 1 for s in seq]])
        starts, ends, _scores, _ = select_starts_ends(out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
                                                      np.ones_like(p_mask))
        answer = res.answers[b]
        assert (answer["start"], answer["end"]) == (int(starts[0]), int(ends[0]))
        assert answer["text"] == c[offsets[starts[0]][0]:offsets[ends[0]][1]] and answer["text"]
        assert all(seq[i] == 1 for i in range(answer["start"], answer["end"] + 1))  # inside the context


def test_best_span_is_select_starts_ends_in_a_band():
    """best_span against transformers' select_starts_ends (top 1) on random logits: lengths 2-300, answer lengths
    1 to past the input, masks with a few or most tokens allowed, quantized logits full of ties; and its memory is
    the [L, K] band's, not the L x L product's (8192 tokens: 0.5 GiB of float64 each time in the pipeline's rule)."""
    import tracemalloc

    from transformers.pipelines.document_question_answering import select_starts_ends

    from runtime_py.classify import best_span

    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(300):
        n = int(rng.integers(2, 300))
        k = int(rng.choice([1, 2, 15, 40, n + 5]))
        start, end = (rng.normal(size=n).astype(np.float32) for _ in range(2))
        if trial % 3 == 0:  # ties everywhere
            start, end = np.round(start), np.round(end)
        allowed = rng.random(n) < (0.2 if trial % 2 else 0.9)
        allowed[rng.integers(1, n)] = True
        allowed[0] = False  # the pipeline zeroes position 0 (BERT's CLS); a (question, context) pair never allows it
        p_mask = (~allowed).astype(np.int64)[None]
        # in float64, as best_span computes: the pipeline's float32 products break exact ties (a + c == b + d) by
        # rounding, so a float32 oracle picks either pair at random
        starts, ends, scores, _ = select_starts_ends(start[None].astype(np.float64), end[None].astype(np.float64),
                                                     p_mask, np.ones_like(p_mask), max_answer_len=k)
        got = best_span(start, end, allowed, k)
        if len(starts) == 0:
            assert got is None
            continue
        assert got is not None and got[:2] == (int(starts[0]), int(ends[0])), (trial, n, k, got, starts, ends)
        assert got[2] == pytest.approx(float(scores[0]), rel=1e-5)
        compared += 1
    assert compared > 200
    n = 8192
    logits = rng.normal(size=n)
    tracemalloc.start()
    best_span(logits, logits[::-1].copy(), np.ones(n, dtype=bool))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * n * 15 * 4, peak  # a few [L, 15] float64 arrays; the L x L product is 537 MB


def test_seq_cls_without_pad_token(tmp_path):
    """No pad_token_id: one input pools its last token (as HF); a batch of two is refused with HF's words."""
    from export.build import build
    from runtime_py.classify import NO_PAD, Classifier

    ckpt = save_task_checkpoint(tmp_path / "ckpt", "qwen2_window", "seq-cls", pad=None)
    art = build(str(ckpt), out=tmp_path / "art", max_seq_len=64, progress=False)
    clf = Classifier(art)
    hf = hf_task_model(ckpt)
    one = _batch()[0]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([one])).logits.numpy()
    np.testing.assert_allclose(np.array(clf.classify([one]).logits), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):
        clf.classify(_batch()[:2])
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):  # transformers refuses it too
        with torch.no_grad():
            hf(input_ids=torch.tensor([one[:5], one[:5]]))
    assert NO_PAD in str(pytest.raises(ValueError, clf.classify, _batch()[:2]).value)


@pytest.mark.parametrize("scheme,case,task", [("int4", "qwen2_window", "seq-cls"), ("int8", "qwen3_moe_mixed", "qa")])
def test_quantized_head(scheme, case, task, task_artifact):
    """int4/int8 weights on a task body: the ort graph (MatMulNBits/QMoE at fp32 compute) equals the reference
    graph (DequantizeLinear on the same quantized weights) within 1e-4, and differs from the float artifact."""
    from runtime_py.classify import Classifier

    ort_art = task_artifact(case, task, "ort", quantize=scheme, accuracy_level=1)
    ref_art = task_artifact(case, task, "reference", quantize=scheme)
    q = json.loads((ort_art / "manifest.json").read_text())["quantization"]
    assert q["counts"]["linear"] > 0 and q["counts"]["lm_head"] == 0
    for art in (ort_art, ref_art):  # the [labels, H] head stays float for every task (it was int for qa/token-cls)
        tensors = json.loads((art / "manifest.json").read_text())["quantization"]["tensors"]
        assert tensors["decoder.head.weight"] == {"scheme": "float"}, tensors["decoder.head.weight"]
    inputs = _batch()
    run = lambda art: np.array(Classifier(art).forward(inputs)[0])  # noqa: E731 - first input's raw outputs
    got, ref, fp32 = run(ort_art), run(ref_art), run(task_artifact(case, task))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - fp32).max() > 1e-3  # the weights really are quantized


@needs_trt
def test_tensorrt_rtx_engine_builds_for_a_head(task_ckpt, tmp_path):
    """--backend tensorrt: TensorRT-RTX builds the sealed graph's engine (one profile, input_ids only) here."""
    from export.build import build

    art = build(str(task_ckpt("gemma2", "seq-cls")), backend="tensorrt", out=tmp_path / "trt", max_seq_len=64,
                max_batch=4, progress=False)
    engine = json.loads((art / "manifest.json").read_text())["engine"]
    assert list(engine["profiles"]) == ["forward"]
    assert [t["name"] for t in engine["io"]["inputs"]] == ["input_ids"]
    assert [t["name"] for t in engine["io"]["outputs"]] == ["logits"] and engine["io"]["outputs"][0]["shape"][-1] == 3
    assert (art / engine["file"]).stat().st_size > 0


# -- config and CLI contract ------------------------------------------------------------------------------------
def _config(family="qwen2", **kw) -> dict:
    fields = dict(CASES["qwen2_window" if family == "qwen2" else "gemma2"][1], **kw)
    return json.loads(hf_config(family, fields).to_json_string())  # as config.json holds it (string label ids)


def test_architectures_select_the_head_and_task_flag_must_agree():
    spec = spec_from_config(_config(architectures=["Qwen2ForSequenceClassification"], id2label=LABELS))
    assert (spec.task, spec.id2label, spec.num_labels, spec.head_bias) == ("seq-cls", ("neg", "pos", "mid"), 3, False)
    assert spec_from_config(_config(architectures=["Qwen2ForTokenClassification"])).head_bias is True
    assert spec_from_config(_config(architectures=["Qwen2ForQuestionAnswering"])).num_labels == 2
    assert spec_from_config(_config(architectures=["Qwen2ForCausalLM"])).task == "causal-lm"
    assert spec_from_config(_config(), task="seq-cls").id2label == ("LABEL_0", "LABEL_1")  # transformers' default
    with pytest.raises(UnsupportedConfigError, match="contradicts"):
        spec_from_config(_config(architectures=["Qwen2ForCausalLM"]), task="seq-cls")
    with pytest.raises(UnsupportedConfigError, match="no qa head for gemma2"):
        spec_from_config(_config("gemma2"), task="qa")
    with pytest.raises(UnsupportedConfigError, match="Qwen2Model"):
        spec_from_config(_config(architectures=["Qwen2Model"]))
    with pytest.raises(UnsupportedConfigError, match="Gemma2ForQuestionAnswering"):
        spec_from_config(_config("gemma2", architectures=["Gemma2ForQuestionAnswering"]))


@pytest.mark.parametrize("num_labels", [1, 3])
def test_num_labels_without_id2label_names_them_as_transformers_does(num_labels):
    from transformers import Qwen2Config

    cfg = _config(architectures=["Qwen2ForSequenceClassification"])
    cfg.pop("id2label", None), cfg.pop("label2id", None)
    cfg["num_labels"] = num_labels  # what some config.json files hold: no id2label at all
    theirs = Qwen2Config(**cfg).id2label
    assert spec_from_config(cfg).id2label == tuple(theirs[i] for i in range(len(theirs))) == tuple(
        f"LABEL_{i}" for i in range(num_labels))


@pytest.mark.parametrize("id2label,label2id,match", [
    ({"0": "a", "2": "b"}, None, "none missing"),
    ({"0": "a", "x": "b"}, None, "id2label"),
    ({"0": "a", "1": 7}, None, "id2label"),
    ({"0": "a", "1": "b"}, {"a": 1, "b": 0}, "label2id"),
    ({"0": "a", "\u00b2": "b"}, None, "field 'id2label' must be"),  # str.isdigit() takes '²'; int() does not
])
def test_bad_labels_are_refused(id2label, label2id, match):
    cfg = _config(architectures=["Qwen2ForSequenceClassification"])
    cfg["id2label"], cfg["label2id"] = id2label, label2id
    with pytest.raises(UnsupportedConfigError, match=match):
        spec_from_config(cfg)


def test_cli_contract(task_ckpt, task_artifact, artifacts, tmp_path, capsys):
    """classify --json shapes; bad combinations exit 2 with one error line and leave nothing behind."""
    from export.__main__ import main as export_main
    from runtime_py.__main__ import main as run_main

    seq = task_artifact("qwen2_window", "seq-cls")
    capsys.readouterr()
    assert run_main(["classify", str(seq), "--text", "Hello world", "--text", "How are you today?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"logits", "labels"} and len(out["logits"]) == 2 and len(out["logits"][0]) == 3
    assert out["labels"] == [LABELS[int(np.argmax(row))] for row in out["logits"]]
    assert run_main(["classify", str(seq), "--prompt-ids", "5,6,7", "--prompt-ids", "8,9"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in LABELS.values()

    tok = task_artifact("qwen2_mqa_tied_linear", "token-cls")
    assert run_main(["classify", str(tok), "--prompt-ids", "5,6,7", "--prompt-ids", "8,9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(r) for r in out["logits"]] == [3, 2] and [len(r) for r in out["labels"]] == [3, 2]

    qa = task_artifact("qwen3_moe_mixed", "qa")
    assert run_main(["classify", str(qa), "--question", "Who?", "--context", "I am fine, thank you.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"start_logits", "end_logits", "answers"} and out["answers"][0]["text"]

    for argv, match in [
        (["classify", str(seq), "--question", "q", "--context", "c"], "question answering"),
        (["classify", str(qa), "--text", "x"], "question-answering artifact"),
        (["classify", str(qa), "--question", "a", "--question", "b", "--context", "c"], "one context per question"),
        (["classify", str(qa), "--question", "Who?", "--context", " "], "--context is empty"),
        (["classify", str(seq), "--text", "x", "--max-answer-len", "3"], "--max-answer-len are for question"),
        (["classify", str(qa), "--question", "", "--context", "hello world"], "--question is empty"),
        (["classify", str(seq)], "one way"),
        (["classify", str(seq), "--prompt-ids", ",".join(["5"] * 65)], "context length"),
        (["classify", str(seq), "--prompt-ids", "5,999"], "outside the vocabulary"),
        (["classify", str(artifacts("qwen2_window")), "--text", "x"], "causal-lm artifact"),
        (["generate", str(seq), "--prompt", "x"], "classify"),
    ]:
        assert run_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)

    ckpt = task_ckpt("qwen2_window", "seq-cls")
    for extra, match in [(["--task", "causal-lm"], "contradicts"), (["--kv-mode", "concat"], "no KV cache"),
                         (["--quantize", "int4", "--quantize-lm-head"], "no LM head")]:
        out_dir = tmp_path / "refused"
        assert export_main(["build", "--model", str(ckpt), "--out", str(out_dir), "--no-progress", *extra]) == 2
        assert match in capsys.readouterr().err and not out_dir.exists()


@pytest.mark.parametrize("problem_type, labels", [("regression", 1), (None, 1), ("multi_label_classification", 3),
                                                  ("single_label_classification", 3), (None, 3),
                                                  ("single_label_classification", 1)])
def test_seq_cls_scores_follow_the_problem_type_as_the_pipeline_does(problem_type, labels):
    from transformers.pipelines.text_classification import sigmoid, softmax

    from runtime_py.classify import label_scores

    cfg = _config(architectures=["Qwen2ForSequenceClassification"], problem_type=problem_type)
    cfg.pop("id2label", None), cfg.pop("label2id", None)
    cfg["num_labels"] = labels
    assert spec_from_config(cfg).problem_type == problem_type  # what the manifest records for classify
    row = np.array([2.05, -0.3, 0.7][:labels], np.float32)
    # TextClassificationPipeline: regression -> the value; multi-label or num_labels == 1 -> sigmoid; else softmax
    want = row if problem_type == "regression" else (
        sigmoid(row) if problem_type == "multi_label_classification" or labels == 1 else softmax(row))
    np.testing.assert_allclose(label_scores(row, problem_type), want, rtol=1e-6)
    cfg["problem_type"] = "ranking"
    with pytest.raises(UnsupportedConfigError, match="problem_type"):
        spec_from_config(cfg)


def test_text_output_keeps_one_field_per_label():
    from runtime_py.__main__ import _printable

    assert _printable("正\tx\n") == "正\\tx\\n" and _printable("pos") == "pos"
