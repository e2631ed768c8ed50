"""`python -m bench.serve_bench`: aggregate decode throughput and latency of `python -m runtime_py serve` under
concurrent streams.

What it does: for each precision variant (``fp32``; ``int4``: ``--quantize int4``; ``int4-head``: the same with
``--quantize-lm-head``, not run by default) it builds one artifact of the
checkpoint (``--max-batch`` = the largest stream count, ``--max-seq-len`` = prompt + new tokens) or takes
``--artifact DIR``, starts the server on a free loopback port, warms it up, then for each stream count N (default
1, 4, 8, 16) sends N streaming ``/v1/completions`` requests at once through the ``openai`` client (one thread per
stream; distinct seeded random prompt ids of ``--prompt-len``; greedy; ``ignore_eos`` so each writes exactly
``--new-tokens``) and timestamps every SSE chunk (the server sends one chunk per token). Per round:

* **decode tok/s** (aggregate, steady state): the tokens all streams wrote between the moment the last stream got
  its first token (every prompt prefilled) and the moment the first stream finished, over that time: N streams
  decoding together. ``decode_overall_tok_s`` in results.json: every token after each stream's first over the
  time from the first first-token to the last token (later prompts are prefilled inside that window);
* **end-to-end tok/s**: all tokens over the time from sending to the last token;
* **TTFT** p50/p99 (send -> first token) and **inter-token latency** p50/p99 (gaps between a stream's tokens).

``--rounds`` rounds per point, medians reported. Prints a table (the markdown rows for bench/README.md too), the
speed-up of each N over one stream, and writes ``results.json`` and ``results.png`` (matplotlib, when installed)
to ``--out``.

With ``--frontends triton`` (or ``http triton``) the same artifacts are also served through Triton: the repository
``python -m export triton`` writes, nvidia-pytriton's bundled tritonserver, gRPC streaming (rows ``VARIANT-triton``).

What it does not do: compare with other servers, check outputs (tests/test_serve_openai.py does), or run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from export.options import int_in

VARIANTS = {"fp32": [], "int4": ["--quantize", "int4"], "int4-head": ["--quantize", "int4", "--quantize-lm-head"]}


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def build(ckpt: Path, out: Path, variant: str, max_batch: int, max_seq_len: int, log: Path) -> Path:
    art = out / "models" / variant
    cmd = [sys.executable, "-m", "export", "build", "--model", str(ckpt), "--precision", "fp32", "--out", str(art),
           "--overwrite", "--no-progress", "--max-seq-len", str(max_seq_len), "--max-batch", str(max_batch),
           *VARIANTS[variant]]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f"build of {variant} failed (rc {rc}); see {log}")
    return art


class Server:
    """`python -m runtime_py serve` on a free loopback port, in its own process group."""

    def __init__(self, artifact: Path, slots: int, threads: int | None, prefill_chunk: int | None, log: Path):
        cmd = [sys.executable, "-m", "runtime_py", "serve", str(artifact), "--port", "0", "--max-batch", str(slots),
               "--max-queue", str(slots), "--model-name", "bench"]
        if threads:
            cmd += ["--threads", str(threads)]
        if prefill_chunk:
            cmd += ["--prefill-chunk", str(prefill_chunk)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        line = self.proc.stdout.readline()
        match = re.search(r"at (http://[^ ]+:\d+)/v1", line)
        if not match:
            self.close()
            raise RuntimeError(f"the server did not start ({line.strip() or 'no output'}); see {log}")
        self.url = match.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class TritonServer:
    """The Triton path: `python -m export triton` writes the repository (the decoupled python model on the same
    engine, `slots` KV slots), nvidia-pytriton's bundled tritonserver serves it on free loopback ports (its own
    process group; stopped with it). Requests go over gRPC streaming (tritonclient), one response per text delta."""

    def __init__(self, artifact: Path, slots: int, threads: int | None, work: Path, log: Path):
        from artifacts.triton_launch import bundled_server, free_ports
        from artifacts.triton_stub_env import stub_env

        repo = work / "repo"
        cmd = [sys.executable, "-m", "export", "triton", str(artifact), "--out", str(repo), "--name", "bench",
               "--max-batch", str(slots), "--overwrite"]
        with open(log, "wb") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode:
                raise RuntimeError(f"export triton failed; see {log}")
        if threads:  # the python model's ONNX Runtime threads (config parameter ort_threads)
            config = repo / "bench" / "config.pbtxt"
            text = config.read_text()
            config.write_text(re.sub(r'(key: "ort_threads"\s*value \{\s*string_value: )"\d+"', rf'\1"{threads}"', text))
        grpc_port, http_port, metrics_port = free_ports(3)
        argv, env = bundled_server(repo, work, grpc_port, http_port, metrics_port, ["bench"], python_env=stub_env())
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"127.0.0.1:{grpc_port}"
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; see {log}")
            try:
                if client.is_model_ready("bench"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"tritonserver not ready after 120 s; see {log}")
            time.sleep(0.3)
        client.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


class TritonClient:
    """What run_point needs from a client: stream one prompt (text: the Triton model takes text_input), timestamp
    every response."""

    def __init__(self, url: str, tokenizer):
        self.url, self.tok = url, tokenizer

    def text(self, prompt: list[int]) -> str:
        """The prompt as text that re-tokenizes to at most len(prompt) tokens (random ids decode to text whose own
        tokenization is usually longer): keep the share of the ids that fits, then drop one at a time until it does."""
        ids = list(prompt)
        while True:
            text = self.tok.decode(ids)
            n = len(self.tok.encode(text))
            if n <= len(prompt) or len(ids) <= 1:
                return text
            ids = ids[:max(1, min(len(ids) - 1, len(ids) * len(prompt) // n))]

    def stream(self, prompt: list[int], new_tokens: int) -> tuple[list[float], int]:
        import queue

        import tritonclient.grpc as grpcclient

        values = {"text_input": np.array([self.text(prompt).encode()], dtype=object),
                  "max_tokens": np.array([new_tokens], dtype=np.int32),
                  "ignore_eos": np.array([True], dtype=bool), "temperature": np.array([0.0], dtype=np.float32)}
        types = {"text_input": "BYTES", "max_tokens": "INT32", "ignore_eos": "BOOL", "temperature": "FP32"}
        inputs = []
        for name, value in values.items():
            t = grpcclient.InferInput(name, [1, 1], types[name])  # the model's batch dim of one first
            t.set_data_from_numpy(value.reshape(1, 1))
            inputs.append(t)
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
        times = []
        try:
            client.async_stream_infer("bench", inputs, enable_empty_final_response=True)
            while True:
                now, result, error = results.get(timeout=600)
                if error is not None:
                    raise RuntimeError(f"triton: {error}")
                out = result.as_numpy("text_output")
                if out is not None and len(out.reshape(-1)[0]):
                    times.append(now)  # one response per text delta, about one per token
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return times, len(times)
        finally:
            client.stop_stream()
            client.close()


def one_stream(client, prompt: list[int], new_tokens: int, barrier: threading.Barrier) -> dict:
    barrier.wait()
    t0 = time.perf_counter()
    if isinstance(client, TritonClient):
        times, tokens = client.stream(prompt, new_tokens)
        return {"t_send": t0, "times": times, "tokens": tokens}
    times, tokens = [], 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].finish_reason is None:
            times.append(now)  # one chunk per token
    return {"t_send": t0, "times": times, "tokens": tokens}


def run_point(client, streams: int, prompt_len: int, new_tokens: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(streams)]
    barrier = threading.Barrier(streams)
    results: list[dict | BaseException] = [None] * streams

    def worker(i):
        try:
            results[i] = one_stream(client, prompts[i], new_tokens, barrier)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]!r}")
    if any(len(r["times"]) < 2 for r in results):  # the Triton model answers per text delta, not per token
        raise RuntimeError("a stream got fewer than 2 timed responses (text deltas): its tokens decode to (almost) no "
                           "text (a random-weight model writes ids its tokenizer has no text for); time this "
                           "frontend on a model that writes text")
    firsts = [r["times"][0] for r in results]
    lasts = [r["times"][-1] for r in results]
    # steady state: from the moment the last stream got its first token (every prompt prefilled) to the moment the
    # first stream finished, all N streams decode together
    lo, hi = max(firsts), min(lasts)
    steady = sum(1 for r in results for t in r["times"] if lo < t <= hi)
    span = max(lasts) - min(firsts)
    overall = sum(len(r["times"]) - 1 for r in results) / span if span > 0 else None
    ttft = [r["times"][0] - r["t_send"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"streams": streams, "tokens": sum(r["tokens"] for r in results),
            "decode_tok_s": steady / (hi - lo) if hi > lo and steady >= streams else overall,
            "decode_overall_tok_s": overall,
            "e2e_tok_s": sum(len(r["times"]) for r in results) / (max(lasts) - min(r["t_send"] for r in results)),
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3 if itl else None,
            "itl_p99_ms": percentile(itl, 99) * 1e3 if itl else None}


def median_point(rounds: list[dict]) -> dict:
    out = {"streams": rounds[0]["streams"], "rounds": rounds}
    for key in ("decode_tok_s", "decode_overall_tok_s", "e2e_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                "itl_p99_ms"):
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def fmt(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(res: dict) -> str:
    lines = ["| variant | streams | decode tok/s | x 1 stream | decode incl. prefills tok/s | end-to-end tok/s | "
             "TTFT p50 / p99 ms | ITL p50 / p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, points in res["variants"].items():
        base = points[0]["decode_tok_s"] if points and points[0]["streams"] == 1 else None
        for p in points:
            speedup = p["decode_tok_s"] / base if base and p["decode_tok_s"] else None
            lines.append(f"| {variant} | {p['streams']} | {fmt(p['decode_tok_s'])} | {fmt(speedup, '.2f')} | "
                         f"{fmt(p['decode_overall_tok_s'])} | {fmt(p['e2e_tok_s'])} | "
                         f"{fmt(p['ttft_p50_ms'], '.0f')} / {fmt(p['ttft_p99_ms'], '.0f')} | "
                         f"{fmt(p['itl_p50_ms'], '.0f')} / {fmt(p['itl_p99_ms'], '.0f')} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (variant, points) in enumerate(res["variants"].items()):
        n, c = [p["streams"] for p in points], f"C{i}"
        axes[0].plot(n, [p["decode_tok_s"] for p in points], "o-", color=c, label=f"{variant} steady")
        axes[0].plot(n, [p["decode_overall_tok_s"] for p in points], "x--", color=c, label=f"{variant} incl. prefills")
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(n, [p[f"{key}_p50_ms"] for p in points], "o-", color=c, label=f"{variant} p50")
            ax.plot(n, [p[f"{key}_p99_ms"] for p in points], "x--", color=c, label=f"{variant} p99")
    for ax, title, unit in zip(axes, ("aggregate decode", "time to first token", "inter-token latency"),
                               ("tok/s", "ms", "ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["streams"], [str(s) for s in res["streams"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"runtime_py serve: {res['model']}, prompt {res['prompt_len']} + {res['new_tokens']} tokens, "
                 f"{res['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args) -> dict:
    import openai

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    streams = sorted(set(args.streams))
    artifacts: dict[str, Path] = {}
    if args.artifact:
        for a in args.artifact:
            artifacts[Path(a).name] = Path(a)
    else:
        from bench.models import resolve_bench_model

        ckpt = resolve_bench_model(args.model)
        for variant in args.variants:
            print(f"building {variant} ...", flush=True)
            artifacts[variant] = build(ckpt, out, variant, max(streams), args.prompt_len + args.new_tokens,
                                       out / "logs" / f"build-{variant}.log")
    res = {"model": args.model if not args.artifact else ",".join(artifacts), "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "streams": streams, "rounds": args.rounds, "threads": args.threads,
           "machine": f"{os.cpu_count()} cores", "date": datetime.now().isoformat(timespec="seconds"),
           "variants": {}}
    runs = [(variant, art, frontend) for variant, art in artifacts.items() for frontend in args.frontends]
    for variant, art, frontend in runs:
        manifest = json.loads((art / "manifest.json").read_text())
        vocab = manifest["spec"]["vocab_size"]
        if max(streams) > manifest["max_batch"]:  # said here, not as a server that did not start
            raise ValueError(f"--streams {max(streams)} > {art}'s max batch {manifest['max_batch']} (its KV slots); "
                             "rebuild it with a larger --max-batch")
        name = variant if frontend == "http" else f"{variant}-triton"
        if frontend == "http":
            server = Server(art, max(streams), args.threads, args.prefill_chunk, out / "logs" / f"server-{name}.log")
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        else:
            from runtime_py.tokenizer import Tokenizer

            tok = Tokenizer(art)
            server = TritonServer(art, max(streams), args.threads, out / f"triton-{variant}",
                                  out / "logs" / f"server-{name}.log")
            client = TritonClient(server.url, tok)
        variant = name
        try:
            run_point(client, 1, args.prompt_len, 4, vocab, seed=999)  # warm-up: binds, first-call costs
            points = []
            for n in streams:
                rounds = [run_point(client, n, args.prompt_len, args.new_tokens, vocab, seed=r) for r in
                          range(args.rounds)]
                points.append(median_point(rounds))
                p = points[-1]
                print(f"{variant:>6} {n:>3} streams: decode {fmt(p['decode_tok_s'])} tok/s, TTFT p50 "
                      f"{fmt(p['ttft_p50_ms'], '.0f')} ms, ITL p50 {fmt(p['itl_p50_ms'], '.0f')} ms", flush=True)
            res["variants"][variant] = points
        finally:
            server.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b-random",
                   help="checkpoint to build (bench model name, directory, preset, tiny-qwen2, ...)")
    p.add_argument("--artifact", action="append", default=[],
                   help="use this built artifact instead of building (repeatable; built with --max-batch >= "
                        "the largest --streams)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["fp32", "int4"])
    p.add_argument("--frontends", nargs="+", choices=["http", "triton"], default=["http"],
                   help="http: `python -m runtime_py serve` (OpenAI API); triton: the Triton repository of "
                        "`export triton` on nvidia-pytriton's tritonserver (gRPC streaming; text prompts: the "
                        "random ids are decoded and re-tokenized by the model, so the prompt length is approximate)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per point, medians reported (default 3: one 64-token single stream is a 2-second "
                        "window, and the ratios divide by it)")
    p.add_argument("--threads", type=int_in(1), default=None, help="the server's ONNX Runtime threads (default: all)")
    p.add_argument("--prefill-chunk", type=int_in(1), default=None, help="the server's --prefill-chunk")
    p.add_argument("--out", default=None, help="results directory (default ~/.cache/llm-export/serve-bench/<time>)")
    args = p.parse_args(argv)
    if min(args.streams) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.rounds < 1:
        p.error("--streams, --prompt-len, --rounds must be >= 1 and --new-tokens >= 2")
    if args.out is None:
        args.out = str(Path.home() / ".cache" / "llm-export" / "serve-bench" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        res = run(args)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    text = table(res)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(text + "\n")
    print()
    print(text)
    drew = plot(res, out / "results.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}" + (f", {out / 'results.png'}" if drew else
                                                                    " (no plot: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
