"""`python -m runtime_py score`: teacher-forced log-probabilities of a token sequence, and its perplexity.

What it does: :func:`score` runs one artifact over ``ids`` and returns ``logprobs[i] = log P(ids[i+1] | ids[:i+1])``
(float64 log-softmax of the raw logits), ``nll`` (their negated mean) and ``ppl = exp(nll)``. How it runs depends
on the graph, and the result says which (``mode``):

* ``all-positions``: a graph built with ``--logits all`` returns every position's logits, so the whole sequence is
  one prefill call;
* ``stepwise``: a ``--logits last`` graph (the default build) returns only the last position's, so the runtime feeds
  the tokens one call per position through the KV cache, as a decode loop does.

Both give the same numbers up to float rounding (tests/test_score.py checks it). Logits that are not finite (an
fp16 artifact's activations overflowing) are an error naming the positions, not a NaN in the output; a finite
``nll`` over 709.78 gives ``ppl`` inf (printed by ``--json`` as ``Infinity``, as Python's json writes it). Users
compare a quantized artifact with its fp32 twin this way.

What it does not do: batch several sequences, or sample (generate.py does).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from runtime_py.sampling import logprobs_of
from runtime_py.tokenizer import check_text

_EXP_MAX = math.log(np.finfo(np.float64).max)


def score(artifact: str | Path, ids: list[int], threads: int | None = None, generator=None) -> dict:
    from runtime_py.generate import Generator

    gen = generator or Generator(artifact, threads=threads)
    session = gen.session
    if len(ids) < 2:
        raise ValueError(f"score needs at least 2 tokens (the first is only context), got {len(ids)}")
    if len(ids) > session.max_seq_len:
        raise ValueError(f"{len(ids)} tokens > the artifact's context length {session.max_seq_len}")
    bad = [t for t in ids if not 0 <= t < session.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {session.vocab_size})")
    S = len(ids)
    static = session.kv_mode == "static"
    cache = session.new_cache(1, S)
    tokens = np.asarray(ids, dtype=np.int64).reshape(1, S)
    if not session.last_logits:
        mode = "all-positions"
        mask = None if static else np.ones((1, S), dtype=np.int64)
        logits = session.forward(tokens, np.arange(S, dtype=np.int64).reshape(1, S), mask, cache)[0, :S - 1]
    else:
        mode = "stepwise"
        rows = []
        for i in range(S - 1):
            mask = None if static else np.ones((1, i + 1), dtype=np.int64)
            out = session.forward(tokens[:, i:i + 1], np.array([[i]], dtype=np.int64), mask, cache)
            rows.append(out[0, -1])
        logits = np.stack(rows)
    bad_rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad_rows.size:  # a NaN/inf log-prob would print as NaN (not JSON) and poison nll; say where instead
        precision = session.manifest.precision
        why = (f"its {precision} activations overflowed; build it with --precision fp32 to score it"
               if precision != "fp32" else "its activations left float32's range (are the weights sane?)")
        raise ValueError(f"the artifact's logits are not finite (NaN or inf) after position(s) "
                         f"{[int(i) for i in bad_rows[:5]]}{' ...' if bad_rows.size > 5 else ''} of {S}: {why}")
    lps = logprobs_of(logits, tokens[0, 1:])
    nll = float(-lps.mean())
    ppl = math.exp(nll) if nll < _EXP_MAX else math.inf  # exp(>709.78) overflows a float: the ppl is inf
    return {"logprobs": [float(x) for x in lps], "nll": nll, "ppl": ppl, "mode": mode, "tokens": S}


def _text_ids(gen, text: str, what: str) -> list[int]:
    return gen.encode(check_text(text, what))


def main(args) -> int:
    """The CLI subcommand (registered in runtime_py/__main__.py): a table per token, or --json."""
    import json

    from runtime_py.generate import Generator

    gen = Generator(args.artifact, threads=args.threads, check_memory=not args.skip_memory_check,
                    backend=args.backend)
    if args.ids is not None:
        ids = args.ids
    elif args.text is not None:
        ids = _text_ids(gen, args.text, "--text")
    else:
        from runtime_py.tokenizer import text_bytes_limit

        limit = text_bytes_limit(gen.session.max_seq_len)
        try:
            with open(args.file, "rb") as f:  # bounded: /dev/zero or a huge file is refused, not read whole
                data = f.read(limit + 1)
            if len(data) > limit:
                raise ValueError(f"--file {args.file} is larger than {limit} bytes, more text than the "
                                 f"{gen.session.max_seq_len}-token context can hold; pass a shorter file")
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--file {args.file}: not valid UTF-8 ({e})") from None
        except OSError as e:
            raise ValueError(f"--file {args.file}: {e.strerror or e}") from None
        ids = _text_ids(gen, text, f"--file {args.file}")
    r = score(args.artifact, ids, generator=gen)
    if args.json:
        print(json.dumps(r))
        return 0
    for i, lp in enumerate(r["logprobs"]):
        print(f"{i + 1:6d}  id {ids[i + 1]:7d}  logprob {lp:10.4f}")
    print(f"tokens {r['tokens']}  nll {r['nll']:.6f}  ppl {r['ppl']:.4f}  ({r['mode']})")
    return 0
