"""The generation loop: prefill, decode steps, sampling, stop conditions, streaming, batches.

What it does: :class:`Generator` opens an artifact (checksums verified). Its loop is three small functions, as in
gpt-fast: ``prefill`` (the prompts, laid out by the session's padding policy: right-padded static buffers,
left-padded masked concat; the ragged two-call prefill for graphs that return only the last position's logits),
``decode_one_token`` (one token per row at its next position) and ``steps``, which samples, applies EOS / stop
strings / the length limit per row (``_accept``) and yields after every model call. ``generate`` (a batch of
prompts, different lengths allowed) and ``stream`` (text deltas of one prompt) are thin consumers of ``steps``, so
the streamed text equals the non-streamed text by construction. Log-probs (only with ``SamplingParams(logprobs=True)``: a log-softmax over the
vocabulary costs ~0.3 ms a token at a 152k vocabulary) are of the raw model distribution.

What it does not do: know the graph's internals (session.py) or render chat templates (chat.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from artifacts.bundle import ArtifactError
from runtime_py.sampling import SamplingParams, find_stop, logprobs_of, make_rng, sample, stop_holdback
from runtime_py.session import OrtSession


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class ContextLengthError(ValueError):
    """Prompt plus max_new_tokens does not fit the artifact's context."""


@dataclass
class Row:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos" | "stop" | "length"


@dataclass
class Batch:
    """The model-side state of one batch between calls: its cache, the concat-mode mask, each row's next
    position."""

    cache: object  # session KVCache
    mask: np.ndarray | None
    next_positions: np.ndarray  # [B] int64


@dataclass
class Result:
    rows: list[Row]
    ttft_s: float
    decode_tok_s: float

    @property
    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.rows]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


class Generator:
    def __init__(self, artifact: str | Path, threads: int | None = None, backend: str = "auto", batch: int = 1,
                 check_memory: bool = True):
        """backend: "auto" runs an artifact's TensorRT engine when a CUDA GPU is present and its graph on ONNX
        Runtime otherwise; "onnxruntime" or "tensorrt" force one. `batch`: the sequences whose KV caches will be
        live at once, for the memory check an ONNX Runtime session makes before loading (runtime_py/memory.py);
        `check_memory=False` skips that check."""
        self.root = Path(artifact)
        self.session = self._open(backend, threads, batch, check_memory)
        self.tokenizer = None
        if (self.root / "tokenizer.json").exists():
            from runtime_py.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(self.root)
        manifest = self.session.manifest
        eos = set(manifest.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_ids)
        self.eos_ids = eos
        pad = manifest.pad_token_id
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_id  # tokenizer_config's pad token, else generation_config's pad or EOS id
        if pad is not None and not 0 <= pad < manifest.vocab_size:  # it is fed to the graph's embedding Gather
            raise ArtifactError(f"{self.root}: the pad token id {pad} (from the tokenizer files or "
                                f"generation_config.json) is outside the vocabulary [0, {manifest.vocab_size})")
        self.pad_id = 0 if pad is None else pad  # pad slots are masked (or overwritten), so any valid id works

    def _open(self, backend: str, threads: int | None, batch: int, check_memory: bool):
        from artifacts.bundle import read_manifest

        if backend not in ("auto", "onnxruntime", "tensorrt"):
            raise ValueError(f"backend must be auto, onnxruntime or tensorrt, got {backend!r}")
        has_engine = read_manifest(self.root).engine is not None
        if backend == "tensorrt" or (backend == "auto" and has_engine and _cuda_available()):
            from runtime_py.trt_session import TrtSession

            try:
                return TrtSession(self.root)
            except ArtifactError as e:  # this machine cannot run the engine (version, GPU, TensorRT missing)
                if backend == "tensorrt":
                    raise
                print(f"note: not using the artifact's TensorRT engine ({e}); running its ONNX graph on ONNX "
                      "Runtime instead (--backend tensorrt to insist)", file=sys.stderr)
        return OrtSession(self.root, threads=threads, batch=batch, check_memory=check_memory)

    # -- helpers ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A raw prompt's ids (Tokenizer.encode_prompt: the special tokens, one BOS however the text begins)."""
        self._need_tokenizer()
        return self.tokenizer.encode_prompt(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from runtime_py.chat import load_chat_template, render_chat

        self._need_tokenizer()
        template, specials = load_chat_template(self.root)
        return self.tokenizer.encode(render_chat(template, messages, add_generation_prompt=True, **specials),
                                     add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _need_tokenizer(self, what: str = "text; pass token ids instead"):
        if self.tokenizer is None:
            raise ValueError(f"{self.root}: the artifact has no tokenizer.json, which {what}")

    def check_chat(self) -> None:
        """ValueError unless messages can be encoded: a tokenizer and a chat template."""
        from runtime_py.chat import load_chat_template

        self._need_tokenizer("chat messages are encoded with")
        load_chat_template(self.root)

    def check_stops(self, params: SamplingParams) -> None:
        """Stop strings are matched on the decoded text: refused, not ignored, without a tokenizer."""
        if params.stop:
            self._need_tokenizer("stop strings are matched against")

    def check_length(self, i: int, n: int, params: SamplingParams) -> None:
        """ContextLengthError unless prompt `i` of `n` tokens plus params.max_new_tokens fits the context."""
        limit = self.session.max_seq_len
        if n + params.max_new_tokens > limit:
            raise ContextLengthError(f"prompt {i} has {n} tokens; with max_new_tokens={params.max_new_tokens} that is "
                                     f"{n + params.max_new_tokens} > the artifact's context length {limit}")

    def check_context(self, prompts: list[list[int]], params: SamplingParams) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            self.check_length(i, len(p), params)
            bad = [t for t in p if not 0 <= t < self.session.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, "
                                 f"{self.session.vocab_size})")
        if len(prompts) > self.session.manifest.max_batch:
            raise ValueError(f"batch of {len(prompts)} prompts > the artifact's max batch "
                             f"{self.session.manifest.max_batch}")

    # -- the loop: prefill, decode_one_token, steps (gpt-fast's prefill / decode_one_token / decode_n_tokens) -------
    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[np.ndarray, "Batch"]:
        """Run the prompts (laid out by the session's padding policy) into a new cache with room for
        `max_new_tokens` more; logits [B, V] at each row's last prompt token, and the batch's state."""
        B, lens = len(prompts), np.array([len(p) for p in prompts])
        padded = self.session.pad(prompts, self.pad_id)
        cache = self.session.new_cache(B, padded.ids.shape[1] + max_new_tokens)
        ids, positions, last = padded.ids, padded.positions, padded.last
        if self.session.last_logits:  # the graph returns the logits of each call's last index only
            if padded.mask is None and len(set(lens.tolist())) > 1:
                # Right-padded rows end at different indices: prefill all but the last index (pads write slots
                # past their prompt, overwritten later), then every row's last prompt token in one S=1 call.
                S = ids.shape[1]
                self.session.forward(ids[:, :S - 1], positions[:, :S - 1], None, cache)
                ids, positions = np.array([[p[-1]] for p in prompts], dtype=np.int64), (lens - 1).reshape(B, 1)
            last = np.zeros(B, dtype=np.int64)
        logits = self.session.forward(ids, positions, padded.mask, cache)
        return logits[np.arange(B), last], Batch(cache, padded.mask, lens.copy())

    def decode_one_token(self, batch: "Batch", tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row at its next position; logits [B, V]."""
        B = len(tokens)
        if batch.mask is not None:
            batch.mask = np.concatenate([batch.mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        logits = self.session.forward(tokens.reshape(B, 1).astype(np.int64), batch.next_positions.reshape(B, 1),
                                      batch.mask, batch.cache)
        batch.next_positions += 1
        return logits[:, -1]

    def steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[list[Row], float]]:
        """Yield (rows, seconds since start) after the prefill and after every decode step."""
        params.validate()
        self.check_context(prompts, params)
        self.check_stops(params)
        rng = make_rng(params.seed)
        rows = [Row(list(p)) for p in prompts]
        seen = [list(p) for p in prompts]
        decoders = [self._stream_decoder() for _ in rows]
        t0 = time.perf_counter()
        logits, batch = self.prefill(prompts, params.max_new_tokens)
        for _ in range(params.max_new_tokens):
            chosen = sample(logits, params, rng, seen)
            lps = logprobs_of(logits, chosen) if params.logprobs else None
            for b, row in enumerate(rows):
                if row.finish_reason is None:
                    self._accept(row, int(chosen[b]), None if lps is None else float(lps[b]), decoders[b], params)
                    seen[b].append(int(chosen[b]))
            yield rows, time.perf_counter() - t0
            if all(r.finish_reason is not None for r in rows):
                return
            logits = self.decode_one_token(batch, chosen)
        for row in rows:
            row.finish_reason = row.finish_reason or "length"

    def _accept(self, row: Row, tok: int, logprob: float | None, decoder, params: SamplingParams) -> None:
        """One chosen token for a running row: EOS, the text so far and its stop strings, the length limit."""
        if tok in self.eos_ids and not params.ignore_eos:
            row.finish_reason = "eos"
            self._flush(row, decoder)
            return
        row.tokens.append(tok)
        if logprob is not None:
            row.logprobs.append(logprob)
        self._append_text(row, decoder, params)
        if row.finish_reason is None and len(row.tokens) >= params.max_new_tokens:
            row.finish_reason = "length"
            self._flush(row, decoder)

    def _stream_decoder(self):
        if self.tokenizer is None:
            return None
        from runtime_py.tokenizer import StreamDecoder

        return StreamDecoder(self.tokenizer)

    @staticmethod
    def _flush(row: Row, decoder) -> None:
        if decoder is not None:
            row.text += decoder.flush()

    def _append_text(self, row: Row, decoder, params: SamplingParams) -> None:
        if decoder is None:
            return
        before = len(row.text)
        row.text += decoder.push(row.tokens[-1])
        at = find_stop(row.text, params.stop, before)
        if at >= 0:
            row.text = row.text[:at]
            row.finish_reason = "stop"

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Result:
        ttft, elapsed = None, 0.0
        for rows, elapsed in self.steps(prompts, params):
            ttft = elapsed if ttft is None else ttft
        decode_tokens = sum(max(len(r.tokens) - 1, 0) for r in rows)
        decode_s = elapsed - ttft
        return Result(rows, ttft, decode_tokens / decode_s if decode_s > 0 else 0.0)

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas of one prompt as they are produced; "".join(...) equals generate(...).texts[0]."""
        self._need_tokenizer("streamed text is decoded with (without streaming, generate returns the token ids)")
        sent = 0
        for rows, _ in self.steps([prompt], params):
            row = rows[0]
            # hold back the end while it could still be the start of a stop string (cut from the final text)
            end = len(row.text) - (0 if row.finish_reason is not None else stop_holdback(row.text, params.stop))
            if end > sent:
                yield row.text[sent:end]
                sent = end
        if len(row.text) > sent:
            yield row.text[sent:]
