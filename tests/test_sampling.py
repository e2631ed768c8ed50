"""runtime_py.sampling against transformers' logits processors (torch is used here, never in the runtime)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime_py.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logprobs_of,
    make_rng,
    probabilities,
    process_logits,
    sample,
    stop_holdback,
)


def _logits(b=3, v=100, scale=3.0, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def _seen(b=3, v=100, n=12, seed=1) -> np.ndarray:
    # Rectangular so HF can take it as input_ids; duplicates on purpose (the penalty applies once per id).
    ids = np.random.default_rng(seed).integers(0, v, size=(b, n))
    ids[:, -1] = ids[:, 0]
    return ids


def _hf_scores(logits: np.ndarray, p: SamplingParams, seen: np.ndarray) -> torch.Tensor:
    """The processors HF generate() builds for these params, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs(torch.from_numpy(seen), torch.from_numpy(logits.copy()))


FILTER_CASES = {
    "temperature": SamplingParams(greedy=False, temperature=0.7),
    "top_k": SamplingParams(greedy=False, top_k=5),
    "top_k_larger_than_vocab": SamplingParams(greedy=False, top_k=1000),
    "top_p": SamplingParams(greedy=False, top_p=0.8),
    "top_p_tiny_keeps_one": SamplingParams(greedy=False, top_p=1e-4),
    "temp_then_top_p": SamplingParams(greedy=False, temperature=1.7, top_p=0.6),
    "top_k_then_top_p": SamplingParams(greedy=False, top_k=20, top_p=0.5),
    "penalty": SamplingParams(greedy=False, repetition_penalty=1.3),
    "penalty_below_one": SamplingParams(greedy=False, repetition_penalty=0.6, top_k=10),
    "everything": SamplingParams(greedy=False, temperature=1.5, top_k=10, top_p=0.9, repetition_penalty=1.3),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_filtering_matches_hf_processors(case):
    p = FILTER_CASES[case]
    logits, seen = _logits(), _seen()
    ref = _hf_scores(logits, p, seen)
    ours = process_logits(logits, p, seen)
    ref_keep = torch.isfinite(ref).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), ref_keep)
    assert ref_keep.sum(axis=1).min() >= 1
    np.testing.assert_allclose(probabilities(logits, p, seen), ref.softmax(-1).double().numpy(), rtol=1e-5,
                               atol=1e-7)


def test_filtering_actually_filters():
    # Guard the parity test above against being vacuous.
    logits = _logits()
    assert np.isfinite(process_logits(logits, FILTER_CASES["top_k"])).sum(axis=1).tolist() == [5, 5, 5]
    kept = np.isfinite(process_logits(logits, FILTER_CASES["top_p"])).sum(axis=1)
    assert (kept > 1).all() and (kept < 100).all()
    assert np.isfinite(process_logits(logits, FILTER_CASES["top_p_tiny_keeps_one"])).sum(axis=1).tolist() == [1] * 3


def test_top_k_keeps_ties_like_hf():
    logits = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    p = SamplingParams(greedy=False, top_k=2)
    ours = np.isfinite(process_logits(logits, p))
    ref = torch.isfinite(_hf_scores(logits, p, np.zeros((1, 0), dtype=np.int64))).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.tolist() == [[False, True, True, True, False]]


@pytest.mark.parametrize("penalty", [1.0, 1.5, 0.5])
def test_greedy_is_argmax_after_penalty(penalty):
    logits, seen = _logits(b=6, seed=3), _seen(b=6, seed=4)
    # Make the penalty decide: the best token of each row has been seen.
    seen[:, 0] = logits.argmax(axis=1)
    p = SamplingParams(repetition_penalty=penalty)
    ref = _hf_scores(logits, p, seen).argmax(-1).numpy()
    rng = make_rng(0)
    state = rng.bit_generator.state
    ids = sample(logits, p, rng, seen)
    assert ids.dtype == np.int64 and ids.shape == (6,)
    np.testing.assert_array_equal(ids, ref)
    assert rng.bit_generator.state == state  # greedy consumes no randomness
    if penalty == 1.5:
        assert (ids != logits.argmax(axis=1)).any()


def test_repetition_penalty_semantics():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], dtype=np.float32)
    before = logits.copy()
    out = apply_repetition_penalty(logits, [[0, 1, 1, 1]], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # once per id, however often seen; unseen untouched
    np.testing.assert_array_equal(logits, before)  # the caller's array is not modified
    with pytest.raises(ValueError, match="out of range"):
        apply_repetition_penalty(logits, [[4]], 2.0)
    with pytest.raises(ValueError, match="rows"):
        apply_repetition_penalty(logits, [[0], [1]], 2.0)
    with pytest.raises(ValueError, match="seen ids"):
        sample(logits, SamplingParams(repetition_penalty=1.2), make_rng(0))


def test_seeded_sampling_is_reproducible():
    logits = _logits(b=4, v=50, scale=1.0)
    p = SamplingParams(greedy=False, temperature=1.0, top_p=0.95, seed=123)

    def run(seed):
        rng = make_rng(seed)
        return np.stack([sample(logits, p, rng) for _ in range(40)])

    a, b, c = run(123), run(123), run(124)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert len(np.unique(a)) > 10  # it is really sampling


def test_empirical_distribution_matches():
    v, n = 8, 40000
    logits = np.tile(np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 3.0, -1.0]], dtype=np.float32), (n, 1))
    p = SamplingParams(greedy=False, temperature=0.8, top_k=6, top_p=0.95)
    expected = probabilities(logits[:1], p)[0]
    ids = sample(logits, p, make_rng(7))
    counts = np.bincount(ids, minlength=v)
    live = expected > 0
    assert counts[~live].sum() == 0  # filtered tokens are never drawn
    assert live.sum() >= 4
    chi2 = (((counts[live] - n * expected[live]) ** 2) / (n * expected[live])).sum()
    assert chi2 < 20.0, (chi2, counts, expected)  # df <= 5: p(chi2 > 20) < 0.002


def test_logprobs_of_raw_logits():
    logits = _logits(b=4, v=30) * 1000  # large spread: a naive exp overflows
    logits[0, 3] = -np.inf
    ids = np.array([0, 5, 29, 7])
    ref = torch.log_softmax(torch.from_numpy(logits).double(), -1)[torch.arange(4), torch.from_numpy(ids)]
    got = logprobs_of(logits, ids)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12)
    # Raw means raw: the penalty/temperature used for choosing do not change the reported logprob.
    assert logprobs_of(logits[:1], np.array([3]))[0] == -np.inf


@pytest.mark.parametrize("vocab", [4, 5, 8, 10, 16])
@pytest.mark.parametrize("top_p", [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9])
def test_top_p_keeps_as_many_as_hf_at_exact_ties(vocab, top_p):
    # uniform logits put the cumulative probabilities exactly on the 1 - top_p boundary: HF compares in float32
    logits = np.zeros((1, vocab), np.float32)
    p = SamplingParams(greedy=False, top_p=top_p)
    ref = _hf_scores(logits, p, np.zeros((1, 1), np.int64))
    assert np.isfinite(process_logits(logits, p)).sum() == torch.isfinite(ref).sum().item()


@pytest.mark.parametrize("top_p", [0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9, 0.95])
def test_top_p_keeps_as_many_as_hf_at_exact_ties_among_survivors(top_p):
    # n tied finite logits among -inf (what top_k leaves, keeping its ties): the cut lands on ties for many n, where
    # the sum's rounding decides; 16 x float32(1/160) summed in float32 is 0.10000002 and kept a token more than HF
    p = SamplingParams(greedy=False, top_p=top_p)
    for n in range(2, 256):
        logits = np.full((1, 256), -np.inf, np.float32)
        logits[0, :n] = 2.0
        ref = _hf_scores(logits, p, np.zeros((1, 1), np.int64))
        assert np.isfinite(process_logits(logits, p)).sum() == torch.isfinite(ref).sum().item(), n


def test_nan_logits_raise():
    logits = _logits()
    logits[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sample(logits, SamplingParams(), make_rng(0))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(logits[0], SamplingParams(), make_rng(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(greedy=False, temperature=0.0), "temperature must be > 0"),
    (dict(greedy=False, temperature=-1.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(seed=-3), "seed must be None or an int >= 0"),
    (dict(stop="\n"), "stop must be a tuple of strings"),
    (dict(stop=("",)), "stop strings must be non-empty"),
    (dict(stop=("x",) * 17), "at most 16 stop strings"),
    (dict(stop=("x" * 1025,)), "at most 1024 characters"),
    (dict(greedy=1), "greedy must be a bool"),
    (dict(logprobs="yes"), "logprobs must be a bool"),
])
def test_bad_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_from_options_refuses_a_temperature_without_api_names(temperature):
    # what a CLI or request user gets: no "greedy=True" (a Python argument they never see)
    with pytest.raises(ValueError, match=r"temperature must be > 0 to sample, got .*greedy when no temperature") as e:
        SamplingParams.from_options(temperature, 0, 1.0)
    assert "greedy=" not in str(e.value)
    assert SamplingParams.from_options(None, 0, 1.0).greedy


def test_good_params():
    assert SamplingParams(greedy=True, temperature=0.0).temperature == 0.0  # ignored when greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    SamplingParams(greedy=False, temperature=0.5, top_k=40, top_p=1.0, repetition_penalty=1.1, seed=0).validate()


def test_runtime_modules_import_no_torch():
    code = ("import sys, runtime_py.sampling, runtime_py.chat, runtime_py.tokenizer\n"
            "bad = [m for m in ('torch', 'transformers', 'export') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_tiny_temperature_is_the_argmax_without_warnings():
    """temperature 1e-320 overflows the division by design (everything but the max goes to -inf): no numpy
    RuntimeWarning reaches the user's stderr, and the distribution is the argmax's."""
    import warnings

    logits = np.array([[1.0, 3.0, 2.0, 3.0 - 1e-3]], np.float32)
    params = SamplingParams(greedy=False, temperature=1e-320)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = probabilities(logits, params)
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def _holdback_brute(text: str, stops) -> int:
    """The definition: the longest suffix of text that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def test_stop_holdback_is_the_longest_suffix_that_could_start_a_stop():
    rng = np.random.default_rng(0)
    for trial in range(3000):
        alphabet = "ab" if trial % 2 else "abcé😀"
        text = "".join(rng.choice(list(alphabet), rng.integers(0, 12)))
        stops = ["".join(rng.choice(list(alphabet), rng.integers(1, 9))) for _ in range(rng.integers(1, 4))]
        assert stop_holdback(text, stops) == _holdback_brute(text, stops), (text, stops)
    assert stop_holdback("Hello! How", ["z" * 1000]) == 0  # a long stop that cannot begin here holds nothing
    assert stop_holdback("Hello! How", ["Howdy", "o! Hoy"]) == 3  # "How" (and "o! Ho" is not a suffix)
    assert stop_holdback("abc", ["c"]) == 0  # a one-character stop is either completed or not started
    assert stop_holdback("", ["ab"]) == 0 and stop_holdback("ab", []) == 0
    assert stop_holdback("a" * 1023, ["a" * 1023 + "b"]) == 1023  # the worst case, still exact
