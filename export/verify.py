"""`python -m export verify`: our decoder against Hugging Face transformers on the same prompt.

What it does: runs greedy decoding with our torch decoder (either KV mode) and, when transformers is installed,
with ``AutoModelForCausalLM`` loaded from the same directory (local files only), then reports the max logit
difference (over prefill and every decode step while the two agree on tokens), greedy-token agreement and the
chosen-token log-prob difference. Both runs use their own KV caches, so the cache handling is checked too.

What it does not do: check ONNX graphs or engines (the artifact tests do), or download anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Trace:
    tokens: list[int] = field(default_factory=list)  # greedy ids after the prompt
    logprobs: list[float] = field(default_factory=list)  # log p(chosen token) under the raw model distribution
    logits: list[torch.Tensor] = field(default_factory=list)  # [S, V] for prefill, then [1, V] per step


def _step_record(trace: Trace, logits: torch.Tensor) -> int:
    """logits [S,V] fp32 for one call; record it and the greedy choice of its last row."""
    trace.logits.append(logits)
    last = logits[-1].double()
    tok = int(torch.argmax(last))
    trace.tokens.append(tok)
    trace.logprobs.append(float(torch.log_softmax(last, -1)[tok]))
    return tok


@torch.no_grad()
def run_ours(model, prompt_ids: list[int], steps: int) -> Trace:
    """Greedy decode with our Decoder: one prefill call, then `steps` one-token calls on the model's KV."""
    trace, n = Trace(), len(prompt_ids)
    ids = torch.tensor([prompt_ids])
    if model.kv_mode == "static":
        past = model.empty_past(1, n + steps + 1)
    else:
        past = model.empty_past(1, 0)
    pos = torch.arange(n)[None]
    mask = torch.ones(1, n, dtype=torch.int64)
    for step in range(steps + 1):
        out = model(ids, pos, mask if model.kv_mode == "concat" else None, *past)
        tok = _step_record(trace, out[0][0])
        past = list(out[1:])
        ids = torch.tensor([[tok]])
        pos = torch.tensor([[n + step]])
        mask = torch.ones(1, n + step + 1, dtype=torch.int64)
    return trace


@torch.no_grad()
def run_hf(model_dir, prompt_ids: list[int], steps: int, hf_model=None) -> Trace:
    """The same greedy loop with transformers (fp32, eager attention, its own DynamicCache)."""
    if hf_model is None:
        from transformers import AutoModelForCausalLM

        from export.checkpoint import CheckpointError

        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001 - whatever transformers raises, the reference is unavailable
            raise CheckpointError(f"{model_dir}: transformers could not load it as the reference ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
    trace = Trace()
    ids = torch.tensor([prompt_ids])
    past = None
    for _ in range(steps + 1):
        out = hf_model(input_ids=ids, past_key_values=past, use_cache=True)
        tok = _step_record(trace, out.logits[0].float())
        past = out.past_key_values
        ids = torch.tensor([[tok]])
    return trace


def compare(ours: Trace, hf: Trace) -> dict:
    agree = 0
    for a, b in zip(ours.tokens, hf.tokens):
        if a != b:
            break
        agree += 1
    # Logits of call j are comparable when both were fed the same tokens: prefill always, step j if agree >= j.
    comparable = min(agree + 1, len(ours.logits))
    diffs = [float((a - b).abs().max()) for a, b in zip(ours.logits[:comparable], hf.logits[:comparable])]
    lp = [abs(a - b) for a, b in zip(ours.logprobs[:comparable], hf.logprobs[:comparable])]
    return {
        "max_logit_diff": max(diffs),
        "greedy_match": ours.tokens == hf.tokens,
        "agreeing_tokens": agree,
        "max_logprob_diff": max(lp),
    }


def verify(model: str, prompt_ids: list[int] | None, steps: int, kv_mode: str) -> dict:
    from export.checkpoint import resolve_model
    from export.model import load_model

    from export.spec import load_spec

    model_dir = resolve_model(model)
    task = load_spec(model_dir).task
    if task != "causal-lm":
        raise ValueError(f"{model_dir} is a {task} checkpoint: verify compares generations; build it and compare "
                         "`python -m runtime_py classify --json` with transformers (tests/test_task_heads.py does)")
    from export.prequant_checkpoint import describe, load_prequant

    prequant = load_prequant(model_dir)
    if prequant is not None:
        raise ValueError(f"{model_dir} is pre-quantized ({describe(prequant)}): verify runs transformers on the "
                         "checkpoint, which needs that format's kernels; build it and compare `python -m runtime_py "
                         "score` with transformers on the dequantized weights (tests/test_prequant_build.py does)")
    ours_model, spec = load_model(model_dir, kv_mode=kv_mode)
    if prompt_ids is None:
        prompt_ids = [(7 * i + 3) % spec.vocab_size for i in range(8)]
    bad = [t for t in prompt_ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise ValueError(f"--prompt-ids: ids {bad} are outside the vocabulary [0, {spec.vocab_size})")
    ours = run_ours(ours_model, prompt_ids, steps)
    result = {"model": str(model_dir), "kv_mode": kv_mode, "prompt_ids": prompt_ids,
              "ours": {"tokens": ours.tokens, "logprobs": ours.logprobs}}
    try:
        import transformers  # noqa: F401
    except ImportError:
        result["hf"] = None
        result["note"] = "transformers is not installed: only our model ran (pip install '.[dev]' for the oracle)"
        return result
    hf = run_hf(model_dir, prompt_ids, steps)
    result["hf"] = {"tokens": hf.tokens, "logprobs": hf.logprobs}
    result.update(compare(ours, hf))
    return result
