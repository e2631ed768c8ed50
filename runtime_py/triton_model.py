"""The Triton python-backend model that streams runtime_py generations (copied as ``NAME/1/model.py``).

What it does: :class:`TritonPythonModel` is a *decoupled* model. ``initialize`` opens the artifact copied next to
this file (``./artifact``, checksums verified) with one :class:`runtime_py.engine.Engine` per instance (parameter
``runtime_backend``, default auto: the artifact's TensorRT engine when a CUDA GPU is present, its ONNX graph on ONNX
Runtime otherwise) and starts its loop: ``max_concurrency`` KV slots (at most the artifact's ``--max-batch``), and
every request joins the running batch (continuous batching: admitted into a free slot while the others decode;
``max_queue`` more may wait, beyond that a request gets an error). The runtime packages it imports are the copies
the repository writer put in ``./runtime`` (first on ``sys.path``), so the repository runs the runtime that was
current when it was written, not whatever is installed. ``execute`` parses each request on the backend's thread
(:func:`parse_request`: the inputs in :data:`INPUTS` -> prompt + :class:`SamplingParams`, with the rules of
``python -m runtime_py generate``), tokenizes it, submits it and returns at once; the engine thread sends one
response per text delta (the deltas of ``Generator.stream``: their concatenation is runtime_py's text for the same
seed and parameters, whatever else is in flight), then an empty response flagged FINAL. With ``stream`` false the
whole text comes in one response. A malformed request, bad sampling values or a prompt too long for the context
get one error response (flagged FINAL); the model keeps serving. A cancelled request frees its slot at the next
iteration.

Inputs also take what Triton's OpenAI-compatible frontend sends to python models: ``text_input``, ``stream``,
``max_tokens``, ``stop_words`` (like ``stop``), ``temperature``, ``top_p``, ``seed`` -> ``text_output``, and what
some of its releases add: ``frequency_penalty`` / ``presence_penalty`` (always sent from 2.60; refused unless 0),
``return_num_input_tokens`` / ``return_num_output_tokens`` (2.63; the counts for its usage), ``random_seed`` (the
seed's name before 2.59), ``exclude_input_in_output`` (2.64, OpenAI's echo: false puts the prompt first) and
``guided_decoding_guide*`` (a forced tool call: refused). The frontend renders chat templates itself and sends the
text: a BOS the text already starts with is not added twice (Tokenizer.encode_prompt).

What it does not do: log-probs, or more than one sequence per request.

Importable without Triton (pb_utils is None then): the tests call :func:`parse_request` directly. The repository
writer (artifacts/triton_write.py) never imports this module (artifacts does not import runtime_py): it reads
:data:`INPUTS`, :data:`OUTPUTS` and :data:`DEFAULTS` from this file's source, so they must stay plain literals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_RUNTIME = _HERE / "runtime"  # runtime_py/ + artifacts/ sources, copied by artifacts.triton_write
if _RUNTIME.is_dir() and str(_RUNTIME) not in sys.path:
    sys.path.insert(0, str(_RUNTIME))

try:  # only inside the Triton python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

# name -> (Triton data type, dims, optional). One request is one prompt, sent with a leading batch dim of 1
# (max_batch_size 1: a scalar is [1, 1], stop strings [1, k]), the shapes TensorRT-LLM's models take and Triton's
# OpenAI-compatible frontend sends.
INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "text_input": ("TYPE_STRING", [1], True),  # a raw prompt (tokenized with the artifact's tokenizer)
    "messages": ("TYPE_STRING", [1], True),  # or a JSON list of chat messages (the artifact's chat template)
    "max_tokens": ("TYPE_INT32", [1], True),
    "temperature": ("TYPE_FP32", [1], True),
    "top_p": ("TYPE_FP32", [1], True),
    "top_k": ("TYPE_INT32", [1], True),
    "repetition_penalty": ("TYPE_FP32", [1], True),
    "seed": ("TYPE_UINT64", [1], True),
    "stop": ("TYPE_STRING", [-1], True),
    "stop_words": ("TYPE_STRING", [-1], True),  # the OpenAI frontend's name for stop strings
    "ignore_eos": ("TYPE_BOOL", [1], True),
    "stream": ("TYPE_BOOL", [1], True),  # false: the whole text in one response (default true: one per delta)
    # also sent by the OpenAI-compatible frontend: token counts for its `usage` (num_input/output_tokens), and
    # penalties this model does not apply (refused unless 0)
    "return_num_input_tokens": ("TYPE_BOOL", [1], True),
    "return_num_output_tokens": ("TYPE_BOOL", [1], True),
    "frequency_penalty": ("TYPE_FP32", [1], True),
    "presence_penalty": ("TYPE_FP32", [1], True),
    # and, depending on its release: the seed under its name before Triton 2.59; OpenAI's echo (2.64 on, sent once
    # the model declares it: false puts the prompt text first); a forced tool call (refused: no guided decoding)
    "random_seed": ("TYPE_UINT64", [1], True),
    "exclude_input_in_output": ("TYPE_BOOL", [1], True),
    "guided_decoding_guide_type": ("TYPE_STRING", [1], True),
    "guided_decoding_guide": ("TYPE_STRING", [1], True),
}
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "text_output": ("TYPE_STRING", [1]),  # one text delta per response
    "num_input_tokens": ("TYPE_INT32", [1]),  # the prompt's tokens, when return_num_input_tokens
    "num_output_tokens": ("TYPE_INT32", [1]),  # the tokens of this response's text, when return_num_output_tokens
}
# config.pbtxt parameters and their values when absent (a literal: the writer reads it from this file's source).
DEFAULTS = {"max_concurrency": "8", "default_max_tokens": "32", "ort_threads": "0", "runtime_backend": "auto",
            "artifact": "artifact", "max_queue": "64"}
DEFAULT_MAX_TOKENS = int(DEFAULTS["default_max_tokens"])  # the runtime_py CLI's --max-new-tokens default


class RequestError(ValueError):
    """The request cannot be served as sent (the client gets this message)."""


def _one(name: str, array: np.ndarray):
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(np.shape(array))}")
    return flat[0]


def _text(name: str, value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input '{name}' is not valid UTF-8 ({e})") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"input '{name}' must be a string, got {type(value).__name__}")


def parse_request(get, default_max_tokens: int = DEFAULT_MAX_TOKENS):
    """(prompt, params, stream) from one request. `get(name)` returns the input as a numpy array or None when absent.

    prompt is ("text", str) or ("messages", list[dict]). Sampling follows ``python -m runtime_py generate``: greedy
    unless temperature, top_k > 0 or top_p != 1 is sent, and ``temperature`` 0 is greedy whatever else is sent (the
    OpenAI meaning, which Triton's OpenAI-compatible frontend forwards); SamplingParams checks the values."""
    from artifacts.paths import json_loads
    from runtime_py.sampling import SamplingParams

    text, messages = get("text_input"), get("messages")
    if (text is None) == (messages is None):
        raise RequestError("send exactly one of 'text_input' (a prompt) or 'messages' (a JSON list of chat messages)")
    if text is not None:
        prompt = ("text", _text("text_input", _one("text_input", text)))
        if not prompt[1]:
            raise RequestError("'text_input' is empty")
    else:
        raw = _text("messages", _one("messages", messages))
        try:
            value = json_loads(raw)
        except ValueError as e:
            raise RequestError(f"'messages' is not valid JSON ({e})") from None
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise RequestError("'messages' must be a JSON list of {\"role\": ..., \"content\": ...} objects")
        prompt = ("messages", value)

    def scalar(name, cast):
        a = get(name)
        return None if a is None else cast(_one(name, a))

    def strings(name):
        a = get(name)
        return () if a is None else tuple(_text(name, s) for s in np.asarray(a).reshape(-1))

    for name in ("guided_decoding_guide_type", "guided_decoding_guide"):  # chat with tool_choice required/named
        if get(name) is not None and _text(name, _one(name, get(name))):
            raise RequestError(f"'{name}' is not supported by this model (no guided decoding: a tool_choice of "
                               "'required' or a named function cannot be honoured); leave tool_choice out")
    seed, random_seed = scalar("seed", int), scalar("random_seed", int)
    if seed is not None and random_seed is not None and seed != random_seed:
        raise RequestError(f"'seed' ({seed}) and 'random_seed' ({random_seed}) disagree; send one")
    for name in ("frequency_penalty", "presence_penalty"):  # OpenAI fields the frontend forwards when sent
        if scalar(name, float) not in (None, 0.0):
            raise RequestError(f"'{name}' is not supported by this model (use repetition_penalty); send 0 or leave "
                               "it out")
    max_tokens = scalar("max_tokens", int)
    if max_tokens is not None and max_tokens < 1:  # SamplingParams would name its own field, max_new_tokens
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
    top_p, top_k = scalar("top_p", float), scalar("top_k", int)
    penalty = scalar("repetition_penalty", float)
    temperature = scalar("temperature", float)
    if temperature == 0:  # OpenAI's greedy (what Triton's OpenAI frontend forwards), as `runtime_py serve` reads it
        temperature, top_k, top_p = None, 0, None
    params = SamplingParams.from_options(
        temperature, top_k or 0, 1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if penalty is None else penalty, seed=random_seed if seed is None else seed,
        max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stop=strings("stop") + strings("stop_words"), ignore_eos=bool(scalar("ignore_eos", bool)))
    stream = scalar("stream", bool)
    return prompt, params, True if stream is None else stream


def echo_of(get, prompt: tuple) -> str:
    """The text that comes before the generated text: the prompt when 'exclude_input_in_output' is sent false
    (OpenAI's echo, as Triton's OpenAI frontend forwards it), else nothing."""
    exclude = get("exclude_input_in_output")
    if exclude is None or bool(_one("exclude_input_in_output", exclude)):
        return ""
    if prompt[0] != "text":
        raise RequestError("'exclude_input_in_output' false (echo) takes a 'text_input' prompt, not 'messages'")
    return prompt[1]


def _check_stub_numpy() -> None:
    """Fail the load with the reason when the stub and numpy disagree on numpy's C ABI.

    A stub built against numpy 1.x (the one nvidia-pytriton 0.7 bundles, Triton 2.51) misreads numpy 2 arrays:
    numeric inputs get garbage strides and BYTES inputs abort the stub. Checked once, with a round trip."""
    probe = np.array([3, -7, 11], dtype=np.int32)
    try:  # from_dlpack(...).as_numpy() builds the array in C++, the way request inputs are built
        back = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("probe", probe).to_dlpack()).as_numpy()
        ok = np.array_equal(np.asarray(back).copy(), probe)
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise RuntimeError(
            f"the python backend stub cannot exchange tensors with numpy {np.__version__} ({np.__file__}): the stub "
            "was built against another numpy C ABI (the stub bundled with nvidia-pytriton 0.7 / Triton 2.51 needs "
            "numpy<2). Run the server with a Python environment holding numpy<2 first on PATH "
            "(python -m artifacts.triton stub-env DIR makes one; see the repository README)")


def _log(message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _error(message: str):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older backends: message only
        return pb_utils.TritonError(message)


def model_parameters(args, defaults: dict, here: Path) -> tuple[dict, dict, Path]:
    """(model config, its parameters over `defaults` (an empty value keeps the default), the artifact directory they
    name: a relative one sits beside model.py, `here`). Both python models' ``initialize`` read their config so."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    p = {**defaults, **{k: v for k, v in params.items() if v}}
    artifact = Path(p["artifact"])
    return config, p, artifact if artifact.is_absolute() else here / artifact


def _use_instance_gpu(args) -> None:
    """A GPU instance (KIND_AUTO on a GPU host) runs its TensorRT engine on the GPU Triton gave it, not on GPU 0
    (where every instance would land): torch's current device, which TrtSession allocates and runs on."""
    if args.get("model_instance_kind") != "GPU":
        return
    try:
        import torch
    except ImportError:  # no torch in this environment: no TensorRT session either (it needs torch)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(args.get("model_instance_device_id") or 0))


class TritonPythonModel:
    def initialize(self, args):
        from runtime_py.engine import Engine

        _check_stub_numpy()
        _, p, artifact = model_parameters(args, DEFAULTS, _HERE)
        _use_instance_gpu(args)
        self.engine = Engine(artifact, slots=max(1, int(p["max_concurrency"])), max_queue=int(p["max_queue"]),
                             threads=int(p["ort_threads"]) or None, backend=p["runtime_backend"])
        self.engine.start()
        import runtime_py

        _log(f"{args.get('model_name')}: runtime_py from {Path(runtime_py.__file__).parent}, artifact {artifact} "
             f"on {type(self.engine.session).__name__}, numpy {np.__version__}, {self.engine.slots} KV slots "
             f"(continuous batching), up to {p['max_queue']} waiting")
        self.default_max_tokens = int(p["default_max_tokens"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()

            def get(name, request=request):
                t = pb_utils.get_input_tensor_by_name(request, name)
                return None if t is None else t.as_numpy()

            try:
                (kind, value), params, stream = parse_request(get, self.default_max_tokens)
                echo = echo_of(get, (kind, value))
                ids = self.engine.encode(value) if kind == "text" else self.engine.encode_chat(value)
                counts = {name: bool(np.asarray(a).reshape(-1)[:1].any()) for name in
                          ("return_num_input_tokens", "return_num_output_tokens") if (a := get(name)) is not None}
                responder = _Responder(sender, stream, len(ids), counts, echo)
                responder.request = self.engine.submit(ids, params, responder)
            except Exception as e:  # noqa: BLE001 - every bad request becomes an error response
                _fail(sender, e)
        return None  # decoupled: responses go through the senders

    def finalize(self):
        self.engine.stop()  # running requests end "cancelled": their responders send the final flag


class _Responder:
    """The engine callback of one request (runs on the engine thread): text deltas to Triton, then FINAL."""

    def __init__(self, sender, stream: bool, prompt_tokens: int = 0, counts: dict | None = None, echo: str = ""):
        self.sender, self.stream, self.text = sender, stream, [echo] if echo else []  # the echo goes first
        self.cancelled = getattr(sender, "is_cancelled", lambda: False)
        self.request = None
        self.prompt_tokens, self.counts = prompt_tokens, counts or {}
        self.tokens = 0  # generated since the last response that counted them
        self.sent = False  # a response with the counts asked for has gone out

    def __call__(self, update) -> None:
        try:
            if update.finish_reason is None and self.cancelled():
                if self.request is not None:
                    self.request.cancel()  # the engine frees the slot at its next iteration and calls back once more
                return
            if update.error is not None:
                _fail(self.sender, RuntimeError(update.error))
                return
            self.tokens += len(update.tokens)
            if update.text:
                self.text.append(update.text)
                if self.stream:
                    self._send("".join(self.text))
                    self.text = []
            if update.finish_reason is not None:
                if self.text:  # the whole text, unstreamed; or an echo no generated text came after
                    self._send("".join(self.text))
                # counts no text came with: tokens that made none (a stop, EOS first), or the prompt's count when
                # nothing was generated into text at all
                if (self.tokens and self.counts.get("return_num_output_tokens")) or \
                        (not self.sent and self.counts.get("return_num_input_tokens")):
                    self._send("")
                self.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - the client is gone; the engine must go on
            pass

    def _send(self, text: str) -> None:
        """One response: the text (shape [1, 1], the batch dim first) and the token counts asked for."""
        out = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
        if self.counts.get("return_num_input_tokens"):
            out.append(pb_utils.Tensor("num_input_tokens", np.array([[self.prompt_tokens]], dtype=np.int32)))
        if self.counts.get("return_num_output_tokens"):
            out.append(pb_utils.Tensor("num_output_tokens", np.array([[self.tokens]], dtype=np.int32)))
        self.tokens, self.sent = 0, True
        self.sender.send(pb_utils.InferenceResponse(output_tensors=out))


def _fail(sender, e: Exception):
    message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    try:
        sender.send(pb_utils.InferenceResponse(error=_error(message)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:  # noqa: BLE001 - the client is gone; nothing to tell
        pass
