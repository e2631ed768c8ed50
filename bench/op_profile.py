"""`python -m bench.op_profile ARTIFACT`: where an ONNX Runtime decode step spends its time, by operator type, at
each batch size.

What it does: for each ``--batch`` B it opens the artifact's graph in one ONNX Runtime session with ORT's profiler
on (``--threads`` intra-op threads), prefills B random prompts of ``--context`` tokens in one call, runs
``--warmup`` decode steps, then ``--steps`` profiled decode steps (positions ``context + warmup`` onwards, every
row at the same position), and adds up the profiler's kernel times per operator type over those steps. Nodes whose
output is vocabulary-sized (the LM head and what reshapes its logits) are counted apart, as ``LM head: <op>``.
Prints one markdown table: each operator type with its kernel calls per step (``x N``), its ms per step and share
of the step at each batch, and the ratio of each batch's time to the first batch's. Why a batch scales as it does
(``bench.serve_bench``) is read off it: a memory-bound operator costs about the same at B=8 as at B=1, a
compute-bound one about 8x.

What it does not do: TensorRT engines, prefill profiles, sampling or anything outside the ORT call
(``bench.serve_bench`` measures the whole server); the profiler adds a few microseconds per node, so the "step ms
(profiled)" row is a little above an unprofiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np


def profile_steps(artifact: Path, batch: int, context: int, warmup: int, steps: int, threads: int) -> dict:
    """{"ops": {category: ms per step}, "calls": {category: kernel calls per step}, "step_ms": profiled wall ms
    per step} for one batch size."""
    from runtime_py.session import OrtSession

    with tempfile.TemporaryDirectory(prefix="llm-export-op-profile-") as tmp:
        session = OrtSession(artifact, threads=threads, batch=batch, profile=str(Path(tmp) / "ort"))
        vocab = session.vocab_size
        static = session.kv_mode == "static"
        cache = session.new_cache(batch, session.max_seq_len if static else 0)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab, (batch, context), dtype=np.int64)
        positions = np.broadcast_to(np.arange(context, dtype=np.int64), (batch, context))
        mask = None if static else np.ones((batch, context), np.int64)
        logits = session.forward(ids, positions, mask, cache)
        for i in range(warmup + steps):
            pos = context + i
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = None if static else np.ones((batch, pos + 1), np.int64)
            logits = session.forward(token, np.full((batch, 1), pos, np.int64), mask, cache)
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[1 + warmup]  # the first profiled step (run 0 is the prefill)
    step_us = sum(e["dur"] for e in events if e.get("name") == "model_run" and e["ts"] >= start)
    ops: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    seen = set()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        if (e["name"], e["ts"]) in seen:  # ORT can write an event twice
            continue
        seen.add((e["name"], e["ts"]))
        shapes = [s for out in e["args"].get("output_type_shape", []) for s in out.values()]
        # logits [B, S, V] / [B*S, V], or [V, B] when a tied head multiplies W @ x^T (not a KV buffer that
        # happens to be max_seq_len == vocab long: [B, KV, L, D])
        lm_head = any(len(s) in (2, 3) and (s[-1] == vocab or (len(s) == 2 and s[0] == vocab)) for s in shapes)
        category = ("LM head: " if lm_head else "") + e["args"]["op_name"]
        ops[category] += e["dur"]
        calls[category] += 1
    return {"ops": {k: v / steps / 1e3 for k, v in ops.items()}, "calls": {k: v / steps for k, v in calls.items()},
            "step_ms": step_us / steps / 1e3}


def table(results: dict[int, dict]) -> list[str]:
    batches = list(results)
    total = Counter()
    for r in results.values():
        total.update(r["ops"])
    order = [k for k, _ in total.most_common()]
    head = "| operator | " + " | ".join(f"B={b} ms | B={b} share" for b in batches)
    head += "".join(f" | B={b} / B={batches[0]}" for b in batches[1:]) + " |"
    lines = [head, "| --- " * (1 + 2 * len(batches) + len(batches) - 1) + "|"]

    def row(name: str, values: list[float], shares: list[str]) -> str:
        first = values[0]
        cells = [f"{v:.2f} | {s}" for v, s in zip(values, shares)]
        ratios = [f"{v / first:.2f}" if first > 0 else "n/a" for v in values[1:]]
        return f"| {name} | " + " | ".join(cells) + "".join(f" | {r}" for r in ratios) + " |"

    for op in order:
        values = [results[b]["ops"].get(op, 0.0) for b in batches]
        shares = [f"{100 * v / results[b]['step_ms']:.0f}%" for v, b in zip(values, batches)]
        calls = max(results[b]["calls"].get(op, 0) for b in batches)
        lines.append(row(f"{op} x{calls:g}", values, shares))
    sums = [sum(results[b]["ops"].values()) for b in batches]
    lines.append(row("all kernels", sums, [f"{100 * s / results[b]['step_ms']:.0f}%" for s, b in zip(sums, batches)]))
    lines.append(row("step ms (profiled)", [results[b]["step_ms"] for b in batches], ["100%"] * len(batches)))
    return lines


def main(argv: list[str] | None = None) -> int:
    from artifacts.bundle import ArtifactError, open_artifact
    from export.options import int_in

    p = argparse.ArgumentParser(prog="python -m bench.op_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--batch", type=int_in(1), nargs="+", default=None,
                   help="batch sizes (default: 1 and 8, or the artifact's max batch when that is smaller)")
    p.add_argument("--context", type=int_in(1), default=None,
                   help="prompt tokens before the profiled steps (default: half the artifact's max_seq_len)")
    p.add_argument("--warmup", type=int_in(0), default=3)
    p.add_argument("--steps", type=int_in(1), default=10)
    p.add_argument("--threads", type=int_in(1), default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        manifest = open_artifact(args.artifact)
    except (ArtifactError, OSError, ValueError) as e:
        p.error(str(e))
    if manifest.task != "causal-lm":
        p.error(f"{args.artifact} is a {manifest.task} artifact: it has no decode step to profile")
    args.batch = args.batch or [1, min(8, manifest.max_batch)]
    if max(args.batch) > manifest.max_batch:
        p.error(f"--batch {max(args.batch)} > the artifact's max batch {manifest.max_batch}")
    context = manifest.max_seq_len // 2 if args.context is None else args.context
    if context + args.warmup + args.steps > manifest.max_seq_len:
        p.error(f"--context {context} + --warmup {args.warmup} + --steps {args.steps} > the artifact's max_seq_len "
                f"{manifest.max_seq_len}")
    results = {}
    for b in dict.fromkeys(args.batch):
        print(f"batch {b}: prefill {context} tokens, {args.warmup} + {args.steps} decode steps ...", file=sys.stderr,
              flush=True)
        try:
            results[b] = profile_steps(args.artifact, b, context, args.warmup, args.steps, args.threads)
        except ArtifactError as e:
            p.error(str(e))
    print(f"{args.artifact}: {manifest.decoder.lowering} lowering, quantization "
          f"{(manifest.quantization or {}).get('scheme', 'none')}, decode at positions {context + args.warmup}.."
          f"{context + args.warmup + args.steps - 1}, {args.threads} threads, {args.steps} steps per batch")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
