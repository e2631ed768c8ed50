"""`python -m runtime_py serve ARTIFACT`: an OpenAI-compatible HTTP API over the batching engine.

What it does: :func:`create_app` builds a Starlette ASGI app around one :class:`runtime_py.engine.Engine` (its loop
runs in a background thread that owns the session; the app submits requests to its bounded queue and receives
tokens through ``loop.call_soon_threadsafe`` into an ``asyncio.Queue`` per request). :func:`serve` binds the socket
and runs it on uvicorn. Endpoints:

* ``POST /v1/completions`` (``prompt``: a string, or a list of token ids) and ``POST /v1/chat/completions``
  (``messages`` rendered with the artifact's chat template, bounded sandbox; roles ``system``, ``user``,
  ``assistant`` and ``developer``, rendered as ``system``): ``stream`` true (server-sent events,
  chunks shaped as OpenAI's, ``data: [DONE]`` last; ``stream_options.include_usage`` adds a usage chunk) or false;
  ``max_tokens`` (chat: also ``max_completion_tokens``; default ``DEFAULT_MAX_NEW_TOKENS``, 32, or what is left of
  the context), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or a list), ``n`` = 1; extensions
  ``top_k``, ``repetition_penalty``, ``ignore_eos``. Greedy or sampled follows the rule every front end of this
  project applies (``SamplingParams.from_options``): greedy unless a temperature, ``top_k`` > 0 or ``top_p`` != 1
  is sent, and ``temperature: 0`` is always greedy (OpenAI's own default temperature is 1: send it to sample).
  ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length``; ``usage`` counts the prompt and the sampled
  tokens (an EOS counts).
* ``GET /v1/models`` (one model: ``--model-name``, default the artifact directory's name), ``GET /v1/models/NAME``
  and ``GET /health``.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON, bad values and
prompts that do not fit the context (code ``context_length_exceeded``), 404 for an unknown model or path, 413 for a
body larger than :func:`body_limit` (64 bytes per context token, at least 1 MiB; refused before it is kept: the
rest is dropped unread up to 4x the limit so the client reads the 413, larger ones see the connection close), 429 when
``--max-queue`` requests already wait for a slot (the queue never grows past it), 503 while the engine is stopping
or after it failed, 500 when a model call fails (that request only; the others go on), 408 for a body that has not
arrived BODY_TIMEOUT_S after its headers. A client that disconnects cancels its request; the engine frees its slot
at its next iteration. A connection that sends no request headers for REQUEST_TIMEOUT_S is closed, and so is one
whose client reads nothing of its answer for WRITE_STALL_S (its request is cancelled). SIGTERM ends the
pending requests as cancelled (503, or an SSE error event) before uvicorn's graceful shutdown.

What it does not do: authentication, TLS, several models, ``n`` > 1, ``echo``, log-probs, tools / function
calling, response formats, audio, frequency / presence penalties or logit bias (each is refused with a 400 naming
it). A field the endpoint does not know (``FIELDS``: OpenAI's documented ones and the extensions) is refused as
OpenAI refuses it, ``Unrecognized request argument supplied: NAME``, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from pathlib import Path

from artifacts.paths import json_loads
from runtime_py.engine import (EngineClosedError, Engine, PromptTooLongError, QueueFullError, Update)
from runtime_py.sampling import (DEFAULT_MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS, PENALTY_RANGE,
                                 SamplingParams)
from runtime_py.tokenizer import MIN_TEXT_BYTES, TEXT_BYTES_PER_TOKEN, text_bytes_limit

BODY_TIMEOUT_S = 10.0  # seconds a request's body has to arrive once its headers have (1 MiB: 100 KB/s at least)
REQUEST_TIMEOUT_S = 10.0  # seconds a connection has to send a request's headers (after opening, after a response)
# seconds a connection may go without its client reading anything while its answer waits to be sent (the socket's
# and the transport's buffers full), before it is dropped: nginx's send_timeout. A client that stops reading a long
# stream otherwise held its connection, its handler and the answer's queued chunks for as long as it stayed connected.
WRITE_STALL_S = 30.0
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# A refused body is read and dropped up to this many times the limit, for at most this long (nginx's lingering
# close): most clients send the whole body before they read, and a connection closed under them reads as a reset.
DRAIN_FACTOR = 4
DRAIN_SECONDS = 5.0
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
CHAT_ROLES = ("system", "user", "assistant", "developer")  # OpenAI's, less tool calling's; developer = system
# The request fields each endpoint knows: OpenAI's documented ones (used, refused when they ask for what this server
# does not do, or ignored when they cannot change the text: user, store, metadata, ...) and this server's
# extensions. Any other field is refused as OpenAI refuses it ("Unrecognized request argument supplied"): a
# sampling option of another server (min_p, say) or a misspelt max_tokens silently ignored would change the answer.
EXTENSIONS = ("top_k", "repetition_penalty", "ignore_eos")
COMMON_FIELDS = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                 "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "user", *EXTENSIONS)
FIELDS = {
    "completions": frozenset((*COMMON_FIELDS, "prompt", "best_of", "echo", "suffix")),
    "chat": frozenset((*COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "response_format",
                       "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "modalities",
                       "audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "store",
                       "metadata", "service_tier", "prompt_cache_key", "safety_identifier")),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def body_limit(context: int) -> int:
    """The largest request body accepted, in bytes: runtime_py.tokenizer's bound on text read from outside (a body
    is read into memory and tokenized on the event loop). Larger ones get 413; their bytes are never kept."""
    return text_bytes_limit(context)


# -- request parsing ---------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(body: dict, name: str, check, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise _bad(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def _refuse(body: dict, name: str, allowed=(None,)) -> None:
    """400 unless `name` is absent, empty, or one of `allowed` with the same JSON type (0 is not false)."""
    v = body.get(name)
    if name in body and not any(v is a or (type(v) is type(a) and v == a) for a in allowed) and v != {} and v != []:
        raise _bad(f"'{name}' is not supported by this server", param=name)


def _count(n: int) -> str:
    """A count for an error message: huge ones (a client's max_tokens) are not echoed digit by digit."""
    return str(n) if n < 10 ** 12 else "more than 10^12"


def check_fields(body: dict, endpoint: str) -> None:
    """400 naming the first field `endpoint` ("completions" or "chat") does not know (see FIELDS)."""
    for name in body:
        if name not in FIELDS[endpoint]:
            raise _bad(f"Unrecognized request argument supplied: {json.dumps(name)[1:-1][:80]}", param=name[:80])


def parse_sampling(body: dict, prompt_len: int, context: int, prompt_param: str) -> SamplingParams:
    """SamplingParams from an OpenAI request body; APIError(400) naming the first bad field."""
    _get(body, "n", lambda v: _is_int(v) and v == 1, "1 (one choice per request)")
    for name in ("frequency_penalty", "presence_penalty"):
        _get(body, name, lambda v: _is_num(v) and v == 0, "0 (penalties are not supported; see repetition_penalty)")
    for name in ("logit_bias", "tools", "functions", "tool_choice", "function_call", "suffix", "top_logprobs",
                 "audio", "web_search_options"):
        _refuse(body, name)
    _refuse(body, "logprobs", (None, False))
    _refuse(body, "echo", (None, False))
    _refuse(body, "best_of", (None, 1))
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _bad("'modalities' other than [\"text\"] is not supported", param="modalities")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("'response_format' other than {\"type\": \"text\"} is not supported", param="response_format")
    max_tokens = _get(body, "max_completion_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    max_tokens = _get(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1", max_tokens)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_NEW_TOKENS, max(context - prompt_len, 1))
    if prompt_len + max_tokens > context:
        raise _bad(f"This model's maximum context length is {context} tokens. However, you requested "
                   f"{_count(prompt_len + max_tokens)} tokens ({prompt_len} in the {prompt_param}, "
                   f"{_count(max_tokens)} in the "
                   "completion). Please reduce the length of the prompt or of max_tokens.",
                   param=prompt_param, code="context_length_exceeded")
    temperature = _get(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= 0 (0 or -1 = off)", 0)
    low, high = PENALTY_RANGE
    penalty = _get(body, "repetition_penalty", lambda v: _is_num(v) and low <= v <= high,
                   f"a number in [{low:g}, {high:g}]", 1.0)
    seed = _get(body, "seed", lambda v: _is_int(v) and 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
    ignore_eos = _get(body, "ignore_eos", lambda v: isinstance(v, bool), "true or false", False)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                   f"of at most {MAX_STOP_CHARS} characters", param="stop")
    rest = dict(repetition_penalty=float(penalty), seed=seed, max_new_tokens=max_tokens, stop=tuple(stop),
                ignore_eos=ignore_eos)
    if temperature == 0:  # OpenAI's greedy, whatever top_p / top_k say
        return SamplingParams(greedy=True, **rest)
    return SamplingParams.from_options(None if temperature is None else float(temperature), max(top_k, 0),
                                       float(top_p), **rest)


def _completion_prompt(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' is empty", param="prompt")
        try:
            return engine.encode(prompt)
        except ValueError as e:
            raise _bad(str(e), param="prompt") from None
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt
    raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids (one prompt per request)",
               param="prompt")


def _chat_prompt(engine: Engine, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", param="messages")
        if m["role"] in ("tool", "function"):
            raise _bad(f"messages[{i}]: role '{m['role']}' belongs to tool calling, which this server does not do",
                       param="messages")
        if m["role"] not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m['role'][:64]!r}",
                       param="messages")
        for key in ("tool_calls", "function_call"):  # an assistant turn that called tools: templates render them
            if m.get(key) not in (None, []):
                raise _bad(f"messages[{i}].{key} belongs to tool calling, which this server does not do",
                           param="messages")
        if m["role"] == "developer":  # OpenAI's newer name for the system role; chat templates know "system"
            m = {**m, "role": "system"}
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts can be rendered
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):  # null content goes with tool calls, which are refused
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        clean.append({k: m[k] for k in ("role", "name") if isinstance(m.get(k), str)} | {"content": content})
    try:
        return engine.encode_chat(clean)
    except ValueError as e:  # no tokenizer, no chat template, a template that refused or exceeded its bounds
        raise _bad(str(e), param="messages") from None


# -- the app -----------------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str):
    """The Starlette app. Its lifespan starts the engine loop and stops it (pending requests end as cancelled)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    created = int(time.time())

    def error_response(e: APIError) -> Response:
        # json.dumps escapes to ASCII: a message that quotes a client's string (a lone surrogate, say) still renders
        return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")

    limit = body_limit(engine.max_seq_len)

    async def discard(stream, size: int = 0) -> None:
        """Read and drop the rest of a refused body, up to DRAIN_FACTOR x the limit and DRAIN_SECONDS, so that a
        client that sends its whole body before reading the answer (urllib, requests, most do) reads the 413
        instead of a reset connection; past either bound the server answers at once and the connection closes."""
        async def drain() -> None:
            nonlocal size
            async for piece in stream:
                size += len(piece)
                if size > DRAIN_FACTOR * limit:
                    return
        try:
            await asyncio.wait_for(drain(), DRAIN_SECONDS)
        except (asyncio.TimeoutError, ClientDisconnect):
            pass

    async def read_body(request: Request) -> dict:
        too_large = APIError(413, f"the request body is larger than this server accepts ({limit} bytes: "
                                  f"{TEXT_BYTES_PER_TOKEN} per token of the {engine.max_seq_len}-token context, "
                                  f"at least {MIN_TEXT_BYTES})", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= DRAIN_FACTOR * limit:
                await discard(request.stream())
            raise too_large
        chunks, size = [], 0
        stream = request.stream()

        async def receive() -> bool:  # False: over the limit
            nonlocal size
            async for piece in stream:  # chunked bodies have no Content-Length: count what arrives
                size += len(piece)
                if size > limit:
                    return False
                chunks.append(piece)
            return True

        try:  # a body dribbled a byte at a time would hold its connection and handler for days
            complete = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        if not complete:
            await discard(stream, size)
            raise too_large
        try:
            body = json_loads(b"".join(chunks))
        except ValueError as e:  # bad JSON, bad UTF-8, nested too deeply
            raise _bad(f"We could not parse the JSON body of your request ({e})") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required (a string)", param="model")
        if model != model_name:
            raise unknown_model(model)
        return body

    def unknown_model(model: str) -> APIError:
        return APIError(404, f"The model {json.dumps(model)[:200]} does not exist (this server serves "
                             f"{json.dumps(model_name)})", param="model", code="model_not_found")

    def submit(prompt: list[int], params: SamplingParams, param: str) -> tuple[object, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def callback(update: Update) -> None:  # on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, update)

        try:
            return engine.submit(prompt, params, callback), queue
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except PromptTooLongError as e:
            raise _bad(str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:  # token ids outside the vocabulary (the sampling fields are checked before)
            raise _bad(str(e), param=param) from None

    def end_error(update: Update) -> APIError:
        if update.finish_reason == "cancelled":
            return APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        return APIError(500, update.error or "generation failed", type="server_error", code="internal_error")

    async def handle(request: Request, chat: bool):
        where = "messages" if chat else "prompt"  # the param a bad prompt is blamed on
        try:
            body = await read_body(request)
            check_fields(body, "chat" if chat else "completions")
            # tokenizing (and rendering a chat template) a body of up to the limit takes a while: off the loop
            prompt = await run_in_threadpool(_chat_prompt if chat else _completion_prompt, engine, body)
            params = parse_sampling(body, len(prompt), engine.max_seq_len, where)
            stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
            options = _get(body, "stream_options", lambda v: isinstance(v, dict) and stream,
                           "an object, and only with stream: true", {})
            include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)
            handle, queue = submit(prompt, params, where)
        except APIError as e:
            return error_response(e)
        except ClientDisconnect:  # gone before its body arrived: nothing to answer, nothing to log
            return Response(status_code=400)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "object": obj + (".chunk" if chat and stream else ""), "created": int(time.time()),
                "model": model_name}

        def usage(u: Update) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": u.completion_tokens,
                    "total_tokens": len(prompt) + u.completion_tokens}

        if not stream:
            text, last = [], None
            loop = asyncio.get_running_loop()
            check_at = loop.time() + DISCONNECT_POLL_S
            try:
                while True:
                    # every DISCONNECT_POLL_S, tokens arriving or not (a model's come far faster than that)
                    if loop.time() >= check_at:
                        if await request.is_disconnected():  # the finally below cancels the request
                            return JSONResponse({"error": None}, status_code=499)  # nobody reads it
                        check_at = loop.time() + DISCONNECT_POLL_S
                    try:
                        last = await asyncio.wait_for(queue.get(), timeout=max(check_at - loop.time(), 0.001))
                    except asyncio.TimeoutError:
                        continue
                    text.append(last.text)
                    if last.finish_reason is not None:
                        break
            finally:
                if handle.finish_reason is None:
                    handle.cancel()
            if last.finish_reason not in FINISH:
                return error_response(end_error(last))
            choice = {"index": 0, "logprobs": None, "finish_reason": FINISH[last.finish_reason]}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            return JSONResponse({**base, "choices": [choice], "usage": usage(last)})

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            # OpenAI: with include_usage "all other chunks will also include a usage field, but with a null value"
            return event({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

        async def events():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    # A queued update is taken without a pause, and uvicorn's send does not pause either: without
                    # this, a backlog of chunks went into a connection reset under it before uvicorn could hear of
                    # it (asyncio's "socket.send() raised exception." from the fifth write on).
                    await asyncio.sleep(0)
                    u = await queue.get()
                    if u.finish_reason is not None and u.finish_reason not in FINISH:
                        yield event(end_error(u).body())
                        break
                    if u.text or u.tokens or u.finish_reason is None:
                        yield chunk(u.text, None)
                    if u.finish_reason is not None:
                        yield chunk(None, FINISH[u.finish_reason])
                        if include_usage:
                            yield event({**base, "choices": [], "usage": usage(u)})
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (Starlette cancels this generator) or the request ended
                if handle.finish_reason is None:
                    handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request):
        return await handle(request, chat=False)

    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "llm-export",
                  "max_model_len": engine.max_seq_len}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request):
        name = request.path_params["name"]
        if name != model_name:
            return error_response(unknown_model(name))
        return JSONResponse(model_card)

    async def health(request: Request):
        state = {"status": "ok" if engine.failure is None else "failed", "slots": engine.slots,
                 "running": len(engine.rows), "waiting": engine.waiting, "finished": dict(engine.finished)}
        if engine.failure is not None:
            state["error"] = engine.failure
        return JSONResponse(state, status_code=200 if engine.failure is None else 503)

    async def http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=kind, headers=exc.headers))  # a 405's Allow

    async def server_error(request: Request, exc: Exception):
        return error_response(APIError(500, f"{type(exc).__name__}: {exc}", type="server_error",
                                       code="internal_error"))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _http_protocol():
    """uvicorn's h11 protocol, plus two bounds uvicorn lacks:

    - a connection that sends no complete request is closed REQUEST_TIMEOUT_S after it opened (or after its last
      response) unless a request arrived meanwhile. uvicorn times out only keep-alive connections idle after a
      response, so connections that sent nothing, or dribbled a header a byte at a time, each held a file
      descriptor for ever, until the process ran out of them;
    - a connection whose writes stay paused (asyncio's pause_writing: the kernel's socket buffers and the
      transport's are full because the client reads nothing) for WRITE_STALL_S is aborted; uvicorn then reports the
      disconnect to the handler, which cancels the request. uvicorn's send waited for the client for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._expect_request()

        def on_response_complete(self):
            super().on_response_complete()
            self._expect_request()

        def _expect_request(self):
            armed = self.cycle  # None before the first request; else the one just answered (or pipelined next)

            def check():
                idle = self.cycle is armed and (armed is None or armed.response_complete)
                if idle and not self.transport.is_closing():
                    self.transport.close()
            self.loop.call_later(REQUEST_TIMEOUT_S, check)

        def pause_writing(self):
            super().pause_writing()
            self._stall = stall = object()  # this pause; a resume (or a later pause) replaces it

            def check():
                if self._stall is stall and not self.transport.is_closing():
                    self.transport.abort()
            self.loop.call_later(WRITE_STALL_S, check)

        def resume_writing(self):
            self._stall = None
            super().resume_writing()

    return Protocol


def serve(artifact: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, slots: int | None = None,
          threads: int | None = None, max_queue: int | None = None, prefill_chunk: int | None = None,
          model_name: str | None = None, check_memory: bool = True, log_level: str = "warning",
          backend: str = "auto") -> int:
    """Open the engine, bind host:port (0 = any free port), print one `serving ... at http://HOST:PORT` line and
    run until SIGINT/SIGTERM."""
    import uvicorn

    from runtime_py.engine import DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK

    engine = Engine(artifact, slots=slots, threads=threads, check_memory=check_memory, backend=backend,
                    max_queue=DEFAULT_MAX_QUEUE if max_queue is None else max_queue,
                    prefill_chunk=DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk)
    name = model_name or Path(artifact).resolve().name
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {name} ({engine.slots} slots, queue {engine.max_queue}, {type(engine.session).__name__}) "
          f"at http://{shown}:{bound}/v1", flush=True)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # First end every pending request as cancelled (a 503 body, an SSE error event) so that they all finish
            # inside the graceful-shutdown window. uvicorn runs the lifespan's engine.stop only after that window,
            # once it has cancelled the handlers still waiting: cut streams, plain-text 500s, a traceback each.
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(create_app(engine, name), log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=False, http=_http_protocol())
    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.stop()
    return 0
