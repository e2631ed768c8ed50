"""The batching engine (runtime_py/engine.py) against the reference: each request generated alone by Generator.

Every family and KV layout the engine has a separate path for: GroupQueryAttention's shared in-place buffer
(qwen2_window, sliding window 5 < the sequences), a graph that writes a second buffer (gemma2: head_dim 24 keeps its
attention in standard ops, so the buffers swap and the engine copies rows back), MoE (qwen3_moe_mixed) and concat KV.
Requests outnumber the slots (later ones join while others decode) and prompts are longer than the prefill chunk
(chunked prefill at offsets > 0).

Tolerance: greedy and seeded tokens must equal the reference exactly. Measured on these artifacts, the logits a row
gets in a batch equal its logits alone bit for bit (dense) or within 3e-6 (the MoE kernel), while the smallest
top-2 logit gap on these prompts is ~8e-3, so a near-tie cannot flip a token here; test_logits_match_alone checks
the 1e-4 bound that makes this hold.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime_py import engine as engine_mod
from runtime_py.engine import Engine, EngineClosedError, PromptTooLongError, QueueFullError
from runtime_py.generate import Generator
from runtime_py.sampling import SamplingParams

CASES = [("qwen2_window", "static"), ("gemma2", "static"), ("qwen3_moe_mixed", "static"), ("qwen2_window", "concat")]
LENGTHS = (5, 19, 1, 30, 9, 12)  # > prefill_chunk=8 for some: chunked prefill
MAX_NEW = (20, 7, 25, 12, 30, 3)


def _prompts(seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, n).tolist() for n in LENGTHS]


def _alone(gen: Generator, prompts, params) -> list:
    return [gen.generate([p], q).rows[0] for p, q in zip(prompts, params)]


@pytest.mark.parametrize("case,kv_mode", CASES)
def test_batched_equals_alone(artifacts, case, kv_mode):
    path = artifacts(case, kv_mode)
    gen = Generator(path, threads=2)
    engine = Engine(path, slots=4, prefill_chunk=8, threads=2)
    prompts = _prompts()
    greedy = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    sampled = [SamplingParams(greedy=False, temperature=0.9, top_p=0.95, top_k=50 if i % 2 else 0, seed=i,
                              max_new_tokens=15, ignore_eos=True) for i in range(len(prompts))]
    params = greedy + sampled
    refs = _alone(gen, prompts + prompts, params)
    outs = engine.generate(prompts + prompts, params)  # 12 requests, 4 slots
    for i, (ref, out) in enumerate(zip(refs, outs)):
        assert out.tokens == ref.tokens, f"request {i}"
        assert out.text == ref.text and out.finish_reason == ref.finish_reason == "length"
    assert not engine.rows and engine.waiting == 0


def test_logits_match_alone(artifacts, monkeypatch):
    """The logits each row is sampled from in a batch of 4 vs. alone (1 slot): within 1e-4 (measured: 0)."""
    seen: dict[int, dict[tuple, list]] = {}
    original = Engine._sample

    def spy(self, row, logits):
        seen.setdefault(id(self), {}).setdefault(tuple(row.request.prompt), []).append(np.array(logits[0]))
        return original(self, row, logits)

    monkeypatch.setattr(Engine, "_sample", spy)
    path = artifacts("qwen2_window")
    prompts, params = _prompts(2), [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    alone, batched = Engine(path, slots=1, threads=2), Engine(path, slots=4, prefill_chunk=8, threads=2)
    alone.generate(prompts, params)
    batched.generate(prompts, params)
    a, b = seen[id(alone)], seen[id(batched)]
    assert a.keys() == b.keys()
    diff = max(float(np.abs(x - y).max()) for k in a for x, y in zip(a[k], b[k], strict=True))
    assert diff <= 1e-4


def test_joins_while_decoding_and_one_call_per_iteration(artifacts):
    """A request admitted mid-flight does not change the running ones; a running stream gets a token every
    iteration while a long prompt is prefilled chunk by chunk; the decode of all running rows is one call."""
    path = artifacts("qwen2_window")
    gen = Generator(path, threads=2)
    engine = Engine(path, slots=4, prefill_chunk=8, threads=2)
    prompts = _prompts(3)
    p = SamplingParams(max_new_tokens=40, ignore_eos=True)
    got: dict[int, list[tuple[int, list[int]]]] = {0: [], 1: [], 2: []}

    def collect(i):
        return lambda u: got[i].append((engine.iterations, u.tokens))

    engine.submit(prompts[0], p, collect(0))
    for _ in range(3):
        engine.step()
    long_prompt = (prompts[3] * 3)[:60]  # 60 tokens: 8 chunks of <= 8
    engine.submit(long_prompt, p, collect(1))
    engine.submit(prompts[1], p, collect(2))
    calls = []
    while engine.busy:
        calls.append((len([r for r in engine.rows if r.pending is not None]), engine.step()))
    refs = _alone(gen, [prompts[0], long_prompt, prompts[1]], [p] * 3)
    for i, ref in enumerate(refs):
        assert [t for _, toks in got[i] for t in toks] == ref.tokens
    # request 0 decodes in every iteration from its first token to its last: never more than one chunk of wait
    iters = sorted({it for it, toks in got[0] if toks})
    assert iters == list(range(iters[0], iters[-1] + 1))
    # once nothing is prefilling, an iteration is exactly one model call however many rows decode
    assert any(n >= 2 and c == 1 for n, c in calls)
    assert all(c == 1 for n, c in calls[-10:])


def test_seeded_sampling_same_whatever_in_flight(artifacts):
    path = artifacts("qwen2_window")
    prompts = _prompts(4)
    mine = SamplingParams(greedy=False, temperature=1.0, seed=1234, max_new_tokens=24, ignore_eos=True)
    alone = Engine(path, slots=4, threads=2).generate([prompts[0]], mine)[0]
    others = [SamplingParams(greedy=False, temperature=1.3, seed=None, max_new_tokens=20, ignore_eos=True),
              SamplingParams(max_new_tokens=30, ignore_eos=True),
              SamplingParams(greedy=False, temperature=0.7, top_k=5, seed=7, max_new_tokens=10, ignore_eos=True)]
    for order in ([0, 1, 2, 3], [1, 2, 0, 3], [3, 1, 2, 0]):  # different slots, different company
        batch = [prompts[i] for i in order]
        params = [mine if i == 0 else others[i - 1] for i in order]
        out = Engine(path, slots=2, prefill_chunk=8, threads=2).generate(batch, params)[order.index(0)]
        assert out.tokens == alone.tokens


def test_stop_strings_and_holdback(artifacts):
    path = artifacts("qwen2_window")
    gen = Generator(path, threads=2)
    engine = Engine(path, slots=3, threads=2)
    prompts = _prompts(5)[:3]
    free = [gen.generate([p], SamplingParams(max_new_tokens=30, ignore_eos=True)).rows[0].text for p in prompts]
    stops = [(t[10:13],) for t in free]  # a stop string from the middle of what each would have written
    params = [SamplingParams(max_new_tokens=30, ignore_eos=True, stop=s + ("never-seen",)) for s in stops]
    deltas = [[] for _ in prompts]
    for i, (p, q) in enumerate(zip(prompts, params)):
        engine.submit(p, q, lambda u, i=i: deltas[i].append(u))
    while engine.busy:
        engine.step()
    for i, (p, q) in enumerate(zip(prompts, params)):
        ref = gen.generate([p], q).rows[0]
        assert ref.finish_reason == "stop" and deltas[i][-1].finish_reason == "stop"
        assert "".join(u.text for u in deltas[i]) == ref.text == free[i][:free[i].find(stops[i][0])]
        assert not any(stops[i][0] in u.text for u in deltas[i])


def test_streams_hold_back_only_what_could_start_a_stop(artifacts):
    """Stop strings that never complete: after every token the engine and Generator.stream have sent all of the
    text but its longest suffix that is the start of a stop string (sampling.stop_holdback's definition, computed
    here by brute force), not the last max(len(stop)) - 1 characters (with a 100-character stop nothing streamed
    until the end)."""
    path = artifacts("qwen2_window")
    gen = Generator(path, threads=2)
    engine = Engine(path, slots=2, threads=2)
    prompt = _prompts(3)[1]
    free = gen.generate([prompt], SamplingParams(max_new_tokens=25, ignore_eos=True)).rows[0].text
    assert len(free) > 20, free
    for stops in (("z" * 100,), (free[4:7] + "\x01", free[-3:] + "\x01" * 50, " \x01")):
        params = SamplingParams(max_new_tokens=25, ignore_eos=True, stop=stops)
        plain = SamplingParams(max_new_tokens=25, ignore_eos=True)
        updates = {}
        for key, q in (("stop", params), ("plain", plain)):
            updates[key] = []
            engine.submit(prompt, q, updates[key].append)
        while engine.busy:
            engine.step()
        assert [u.finish_reason for u in updates["stop"]] == [u.finish_reason for u in updates["plain"]]
        sent = available = ""
        for with_stop, without in zip(updates["stop"], updates["plain"]):
            sent, available = sent + with_stop.text, available + without.text
            if without.finish_reason is None:
                assert sent == available[:len(available) - _holdback(available, stops)], (stops, sent, available)
        assert sent == available == free
        assert "".join(gen.stream(prompt, params)) == free
        streamed = list(gen.stream(prompt, params))
        if stops == ("z" * 100,):  # nothing to hold: a delta a token, as without stop strings
            assert streamed == list(gen.stream(prompt, plain)) and len(streamed) > 10


def _holdback(text: str, stops) -> int:
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def test_two_stops_completed_by_one_token_cut_at_the_earlier(artifacts):
    # OpenAI's rule: the returned text holds no stop string, whatever order the stops were given in
    path = artifacts("qwen2_window")
    gen = Generator(path, threads=2)
    prompt = _prompts(1)[0]
    free = gen.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True)).rows[0]
    texts = [gen.tokenizer.decode(free.tokens[:k]) for k in range(len(free.tokens) + 1)]
    for k in range(1, len(free.tokens)):
        before, piece = texts[k], texts[k + 1][len(texts[k]):]
        early = before[-1:] + piece[:1]  # starts before token k's text, completed by it
        if piece and early not in before and piece not in before and texts[k + 1].find(early) == len(before) - 1:
            break
    else:
        raise AssertionError(f"no token of {texts[-1]!r} completes two fresh stop strings")
    engine = Engine(path, slots=2, threads=2)
    for stops in ((piece, early), (early, piece)):
        params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=stops)
        row = gen.generate([prompt], params).rows[0]
        assert row.finish_reason == "stop" and row.text == before[:-1], (stops, row.text)
        assert "".join(gen.stream(prompt, params)) == row.text
        out = engine.generate([prompt], [params])[0]
        assert out.finish_reason == "stop" and out.text == row.text


def test_cancel_frees_the_slot(artifacts):
    path = artifacts("qwen2_window")
    engine = Engine(path, slots=1, threads=2)
    prompts = _prompts(6)
    long = engine.submit(prompts[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
    nxt = engine.submit(prompts[1], SamplingParams(max_new_tokens=5, ignore_eos=True))
    queued = engine.submit(prompts[2], SamplingParams(max_new_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert [r.request for r in engine.rows] == [long]
    long.cancel()
    queued.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert [r.request for r in engine.rows] == [nxt]  # admitted into the freed slot in the same iteration
    while engine.busy:
        engine.step()
    assert nxt.finish_reason == "length" and engine.finished == {"cancelled": 2, "length": 1}


def test_bounded_queue_and_bad_requests(artifacts):
    path = artifacts("qwen2_window")
    engine = Engine(path, slots=1, max_queue=1, threads=2)
    p = SamplingParams(max_new_tokens=4)
    engine.submit([1, 2], p)
    engine.step()  # admitted: the slot is busy
    engine.submit([3, 4], p)  # waits
    with pytest.raises(QueueFullError):
        engine.submit([5, 6], p)
    with pytest.raises(PromptTooLongError, match="context length 128"):
        engine.submit([1] * 120, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 99999], p)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], p)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        Engine(path, slots=9)
    engine.stop()
    with pytest.raises(EngineClosedError):
        engine.submit([1, 2], p)


def test_threaded_loop_and_failing_call(artifacts, monkeypatch):
    """The background loop serves submitters on other threads; a model call that raises fails only the requests
    in it, and stop() cancels what is left."""
    path = artifacts("qwen2_window")
    gen = Generator(path, threads=2)
    engine = Engine(path, slots=4, prefill_chunk=8, threads=2)
    engine.start()
    prompts = _prompts(7)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    done = [threading.Event() for _ in prompts]
    texts = ["" for _ in prompts]

    def callback(i):
        def cb(u):
            texts[i] += u.text
            if u.finish_reason:
                done[i].set()
        return cb

    threads = [threading.Thread(target=engine.submit, args=(p, params, callback(i))) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(d.wait(30) for d in done)
    assert texts == [r.text for r in _alone(gen, prompts, [params] * len(prompts))]

    boom = threading.Event()
    original = engine_mod._StaticBuffers.forward

    def flaky(self, lo, hi, ids, pos):
        if ids.shape[1] > 1 and not boom.is_set():  # the first prefill call fails
            boom.set()
            raise RuntimeError("injected")
        return original(self, lo, hi, ids, pos)

    monkeypatch.setattr(engine_mod._StaticBuffers, "forward", flaky)
    results = []
    ok = threading.Event()
    engine.submit(prompts[3], params, lambda u: u.finish_reason and results.append(u))
    engine.submit(prompts[4], params, lambda u: u.finish_reason and (results.append(u), ok.set()))
    assert ok.wait(30)
    assert [u.finish_reason for u in results] == ["error", "length"] and "injected" in results[0].error
    hang = threading.Event()
    engine.submit(prompts[0], SamplingParams(max_new_tokens=100, ignore_eos=True),
                  lambda u: u.finish_reason and hang.set())
    engine.stop()
    assert hang.is_set()


def test_generate_takes_more_prompts_than_the_queue_and_leaves_nothing_behind_on_error(artifacts):
    """Engine.generate with more prompts than slots + queue runs them all (it used to raise QueueFullError and leave
    the submitted ones queued for ever, failing every later call); a bad prompt after good ones is refused before
    any is submitted (they used to stay queued and run inside the next call); a params list of the wrong length is
    refused (zip dropped the extra prompts silently)."""
    path = artifacts("qwen2_window")
    engine = Engine(path, slots=2, prefill_chunk=8, threads=2, max_queue=1)
    gen = Generator(path, threads=2)
    prompts = _prompts()
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    outs = engine.generate(prompts, params)  # 6 prompts, room for 3
    assert [o.tokens for o in outs] == [r.tokens for r in _alone(gen, prompts, params)]
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.generate([prompts[0], prompts[1], []], SamplingParams(max_new_tokens=3))
    assert not engine.busy
    with pytest.raises(ValueError, match="3 prompts but 2 sampling parameters"):
        engine.generate(prompts[:3], params[:2])
    seen = []
    real_step = engine.step

    def failing_step():  # a model call that fails mid-way: what was submitted is withdrawn, not left queued
        if engine.iterations == 3:
            raise RuntimeError("model call failed")
        seen.append(len(engine.rows) + engine.waiting)
        return real_step()

    engine.step = failing_step
    engine.iterations = 0
    with pytest.raises(RuntimeError, match="model call failed"):
        engine.generate(prompts, params)
    assert seen and max(seen) > 0 and not engine.busy
    del engine.step
    assert engine.generate(prompts[:1], params[:1])[0].tokens == _alone(gen, prompts[:1], params[:1])[0].tokens


def test_queue_full_message_counts_what_is_busy(artifacts):
    engine = Engine(artifacts("qwen2_window"), slots=2, threads=2, max_queue=1)
    for _ in range(3):
        engine.submit([5, 6], SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFullError, match=r"3 requests wait for the 2 slots \(0 busy"):
        engine.submit([5, 6], SamplingParams(max_new_tokens=2))
