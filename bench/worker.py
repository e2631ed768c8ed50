"""One runtime measurement in its own process: `python -m bench.worker KIND PATH --prompt-file F ...`.

What it does: loads one runtime (``ours``: runtime_py's Generator on our artifact; ``hf-eager``: transformers
fp32 eager attention with a manual greedy loop over its KV cache; ``ort-genai``: og.Model/og.Generator on the
model builder's output), runs one warm-up (the same prompt, 2 new tokens), then the measured greedy run that
produces exactly ``--new-tokens`` tokens, and writes one JSON object to ``--result``: load seconds, TTFT (prefill
plus choosing the first token), decode tokens/s over the remaining ``new_tokens - 1`` tokens, the tokens.
Its peak RSS is measured by the parent (bench/compare.py) from the process's rusage when it exits.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("kind", choices=["ours", "hf-eager", "ort-genai"])
    p.add_argument("path", help="artifact dir (ours), checkpoint dir (hf-eager) or model builder output (ort-genai)")
    p.add_argument("--prompt-file", required=True, help="JSON list of prompt token ids")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32", help="hf-eager weight dtype")
    p.add_argument("--result", required=True, help="where to write the JSON result")
    args = p.parse_args(argv)
    prompt = json.loads(Path(args.prompt_file).read_text())
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
