"""One runtime measurement in its own process: `python -m bench.worker KIND PATH --prompt-file F ...`.

What it does: loads one runtime (``ours``: runtime_py's Generator on our artifact; ``hf-eager``: transformers
fp32 eager attention with a manual greedy loop over its KV cache; ``ort-genai``: og.Model/og.Generator on the
model builder's output), runs one warm-up (the same prompt, 2 new tokens), then the measured greedy run that
produces exactly ``--new-tokens`` tokens, and writes one JSON object to ``--result``: load seconds, TTFT (prefill
plus choosing the first token), decode tokens/s over the remaining ``new_tokens - 1`` tokens, the tokens.
Its peak RSS is measured by the parent (bench/compare.py) from the process's rusage when it exits.

With ``--score-file F`` (JSON ``{"prompt": [...], "continuation": [...]}``) it scores instead: the teacher-forced
log-probability of every continuation token given the prompt and the continuation before it, and their mean
negated (``nll``). ``ours``: runtime_py's ``score`` over prompt + continuation (the default graph steps through
the KV cache position by position); ``hf-eager``: one forward over the whole sequence, float64 log-softmax;
``ort-genai``: og.Generator, the prompt appended, then one continuation token at a time, ``get_logits()`` after
each (the last position's logits).

What it does not do: compare, aggregate or print tables (compare.py does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _timing(t0: float, t_first: float, t_end: float, n: int) -> dict:
    decode_s = t_end - t_first
    return {"ttft_s": t_first - t0, "decode_s": decode_s,
            "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0}


def run_ours(path: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
    from runtime_py.generate import Generator
    from runtime_py.sampling import SamplingParams

    t = time.perf_counter()
    gen = Generator(path, threads=threads)
    load_s = time.perf_counter() - t
    gen.generate([prompt], SamplingParams(greedy=True, max_new_tokens=2, ignore_eos=True))  # warm-up
    result = gen.generate([prompt], SamplingParams(greedy=True, max_new_tokens=new_tokens, ignore_eos=True))
    tokens = result.rows[0].tokens
    decode_s = (len(tokens) - 1) / result.decode_tok_s if result.decode_tok_s > 0 else 0.0
    return {"load_s": load_s, "ttft_s": result.ttft_s, "decode_s": decode_s, "decode_tok_s": result.decode_tok_s,
            "tokens": tokens}


def run_hf(path: str, prompt: list[int], new_tokens: int, threads: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                 local_files_only=True).eval()
    load_s = time.perf_counter() - t

    def once(n: int) -> tuple[dict, list[int]]:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() does: last logits only
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
            tokens = [int(tok)]
            t_first = time.perf_counter()
            for _ in range(n - 1):
                out = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
                tokens.append(int(tok))
            t_end = time.perf_counter()
        return _timing(t0, t_first, t_end, n), tokens

    once(2)  # warm-up
    timing, tokens = once(new_tokens)
    return {"load_s": load_s, **timing, "tokens": tokens}


def run_genai(path: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t
    ids = np.array([prompt], dtype=np.int32)

    def once(n: int) -> tuple[dict, list[int]]:
        params = og.GeneratorParams(model)
        # min_length = max_length: EOS cannot stop it early, exactly n new tokens
        params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # runs the prefill
        gen.generate_next_token()  # picks the first token (the next forward runs lazily in the next call)
        t_first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t_end = time.perf_counter()
        tokens = [int(x) for x in gen.get_sequence(0)[len(prompt):]]
        if len(tokens) != n:
            raise RuntimeError(f"onnxruntime-genai produced {len(tokens)} tokens, expected {n}")
        return _timing(t0, t_first, t_end, n), tokens

    once(2)  # warm-up
    timing, tokens = once(new_tokens)
    return {"load_s": load_s, **timing, "tokens": tokens}


def _logprob(logits, token: int) -> float:
    import numpy as np

    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    return float(x[token] - m - np.log(np.exp(x - m).sum()))


def score_ours(path: str, prompt: list[int], cont: list[int], threads: int) -> dict:
    from runtime_py.score import score

    t = time.perf_counter()
    r = score(path, prompt + cont, threads=threads)
    lps = r["logprobs"][len(prompt) - 1:]  # logprobs[i] = log P(ids[i+1] | ids[:i+1])
    return {"logprobs": lps, "score_s": time.perf_counter() - t, "mode": f"runtime_py score ({r['mode']})"}


def score_hf(path: str, prompt: list[int], cont: list[int], threads: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                 local_files_only=True).eval()
    ids = torch.tensor([prompt + cont], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].double()
    lps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont)[:, None])[:, 0]
    return {"logprobs": [float(x) for x in lps], "score_s": time.perf_counter() - t, "mode": "hf one forward"}


def score_genai(path: str, prompt: list[int], cont: list[int], threads: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    total = len(prompt) + len(cont)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    lps = [_logprob(gen.get_logits(), cont[0])]
    for prev, nxt in zip(cont[:-1], cont[1:]):
        gen.append_tokens(np.array([[prev]], dtype=np.int32))
        lps.append(_logprob(gen.get_logits(), nxt))
    return {"logprobs": lps, "score_s": time.perf_counter() - t, "mode": "og get_logits, token by token"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("kind", choices=["ours", "hf-eager", "ort-genai"])
    p.add_argument("path", help="artifact dir (ours), checkpoint dir (hf-eager) or model builder output (ort-genai)")
    p.add_argument("--prompt-file", required=True, help="JSON list of prompt token ids")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32", help="hf-eager weight dtype")
    p.add_argument("--result", required=True, help="where to write the JSON result")
    p.add_argument("--score-file", default=None,
                   help='JSON {"prompt": [...], "continuation": [...]}: score the continuation instead of timing')
    args = p.parse_args(argv)
    prompt = json.loads(Path(args.prompt_file).read_text())
    if args.score_file:
        sc = json.loads(Path(args.score_file).read_text())
        prompt, cont = sc["prompt"], sc["continuation"]
        if args.kind == "ours":
            r = score_ours(args.path, prompt, cont, args.threads)
        elif args.kind == "hf-eager":
            r = score_hf(args.path, prompt, cont, args.threads, args.dtype)
        else:
            r = score_genai(args.path, prompt, cont, args.threads)
        if len(r["logprobs"]) != len(cont):
            raise RuntimeError(f"scored {len(r['logprobs'])} tokens, expected {len(cont)}")
        r["nll"] = -sum(r["logprobs"]) / len(cont)
        Path(args.result).write_text(json.dumps(r))
        return 0
    if args.kind == "ours":
        r = run_ours(args.path, prompt, args.new_tokens, args.threads)
    elif args.kind == "hf-eager":
        r = run_hf(args.path, prompt, args.new_tokens, args.threads, args.dtype)
    else:
        r = run_genai(args.path, prompt, args.new_tokens, args.threads)
    Path(args.result).write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
