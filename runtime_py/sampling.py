"""Next-token selection over a batch of logits: greedy or sampled, with an explicit RNG.

What it does: :class:`SamplingParams` holds the user's decoding options and checks them once, at construction.
:func:`sample` turns fp32 logits ``[B, V]`` into next-token ids ``[B]`` in the same order and with the same
semantics as transformers' logits processors: repetition penalty (over prompt + generated ids) -> temperature ->
top-k -> top-p -> one categorical draw per row from the ``np.random.Generator`` the caller passes in. Greedy is the
argmax after the repetition penalty (temperature/top-k/top-p cannot change an argmax). :func:`logprobs_of` reports
the log-probability of chosen ids under the model's raw distribution.

What it does not do: no min-p, typical, beam search, n-gram bans, logit bias or per-row parameters; no stop-string
or EOS handling (``max_new_tokens``, ``stop`` and ``ignore_eos`` are carried here for the generation loop, which
owns them). It never creates an RNG behind the caller's back: reproducibility is ``make_rng(params.seed)``.
Only numpy: this file ships with the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


DEFAULT_MAX_NEW_TOKENS = 32  # the CLI's --max-new-tokens, the Triton model's and the server's max_tokens default
# Stop strings are checked against the text after every token, and a stream holds back what could still start one
# (stop_holdback): bounded, for requests from the network (the HTTP server and the Triton model take them from clients).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


PENALTY_RANGE = (1e-4, 1e4)  # a fp32 logit (|x| < ~1e4) times or over these stays finite


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0  # used only when not greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (CTRL paper): > 1 discourages repeats
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # report each chosen token's log-prob (a log-softmax over the vocabulary per token)

    def __post_init__(self):
        if isinstance(self.stop, list):  # a list from JSON/argparse is fine; a bare str is a bug (checked below)
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @classmethod
    def from_options(cls, temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                     greedy: bool = False, **rest) -> "SamplingParams":
        """What a user's options mean, the one rule every front end (CLI flags, Triton request fields, HTTP
        request bodies) applies: greedy unless a temperature, a top_k > 0 or a top_p != 1 is given; `greedy=True`
        together with any of those is refused (a temperature <= 0 is refused by validate: a front end whose protocol
        means greedy by temperature 0, like OpenAI's, passes None). `rest`: the other fields as they are
        (max_new_tokens, stop, seed, ...)."""
        sampled = temperature is not None or bool(top_k) or top_p != 1.0
        if _is_real(temperature) and temperature <= 0:  # a front end's value, named as its user knows it
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}; decoding is greedy when no "
                             "temperature, top-k or top-p is given")
        if greedy and sampled:
            raise ValueError("--greedy cannot be combined with --temperature/--top-k/--top-p")
        return cls(greedy=not sampled, temperature=1.0 if temperature is None else temperature, top_k=top_k,
                   top_p=top_p, **rest)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be a bool, got {self.greedy!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (greedy=False), got {self.temperature}; "
                             "use greedy=True for deterministic decoding")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        low, high = PENALTY_RANGE
        if not _is_real(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be a number in [{low:g}, {high:g}] (1 = off; beyond that "
                             f"range float32 logits overflow), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__} {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of {len(s)}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")


def find_stop(text: str, stops: Sequence[str], new_from: int) -> int:
    """Where `text` is to be cut for a stop string that the characters from `new_from` on completed (-1: none):
    the earliest such occurrence whichever string it is, so the text kept holds none of them (OpenAI's rule). The
    text before `new_from` was checked on earlier tokens."""
    hits = [at for stop in stops if (at := text.find(stop, max(0, new_from - len(stop) + 1))) >= 0]
    return min(hits, default=-1)


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` a stream must hold back: the longest suffix that is the start (a
    proper prefix) of some stop string, since the next tokens could complete it into a stop that is cut from the
    text. Anything before that suffix can be in no later match (find_stop has checked the completed ones), so it is
    sent. 0 when no stop string could begin in what is there, however long the stop strings are. At most
    MAX_STOP_STRINGS x MAX_STOP_CHARS^2 character comparisons a token (a stop like 'aaa...ab' after 'aaa...a')."""
    held = 0
    for stop in stops:
        tail = text[len(text) - min(len(stop) - 1, len(text)):]  # a longer suffix would hold the whole stop
        i = tail.find(stop[0])
        while 0 <= i and len(tail) - i > held:  # earliest start first: the first hit is this stop's longest
            if stop.startswith(tail[i:]):
                held = len(tail) - i
                break
            i = tail.find(stop[0], i + 1)
    return held


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def make_rng(seed: int | None) -> np.random.Generator:
    """The generator a generation run uses: seeded -> reproducible, None -> fresh OS entropy."""
    return np.random.default_rng(seed)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    if np.isnan(logits).any():  # a NaN argmax/draw would silently pick garbage; this is an engine bug
        raise ValueError("logits contain NaN")
    return logits.astype(np.float32, copy=False)


def apply_repetition_penalty(logits: np.ndarray, seen_ids_per_row: Sequence[Sequence[int]],
                             penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor on a copy: for each id seen in a row (once, however often it was seen),
    a positive logit is divided by `penalty` and a negative one multiplied by it."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if len(seen_ids_per_row) != out.shape[0]:
        raise ValueError(f"seen ids for {len(seen_ids_per_row)} rows, logits have {out.shape[0]}")
    p = np.float32(penalty)
    for b, ids in enumerate(seen_ids_per_row):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            continue
        if ids[0] < 0 or ids[-1] >= out.shape[1]:
            raise ValueError(f"row {b}: seen id out of range [0, {out.shape[1]})")
        x = out[b, ids]
        out[b, ids] = np.where(x < 0, x * p, x / p)
    return out


def _top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """HF TopKLogitsWarper: drop everything strictly below the k-th largest value (ties with it are kept)."""
    k = min(k, x.shape[1])
    kth = np.partition(x, x.shape[1] - k, axis=1)[:, x.shape[1] - k][:, None]
    return np.where(x < kth, np.float32(-np.inf), x)


def _top_p_mask(x: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p; the most
    likely token always stays. Only finite entries are sorted (already-filtered ones have probability 0)."""
    out = x.copy()
    for b in range(x.shape[0]):
        live = np.flatnonzero(np.isfinite(x[b]))
        if live.size == 0:
            continue
        order = live[np.argsort(x[b, live], kind="stable")]  # ascending, like HF
        v = x[b, order].astype(np.float64)
        p = np.exp(v - v[-1])
        # float32 probabilities, summed as torch's CPU cumsum sums them (a float64 accumulator, each partial sum
        # rounded to float32) and compared in float32 (HF's 1 - top_p becomes a float32 too): at exact ties on the
        # boundary, float64 sums kept one token more (uniform logits, top_p 0.9 of 10), and so did float32 sums
        # (160 tied survivors: 16 x float32(1/160) summed in float32 is 0.10000002 > float32(0.1))
        cum = np.cumsum((p / p.sum()).astype(np.float32), dtype=np.float64).astype(np.float32)
        remove = cum <= np.float32(1.0 - top_p)
        remove[-1] = False
        out[b, order[remove]] = -np.inf
    return out


def process_logits(logits: np.ndarray, params: SamplingParams,
                   seen: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Logits [B, V] fp32 after repetition penalty and, when sampling, temperature -> top-k -> top-p (filtered
    entries are -inf). Greedy skips the warpers: they never change the argmax."""
    x = _check_logits(logits)
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen ids (prompt + generated) per row")
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        # In float64 after the row's max is subtracted (nothing changes: every warper and the softmax are
        # shift-invariant): a temperature like 1e-38 then sends the others to -inf instead of making inf - inf NaNs.
        x = x.astype(np.float64)
        top = x.max(axis=1, keepdims=True)
        with np.errstate(over="ignore"):  # the overflow is the point: those go to -inf (no warning on stderr)
            x = (x - np.where(np.isfinite(top), top, 0.0)) / params.temperature
    if params.top_k > 0:
        x = _top_k_mask(x, params.top_k)
    if params.top_p < 1.0:
        x = _top_p_mask(x, params.top_p)
    return x


def probabilities(logits: np.ndarray, params: SamplingParams,
                  seen: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The distribution `sample` draws from when not greedy: softmax of process_logits, float64 [B, V]."""
    x = process_logits(logits, params, seen).astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Next ids [B] int64. `seen[b]` = ids of row b so far (prompt + generated), needed only for the penalty.
    Greedy consumes no randomness; sampling draws exactly one uniform per row from `rng`."""
    if params.greedy:
        return np.argmax(process_logits(logits, params, seen), axis=1).astype(np.int64)
    probs = probabilities(logits, params, seen)
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # Inverse CDF: the first index whose cdf exceeds u. A probability-0 token is a flat step and is never hit;
    # u < cdf[-1] up to rounding; the clip to the last live token guards that rounding.
    ids = (cdf <= u[:, None]).sum(axis=1)
    last_live = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
    return np.minimum(ids, last_live).astype(np.int64)


def logprobs_of(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log softmax(raw logits)[b, ids[b]] in float64: the model's own probability, before penalty/temperature."""
    x = np.asarray(logits, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    if x.ndim != 2 or ids.shape != (x.shape[0],):
        raise ValueError(f"logits must be [B, V] and ids [B], got {x.shape} and {ids.shape}")
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(x.shape[0]), ids] - lse
