"""Command line: `python -m export {build,verify,inspect,triton,bundle,engine} ...`. Defaults, limits and choices
come from export/options.py, where each is defined once."""

from __future__ import annotations

if __name__ == "__main__":  # first, before any import: a Ctrl-C while the imports run exits 130, no traceback
    from artifacts.cli import quiet_startup

    quiet_startup()

import argparse
import json
import sys

from export.options import (ACCURACY_LEVELS, BACKENDS, DEFAULT_ACCURACY_LEVEL, DEFAULT_BACKEND, DEFAULT_GROUP_SIZE,
                            DEFAULT_KV_MODE, DEFAULT_LOGITS, DEFAULT_MAX_BATCH, DEFAULT_PRECISION,
                            DEFAULT_VERIFY_STEPS, EAGER_KV_MODE, KV_MODES, LOGITS, LOWERINGS, MAX_BATCH,
                            MAX_VERIFY_STEPS, PRECISIONS, QUANT_SCHEMES, TASKS, int_in)


def _ids(text: str) -> list[int]:
    from runtime_py.tokenizer import parse_ids

    try:
        ids = parse_ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not ids:
        raise argparse.ArgumentTypeError(f"needs at least one token id, got {text!r}")
    return ids


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM. A BaseException (like KeyboardInterrupt, so `except Exception` in
    libraries does not swallow it and every staging directory is removed on the way out) but not KeyboardInterrupt
    itself: CPython remembers a KeyboardInterrupt that passed through C-level code evaluation and then re-kills
    the process with SIGINT at exit, losing our exit status (seen: -2 instead of 143)."""


def terminate_cleanly() -> None:
    """SIGTERM (kill, systemd, a CI timeout) unwinds like Ctrl-C: staging directories are removed on the way out."""
    import signal

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="compare our decoder with HF transformers on one prompt")
    v.add_argument("--model", required=True, help="checkpoint dir, preset name, HF repo id (cached) or tiny-*")
    v.add_argument("--prompt-ids", type=_ids, default=None, help="comma-separated token ids (default: 8 fixed ids)")
    v.add_argument("--steps", type=int_in(0, MAX_VERIFY_STEPS), default=DEFAULT_VERIFY_STEPS,
                   help="greedy decode steps after the prefill")
    v.add_argument("--kv-mode", choices=KV_MODES, default=EAGER_KV_MODE,
                   help=f"the torch decoder's cache (default {EAGER_KV_MODE}: it grows, like HF's)")
    v.add_argument("--json", action="store_true", help="print only one JSON object")

    b = sub.add_parser("build", help="export a checkpoint to a deployable artifact directory")
    b.add_argument("--model", required=True, help="checkpoint dir, preset name, HF repo id (cached) or tiny-*")
    b.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    b.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="tensorrt: also build an engine (full TensorRT or TensorRT-RTX, ahead of time)")
    b.add_argument("--kv-mode", choices=KV_MODES, default=DEFAULT_KV_MODE,
                   help="static: fixed-length KV buffer updated in place (fast); concat: present = past + new")
    b.add_argument("--out", default=None, help="artifact directory (default: ~/.cache/llm-export/artifacts/...)")
    b.add_argument("--max-seq-len", type=int_in(2), default=None,
                   help="context length, 2 .. the model's max_position_embeddings (default: the model's)")
    b.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=DEFAULT_MAX_BATCH,
                   help=f"sequences one call runs at once (static KV slots), 1..{MAX_BATCH}")
    b.add_argument("--lowering", choices=LOWERINGS, default=None,
                   help="graph lowering (default: ort for --kv-mode static, reference for concat)")
    b.add_argument("--logits", choices=LOGITS, default=DEFAULT_LOGITS,
                   help="positions whose logits the graph returns: the last of each call (default; what generation "
                        "samples from, and a long prefill skips most of the LM head), or all (for scoring)")
    b.add_argument("--quantize", choices=QUANT_SCHEMES, default=None,
                   help="weight-only RTN quantization, symmetric, per group along the input dimension (activations "
                        "stay --precision); fp8 is TensorRT only. Default: none")
    b.add_argument("--group-size", type=int_in(2), default=None,
                   help=f"inputs per scale (default {DEFAULT_GROUP_SIZE['onnxruntime']} for ONNX Runtime, "
                        f"{DEFAULT_GROUP_SIZE['tensorrt']} for TensorRT int4 and trt-native graphs; "
                        "TensorRT int8/fp8 are per channel)")
    b.add_argument("--accuracy-level", type=int_in(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)), default=None,
                   help=f"MatMulNBits/QMoE compute (ort lowering): 4 = int8 (default {DEFAULT_ACCURACY_LEVEL}, fast "
                        "with VNNI), 1 = fp32 (for checking against the reference)")
    b.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the LM head (default: it stays --precision, like the embeddings and norms); a tied "
                        "model's embedding then reads the quantized head on ort/reference (no float table stored)")
    b.add_argument("--task", choices=TASKS, default=None,
                   help="the head: from config.json architectures by default; refused when it contradicts them")
    b.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    b.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("bundle", help="pack an artifact for building its TensorRT engine on a device")
    e.add_argument("artifact")
    e.add_argument("--out", required=True, help="bundle file to write (.tar)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle of ours")

    g = sub.add_parser("engine", help="on the device: unpack a bundle, build and verify the engine")
    g.add_argument("bundle")
    g.add_argument("--out", default=None, help="artifact directory (default: BUNDLE without .tar + -engine)")
    g.add_argument("--overwrite", action="store_true")

    from export.triton_cmd import add_parser as add_triton_parser

    add_triton_parser(sub)

    i = sub.add_parser("inspect", help="op histogram and fusion counts of an artifact's graphs")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print only one JSON object")

    args = parser.parse_args(argv)
    from artifacts.bundle import ArtifactError

    errors: tuple[type[BaseException], ...] = (ArtifactError, OSError, ValueError)
    if args.command not in ("inspect", "triton"):  # these run without torch (export.checkpoint, export.spec need it)
        from export.checkpoint import CheckpointError
        from export.engine import EngineError
        from export.spec import UnsupportedConfigError

        errors += (CheckpointError, UnsupportedConfigError, EngineError)
        import onnx  # noqa: F401 - these two under quiet_startup's handler (artifacts/cli.py says why)
        import onnxruntime  # noqa: F401
    # After the imports: torch's C init (numpy's import inside it) swallowed a Terminated raised there, and the
    # command then ran to the end with exit 0. Until here a SIGTERM just ends the process: nothing has started.
    terminate_cleanly()
    from artifacts.cli import restore_interrupts

    restore_interrupts()
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "build":
            return _build(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "triton":
            return args.func(args)
        if args.command == "bundle":
            from export.edge_cmd import bundle

            print(bundle(args.artifact, args.out, overwrite=args.overwrite))
            return 0
        if args.command == "engine":
            from export.edge_cmd import engine

            print(engine(args.bundle, args.out, overwrite=args.overwrite))
            return 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): nothing was written", file=sys.stderr)
        return 143
    except BrokenPipeError:  # standard output closed under us (| head): the work is done; artifacts.cli.run says
        raise
    except errors as e:
        # OSError: a full disk, a permission denied, a file that vanished: the message names the path
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _build(args) -> int:
    from export.build import build

    path = build(args.model, precision=args.precision, backend=args.backend, out=args.out, kv_mode=args.kv_mode,
                 max_seq_len=args.max_seq_len, max_batch=args.max_batch, overwrite=args.overwrite,
                 progress=not args.no_progress, lowering=args.lowering, logits=args.logits,
                 quantize=args.quantize, group_size=args.group_size, accuracy_level=args.accuracy_level,
                 quantize_lm_head=args.quantize_lm_head, task=args.task)
    print(path)
    return 0


def _inspect(args) -> int:
    from export.inspect import inspect_artifact

    report = inspect_artifact(args.artifact)
    if args.json:
        print(json.dumps(report))
        return 0
    q = report["quantization"]
    if q is not None and "source" in q:  # a pre-quantized checkpoint
        src = q["source"]
        scheme = f"pre-quantized {src['method']} {src['bits']}-bit (group {src['group_size']}), forms {q['forms']}"
    elif q is not None:
        scheme = f"{q['scheme']} (group {q['group_size'] or 'per channel'})"
    print("weights: " + ("every weight in the build precision" if q is None else
                         f"{scheme}: {q['quantized_tensors']} tensors quantized, {q['float_tensors']} float; "
                         f"{q['counts']}"))
    for name, g in report["graphs"].items():
        print(f"graph {name}: {g['file']}  lowering={g['lowering']}  logits={g['logits']}  "
              f"nodes={sum(g['ops'].values())}")
        for op, n in sorted(g["ops"].items(), key=lambda kv: -kv[1]):
            print(f"  {n:6d}  {op}")
        f = g["fusion"]
        print(f"  fusion: attention {f.get('attention_fused', 0)}/{report['layers']}, "
              f"MoE {f.get('moe_fused', 0)}/{report['sparse_layers']}")
        for line in f.get("skipped", []):
            print(f"  unfused: {line}")
    return 0


def _verify(args) -> int:
    from export.verify import verify

    r = verify(args.model, args.prompt_ids, args.steps, args.kv_mode)
    if args.json:
        if r["hf"] is None:
            print(r["note"], file=sys.stderr)
        print(json.dumps(r))
    elif r["hf"] is None:
        print(r["note"], file=sys.stderr)
        print(f"ours: tokens {r['ours']['tokens']}")
    else:
        print(f"model: {r['model']} (kv {r['kv_mode']})")
        print(f"max |logit diff|      {r['max_logit_diff']:.3e}")
        print(f"greedy tokens match   {r['greedy_match']} ({r['agreeing_tokens']}/{len(r['ours']['tokens'])})")
        print(f"max |logprob diff|    {r['max_logprob_diff']:.3e}")
    return 0 if r["hf"] is None or r["greedy_match"] else 1


if __name__ == "__main__":
    from artifacts.cli import run

    run(main)
