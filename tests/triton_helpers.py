"""Fixtures and helpers shared by the tests/test_triton*.py modules: a tiny artifact, the Triton repository made
from it, runtime_py's generator on it, the tritonserver bundled with nvidia-pytriton serving it, and the streaming
client.

Not a conftest: the fixtures' names (artifact, repo, generator, server) are generic, and other test modules define
their own under the same names; a module uses these by importing them (``from tests.triton_helpers import repo``),
and a module that defines its own ``artifact`` feeds it to ``repo``, ``generator`` and ``server``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time

import numpy as np
import pytest

from artifacts.triton_launch import bundled_server, free_ports, pytriton_paths
from artifacts.triton_stub_env import stub_env
from artifacts.triton_write import write_repository
from runtime_py.generate import Generator
from runtime_py.triton_model import parse_request

NAME = "llm"
CASE = "qwen2_window"  # static KV, ort lowering (GroupQueryAttention): the default build


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts(CASE)


@pytest.fixture(scope="module")
def repo(artifact, tmp_path_factory):
    return write_repository(artifact, tmp_path_factory.mktemp("triton") / "repo", name=NAME, instances=1,
                            max_batch=8)


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator(artifact, threads=1)


TYPES = {"text_input": (np.object_, "BYTES"), "messages": (np.object_, "BYTES"), "stop": (np.object_, "BYTES"),
         "stop_words": (np.object_, "BYTES"), "stream": (np.bool_, "BOOL"),
         "max_tokens": (np.int32, "INT32"), "top_k": (np.int32, "INT32"), "seed": (np.uint64, "UINT64"),
         "temperature": (np.float32, "FP32"), "top_p": (np.float32, "FP32"),
         "repetition_penalty": (np.float32, "FP32"), "ignore_eos": (np.bool_, "BOOL"),
         "frequency_penalty": (np.float32, "FP32"), "presence_penalty": (np.float32, "FP32"),
         "return_num_input_tokens": (np.bool_, "BOOL"), "return_num_output_tokens": (np.bool_, "BOOL"),
         "random_seed": (np.uint64, "UINT64"), "exclude_input_in_output": (np.bool_, "BOOL"),
         "guided_decoding_guide_type": (np.object_, "BYTES"), "guided_decoding_guide": (np.object_, "BYTES")}


def getter(values: dict):
    """get(name) over a request given as python values, typed as the client sends them (TYPES)."""
    arrays = {}
    for name, value in values.items():
        items = [v.encode() if isinstance(v, str) else v for v in (value if isinstance(value, list) else [value])]
        arrays[name] = np.array(items, dtype=TYPES[name][0])
    return arrays.get


@pytest.fixture(scope="session")
def stub_python():
    """The Python environment for the python backend stub (numpy<2; see artifacts.triton_stub_env)."""
    pytest.importorskip("tritonclient.grpc")
    try:
        pytriton_paths()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        return stub_env()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no numpy<2 environment for the tritonserver python backend stub: {e}")


def assert_broken_config_rejected(repo, tmp_path, model: str, old: str, new: str, error: str) -> None:
    """A copy of `repo` with `old` replaced by `new` in `model`'s config.pbtxt fails validation with `error`
    (a literal), naming that config file."""
    import shutil

    from artifacts.triton_check import validate_repository
    from artifacts.triton_contract import RepositoryError

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    cfg = broken / model / "config.pbtxt"
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    with pytest.raises(RepositoryError, match=error.replace("[", r"\[").replace("(", r"\(")) as e:
        validate_repository(broken)
    assert str(cfg) in str(e.value)


def start_server(repo, work, python_env, models=None):
    grpc_port, http_port, metrics_port = free_ports(3)
    argv, env = bundled_server(repo, work, grpc_port, http_port, metrics_port, models, python_env=python_env)
    log = open(work / "server.log", "wb")
    # Own process group: the python backend's stub processes are children of tritonserver; teardown reaches them.
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), \
        f"127.0.0.1:{grpc_port}", log


def stop_server(proc) -> None:
    """SIGTERM, bounded wait, then SIGKILL to the whole process group (tritonserver and its stubs)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory, stub_python):
    """The tritonserver bundled with nvidia-pytriton serving `repo` on loopback; always stopped afterwards."""
    import tritonclient.grpc as grpcclient

    work = tmp_path_factory.mktemp("tritonserver")
    proc, url, log = start_server(repo, work, stub_python)

    def tail():
        return (work / "server.log").read_text(errors="replace")[-8000:]

    try:
        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{tail()}")
            try:
                if client.is_server_ready() and client.is_model_ready(NAME):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after 60 s:\n{tail()}")
            time.sleep(0.2)
        client.close()
        log_text = tail()
        # the backend imports the runtime copied into the repository, not the installed one
        assert f"runtime_py from {repo / NAME / '1' / 'runtime' / 'runtime_py'}" in log_text, log_text
        yield url
    finally:
        stop_server(proc)
        log.close()


def stream(url: str, request: dict, timeout: float = 60.0) -> tuple[list[str], Exception | None]:
    """Send one request on its own client and stream; (text deltas, error or None)."""
    results, error = stream_results(url, request, timeout)
    return [out.reshape(-1)[0].decode() for r in results if (out := r.as_numpy("text_output")) is not None], error


def stream_results(url: str, request: dict, timeout: float = 60.0) -> tuple[list, Exception | None]:
    """Send one request (every tensor [1, n]: the batch dim of one first) on its own client and stream; (the
    InferResults up to the final one, error or None)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in request.items():
        values = value if isinstance(value, list) else [value]
        dtype, triton_type = TYPES[name]
        values = [v.encode() if isinstance(v, str) else v for v in values]
        t = grpcclient.InferInput(name, [1, len(values)], triton_type)  # the batch dim of one first
        t.set_data_from_numpy(np.array([values], dtype=dtype))
        inputs.append(t)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(NAME, inputs, enable_empty_final_response=True)
        got = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                return got, error
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return got, None
    finally:
        client.stop_stream()
        client.close()


def expected_deltas(gen: Generator, request: dict) -> list[str]:
    """What runtime_py streams for the same request (same parsing as the server)."""
    (kind, value), params, _ = parse_request(getter(request))
    ids = gen.encode(value) if kind == "text" else gen.encode_chat(value)
    deltas = list(gen.stream(ids, params))
    assert "".join(deltas) == gen.generate([ids], params).texts[0]
    return deltas


GREEDY = {"text_input": "Hello world", "max_tokens": 24, "ignore_eos": True}
