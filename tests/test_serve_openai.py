"""`python -m runtime_py serve` against the real `openai` client on loopback.

One server process for the module (`--port 0`: the port it prints; 4 slots, a queue of 2, prefill chunks of 16) on
the tiny qwen2_window artifact (GroupQueryAttention, sliding window). The reference for every text is Generator
run on the same artifact in this process, one request alone (fp32: the engine's batched logits equal the
single-request ones bit for bit on this artifact, see tests/test_engine_batching.py, so texts compare exactly).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from runtime_py.generate import Generator  # noqa: E402
from runtime_py.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-served"


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    """(url, artifact path, the server's stderr log)."""
    path = artifacts("qwen2_window")
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = [sys.executable, "-m", "runtime_py", "serve", str(path), "--port", "0", "--max-batch", "4",
           "--max-queue", "2", "--prefill-chunk", "16", "--threads", "1", "--model-name", MODEL]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    assert match, (line, log.read_text() if proc.poll() is not None else "")
    url = match.group(1)
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the server did not answer /health: {log.read_text()[-2000:]}")
    yield url, path, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def gen(server):
    return Generator(server[1], threads=1)


def _health(url: str) -> dict:
    return json.load(urllib.request.urlopen(url + "/health", timeout=5))


def _complete(client, stream: bool, chat: bool, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one request through the client."""
    if chat:
        if not stream:
            r = client.chat.completions.create(model=MODEL, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = "", None
        for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish
    if not stream:
        r = client.completions.create(model=MODEL, **kw)
        return r.choices[0].text, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.completions.create(model=MODEL, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def _reference(gen, prompt, params) -> tuple[str, str]:
    ids = gen.encode_chat(prompt) if isinstance(prompt, list) and isinstance(prompt[0], dict) else \
        prompt if isinstance(prompt, list) else gen.encode(prompt)
    row = gen.generate([ids], params).rows[0]
    return row.text, {"eos": "stop", "stop": "stop", "length": "length"}[row.finish_reason]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = _health(server[0])
    assert h["status"] == "ok" and h["slots"] == 4


def test_concurrent_greedy_equals_alone(client, gen):
    """Six requests at once (4 slots + 2 queued): completions (text and token-id prompts) and chat, streamed and
    not, different lengths; each text equals that request generated alone."""
    jobs = [(False, False, "Hello world, this is a test of the server", 24),
            (True, False, [5, 17, 99, 3, 200, 41, 8, 8, 250, 77, 12, 60, 61, 62, 63, 64, 65, 66, 67, 68], 30),
            (True, True, [{"role": "user", "content": "hi there"}], 12),
            (False, True, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}], 20),
            (True, False, "x", 40),
            (False, False, [9, 9, 9], 8)]

    def run(job):
        stream, chat, prompt, n = job
        kw = {"messages": prompt} if chat else {"prompt": prompt}
        return _complete(client, stream, chat, max_tokens=n, temperature=0, **kw)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for (stream, chat, prompt, n), out in zip(jobs, got):
        assert out == _reference(gen, prompt, SamplingParams(max_new_tokens=n)), (stream, chat, prompt)


def test_seeded_sampling_whatever_in_flight(client, gen):
    kw = dict(prompt="Once upon a time", max_tokens=20, temperature=0.8, top_p=0.9, seed=7)
    alone = _complete(client, True, False, **kw)
    assert alone == _reference(gen, "Once upon a time", SamplingParams(greedy=False, temperature=0.8, top_p=0.9,
                                                                      seed=7, max_new_tokens=20))
    noise = [dict(prompt=f"noise {i}", max_tokens=30, temperature=1.0, extra_body={"ignore_eos": True})
             for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_complete, client, True, False, **n) for n in noise[:2]]
        mine = pool.submit(_complete, client, False, False, **kw)
        futures.append(pool.submit(_complete, client, True, False, **noise[2]))
        assert mine.result() == alone
        [f.result() for f in futures]


def test_stop_strings(client, gen):
    prompt = [40, 41, 42, 43, 44]
    free, _ = _reference(gen, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    stop = free[8:11]
    want = free[:free.find(stop)]
    for stream in (True, False):
        text, finish = _complete(client, stream, False, prompt=prompt, max_tokens=30, temperature=0,
                                 stop=[stop, "never-written"], extra_body={"ignore_eos": True})
        assert (text, finish) == (want, "stop")


def test_usage_and_chunk_shapes(server, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    # OpenAI: with include_usage every other chunk carries "usage": null (typed clients read the key)
    request = urllib.request.Request(server[0] + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True,
                                                      "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        raw = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]
    assert all("usage" in c and c["usage"] is None for c in raw[:-1]) and raw[-1]["usage"]["total_tokens"] > 0, raw
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 4
    assert r.usage.total_tokens == 7


def test_disconnect_frees_the_slot(server, client):
    """A stream closed after its first chunk is cancelled and its slot freed. A tiny model writes its 120 tokens in
    ~0.1 s, so the stream can end by itself before the server notices the disconnect (a lost race, not a bug):
    up to 5 tries, and every try must leave no request running."""
    cancelled = 0
    for _ in range(5):
        before = _health(server[0])["finished"]
        stream = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=120, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
        for _ in range(250):
            h = _health(server[0])
            if h["running"] == 0 and sum(h["finished"].values()) == sum(before.values()) + 1:
                break
            time.sleep(0.02)
        assert h["running"] == 0 and sum(h["finished"].values()) == sum(before.values()) + 1, h
        cancelled = h["finished"].get("cancelled", 0) - before.get("cancelled", 0)
        if cancelled:
            break
    assert cancelled == 1


def test_bad_requests_while_another_streams(server, client, gen):
    url = server[0]
    result = {}

    def long_stream():
        result["out"] = _complete(client, True, False, prompt=[11, 12, 13], max_tokens=110, temperature=0,
                                  extra_body={"ignore_eos": True})

    t = threading.Thread(target=long_stream)
    t.start()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * 120, max_tokens=16)
    assert e.value.code == "context_length_exceeded" and "128" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 200}])
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    for bad, param in ((dict(temperature=5), "temperature"), (dict(top_p=0), "top_p"), (dict(n=2), "n"),
                       (dict(max_tokens=0), "max_tokens"), (dict(seed=-1), "seed"),
                       (dict(extra_body={"top_k": "3"}), "top_k"), (dict(stop=[""]), "stop"),
                       (dict(logprobs=2), "logprobs"), (dict(prompt=[1, 999999]), "prompt"),
                       # fields OpenAI does not define are refused as OpenAI refuses them, not silently ignored
                       (dict(extra_body={"min_p": 0.1}), "min_p"), (dict(extra_body={"max_token": 3}), "max_token"),
                       (dict(extra_body={"messages": []}), "messages")):  # a chat field on /v1/completions
        kw = {"prompt": "ok", **bad}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **kw)
        assert e.value.status_code == 400 and e.value.param == param, bad
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: min_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"min_p": 0.1})
    for bad, param in ((dict(modalities=["text", "audio"]), "modalities"),
                       (dict(audio={"voice": "alloy", "format": "wav"}), "audio")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **bad)
        assert e.value.param == param, bad
    # documented fields that cannot change the text are accepted
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          user="u1", store=False, metadata={"k": "v"}, modalities=["text"],
                                          parallel_tool_calls=False)
    assert done.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    for data in (b"{not json", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):  # the second: too deep
        request = urllib.request.Request(url + "/v1/completions", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        body = json.loads(e.value.read())
        assert e.value.code == 400 and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert "could not parse the JSON body" in body["error"]["message"], body
    t.join(60)
    assert result["out"] == _reference(gen, [11, 12, 13], SamplingParams(max_new_tokens=110, ignore_eos=True))


def test_full_queue_gets_429(client, gen):
    """12 requests at once on 4 slots and a queue of 2: the overflow gets 429 at once, the rest are served
    correctly."""
    def run(i):
        try:
            return _complete(client, False, False, prompt=[30 + i, 31, 32], max_tokens=100, temperature=0,
                             extra_body={"ignore_eos": True})
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(run, range(12)))
    refused = [g for g in got if isinstance(g, openai.RateLimitError)]
    assert refused and all(e.status_code == 429 and e.code == "queue_full" for e in refused)
    assert len(refused) <= 12 - 6
    for i, g in enumerate(got):
        if not isinstance(g, Exception):
            assert g == _reference(gen, [30 + i, 31, 32], SamplingParams(max_new_tokens=100, ignore_eos=True))


def test_cli_bad_values(artifacts, capsys):
    from runtime_py.__main__ import main

    path = str(artifacts("qwen2_window"))
    assert main(["serve", path, "--max-batch", "9"]) == 2
    assert "error: slots (--max-batch) must be an integer in [1, 8]" in capsys.readouterr().err
    for flags in (["--port", "70000"], ["--max-queue", "-1"], ["--prefill-chunk", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", path, *flags])
        assert e.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_body_limit(server, client):
    """A body over serve.body_limit gets 413 before it is read (Content-Length) or as soon as it passes the limit
    (chunked); one of exactly the limit is read (and then refused for the context); the server goes on."""
    from runtime_py import serve
    from runtime_py.serve import body_limit
    from runtime_py.tokenizer import MIN_TEXT_BYTES

    url = server[0] + "/v1/completions"
    limit = body_limit(128)
    assert limit == MIN_TEXT_BYTES  # the tiny artifact's 128-token context

    def body(size: int) -> bytes:  # a JSON body of exactly `size` bytes: a prompt of words "a a a ..."
        head, tail = f'{{"model": "{MODEL}", "max_tokens": 4, "prompt": "'.encode(), b'"}'
        n = size - len(head) - len(tail)
        return head + (b"a " * (n // 2 + 1))[:n] + tail

    def post(data, chunked=False) -> tuple[int, dict]:
        if chunked:  # an iterable body without Content-Length: urllib sends it chunked
            whole = data
            data = (whole[i:i + 65536] for i in range(0, len(whole), 65536))
        request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    exact = body(limit)
    assert len(exact) == limit and len(body(limit + 1)) == limit + 1
    status, got = post(exact)
    assert status == 400 and got["error"]["code"] == "context_length_exceeded"
    for size in (limit + 1, 3 * limit):  # 3x: the client is still sending long after the server has decided
        for chunked in (False, True):
            status, got = post(body(size), chunked)
            assert status == 413 and got["error"]["code"] == "request_too_large", (size, chunked)
            assert f"{limit} bytes" in got["error"]["message"]
    # A declared length past what the server drains is answered at once, without waiting for (or reading) a byte.
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {100 * limit}\r\n\r\n".encode())
        start, answer = time.monotonic(), b""
        while b"\r\n\r\n" not in answer and (piece := s.recv(65536)):
            answer += piece
        assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - start < serve.DRAIN_SECONDS, answer[:200]
    assert _complete(client, False, False, prompt=[5, 6, 7], max_tokens=3, temperature=0)[1] == "length"


def test_stop_string_bounds(client):
    from runtime_py.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

    for stop in (["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_CHARS + 1)]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stop=stop)
        assert e.value.param == "stop"
    assert _complete(client, False, False, prompt="hi", max_tokens=2, temperature=0,
                     stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)[1] == "length"


def test_chat_roles(client, gen):
    """OpenAI's roles: developer is rendered as system (same tokens as the reference with a system message); tool
    messages and unknown roles get 400 naming the message, and nothing is rendered for them."""
    import openai

    kw = dict(max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    sys_ = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    want = _reference(gen, sys_, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert _complete(client, False, True, messages=dev, **kw) == want
    assert gen.encode_chat(dev) != gen.encode_chat(sys_)  # the template alone would render the role as given
    r = client.chat.completions.create(model=MODEL, messages=dev, **kw)
    assert r.usage.prompt_tokens == len(gen.encode_chat(sys_))
    for messages, words in (
            ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "tool calling"),
            ([{"role": "user", "content": "hi"},  # a template would render the call: refused like tool messages
              {"role": "assistant", "content": "ok", "tool_calls": [
                  {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
             "messages[1].tool_calls belongs to tool calling"),
            ([{"role": "user", "content": "hi"}, {"role": "<|im_start|>system", "content": "x"}],
             "messages[1].role must be one of system, user, assistant, developer")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert words in e.value.message and e.value.param == "messages", e.value.message


def test_client_gone_mid_body_is_dropped_quietly(server):
    """A client that closes its connection before its body has arrived (Content-Length or chunked) is dropped
    like one that leaves mid-answer: no 'Exception in ASGI application' traceback in the server's log per
    connection, and the server serves on."""
    url, _, log = server
    port = urllib.parse.urlsplit(url).port
    before = log.read_text()
    for head in (b"Content-Length: 100\r\n\r\n{\"model\"", b"Transfer-Encoding: chunked\r\n\r\n8\r\n{\"model\""):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head)
            time.sleep(0.3)
    time.sleep(0.5)
    assert _health(url)["status"] == "ok"
    added = log.read_text()[len(before):]
    assert "Traceback" not in added and "Exception in ASGI" not in added, added


def test_stream_reset_by_its_client_logs_nothing(server):
    """A streaming client that resets its connection (SO_LINGER 0) mid-answer: its request is cancelled without
    asyncio's "socket.send() raised exception." in the log. The generator used to write the queued chunks in one
    go without yielding to the event loop, so uvicorn learnt of the lost connection only after five or more
    writes into it (a line per write after the fifth, ~3 per disconnect)."""
    url, _, log = server
    port = urllib.parse.urlsplit(url).port
    before = log.read_text()
    body = json.dumps({"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 120, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert s.recv(64).startswith(b"HTTP/1.1 200")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.3)  # the answer goes on into the reset connection
    for _ in range(250):
        if _health(url)["running"] == 0:
            break
        time.sleep(0.02)
    assert _health(url)["running"] == 0
    added = log.read_text()[len(before):]
    assert "socket.send() raised exception" not in added and "Traceback" not in added, added


def test_connections_that_send_no_request_are_closed(server):
    """A connection that sends nothing, or dribbles an unfinished header, is closed REQUEST_TIMEOUT_S after it
    opened (uvicorn alone kept both open for ever: enough of them exhausted the server's file descriptors); one
    whose body stops short is answered 408 after BODY_TIMEOUT_S (its handler waited for the rest for ever)."""
    from runtime_py.serve import BODY_TIMEOUT_S, REQUEST_TIMEOUT_S

    url = server[0]
    port = urllib.parse.urlsplit(url).port
    idle, dribble, short = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
    try:
        dribble.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        short.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\"")
        t0 = time.monotonic()
        for s in (idle, dribble):
            s.settimeout(REQUEST_TIMEOUT_S + 10)
            assert s.recv(1) == b""  # closed by the server
        short.settimeout(BODY_TIMEOUT_S + 10)
        answer = b""
        while chunk := short.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:300]
        assert time.monotonic() - t0 < max(REQUEST_TIMEOUT_S, BODY_TIMEOUT_S) + 5
    finally:
        for s in (idle, dribble, short):
            s.close()
    assert _health(url)["status"] == "ok"


def test_sigterm_ends_pending_requests_with_errors_not_cut_streams(artifacts, tmp_path):
    """SIGTERM with more work pending than uvicorn's 5 s graceful window (one slot, 32 long streams): every
    stream ends either complete or with the 'shutting down' error event and [DONE], nothing is cut off, no
    traceback is logged, and the process exits within the window. Before, uvicorn cancelled the handlers first and
    stopped the engine only afterwards: cut streams and an 'Exception in ASGI application' each."""
    path = artifacts("qwen2_window")
    log = tmp_path / "stderr.log"
    proc = subprocess.Popen([sys.executable, "-m", "runtime_py", "serve", str(path), "--port", "0", "--max-batch",
                             "1", "--max-queue", "64", "--threads", "1", "--model-name", MODEL], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    url = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", proc.stdout.readline()).group(1)
    endings, started = [], threading.Event()

    def stream():
        body = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 120, "stream": True,
                           "ignore_eos": True}).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        lines = []
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                for line in r:
                    lines.append(line.decode().strip())
                    started.set()
        except Exception as e:  # noqa: BLE001 - a cut stream is what this test looks for
            lines.append(f"cut: {type(e).__name__}")
        endings.append([x for x in lines if x])

    threads = [threading.Thread(target=stream) for _ in range(32)]
    for t in threads:
        t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = proc.wait(timeout=30)
    took = time.monotonic() - t0
    for t in threads:
        t.join(timeout=30)
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM) and took < 5, (rc, took)
    assert len(endings) == 32
    cancelled = 0
    for lines in endings:
        assert lines and lines[-1] == "data: [DONE]", lines[-3:]
        if "shutting down" in lines[-2]:
            cancelled += 1
    assert cancelled >= 1  # the work did outlast the SIGTERM
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-2000:]


def _post_raw(url: str, path: str, data: bytes, method: str = "POST") -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_hostile_values(server, client, gen):
    """Values that used to end in a 500 or in junk: lone UTF-16 surrogates (valid JSON, not Unicode) in a prompt,
    chat content or the model name; a 4300-digit max_tokens (its error message echoes no digits); a temperature
    that underflows float32 (sampled at 1e-38 it must equal greedy, not NaN -> token 0); a repetition penalty
    beyond what float32 logits survive; logprobs 0 (0 is not false); null chat content; a 405's Allow header; and
    GET /v1/models/NAME (the openai client's models.retrieve)."""
    url = server[0]
    for path, body, param in (
            ("/v1/completions", '{"model": "%s", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
            ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\udc80"}]}',
             "messages")):
        status, _, out = _post_raw(url, path, (body % MODEL).encode())
        assert status == 400 and out["error"]["param"] == param and "not valid UTF-8" in out["error"]["message"], out
    status, _, out = _post_raw(url, "/v1/completions", b'{"model": "\\ud800x", "prompt": "hi"}')
    assert status == 404 and out["error"]["code"] == "model_not_found", out
    status, _, out = _post_raw(url, "/v1/completions",
                               ('{"model": "%s", "prompt": "hi", "max_tokens": %s}' % (MODEL, "9" * 4300)).encode())
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert len(out["error"]["message"]) < 400 and "10^12" in out["error"]["message"]
    want = _complete(client, False, False, prompt="Hello", max_tokens=8, temperature=0,
                     extra_body={"ignore_eos": True})
    assert _complete(client, False, False, prompt="Hello", max_tokens=8, temperature=1e-38, seed=3,
                     extra_body={"ignore_eos": True}) == want
    for bad, param in ((dict(extra_body={"repetition_penalty": 1e-39}), "repetition_penalty"),
                       (dict(extra_body={"repetition_penalty": 1e39}), "repetition_penalty"),
                       (dict(logprobs=0), "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="ok", max_tokens=2, **bad)
        assert e.value.param == param, bad
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)
    assert "messages[0].content must be a string" in e.value.message
    status, headers, out = _post_raw(url, "/v1/chat/completions", None, method="GET")
    assert status == 405 and "POST" in headers.get("allow", headers.get("Allow", "")), (headers, out)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert _health(url)["running"] == 0


@contextlib.contextmanager
def _serving(engine, http):
    """An in-process uvicorn server on `engine` with the protocol class `http`, on a free loopback port; its URL."""
    import uvicorn

    from runtime_py.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), log_level="error", access_log=False,
                                           http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


def test_non_streamed_request_whose_client_left_is_cancelled(artifacts, monkeypatch):
    """A non-streamed request whose client closed its connection is cancelled within about DISCONNECT_POLL_S even
    while its tokens keep coming. The disconnect check used to run only when no token came for 0.25 s, so with a
    real model's token rate the dead request held its slot to the end. In-process, on a model slowed to 50 ms a
    step (a 0.5B model on a CPU), so that the generation outlasts the check."""
    from runtime_py.engine import Engine
    from runtime_py.serve import DISCONNECT_POLL_S, _http_protocol

    decode = Engine._decode
    monkeypatch.setattr(Engine, "_decode", lambda self: (time.sleep(0.05), decode(self))[1])
    with _serving(Engine(artifacts("qwen2_window"), slots=2, threads=1), _http_protocol()) as url:
        port = urllib.parse.urlsplit(url).port
        conn = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}).encode()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # 100 tokens: 5 s
        while _health(url)["running"] == 0:
            time.sleep(0.02)
        time.sleep(0.3)
        conn.close()
        t0 = time.monotonic()
        while (h := _health(url))["running"] and time.monotonic() - t0 < 4:
            time.sleep(0.02)
        assert h["running"] == 0 and h["finished"] == {"cancelled": 1}, h
        assert time.monotonic() - t0 < DISCONNECT_POLL_S + 1


def test_a_client_that_stops_reading_is_dropped_and_a_slow_one_is_not(artifacts, monkeypatch):
    """A streaming client that reads nothing of its answer is disconnected WRITE_STALL_S after its writes paused,
    and its request is cancelled while it still decodes; a client that reads slowly but steadily gets its whole
    answer. uvicorn's send waited for a client that stopped reading for as long as it stayed connected, holding the
    connection, its handler and the queued chunks. In-process, with WRITE_STALL_S at 2 s, a model slowed to 40 ms
    a step, and the socket's and transport's buffers made small (SO_SNDBUF / SO_RCVBUF 1024, which Linux raises to
    its minimum of a few KB, a 1 KB high-water mark) so that a tiny model's 100-token stream overflows them."""
    from runtime_py import serve
    from runtime_py.engine import Engine

    monkeypatch.setattr(serve, "WRITE_STALL_S", 2.0)
    decode = Engine._decode
    monkeypatch.setattr(Engine, "_decode", lambda self: (time.sleep(0.04), decode(self))[1])

    class SmallBuffers(serve._http_protocol()):
        def connection_made(self, transport):
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
            transport.set_write_buffer_limits(high=1024)
            super().connection_made(transport)

    def open_stream(port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", port))
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                           "ignore_eos": True, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return s

    with _serving(Engine(artifacts("qwen2_window"), slots=2, threads=1), SmallBuffers) as url:
        port = urllib.parse.urlsplit(url).port
        with open_stream(port) as slow:  # 4 KB every 0.3 s: the writes pause and resume, never for 2 s
            slow.settimeout(30)
            answer = b""
            while chunk := (time.sleep(0.3), slow.recv(4096))[1]:
                answer += chunk
                if b"data: [DONE]" in answer:
                    break
        assert b"data: [DONE]" in answer and answer.count(b"chat.completion.chunk") >= 100, answer[-300:]
        assert _health(url)["finished"] == {"length": 1}

        with open_stream(port) as stalled:  # reads nothing
            t0 = time.monotonic()
            while not (h := _health(url))["finished"].get("cancelled") and time.monotonic() - t0 < 20:
                time.sleep(0.05)
            waited = time.monotonic() - t0
            assert h["finished"] == {"length": 1, "cancelled": 1} and h["running"] == 0, h
            assert waited >= 2.0, waited  # not before the stall bound ("cancelled" above: before its 100 steps)
            stalled.settimeout(10)
            try:  # what the buffers held, then the end of the aborted connection (a timeout fails the test)
                while stalled.recv(65536):
                    pass
            except ConnectionResetError:
                pass
        assert _health(url)["status"] == "ok"
