"""`python -m runtime_py bench`: time to first token, decode tokens/s and peak RSS of one artifact.

What it does: random prompt ids (seeded) of the given length, greedy, EOS ignored so exactly `new_tokens` are
produced per row; one warm-up run, then the measured run. Peak RSS is this process's high-water mark.

What it does not do: compare with peers (bench/compare.py does) or check outputs.
"""

from __future__ import annotations

import resource

import numpy as np

from runtime_py.generate import Generator
from runtime_py.sampling import SamplingParams


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench(artifact, prompt_len: int, new_tokens: int, batch: int = 1, threads: int | None = None,
          generator: Generator | None = None, check_memory: bool = True, backend: str = "auto") -> dict:
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise ValueError("--prompt-len, --new-tokens and --batch must be >= 1")
    gen = generator or Generator(artifact, threads=threads, batch=batch, check_memory=check_memory, backend=backend)
    params = SamplingParams(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    gen.check_length(0, prompt_len, params)  # before the prompts are made (--prompt-len 10**10: 75 GB of them)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, gen.session.vocab_size, prompt_len).tolist() for _ in range(batch)]
    gen.check_context(prompts, params)  # refused in the user's own numbers, before the warm-up
    gen.generate(prompts, SamplingParams(greedy=True, max_new_tokens=min(2, new_tokens), ignore_eos=True))
    result = gen.generate(prompts, params)
    decode = result.decode_tok_s if new_tokens > 1 else None  # one token: no decode step was timed
    return {"ttft_s": result.ttft_s, "decode_tok_s": decode, "peak_rss_bytes": peak_rss_bytes(),
            "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch}
