"""Continuous batching: one session serving many requests at once through a fixed number of KV slots.

What it does: :class:`Engine` opens an artifact the way :class:`runtime_py.generate.Generator` does (ONNX Runtime,
or the TensorRT engine on a GPU) and keeps ``slots`` rows of KV cache (at most the artifact's ``max_batch``).
Requests (:meth:`Engine.submit`: prompt ids + :class:`SamplingParams` + a callback) wait in a bounded queue and are
admitted into free slots while other rows decode. Each iteration (:meth:`Engine.step`):

1. cancelled requests are dropped (their slots are free at once);
2. waiting requests are admitted into free slots, the lowest free slot first (busy slots stay near the front);
3. prefill: prompts are cut into chunks of ``prefill_chunk`` tokens at fixed offsets (0, C, 2C, ...), one batch-1
   call per chunk on that slot's rows of the shared buffers, oldest request first, until the iteration's budget of
   ``prefill_chunk`` prompt tokens is spent (at least one chunk runs), so a running stream never waits for more
   than one chunk's worth of prefill between two of its tokens. After a prompt's last chunk (its last token is the
   call's last index, which is all a ``--logits last`` graph returns) its first token is sampled;
4. decode: ONE call ``[hi, 1]`` over slots ``0..hi-1`` (``hi`` = highest busy slot + 1) feeds every decoding row
   its pending token at its own position, and samples each row's next token.

Static KV mode (slot == row of the ``[slots, KV, max_seq_len, D]`` buffers; the GroupQueryAttention ``ort``
lowering derives each row's past length from its positions): the buffers are allocated here and the calls run on
``KVCache`` views of row ranges (row ``b`` of a C-contiguous buffer is contiguous memory, and so is rows ``0..hi-1``).
In a decode call, a row that is still prefilling is fed a pad token at its next position (the slot its next chunk
overwrites before anything reads it) and a free slot a pad at position 0. Graphs that read one buffer and write
another (the reference and trt-native lowerings on ONNX Runtime, and the TensorRT session) get the written rows
copied back, so the data of every row always lives in one set. Concat KV mode: every request owns a batch-1 cache
that grows (left-padding rows that join mid-flight would make every row pay for the longest one); each row then
decodes in its own [1, 1] call: correct and concurrent, but not batched (build with ``--kv-mode static`` for
throughput).

Per row: its position, :class:`SamplingParams`, its own ``np.random.Generator`` (``make_rng(seed)``: one uniform per
sampled token, so a seeded request draws the same numbers whatever else is in flight), stop strings (with the
hold-back of ``Generator.stream``: text that could still be the start of a stop string is sent once it cannot),
``max_new_tokens``, EOS and cancellation. Token choice, stop strings and finish reasons follow ``Generator.steps``
exactly, so a request run through the engine produces what ``Generator.generate`` produces for it alone (up to
floating-point differences between batch sizes in the decode matmuls; tests/test_engine_batching.py measures them).

Threading: :meth:`start` runs the loop in one background thread that owns the session; :meth:`submit` and
:meth:`Request.cancel` may be called from any thread. Callbacks run on the engine thread and must not block (the
HTTP server hands them to its event loop). Without :meth:`start`, call :meth:`step` (or :meth:`generate`) yourself.

What it does not do: HTTP (runtime_py/serve.py), tokenizing requests (the caller passes ids; :meth:`encode` and
:meth:`encode_chat` are the Generator's), log-probs, beam search, prefix caching or preemption (an admitted request
keeps its slot until it finishes or is cancelled).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from artifacts.bundle import read_manifest
from runtime_py.sampling import SamplingParams, find_stop, make_rng, sample, stop_holdback

DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_QUEUE = 64


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue requests already (the server answers 429)."""


class EngineClosedError(RuntimeError):
    """The engine is stopping or its loop has died (the server answers 503)."""


class PromptTooLongError(ValueError):
    """Prompt plus max_new_tokens does not fit the artifact's context."""


@dataclass
class Update:
    """What happened to one request: new tokens and text, or its end. Sent to the request's callback."""

    tokens: list[int]  # new generated ids (EOS is not one of them)
    text: str  # new text; text that may still turn out to be part of a stop string is held back
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled" | "error"; None while running
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens sampled so far (an EOS counts: the model produced it)


class Request:
    """One submitted generation. `cancel()` from any thread; the engine frees its slot at its next iteration."""

    def __init__(self, prompt: list[int], params: SamplingParams, callback: Callable[[Update], None] | None):
        self.prompt = list(prompt)
        self.params = params
        self.callback = callback
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Output:
    """The collected result of one request (Engine.generate)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class _Row:
    """A request admitted into a slot."""

    def __init__(self, request: Request, slot: int, decoder):
        self.request = request
        self.slot = slot
        self.fed = 0  # tokens of the sequence (prompt, then generated) already in the cache = next position
        self.pending: int | None = None  # a sampled token the next decode call feeds at position `fed`
        self.tokens: list[int] = []
        self.seen = list(request.prompt)  # prompt + generated, for the repetition penalty
        self.sampled = 0
        self.rng = make_rng(request.params.seed)
        self.decoder = decoder
        self.text = ""
        self.sent = 0  # characters of text already sent
        self.finish: str | None = None
        self.cache = None  # concat mode: this row's own KVCache

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt)


class _StaticBuffers:
    """The shared [slots, KV, L, D] buffers of a static-KV session and KVCache views of row ranges of them.

    ONNX Runtime: numpy arrays wrapped as OrtValues (which share their memory); TensorRT: torch CUDA tensors. A
    session that writes a second set (``present`` != ``past``) swaps the view's sets after each call; the rows it
    wrote are copied back into the first set and the swap undone, so every row's data stays in one place."""

    def __init__(self, session, slots: int, length: int):
        from runtime_py.session import KVCache

        self._kv_cache = KVCache
        self.session = session
        self.length = length
        shape = (slots, session.kv_heads, length, session.head_dim)
        torch = getattr(session, "torch", None)  # TrtSession keeps torch; OrtSession runs on numpy
        if torch is None:
            import onnxruntime as ort

            alloc = lambda: np.zeros(shape, session.kv_dtype)  # noqa: E731
            self._wrap = ort.OrtValue.ortvalue_from_numpy
        else:
            alloc = lambda: torch.zeros(shape, dtype=session.kv_dtype, device="cuda")  # noqa: E731
            self._wrap = lambda t: t
        self.home = [alloc() for _ in session.kv_in]
        self.other = None if getattr(session, "in_place", False) else [alloc() for _ in session.kv_in]
        self._views: dict[tuple[int, int], object] = {}

    def _view(self, lo: int, hi: int):
        cache = self._views.get((lo, hi))
        if cache is None:  # kept: an in-place ORT view holds its prepared I/O binding
            values = [self._wrap(a[lo:hi]) for a in self.home]
            spare = None if self.other is None else [self._wrap(a[lo:hi]) for a in self.other]
            cache = self._views[(lo, hi)] = self._kv_cache(values, spare, self.length)
        return cache

    def forward(self, lo: int, hi: int, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        cache = self._view(lo, hi)
        logits = self.session.forward(ids, pos, None, cache)
        if self.other is not None:
            for home, other in zip(self.home, self.other):
                home[lo:hi] = other[lo:hi]
            cache.values, cache.spare = cache.spare, cache.values
        return logits


class Engine:
    def __init__(self, artifact: str | Path, slots: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_queue: int = DEFAULT_MAX_QUEUE, threads: int | None = None, backend: str = "auto",
                 check_memory: bool = True):
        """`slots`: concurrent requests (default and upper bound: the artifact's max_batch); `prefill_chunk`:
        prompt tokens per prefill call and per iteration; `max_queue`: requests that may wait for a slot before
        submit() raises QueueFullError. The memory check (runtime_py/memory.py) counts `slots` KV caches."""
        from runtime_py.generate import Generator

        self.root = Path(artifact)
        manifest = read_manifest(self.root)
        cap = manifest.max_batch
        slots = cap if slots is None else slots
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= cap:
            raise ValueError(f"slots (--max-batch) must be an integer in [1, {cap}] (the artifact's max batch; "
                             f"build with a larger --max-batch for more), got {slots!r}")
        for name, value, low in (("prefill_chunk", prefill_chunk, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.generator = Generator(self.root, threads=threads, backend=backend, batch=slots,
                                   check_memory=check_memory)
        self.session = self.generator.session
        self.tokenizer = self.generator.tokenizer
        self.eos_ids = self.generator.eos_ids
        self.pad_id = self.generator.pad_id
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.max_seq_len = self.session.max_seq_len
        self.static = self.session.kv_mode == "static"
        self.buffers = _StaticBuffers(self.session, slots, self.max_seq_len) if self.static else None
        self.rows: list[_Row] = []  # admission order; touched by the engine thread only
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the loop died, if it did
        self.iterations = 0
        self.finished: dict[str, int] = {}  # finish_reason -> how many requests ended so far

    # -- requests -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.generator.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.generator.encode_chat(messages)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (PromptTooLongError for the context) when the request cannot run."""
        if not prompt:
            raise ValueError("the prompt is empty")
        self.generator.check_stops(params)
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, (int, np.integer))
               or not 0 <= t < self.session.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.session.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens; with max_new_tokens={params.max_new_tokens} that is "
                f"{len(prompt) + params.max_new_tokens} > the context length {self.max_seq_len}")

    def submit(self, prompt: list[int], params: SamplingParams,
               callback: Callable[[Update], None] | None = None) -> Request:
        """Queue a request; raises ValueError (bad request), QueueFullError or EngineClosedError."""
        params.validate()
        self.check(prompt, params)
        request = Request([int(t) for t in prompt], params, callback)
        with self._cv:
            if self._closed or self.failure is not None:
                raise EngineClosedError(self.failure or "the engine is shutting down")
            free = self.slots - len(self.rows)  # requests that the next iteration admits do not count as queued
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFullError(f"the queue is full: {len(self._waiting)} requests wait for the {self.slots} "
                                     f"slots ({len(self.rows)} busy; at most {self.max_queue} may wait beyond the "
                                     "free ones); retry later")
            self._waiting.append(request)
            self._cv.notify()
        return request

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self._waiting)

    # -- the loop -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (the only thread that touches the session from now on)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="runtime_py-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; running and waiting requests end with finish_reason "cancelled"."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._drain("cancelled", None)

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self.rows:
                        self._cv.wait()
                    if self._closed:
                        break
                self.step()
            self._drain("cancelled", None)
        except BaseException as e:  # noqa: BLE001 - a bug in the loop: tell every client and refuse new requests
            self.failure = f"the engine loop failed: {type(e).__name__}: {e}"
            self._drain("error", self.failure)
            raise

    def _drain(self, reason: str, error: str | None) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for row in list(self.rows):
            self._finish(row, reason, error)
        for request in waiting:
            self._send(request, Update([], "", reason, error, len(request.prompt), 0))

    def step(self) -> int:
        """One iteration: drop cancelled, admit, prefill (up to one chunk budget), one decode call. Returns the
        number of model calls made."""
        calls = 0
        self._drop_cancelled()
        self._admit()
        calls += self._prefill()
        calls += self._decode()
        self.iterations += 1
        return calls

    def _drop_cancelled(self) -> None:
        """End every cancelled request, waiting or running, with finish_reason "cancelled" (its slot freed)."""
        with self._cv:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self._send(request, Update([], "", "cancelled", None, len(request.prompt), 0))
        for row in [r for r in self.rows if r.request.cancelled]:
            self._finish(row, "cancelled", None)

    def _admit(self) -> None:
        while len(self.rows) < self.slots:
            with self._cv:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            used = {r.slot for r in self.rows}
            slot = next(s for s in range(self.slots) if s not in used)
            row = _Row(request, slot, self._stream_decoder())
            if not self.static:
                row.cache = self.session.new_cache(1, 0)
            self.rows.append(row)

    def _prefill(self) -> int:
        budget, calls = self.prefill_chunk, 0
        for row in list(self.rows):
            while row.prefilling and row.finish is None:
                prompt = row.request.prompt
                n = min(self.prefill_chunk - row.fed % self.prefill_chunk, len(prompt) - row.fed)
                if calls and n > budget:
                    return calls
                ids = np.array([prompt[row.fed:row.fed + n]], dtype=np.int64)
                pos = np.arange(row.fed, row.fed + n, dtype=np.int64)[None, :]
                try:
                    logits = self._forward_row(row, ids, pos)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    self._finish(row, "error", f"prefill failed: {type(e).__name__}: {e}")
                    break
                calls += 1
                budget -= n
                row.fed += n
                if not row.prefilling:
                    self._sample(row, logits[:, -1])
        return calls

    def _forward_row(self, row: _Row, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if self.static:
            return self.buffers.forward(row.slot, row.slot + 1, ids, pos)
        mask = np.ones((1, pos[0, -1] + 1), dtype=np.int64)  # the row's own cache: every slot is real
        return self.session.forward(ids, pos, mask, row.cache)

    def _decode(self) -> int:
        decoding = [r for r in self.rows if r.pending is not None and r.finish is None]
        if not decoding:
            return 0
        if not self.static:
            for row in decoding:
                try:
                    logits = self._forward_row(row, np.array([[row.pending]], dtype=np.int64),
                                               np.array([[row.fed]], dtype=np.int64))
                except Exception as e:  # noqa: BLE001
                    self._finish(row, "error", f"decode failed: {type(e).__name__}: {e}")
                    continue
                row.fed += 1
                row.pending = None
                self._sample(row, logits[:, -1])
            return len(decoding)
        hi = max(r.slot for r in self.rows) + 1
        ids = np.full((hi, 1), self.pad_id, dtype=np.int64)
        pos = np.zeros((hi, 1), dtype=np.int64)  # free slots: a pad at position 0
        for row in self.rows:
            pos[row.slot, 0] = row.fed  # prefilling rows: a pad where their next chunk writes
            if row.pending is not None:
                ids[row.slot, 0] = row.pending
        try:
            logits = self.buffers.forward(0, hi, ids, pos)[:, -1]
        except Exception as e:  # noqa: BLE001 - the batch call failed: every row in it fails
            for row in decoding:
                self._finish(row, "error", f"decode failed: {type(e).__name__}: {e}")
            return 1
        for row in decoding:
            row.fed += 1
            row.pending = None
            self._sample(row, logits[row.slot:row.slot + 1])
        return 1

    # -- tokens -> text -----------------------------------------------------------------------------------------
    def _stream_decoder(self):
        if self.tokenizer is None:
            return None
        from runtime_py.tokenizer import StreamDecoder

        return StreamDecoder(self.tokenizer)

    def _sample(self, row: _Row, logits: np.ndarray) -> None:
        """Choose the row's next token from its logits [1, V] and apply Generator.steps' rules to it."""
        params = row.request.params
        try:
            tok = int(sample(logits, params, row.rng, [row.seen])[0])
        except ValueError as e:  # NaN logits
            self._finish(row, "error", f"sampling failed: {e}")
            return
        row.sampled += 1
        if tok in self.eos_ids and not params.ignore_eos:
            if row.decoder is not None:
                row.text += row.decoder.flush()
            self._finish(row, "eos", None)
            return
        row.tokens.append(tok)
        row.seen.append(tok)
        if row.decoder is not None:
            before = len(row.text)
            row.text += row.decoder.push(tok)
            at = find_stop(row.text, params.stop, before)  # the earliest in the text, as in Generator
            if at >= 0:
                row.text = row.text[:at]
                self._finish(row, "stop", None, [tok])
                return
        if len(row.tokens) >= params.max_new_tokens:
            if row.decoder is not None:
                row.text += row.decoder.flush()
            self._finish(row, "length", None, [tok])
            return
        row.pending = tok
        end = max(len(row.text) - stop_holdback(row.text, params.stop), row.sent)
        self._emit(row, [tok], end, None, None)

    def _emit(self, row: _Row, tokens: list[int], end: int, reason: str | None, error: str | None) -> None:
        text = row.text[row.sent:end]
        row.sent = end
        self._send(row.request, Update(tokens, text, reason, error, len(row.request.prompt), row.sampled))

    def _finish(self, row: _Row, reason: str, error: str | None, tokens: list[int] | None = None) -> None:
        """End the row: send the rest of its text and free its slot (the next admitted request overwrites it)."""
        row.finish = reason
        if row in self.rows:
            self.rows.remove(row)
        row.cache = None
        self._emit(row, tokens or [], len(row.text), reason, error)

    def _send(self, request: Request, update: Update) -> None:
        if update.finish_reason is not None:
            request.finish_reason = update.finish_reason
            self.finished[update.finish_reason] = self.finished.get(update.finish_reason, 0) + 1
        if request.callback is None:
            return
        try:
            request.callback(update)
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request, never the engine
            request.cancelled = True

    # -- synchronous use ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Output]:
        """Run requests to completion on this thread (the loop must not be started). Every prompt is checked
        first (ValueError: nothing submitted); they are submitted as the queue takes them, and if anything fails
        on the way, those already submitted are withdrawn before the error propagates."""
        if self._thread is not None:
            raise RuntimeError("generate() runs the engine on the calling thread; the loop is already started")
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        for prompt, p in zip(prompts, params):
            p.validate()
            self.check(prompt, p)
        outputs = [Output() for _ in prompts]

        def collect(out: Output):
            def callback(u: Update):
                out.tokens += u.tokens
                out.text += u.text
                out.finish_reason, out.error = u.finish_reason, u.error
            return callback

        pending, mine = deque(zip(prompts, params, outputs)), []
        try:
            while pending or self.busy:
                while pending:
                    prompt, p, out = pending[0]
                    try:
                        mine.append(self.submit(prompt, p, collect(out)))
                    except QueueFullError:  # the rest waits for this step to free room
                        break
                    pending.popleft()
                self.step()
        except BaseException:  # what was submitted is withdrawn at once, without a model call
            for request in mine:
                request.cancel()
            self._drop_cancelled()
            raise
        return outputs

