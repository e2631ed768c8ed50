"""Command line: `python -m export {verify} ...`. Defaults are defined here, once."""

from __future__ import annotations

import argparse
import json
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="compare our decoder with HF transformers on one prompt")
    v.add_argument("--model", required=True, help="checkpoint dir, preset name, HF repo id (cached) or tiny-*")
    v.add_argument("--prompt-ids", type=_ids, default=None, help="comma-separated token ids (default: 8 fixed ids)")
    v.add_argument("--steps", type=_positive, default=8, help="greedy decode steps after the prefill")
    v.add_argument("--kv-mode", choices=["concat", "static"], default="concat")
    v.add_argument("--json", action="store_true", help="print one JSON object last")

    args = parser.parse_args(argv)
    from export.checkpoint import CheckpointError
    from export.spec import UnsupportedConfigError

    try:
        if args.command == "verify":
            return _verify(args)
    except (CheckpointError, UnsupportedConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _verify(args) -> int:
    from export.verify import verify

    r = verify(args.model, args.prompt_ids, args.steps, args.kv_mode)
    if r["hf"] is None:
        print(r["note"], file=sys.stderr)
        print(f"ours: tokens {r['ours']['tokens']}")
    else:
        print(f"model: {r['model']} (kv {r['kv_mode']})")
        print(f"max |logit diff|      {r['max_logit_diff']:.3e}")
        print(f"greedy tokens match   {r['greedy_match']} ({r['agreeing_tokens']}/{len(r['ours']['tokens'])})")
        print(f"max |logprob diff|    {r['max_logprob_diff']:.3e}")
    if args.json:
        print(json.dumps(r))
    return 0 if r["hf"] is None or r["greedy_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
