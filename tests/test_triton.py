"""Triton model repositories: written atomically, every config.pbtxt valid, broken ones rejected, and served for real.

The end-to-end tests start the tritonserver bundled with nvidia-pytriton (CPU only, python backend only) on a
repository made from a tiny artifact, stream generations over gRPC and compare them with runtime_py's for the same
prompt, seed and parameters: greedy, seeded sampling, stop strings, chat messages, 8 concurrent streams, and bad
requests (each gets an error; the server keeps serving). The raw graph model cannot be loaded there (no ONNX Runtime
backend in pytriton), so it is checked the way Triton's ORT backend runs it: plain InferenceSession.run, no binding.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from artifacts.bundle import open_artifact
from artifacts.triton_check import validate_repository
from artifacts.triton_contract import RepositoryError
from artifacts.triton_write import write_repository
from runtime_py.sampling import SamplingParams
from runtime_py.triton_model import INPUTS, RequestError, echo_of, parse_request
from tests.triton_helpers import (GREEDY, NAME, artifact, assert_broken_config_rejected,  # noqa: F401 - fixtures
                                  expected_deltas, generator, getter, repo, server, start_server, stop_server,
                                  stream, stream_results, stub_python)


def _pb():
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format, model_config_pb2


# -- the written repository ---------------------------------------------------------------------------------------
def test_every_config_parses_as_model_config(repo, artifact):
    text_format, pb = _pb()
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == [NAME, f"{NAME}_graph"]
    parsed = {}
    for c in configs:
        cfg = pb.ModelConfig()
        text_format.Parse(c.read_text(), cfg)
        assert cfg.name == c.parent.name and cfg.max_batch_size == (1 if c.parent.name == NAME else 0)
        parsed[cfg.name] = cfg
    assert validate_repository(repo) == [NAME, f"{NAME}_graph"]

    py = parsed[NAME]
    assert py.backend == "python" and py.model_transaction_policy.decoupled
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in py.input} == \
        {n: (dt, dims) for n, (dt, dims, _) in INPUTS.items()}
    assert all(t.optional for t in py.input)
    assert [(t.name, pb.DataType.Name(t.data_type)) for t in py.output] == [
        ("text_output", "TYPE_STRING"), ("num_input_tokens", "TYPE_INT32"), ("num_output_tokens", "TYPE_INT32")]
    assert py.parameters["max_concurrency"].string_value == "8"
    assert (repo / NAME / "1" / "model.py").is_file() and (repo / NAME / "1" / "runtime" / "runtime_py").is_dir()
    open_artifact(repo / NAME / "1" / "artifact")  # a complete copy: every checksum holds

    graph = parsed[f"{NAME}_graph"]
    assert graph.backend == "onnxruntime" and graph.platform == "onnxruntime_onnx"
    manifest = open_artifact(artifact)
    io = manifest.decoder.to_dict()
    dt = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
    dims = lambda shape: [d if isinstance(d, int) else -1 for d in shape]  # noqa: E731
    for tensors, spec in ((graph.input, io["inputs"]), (graph.output, io["outputs"])):
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in tensors] == \
            [(s["name"], dt[s["dtype"]], dims(s["shape"])) for s in spec]
    assert any(t.name.startswith("past_key_values.") for t in graph.input)
    assert any(t.name.startswith("present.") for t in graph.output)
    assert (repo / f"{NAME}_graph" / "1" / "model.onnx").is_file()
    assert (repo / f"{NAME}_graph" / "1" / "model.onnx.data").is_file()
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "async_stream_infer" in readme
    assert "com.microsoft.GroupQueryAttention" in readme


BROKEN = [
    # (model, old text, new text, expected error)
    (NAME, 'backend: "python"', 'backend: "python"\nnot_a_field: 1', "not_a_field"),
    (NAME, "TYPE_INT32", "TYPE_INTEGER", "TYPE_INTEGER"),
    (NAME, 'name: "max_tokens"\n  data_type: TYPE_INT32', 'name: "max_tokens"\n  data_type: TYPE_FP32',
     "'max_tokens' has data_type TYPE_FP32"),
    (NAME, "decoupled: true", "decoupled: false", "must be decoupled"),
    (NAME, f'name: "{NAME}"', 'name: "other"', "must equal the directory name"),
    (NAME, 'string_value: "8"', 'string_value: "eight"', "max_concurrency"),
    # parameters model.py or the engine would refuse when the model loads (tritonserver then exits 1)
    (NAME, 'key: "max_queue"\n  value {\n    string_value: "64"', 'key: "max_queue"\n  value {\n    string_value: "-1"',
     "parameter max_queue must be a non-negative integer, got '-1'"),
    (NAME, 'key: "max_concurrency"\n  value {\n    string_value: "8"',
     'key: "max_concurrency"\n  value {\n    string_value: "9"', "max_concurrency 9 is more KV slots than the artifact has"),
    (NAME, 'key: "default_max_tokens"\n  value {\n    string_value: "32"',
     'key: "default_max_tokens"\n  value {\n    string_value: "100000"', "default_max_tokens 100000 leaves no room"),
    (NAME, 'string_value: "auto"', 'string_value: "tensorrt"', "the artifact has no TensorRT engine"),
    (f"{NAME}_graph", 'name: "past_key_values.0.key"\n  data_type: TYPE_FP32',
     'name: "past_key_values.0.key"\n  data_type: TYPE_FP16', "'past_key_values.0.key' has data_type TYPE_FP16"),
    (f"{NAME}_graph", 'name: "logits"', 'name: "scores"', "unexpected ['scores']"),
    (f"{NAME}_graph", "dims: 16", "dims: 0", "invalid dims"),
    (f"{NAME}_graph", 'backend: "onnxruntime"', 'backend: "tensorflow"', "backend 'tensorflow'"),
    (f"{NAME}_graph", "input {", "input {{", "not a valid Triton ModelConfig"),
]


@pytest.mark.parametrize("model,old,new,error", BROKEN, ids=[b[3] for b in BROKEN])
def test_hand_broken_config_is_rejected(repo, tmp_path, model, old, new, error):
    _pb()
    assert_broken_config_rejected(repo, tmp_path, model, old, new, error)


def test_missing_files_are_rejected(repo, tmp_path):
    _pb()
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / f"{NAME}_graph" / "1" / "model.onnx.data").unlink()
    with pytest.raises(RepositoryError, match="external data file .* is missing"):
        validate_repository(broken)
    shutil.rmtree(broken)
    shutil.copytree(repo, broken)
    (broken / NAME / "1" / "artifact" / "tokenizer.json").unlink()
    with pytest.raises(RepositoryError, match="artifact"):
        validate_repository(broken)
    # somebody else's python model (no INPUTS/OUTPUTS of ours): only the generic checks apply
    (broken / NAME / "1" / "model.py").write_text("class TritonPythonModel:\n    pass\n")
    assert validate_repository(broken) == [NAME, f"{NAME}_graph"]
    (broken / NAME / "1" / "model.py").unlink()
    with pytest.raises(RepositoryError, match="model.py is missing"):
        validate_repository(broken)


@pytest.mark.parametrize("flavour", ["tensorrt", "tensorrt_rtx"])
def test_engine_artifact_repository(artifact, tmp_path, flavour):
    """Full TensorRT engine -> tensorrt_plan model; TensorRT-RTX engine (no Triton backend) -> the ONNX graph.
    The engine here is a stand-in file: what is checked is the repository, not TensorRT."""
    text_format, pb = _pb()
    from artifacts.bundle import write_manifest

    fake = tmp_path / "engine-artifact"
    shutil.copytree(artifact, fake)
    (fake / "model.engine").write_bytes(b"stand-in engine")
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    manifest.update(backend="tensorrt", engine={"file": "model.engine", "flavour": flavour, "version": "10.9.0.34",
                                                "compute_capabilities": ["SM89"], "profiles": {},
                                                "io": {"inputs": [], "outputs": []}})  # what export/engine.py records
    write_manifest(fake, manifest)
    repo = write_repository(fake, tmp_path / "repo")
    assert validate_repository(repo) == [NAME, f"{NAME}_graph"]
    graph = pb.ModelConfig()
    text_format.Parse((repo / f"{NAME}_graph" / "config.pbtxt").read_text(), graph)
    py = pb.ModelConfig()
    text_format.Parse((repo / NAME / "config.pbtxt").read_text(), py)
    assert py.instance_group[0].kind == pb.ModelInstanceGroup.KIND_AUTO  # the engine runs on a GPU when present
    assert py.parameters["runtime_backend"].string_value == "auto"
    readme = (repo / "README.md").read_text()
    if flavour == "tensorrt":
        assert graph.platform == "tensorrt_plan" and graph.backend == "tensorrt"
        assert graph.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert (repo / f"{NAME}_graph" / "1" / "model.plan").read_bytes() == b"stand-in engine"
        assert not (repo / f"{NAME}_graph" / "1" / "model.onnx").exists()
        assert "TensorRT 10.9.0.34 engine" in readme
        cfg = repo / f"{NAME}_graph" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace("max_batch_size: 0", "max_batch_size: 4"))
        with pytest.raises(RepositoryError, match="max_batch_size must be 0"):
            validate_repository(repo)
    else:
        assert graph.platform == "onnxruntime_onnx"
        assert (repo / f"{NAME}_graph" / "1" / "model.onnx").is_file()
        assert "TensorRT-RTX 10.9.0.34 engine" in readme and "cannot" in readme


def test_invalid_repository_is_never_left_behind(artifact, tmp_path, monkeypatch):
    _pb()
    import artifacts.triton_write as triton

    def reject(path):
        raise RepositoryError(f"{path}: rejected on purpose")

    monkeypatch.setattr(triton, "validate_repository", reject)
    with pytest.raises(RepositoryError, match="on purpose"):
        write_repository(artifact, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []  # neither the repository nor its staging directory
    monkeypatch.undo()
    out = write_repository(artifact, tmp_path / "repo")
    with pytest.raises(ValueError, match="already exists"):
        write_repository(artifact, out)
    before = (out / NAME / "config.pbtxt").read_text()
    monkeypatch.setattr(triton, "validate_repository", reject)
    with pytest.raises(RepositoryError):
        write_repository(artifact, out, max_batch=3, overwrite=True)
    assert (out / NAME / "config.pbtxt").read_text() == before  # the old repository is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_cli_writes_and_prints_the_path_last(artifact, tmp_path, capsys):
    _pb()
    from export import triton_cmd

    parser = argparse.ArgumentParser()
    triton_cmd.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "repo"
    args = parser.parse_args(["triton", str(artifact), "--out", str(out), "--name", "tiny", "--instances", "2",
                              "--max-batch", "4"])
    assert triton_cmd.run(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())
    assert validate_repository(out) == ["tiny", "tiny_graph"]
    text = (out / "tiny" / "config.pbtxt").read_text()
    assert "count: 2" in text and 'string_value: "4"' in text
    assert triton_cmd.run(args) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    bad = parser.parse_args(["triton", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")])
    assert triton_cmd.run(bad) == 2 and not (tmp_path / "r2").exists()
    capsys.readouterr()
    for name, words in (("a" * 250, "at most 128 bytes"), ("../x", "letters, digits")):  # [Errno 36] before
        long = parser.parse_args(["triton", str(artifact), "--out", str(tmp_path / "r3"), "--name", name])
        assert triton_cmd.run(long) == 2 and not (tmp_path / "r3").exists()
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["triton", str(artifact), "--out", str(out), "--instances", "0"])


def test_serve_refuses_one_port_for_two_endpoints(repo, capsys):
    """tritonserver given one port twice printed its whole usage text and exited 1: refused here with exit 2."""
    from artifacts.triton import main as triton_main

    with pytest.raises(SystemExit) as e:
        triton_main(["serve", str(repo), "--grpc-port", "8101", "--http-port", "8101"])
    assert e.value.code == 2 and "must differ" in capsys.readouterr().err


# -- request parsing (what model.py does with each request) ---------------------------------------------------------

def test_parse_request_follows_the_runtime_cli():
    prompt, p, streamed = parse_request(getter({"text_input": b"Hi"}))
    assert prompt == ("text", "Hi") and p == SamplingParams(greedy=True, max_new_tokens=32) and streamed
    prompt, p, _ = parse_request(getter({"messages": json.dumps([{"role": "user", "content": "Hi"}]).encode(),
                                       "temperature": np.float32(0.5), "top_k": np.int32(5), "seed": np.int64(3),
                                       "stop": [b"a", b"bc"], "ignore_eos": np.bool_(True),
                                       "max_tokens": np.int32(7)}))
    assert prompt == ("messages", [{"role": "user", "content": "Hi"}])
    assert p == SamplingParams(greedy=False, temperature=0.5, top_k=5, seed=3, stop=("a", "bc"), ignore_eos=True,
                               max_new_tokens=7)
    assert parse_request(getter({"text_input": b"x", "top_p": np.float32(0.5)}))[1].greedy is False
    # what Triton's OpenAI-compatible frontend sends to a python model
    prompt, p, streamed = parse_request(getter({"text_input": b"Hi", "stream": np.bool_(False),
                                                 "stop_words": [b"x", b"yz"], "max_tokens": np.int32(5),
                                                 "temperature": np.float32(0.5), "top_p": np.float32(0.9),
                                                 "seed": np.int64(7)}))
    assert prompt == ("text", "Hi") and not streamed
    assert p == SamplingParams(greedy=False, temperature=0.5, top_p=float(np.float32(0.9)), seed=7, stop=("x", "yz"),
                               max_new_tokens=5)
    # temperature 0 is OpenAI's greedy whatever top_p says (as `runtime_py serve` reads it)
    _, p, _ = parse_request(getter({"text_input": b"Hi", "temperature": np.float32(0), "top_p": np.float32(0.9)}))
    assert p == SamplingParams(greedy=True, max_new_tokens=p.max_new_tokens)
    for bad, match in [({}, "exactly one of"), ({"text_input": b"a", "messages": b"[]"}, "exactly one of"),
                       ({"messages": b"{not json"}, "not valid JSON"), ({"messages": b'{"a": 1}'}, "JSON list"),
                       ({"messages": b"[" * 100_000 + b"]" * 100_000}, "nested too deeply"),
                       ({"text_input": b"\xff"}, "UTF-8"), ({"text_input": b""}, "empty"),
                       ({"text_input": [b"a", b"b"]}, "exactly one value"),
                       ({"text_input": b"a", "temperature": np.float32(-1)}, "temperature"),
                       ({"text_input": b"a", "top_p": np.float32(1.5)}, "top_p"),
                       ({"text_input": b"a", "max_tokens": np.int32(0)}, "'max_tokens' must be >= 1, got 0"),
                       ({"text_input": b"a", "frequency_penalty": np.float32(0.5)}, "'frequency_penalty' is not"),
                       ({"text_input": b"a", "presence_penalty": np.float32(-1)}, "'presence_penalty' is not"),
                       ({"text_input": b"a", "stop": [b""]}, "stop"),
                       ({"text_input": b"a", "seed": 1, "random_seed": 2}, "'seed' \\(1\\) and 'random_seed' \\(2\\)"),
                       ({"text_input": b"a", "guided_decoding_guide_type": b"json_schema",
                         "guided_decoding_guide": b"{}"}, "no guided decoding")]:
        with pytest.raises(ValueError, match=match):
            parse_request(getter(bad))
    assert issubclass(RequestError, ValueError)
    # the seed under its pre-2.59 frontend name; an empty guide (what a plain chat request would carry) is no guide
    assert parse_request(getter({"text_input": b"a", "random_seed": 9, "temperature": 0.5}))[1].seed == 9
    assert parse_request(getter({"text_input": b"a", "guided_decoding_guide": b""}))[0] == ("text", "a")
    assert echo_of(getter({"text_input": b"Hi", "exclude_input_in_output": False}), ("text", "Hi")) == "Hi"
    assert echo_of(getter({"exclude_input_in_output": True}), ("text", "Hi")) == echo_of(getter({}), ("text", "x"))
    with pytest.raises(RequestError, match="echo"):
        echo_of(getter({"exclude_input_in_output": False}), ("messages", []))


def test_graph_model_runs_with_plain_session_run(repo, artifact, generator):
    """What Triton's ONNX Runtime backend does (fresh outputs each call, no I/O binding) gives runtime_py's tokens."""
    import onnxruntime as ort

    ids = generator.encode("Hello world")
    n = 10
    expected = generator.generate([ids], SamplingParams(greedy=True, max_new_tokens=n, ignore_eos=True)).tokens[0]
    manifest = open_artifact(artifact)
    spec = manifest.spec
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    s = ort.InferenceSession(str(repo / f"{NAME}_graph" / "1" / "model.onnx"), options,
                             providers=["CPUExecutionProvider"])
    assert manifest.kv_mode == "static"
    shape = (1, spec["num_kv_heads"], len(ids) + n, spec["head_dim"])
    kv = {i.name: np.zeros(shape, np.float32) for i in s.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in s.get_outputs()]
    tokens, cur, pos = [], ids, list(range(len(ids)))
    for _ in range(n):
        out = dict(zip(names, s.run(None, {"input_ids": np.array([cur], np.int64),
                                           "position_ids": np.array([pos], np.int64), **kv})))
        tokens.append(int(out["logits"][0, -1].argmax()))
        kv = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        cur, pos = [tokens[-1]], [pos[-1] + 1]
    assert tokens == expected


# -- end to end: the real tritonserver ------------------------------------------------------------------------------
SAMPLED = {"text_input": "The quick brown fox", "max_tokens": 24, "temperature": 0.8, "top_k": 40, "top_p": 0.75,
           "seed": 1234, "ignore_eos": True}


EXPLICIT = {  # the same requests as runtime_py SamplingParams written out (FP32 inputs arrive as float32)
    "greedy": SamplingParams(greedy=True, max_new_tokens=24, ignore_eos=True),
    "seeded-sampling": SamplingParams(greedy=False, temperature=float(np.float32(0.8)), top_k=40, top_p=0.75,
                                      seed=1234, max_new_tokens=24, ignore_eos=True),
}


@pytest.mark.parametrize("request_,params", [(GREEDY, EXPLICIT["greedy"]), (SAMPLED, EXPLICIT["seeded-sampling"])],
                         ids=list(EXPLICIT))
def test_stream_equals_runtime(server, generator, request_, params):
    deltas, error = stream(server, request_)
    assert error is None
    assert deltas == list(generator.stream(generator.encode(request_["text_input"]), params))
    assert "".join(deltas) == generator.generate([generator.encode(request_["text_input"])], params).texts[0]
    assert len(deltas) > 1


def test_stream_chat_and_stop_strings(server, generator):
    chat = {"messages": json.dumps([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello world"}]),
            "max_tokens": 16, "temperature": 0.9, "seed": 5, "ignore_eos": True}
    deltas, error = stream(server, chat)
    assert error is None and deltas == expected_deltas(generator, chat)
    full = "".join(expected_deltas(generator, SAMPLED))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    with_stop = {**SAMPLED, "stop": [stop, "never-seen"]}
    deltas, error = stream(server, with_stop)
    assert error is None and deltas == expected_deltas(generator, with_stop)
    assert "".join(deltas) == full[:full.index(stop)]


def test_eight_concurrent_streams(server, generator):
    requests = [{"text_input": ["Hello world", "The quick brown fox", "Once upon"][i % 3], "max_tokens": 16,
                 "temperature": 0.7 + 0.05 * i, "seed": 100 + i, "ignore_eos": True} for i in range(8)]
    requests[0] = {**GREEDY, "max_tokens": 16}
    expected = [expected_deltas(generator, r) for r in requests]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait(timeout=30)
        results[i] = stream(server, requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    for i, (deltas, error) in enumerate(results):
        assert error is None, f"request {i}: {error}"
        assert deltas == expected[i], f"request {i}"


def test_non_streaming_openai_frontend_request(server, generator):
    """stream false (what Triton's OpenAI frontend sends for a non-streaming call): one response with the text."""
    request = {**SAMPLED, "stream": False, "stop_words": ["never-seen"]}
    deltas, error = stream(server, request)
    assert error is None and deltas == ["".join(expected_deltas(generator, request))]


def test_readme_client_example_runs(server, repo, generator, capsys):
    readme = (repo / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:8001"' in code
    scope: dict = {}
    exec(compile(code.replace('"localhost:8001"', repr(server)), "README.md", "exec"), scope)  # noqa: S102
    params = SamplingParams(greedy=False, temperature=float(np.float32(0.7)), seed=1, max_new_tokens=32)
    assert scope["text"] == generator.generate([generator.encode("Hello world")], params).texts[0]


def test_requests_shaped_as_the_openai_frontend_sends_them(server, generator):
    """Triton's OpenAI-compatible frontend (python/openai/openai_frontend/engine/utils/triton.py,
    _create_trtllm_generate_request) sends a python model 2-D tensors ([[x]]), stop_words [[...]], a UINT64 seed
    and the usage flags; before, Triton refused them against our config ([1] expected, INT64 seed)."""
    frontend = {"text_input": "Hello world", "stream": True, "max_tokens": 20, "stop_words": ["zzz-never"],
                "top_p": 0.9, "temperature": 0.7, "seed": 11, "return_num_input_tokens": True,
                "return_num_output_tokens": True}  # each sent [1, 1] ([1, k] for stop_words), as the frontend does
    results, error = stream_results(server, frontend)
    assert error is None, error.message()
    text, prompt_counts, output_tokens = "", set(), 0
    for result in results:
        out = result.as_numpy("text_output")
        if out is not None:
            assert out.shape == (1, 1)
            text += out.reshape(-1)[0].decode()
            prompt_counts.add(int(result.as_numpy("num_input_tokens").reshape(-1)[0]))
            output_tokens += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
    ids = generator.encode("Hello world")
    params = SamplingParams(greedy=False, temperature=float(np.float32(0.7)), top_p=float(np.float32(0.9)), seed=11,
                            max_new_tokens=20, stop=("zzz-never",))
    row = generator.generate([ids], params).rows[0]
    assert text == row.text and prompt_counts == {len(ids)} and output_tokens == len(row.tokens)


@pytest.mark.parametrize("streamed", [True, False])
def test_echo_and_older_frontend_inputs(server, generator, streamed):
    """exclude_input_in_output false (the frontend's echo, 2.64 on) puts the prompt text first; random_seed (its
    seed before 2.59) seeds like seed; a forced tool call's guide is refused with a reason (before: Triton refused
    the requests as 'unexpected inference input')."""
    request = {**SAMPLED, "stream": streamed, "exclude_input_in_output": False, "return_num_output_tokens": True}
    del request["seed"]
    deltas, error = stream(server, {**request, "random_seed": 1234})
    assert error is None, error
    want = "".join(expected_deltas(generator, SAMPLED))
    assert "".join(deltas) == SAMPLED["text_input"] + want and deltas[0].startswith(SAMPLED["text_input"])
    deltas, error = stream(server, {**request, "exclude_input_in_output": True, "seed": 1234})
    assert error is None and "".join(deltas) == want
    _, error = stream(server, {**SAMPLED, "guided_decoding_guide_type": "json", "guided_decoding_guide": "{}"})
    assert error is not None and "no guided decoding" in error.message()


def test_prompt_count_answered_when_no_text_is_generated(server, generator):
    """return_num_input_tokens alone, and the first token's text is a stop string: no text ever goes out, yet the
    prompt's count must (before, only return_num_output_tokens brought the count-only response)."""
    ids = generator.encode("Hello world")
    first = generator.generate([ids], SamplingParams(max_new_tokens=1, ignore_eos=True)).rows[0].text
    assert first.strip(), first
    request = {"text_input": "Hello world", "stream": True, "max_tokens": 8, "stop_words": [first],
               "return_num_input_tokens": True}
    results, error = stream_results(server, request)
    assert error is None, error.message()
    counts = [int(r.as_numpy("num_input_tokens").reshape(-1)[0]) for r in results
              if r.as_numpy("num_input_tokens") is not None]
    texts = [r.as_numpy("text_output").reshape(-1)[0] for r in results if r.as_numpy("text_output") is not None]
    assert counts == [len(ids)] and texts == [b""], (counts, texts)


def test_cancelled_stream_stops_and_the_server_keeps_serving(server, generator):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    t = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"Hello world"]], dtype=np.object_))
    n = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    n.set_data_from_numpy(np.array([[96]], dtype=np.int32))
    client.async_stream_infer(NAME, [t, n])
    result, error = results.get(timeout=30)
    assert error is None and result.as_numpy("text_output") is not None, error and error.message()
    client.stop_stream(cancel_requests=True)
    client.close()
    deltas, error = stream(server, GREEDY)
    assert error is None and deltas == expected_deltas(generator, GREEDY)


@pytest.mark.parametrize("bad,message", [
    ({"max_tokens": 8}, "exactly one of 'text_input'"),
    ({"text_input": "Hello", "temperature": -1.0}, "temperature must be > 0"),
    ({"text_input": "Hello", "top_p": 1.5}, "top_p must be in"),
    ({"messages": "{not json"}, "not valid JSON"),
    ({"text_input": "Hello", "max_tokens": 10_000}, "context length"),
])
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(server, generator, bad, message):
    deltas, error = stream(server, bad)
    assert error is not None and deltas == []
    assert message in str(error)
    deltas, error = stream(server, GREEDY)
    assert error is None and deltas == expected_deltas(generator, GREEDY)


def test_stub_with_numpy2_refuses_to_load_with_the_reason(repo, tmp_path, stub_python):
    """The bundled stub misreads numpy 2 arrays; model.py must say so at load time instead of serving garbage."""
    import sys

    numpy2 = Path(sys.prefix)
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has numpy<2: nothing to refuse")
    proc, _, log = start_server(repo, tmp_path, numpy2)
    try:
        proc.wait(timeout=60)  # the only model fails to load: the server exits
    finally:
        stop_server(proc)
        log.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert proc.returncode != 0 and "cannot exchange tensors with numpy 2" in text, text[-3000:]
