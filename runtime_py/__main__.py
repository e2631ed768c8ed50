"""Command line: `python -m runtime_py {generate,bench,score,classify,chat,serve} ARTIFACT ...`. Generation defaults come
from runtime_py/sampling.py (SamplingParams, DEFAULT_MAX_NEW_TOKENS), the server's from runtime_py/serve.py and
runtime_py/engine.py, next to the code that reads them; the other flags' defaults are defined here, once.

Bad input (an unusable artifact, bad values, text that is not UTF-8, a chat template that fails or exceeds its
bounds) ends with `error: ...` on stderr and exit status 2, no traceback."""

from __future__ import annotations

if __name__ == "__main__":  # first, before any import: a Ctrl-C while the imports run exits 130, no traceback
    from artifacts.cli import quiet_startup

    quiet_startup()

import argparse
import codecs
import json
import os
import sys

from runtime_py.sampling import DEFAULT_MAX_NEW_TOKENS
from runtime_py.tokenizer import check_text, parse_ids


def _ids(text: str) -> list[int]:
    try:
        return parse_ids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _utf8(what: str, text: str | None) -> None:
    if text is not None:
        check_text(text, what)


def _from_argv(text):
    """An argument as UTF-8 whatever the locale: outside Python's UTF-8 mode (LC_ALL=POSIX with PYTHONUTF8=0)
    argv is decoded as ASCII, and valid UTF-8 bytes arrive as surrogate escapes; bytes that are not UTF-8 stay
    escaped, for check_text to name."""
    if not isinstance(text, str) or _is_utf8(sys.getfilesystemencoding()):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        return text


def _is_utf8(encoding: str | None) -> bool:
    return codecs.lookup(encoding or "ascii").name == "utf-8"


def _utf8_streams() -> None:
    """stdin and stdout in UTF-8 when the locale would make them ASCII (and PYTHONIOENCODING does not ask for it):
    prompts, chat messages and generated text are UTF-8 whatever the locale, as in Python's UTF-8 mode."""
    if os.environ.get("PYTHONIOENCODING"):
        return
    for stream in (sys.stdin, sys.stdout):
        if stream is not None and hasattr(stream, "reconfigure") and not _is_utf8(getattr(stream, "encoding", None)):
            stream.reconfigure(encoding="utf-8")


def _check_text_args(args) -> None:
    for flag in ("prompt", "chat", "system", "text", "question", "context", "stop"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(args, flag, [_from_argv(v) for v in value] if isinstance(value, list) else _from_argv(value))
    for flag in ("prompt", "chat", "system"):
        _utf8(f"--{flag}", getattr(args, flag, None))
    for stop in getattr(args, "stop", None) or ():
        _utf8("--stop", stop)
    for flag in ("text", "question", "context"):
        value = getattr(args, flag, None)
        for text in value if isinstance(value, list) else ():
            _utf8(f"--{flag}", text)


MAX_THREADS = 1024


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_THREADS}], got {text!r}")
    return value


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}")
        return value

    return parse


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature etc.)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--threads", type=_threads, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    _session_flags(p)


def _session_flags(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """How the artifact is opened: --skip-memory-check, and --backend (not for classify, ONNX Runtime only)."""
    p.add_argument("--skip-memory-check", action="store_true",
                   help="open the artifact even when its estimated memory exceeds what this process may use")
    if backend:
        p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto",
                       help="auto (default): the artifact's TensorRT engine when a CUDA GPU is present and the "
                            "engine loads there, else its ONNX graph on ONNX Runtime")


def _params(args):
    from runtime_py.sampling import SamplingParams

    return SamplingParams.from_options(args.temperature, args.top_k, args.top_p, greedy=args.greedy,
                                       repetition_penalty=args.repetition_penalty, seed=args.seed,
                                       max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
                                       ignore_eos=args.ignore_eos, logprobs=getattr(args, "logprobs", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_py")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("artifact")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text prompt")
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids")
    src.add_argument("--chat", help="one user message, rendered with the artifact's chat template")
    _sampling_args(g)
    g.add_argument("--logprobs", action="store_true", help="include chosen-token log-probs in --json output")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help="print only one JSON object (tokens, text, timings)")

    b = sub.add_parser("bench", help="time prefill and decode")
    b.add_argument("artifact")
    b.add_argument("--prompt-len", type=int, default=64)
    b.add_argument("--new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=_threads, default=None)
    b.add_argument("--json", action="store_true", help="print only one JSON object")
    _session_flags(b)

    s = sub.add_parser("score", help="teacher-forced log-probs of a token sequence and its perplexity")
    s.add_argument("artifact")
    ssrc = s.add_mutually_exclusive_group(required=True)
    ssrc.add_argument("--ids", type=_ids, help="comma-separated token ids")
    ssrc.add_argument("--text", help="text, tokenized with the artifact's tokenizer")
    ssrc.add_argument("--file", help="a UTF-8 text file, tokenized with the artifact's tokenizer")
    s.add_argument("--threads", type=_threads, default=None)
    s.add_argument("--json", action="store_true",
                   help='print one object last: {"logprobs": [...], "nll": float, "ppl": float, "mode": ...}')
    _session_flags(s)

    k = sub.add_parser("classify", help="run a task-head artifact: sequence / token classification, extractive QA")
    k.add_argument("artifact")
    k.add_argument("--text", action="append", default=None, help="an input text (repeatable: one batch)")
    k.add_argument("--prompt-ids", type=_ids, action="append", default=None,
                   help="an input as comma-separated token ids (repeatable)")
    k.add_argument("--question", action="append", default=None, help="QA: a question (repeatable, with --context)")
    k.add_argument("--context", action="append", default=None, help="QA: the context of the question at its place")
    k.add_argument("--max-answer-len", type=_int_in(1, 1_000_000), default=None,
                   help="QA: longest answer span in tokens (default 15, as transformers' pipeline)")
    k.add_argument("--threads", type=_threads, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    k.add_argument("--json", action="store_true",
                   help='print one JSON object: {"logits", "labels"} (classification) or {"start_logits", '
                        '"end_logits", "answers"} (qa)')
    _session_flags(k, backend=False)

    c = sub.add_parser("chat", help="interactive chat (streams)")
    c.add_argument("artifact")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c)

    from runtime_py.engine import DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
    from runtime_py.serve import DEFAULT_HOST, DEFAULT_PORT

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    v.add_argument("artifact")
    v.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    v.add_argument("--port", type=_int_in(0, 65535), default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port, printed at start)")
    v.add_argument("--max-batch", type=_int_in(1, 1024), default=None,
                   help="concurrent requests (KV slots); at most, and by default, the artifact's --max-batch")
    v.add_argument("--max-queue", type=_int_in(0, 1_000_000), default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a slot; more get 429 (default {DEFAULT_MAX_QUEUE})")
    v.add_argument("--prefill-chunk", type=_int_in(1, 1_000_000), default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens per prefill call and per iteration: the longest a running stream waits "
                        f"for a new prompt (default {DEFAULT_PREFILL_CHUNK})")
    v.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact's "
                                                      "directory name)")
    v.add_argument("--threads", type=_threads, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    _session_flags(v)

    args = parser.parse_args(argv)
    import onnxruntime  # noqa: F401 - under quiet_startup's handler (artifacts/cli.py says why)

    from artifacts.bundle import ArtifactError
    from artifacts.cli import restore_interrupts

    restore_interrupts()
    try:
        _utf8_streams()
        _check_text_args(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "score":
            from runtime_py.score import main as score_main

            return score_main(args)
        if args.command == "classify":
            return _classify(args)
        if args.command == "serve":
            from runtime_py.serve import serve

            return serve(args.artifact, host=args.host, port=args.port, slots=args.max_batch, threads=args.threads,
                         max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, model_name=args.model_name,
                         check_memory=not args.skip_memory_check, backend=args.backend)
        return _chat(args)
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - only an allocation failure is turned into an error line
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the memory check's "
              "estimate (runtime_py/memory.py) was below what this artifact needed here: raise the limit, free "
              "memory, or use a smaller --max-batch / context", file=sys.stderr)
        return 2


def _out_of_memory(e: BaseException) -> bool:
    """numpy's or ONNX Runtime's allocation failure (ORT raises its RuntimeException with bad_alloc / BFCArena)."""
    text = str(e)
    return isinstance(e, MemoryError) or (type(e).__module__.startswith("onnxruntime") and any(
        s in text for s in ("bad_alloc", "Failed to allocate")))


def _generate(args) -> int:
    from runtime_py.generate import Generator

    params = _params(args)
    if args.stream and args.json:
        raise ValueError("--stream and --json: choose one (--json prints a single object once generation ends)")
    gen = Generator(args.artifact, threads=args.threads, check_memory=not args.skip_memory_check,
                    backend=args.backend)
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    elif args.chat is not None:
        prompt = gen.encode_chat([{"role": "user", "content": args.chat}])
    else:
        prompt = gen.encode(args.prompt)
    if args.stream:
        gen.check_context([prompt], params)
        for delta in gen.stream(prompt, params):
            print(delta, end="", flush=True)
        print()
        return 0
    result = gen.generate([prompt], params)
    if not args.json:
        print(result.texts[0] if gen.tokenizer else result.tokens[0])
    else:
        row = result.rows[0]
        out = {"tokens": row.tokens, "text": row.text, "ttft_s": result.ttft_s, "decode_tok_s": result.decode_tok_s,
               "finish_reason": row.finish_reason}
        if args.logprobs:
            out["logprobs"] = row.logprobs
        print(json.dumps(out))
    return 0


def _classify(args) -> int:
    from runtime_py.classify import MAX_ANSWER_LEN, Classifier

    texts, ids, questions, contexts = args.text or [], args.prompt_ids or [], args.question or [], args.context or []
    if sum(bool(x) for x in (texts, ids, questions or contexts)) != 1:
        raise ValueError("pass the inputs one way: --text (repeatable), --prompt-ids (repeatable) or "
                         "--question with --context (QA)")
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} --question but {len(contexts)} --context: pass one context per question")
    for flag, values in (("--question", questions), ("--context", contexts)):
        if any(not v.strip() for v in values):  # as the Triton model refuses an empty row
            raise ValueError(f"{flag} is empty")
    clf = Classifier(args.artifact, threads=args.threads, check_memory=not args.skip_memory_check)
    if clf.task == "qa":
        if texts:
            raise ValueError("this is a question-answering artifact: pass --question and --context (or --prompt-ids)")
        result = clf.answer(pairs=list(zip(questions, contexts)) or None, inputs=ids or None,
                            max_answer_len=args.max_answer_len or MAX_ANSWER_LEN)
    else:
        if questions or args.max_answer_len is not None:
            raise ValueError(f"this is a {clf.task} artifact: --question/--context/--max-answer-len are for question "
                             "answering")
        result = clf.classify(ids or [clf.encode(t) for t in texts])
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for i, tokens in enumerate(result.tokens):
        if result.task == "seq-cls":
            print(f"{_printable(result.labels[i])}\t{result.scores[i]:.4f}")
        elif result.task == "token-cls":
            shown = [clf.tokenizer.decode([t], skip_special_tokens=False) if clf.tokenizer else str(t) for t in tokens]
            print(" ".join(f"{_printable(tok)}/{_printable(label)}" for tok, label in zip(shown, result.labels[i])))
        else:
            a = result.answers[i]
            print(f"{a['text']!r}\ttokens {a['start']}..{a['end']}\tscore {a['score']:.4f}" if a["start"] is not None
                  else "(no answer in the context)")
    return 0


def _printable(text: str) -> str:
    """A label or token for the tab- and space-separated text output: control characters escaped (\\t, \\n, ...),
    so one field stays one field; --json has the exact strings."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _bench(args) -> int:
    from runtime_py.bench import bench

    r = bench(args.artifact, args.prompt_len, args.new_tokens, args.batch, threads=args.threads,
              check_memory=not args.skip_memory_check, backend=args.backend)
    if args.json:
        print(json.dumps(r))
    else:
        decode = "n/a (one new token)" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f} tok/s"
        print(f"ttft {r['ttft_s'] * 1000:.1f} ms   decode {decode}   "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0


def _chat(args) -> int:
    from runtime_py.generate import Generator

    params = _params(args)
    gen = Generator(args.artifact, threads=args.threads, check_memory=not args.skip_memory_check,
                    backend=args.backend)
    gen.check_chat()  # no tokenizer or no template: said before the first message, not after it
    gen.check_stops(params)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    failed = False  # a message that could not be sent ends the chat with exit 2, after the rest went on
    while True:
        try:
            line = input("you> ").strip()
            _utf8("the message read from stdin", line)
        except (EOFError, RuntimeError):  # RuntimeError: "lost sys.stdin" (stdin closed, <&-): the end too
            return 2 if failed else 0
        except (UnicodeDecodeError, ValueError) as e:  # ValueError: check_text's, which names the byte
            why = f"the message read from stdin is not valid UTF-8 ({e})" if isinstance(e, UnicodeDecodeError) else e
            print(f"error: {why}; not sent", file=sys.stderr)
            failed = True
            continue
        if not line:
            return 2 if failed else 0
        messages.append({"role": "user", "content": line})
        try:
            prompt = _fit_chat(gen, messages, params)
        except ValueError as e:  # the template refused it, or this message alone does not fit the context
            messages.pop()
            print(f"error: {e}; not sent", file=sys.stderr)
            failed = True
            continue
        print("assistant> ", end="", flush=True)
        reply = ""
        for delta in gen.stream(prompt, params):
            reply += delta
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def _fit_chat(gen, messages: list[dict], params) -> list[int]:
    """The prompt of the conversation, the oldest exchanges (after a system message) dropped from `messages` until
    it fits the context with max_new_tokens to spare; ContextLengthError when the last message alone does not."""
    from runtime_py.generate import ContextLengthError

    first = 1 if messages[0]["role"] == "system" else 0
    trial = list(messages)  # the history is changed only when the new message fits
    while True:
        prompt = gen.encode_chat(trial)
        try:
            gen.check_context([prompt], params)
        except ContextLengthError:
            if len(trial) - first <= 1:
                raise
            del trial[first:first + 2]  # the oldest user message and its reply
            continue
        if len(trial) < len(messages):
            print(f"(the conversation outgrew the context: the {(len(messages) - len(trial)) // 2} oldest "
                  "exchange(s) were dropped)", file=sys.stderr)
            messages[:] = trial
        return prompt


if __name__ == "__main__":
    from artifacts.cli import run

    run(main)
