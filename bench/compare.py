"""`python -m bench.compare`: our build + runtime against HF transformers (eager) and onnxruntime-genai on ONE
checkpoint, in fp32 or with weight-only quantization (``--quantize int4|int8``) beside the fp32 rows.

What it does, with the same prompt ids (seeded random, ``--prompt-len`` of them) and exactly ``--new-tokens``
greedy tokens for every peer:

1. builds our artifact in a subprocess (``python -m export build ... --max-seq-len prompt+new``) and measures its
   wall time and peak RSS (the child's rusage from ``os.wait4``), next to the checkpoint size (sum of
   ``*.safetensors``), and its size on disk;
2. if ``onnxruntime_genai`` is importable, builds with its model builder from the same checkpoint directory
   (offline: ``HF_HUB_OFFLINE=1``, cache dir inside the output dir), measured the same way;
   with ``--quantize Q`` the peers are ``ours-Q`` (``build --quantize Q --group-size G --accuracy-level A``),
   ``ort-genai-Q`` (``-p Q --extra_options block_size=G qmoe_block_size=G accuracy_level=A``), and the fp32 rows
   ``ours-fp32``, ``ort-genai-fp32`` and ``hf-eager``;
3. runs each peer in its own subprocess (bench/worker.py: load, warm-up, measured run), alternating peers round by
   round for ``--runs`` rounds; TTFT, decode tokens/s, load time and the process's peak RSS are reported as
   medians over the rounds;
4. quality: the reference peer's greedy continuation (``ours-fp32``, or ``ours`` without ``--quantize``) is scored
   teacher-forced under every peer (bench/worker.py ``--score-file``: runtime_py ``score`` for ours,
   og.Generator.get_logits step by step for onnxruntime-genai, one forward for HF): the NLL column is the mean
   negative log-probability of those N tokens given the prompt and the tokens before them;
5. measures the machine's memory read bandwidth with numpy (1 GiB float32, best of 3 for a few read kernels, the
   best is used) and reports each peer's decode floor: the weight bytes one token reads (bench/models.py
   ``bytes_read_per_token``: one embedding row, top_k / num_experts of the expert stacks, quantized weights at
   their stored size) / bandwidth, and its decode speed as a fraction of the speed that floor allows;
6. prints a table and the ratios vs the first peer, writes ``results.json`` and ``results.png`` (matplotlib, Agg)
   into ``--out`` (default ``~/.cache/llm-export/bench/<timestamp>``; a given ``--out`` must be new or empty, since
   built models are deleted from it at the end unless ``--keep-artifacts``).

What it does not do: judge output quality beyond that NLL (the weights of the bench models are random, so their
continuation is meaningless; the NLL still shows how far a quantized model moves from the fp32 one), or run on a
GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from export.options import float_in, int_in

PEERS = ("ours", "hf-eager", "ort-genai")  # without --quantize
HF_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ACT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANT_BITS = {"int4": 4, "int8": 8}


def peer_specs(quantize: str | None) -> list[dict]:
    """The peers of one benchmark, in run order: name, runtime kind, weight scheme (None = float)."""
    if quantize is None:
        return [{"name": n, "kind": n, "scheme": None} for n in PEERS]
    return [{"name": f"ours-{quantize}", "kind": "ours", "scheme": quantize},
            {"name": f"ort-genai-{quantize}", "kind": "ort-genai", "scheme": quantize},
            {"name": "ours-fp32", "kind": "ours", "scheme": None},
            {"name": "ort-genai-fp32", "kind": "ort-genai", "scheme": None},
            {"name": "hf-eager", "kind": "hf-eager", "scheme": None}]


def reference_peer(quantize: str | None) -> str:
    """Whose greedy tokens the others are compared with and scored on: our float build."""
    return "ours" if quantize is None else "ours-fp32"


# -- measuring child processes ------------------------------------------------------------------------------------
def run_child(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd to completion with stdout+stderr to `log`; its wall seconds and peak RSS (its own rusage, taken by
    the small launcher bench/spawn.py so that this process's memory high-water mark does not leak into it)."""
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    launcher = [sys.executable, "-S", str(Path(__file__).with_name("spawn.py")), str(usage_file)]
    before = cpu_times()
    with open(log, "wb") as f:
        proc = subprocess.Popen(launcher + cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C: take the command down with the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    after = cpu_times()
    if not usage_file.exists():
        return {"rc": rc or 1, "wall_s": None, "peak_rss_bytes": None}
    r = json.loads(usage_file.read_text())
    if before and after and r["wall_s"]:
        # Machine-wide CPU time not spent by the command (other processes, hypervisor steal) over its wall time:
        # a run that shared the cores is not a clean measurement.
        capacity = r["wall_s"] * (os.cpu_count() or 1)
        r["other_cpu_frac"] = max(after["busy"] - before["busy"] - r["cpu_s"], 0.0) / capacity
        r["steal_frac"] = (after["steal"] - before["steal"]) / capacity
    return r


def wait_quiet(max_s: float, threshold: float = 0.10, window_s: float = 2.0) -> float:
    """Wait up to max_s until the machine's CPU use (all processes) over window_s is below threshold; seconds
    waited. On a shared machine this keeps another job's burst out of a measurement."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        a = cpu_times()
        time.sleep(window_s)
        b = cpu_times()
        if a is None or b is None or (b["busy"] - a["busy"]) / (window_s * (os.cpu_count() or 1)) < threshold:
            break
    return time.perf_counter() - t0


def cpu_times() -> dict | None:
    """Machine-wide busy and steal CPU seconds since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq + steal) / tick, "steal": steal / tick}


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").strip().splitlines()[-lines:])


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)  # the repo, so `-m export` / `-m bench.worker` resolve
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- machine facts --------------------------------------------------------------------------------------------------
def measure_bandwidth(gib: float = 1.0, threads: int = 1, repeats: int = 3) -> dict:
    """Memory read bandwidth in bytes/s: best of `repeats` for a few numpy read kernels over a float32 array."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(max(int(gib * 2**30) // 4, 1024), dtype=np.float32)  # ones: every page is really touched
    half = a.size // 2
    chunks = np.array_split(a, max(threads, 1))
    kernels = {
        "sum": lambda: a.sum(),
        "dot": lambda: np.dot(a[:half], a[half:2 * half]),
    }
    pool = ThreadPoolExecutor(len(chunks)) if len(chunks) > 1 else None
    if pool is not None:
        pairs = [(c[:c.size // 2], c[c.size // 2:2 * (c.size // 2)]) for c in chunks]
        kernels[f"sum x{len(chunks)} threads"] = lambda: list(pool.map(np.sum, chunks))
        kernels[f"dot x{len(chunks)} threads"] = lambda: list(pool.map(lambda ab: np.dot(*ab), pairs))
    results = {}
    try:
        for name, fn in kernels.items():
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            nbytes = 2 * half * 4 if name == "dot" else a.nbytes
            results[name] = nbytes / best
    finally:
        if pool is not None:
            pool.shutdown()
    del a, chunks, kernels
    return {"bytes_per_s": max(results.values()), "kernels_bytes_per_s": results, "array_bytes": int(gib * 2**30)}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def genai_available() -> tuple[bool, str]:
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return False, f"onnxruntime-genai is not importable ({type(e).__name__}: {e})"
    return True, ""


# -- formatting -----------------------------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def fmt_num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


COLUMNS = [("build s", "build_s", lambda v: fmt_num(v, ".1f")),
           ("build peak RSS", "build_peak_rss_bytes", fmt_bytes),
           ("build RSS/ckpt", "build_rss_over_ckpt", lambda v: fmt_num(v, ".2f") + ("x" if v is not None else "")),
           ("load s", "load_s", lambda v: fmt_num(v, ".2f")),
           ("TTFT ms", "ttft_ms", lambda v: fmt_num(v, ".1f")),
           ("decode tok/s", "decode_tok_s", lambda v: fmt_num(v, ".2f")),
           ("run peak RSS", "run_peak_rss_bytes", fmt_bytes),
           ("disk", "disk_bytes", fmt_bytes),
           ("NLL", "nll", lambda v: fmt_num(v, ".4f"))]


def table(peers: dict) -> str:
    rows = [["peer"] + [c[0] for c in COLUMNS]]
    for name, p in peers.items():
        rows.append([name] + [fmt(p.get(key)) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratio_lines(peers: dict) -> tuple[list[str], dict]:
    """Ratios of the first peer (ours) vs every other, each written so that > 1 means ours is better (faster or
    smaller); the NLL as a difference (other - ours: > 0 means ours is closer to the fp32 model)."""
    names = list(peers)
    first = names[0]
    ours = peers[first]
    others = names[1:]
    out: dict = {}
    specs = [("decode tok/s", "decode_tok_s", True), ("TTFT", "ttft_ms", False), ("build time", "build_s", False),
             ("build peak RSS", "build_peak_rss_bytes", False), ("run peak RSS", "run_peak_rss_bytes", False),
             ("disk", "disk_bytes", False)]
    lines = []
    for label, key, higher_better in specs:
        parts = []
        for other in others:
            if key.startswith("build") and peers[other].get("kind") == "hf-eager":
                continue  # nothing to build
            a, b = ours.get(key), peers[other].get(key)
            r = ratio(a, b) if higher_better else ratio(b, a)
            name = f"{first}/{other}" if higher_better else f"{other}/{first}"
            out[f"{key}: {name}"] = r
            parts.append(f"{name} = {fmt_num(r, '.2f')}{'x' if r is not None else ''}")
        lines.append(f"{label + ':':16s}" + ", ".join(parts))
    if ours.get("nll") is not None:
        parts = []
        for other in others:
            b = peers[other].get("nll")
            d = None if b is None else b - ours["nll"]
            out[f"nll: {other} - {first}"] = d
            parts.append(f"{other} - {first} = {fmt_num(d, '+.4f')}")
        lines.append(f"{'NLL:':16s}" + ", ".join(parts))
    return lines, out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def graph_ops(onnx_path: Path) -> dict:
    """Op histogram of a graph (its external data not loaded), and whether the LM head / embedding are quantized."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    head_q = any(n.op_type == "MatMulNBits" and ("lm_head" in n.name or "lm_head" in n.input[1]) for n in m.graph.node)
    embed_q = any(n.op_type == "GatherBlockQuantized" for n in m.graph.node)
    return {"ops": dict(sorted(ops.items())), "lm_head_quantized": head_q, "embedding_quantized": embed_q}


# -- the benchmark --------------------------------------------------------------------------------------------------
def default_out() -> Path:
    from export.tiny import cache_root

    return cache_root() / "bench" / datetime.now().strftime("%Y%m%d-%H%M%S")


def out_problem(out: Path) -> str | None:
    """Why `out` cannot hold a benchmark run, or None. The run writes logs/, models/ (deleted at the end) and
    results.*, so it must be new or empty: an existing directory of the user's must never lose a models/ folder."""
    if out.is_symlink():
        return "is a symlink; give the real directory"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return "exists and is not an empty directory; the benchmark writes (and later deletes) files there: choose a " \
               "new directory"
    return None


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def build_ours(ckpt: Path, out: Path, name: str, precision: str, max_seq_len: int, env: dict,
               quant_flags: list[str] | None = None) -> tuple[dict, Path]:
    art = out / "models" / name
    cmd = [sys.executable, "-m", "export", "build", "--model", str(ckpt), "--precision", precision, "--out", str(art),
           "--overwrite", "--no-progress", "--max-seq-len", str(max_seq_len), *(quant_flags or [])]
    r = run_child(cmd, out / "logs" / f"build-{name}.log", env)
    return {**r, "cmd": cmd}, art


def build_genai(ckpt: Path, out: Path, name: str, precision: str, env: dict,
                extra_options: list[str] | None = None) -> tuple[dict, Path]:
    dest = out / "models" / name
    cache = out / "models" / f"{name}-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(dest),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    r = run_child(cmd, out / "logs" / f"build-{name}.log", env)
    shutil.rmtree(cache, ignore_errors=True)
    return {**r, "cmd": cmd}, dest


def quant_settings(args) -> dict | None:
    """The --quantize settings both builders get (same scheme, group size, accuracy level)."""
    if args.quantize is None:
        return None
    return {"scheme": args.quantize, "bits": QUANT_BITS[args.quantize], "group_size": args.group_size,
            "accuracy_level": args.accuracy_level, "lm_head": args.quantize_lm_head}


def ours_quant_flags(q: dict) -> list[str]:
    flags = ["--quantize", q["scheme"], "--group-size", str(q["group_size"]), "--accuracy-level",
             str(q["accuracy_level"])]
    return flags + (["--quantize-lm-head"] if q["lm_head"] else [])


def genai_quant_options(q: dict) -> list[str]:
    # block_size: MatMulNBits; qmoe_block_size: QMoE experts (ignored by dense models); accuracy_level: both
    g = q["group_size"]
    return [f"block_size={g}", f"qmoe_block_size={g}", f"accuracy_level={q['accuracy_level']}"]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_benchmark(args) -> dict:
    from bench.models import bytes_read_per_token, resolve_bench_model
    from export.spec import load_spec

    threads = args.threads or os.cpu_count() or 1
    env = child_env(threads)
    q = quant_settings(args)
    specs = peer_specs(args.quantize)
    ref_name = reference_peer(args.quantize)

    print(f"checkpoint: resolving {args.model} ...", flush=True)
    ckpt = resolve_bench_model(args.model).resolve()
    spec = load_spec(ckpt)  # a model that is not there or not ours fails here, before --out exists
    out = Path(args.out).expanduser() if args.out else default_out()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ckpt_bytes = checkpoint_bytes(ckpt)
    act = ACT_BYTES[args.precision]
    float_read = bytes_read_per_token(spec, act)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, spec.vocab_size, args.prompt_len).tolist()
    prompt_file = out / "prompt_ids.json"
    prompt_file.write_text(json.dumps(prompt))
    max_seq_len = args.prompt_len + args.new_tokens
    print(f"checkpoint: {ckpt} ({fmt_bytes(ckpt_bytes)} safetensors, {spec.model_type}, {spec.num_layers} layers)")
    print(f"out: {out}")

    peers: dict = {}
    for sp in specs:
        peers[sp["name"]] = {**sp, "available": True, "note": None, "runs": []}
    for p in peers.values():
        if p["kind"] == "hf-eager":
            p["build_note"] = "no build step"
            p["disk_bytes"] = ckpt_bytes
        if p["scheme"] is None:
            p["bytes_read_per_token"] = float_read["total"]
        elif p["kind"] == "ours":
            p["bytes_read_per_token"] = bytes_read_per_token(
                spec, act, {"bits": q["bits"], "group": q["group_size"], "scale_bytes": act,
                            "lm_head": q["lm_head"]})["total"]

    # -- builds
    paths: dict = {}
    ok, why = genai_available()
    for p in peers.values():
        name = p["name"]
        if p["kind"] == "hf-eager":
            paths[name] = ckpt
            continue
        if p["kind"] == "ort-genai":
            if not ok:
                print(f"{name}: {why}; its cells are n/a (pip install -e '.[bench]')")
                p.update(available=False, note=why)
                continue
            if args.precision != "fp32":
                note = f"ort-genai's CPU builder has no {args.precision} target (fp32/int8/int4 only); skipped"
                print(f"{name}: {note}")
                p.update(available=False, note=note)
                continue
        if args.quiet_wait:
            wait_quiet(args.quiet_wait)
        print(f"build: {name} ...", flush=True)
        if p["kind"] == "ours":
            r, art = build_ours(ckpt, out, name, args.precision, max_seq_len, env,
                                ours_quant_flags(q) if p["scheme"] else None)
        else:
            r, art = build_genai(ckpt, out, name, p["scheme"] or args.precision, env,
                                 genai_quant_options(q) if p["scheme"] else None)
        _record_build(p, r, ckpt_bytes, out / "logs" / f"build-{name}.log")
        if p["available"]:
            paths[name] = art
            p["disk_bytes"] = disk_bytes(art)
            try:
                p["graph"] = graph_ops(art / "model.onnx")
            except Exception as e:  # noqa: BLE001 - a description only; the runs say whether the model works
                p["graph"] = {"error": f"{type(e).__name__}: {e}"}
            if p["kind"] == "ort-genai" and p["scheme"]:
                # their builder quantizes the LM head too (shared with the embedding when tied): read from the graph
                head_q = p["graph"].get("lm_head_quantized", True)
                p["bytes_read_per_token"] = bytes_read_per_token(
                    spec, act, {"bits": q["bits"], "group": q["group_size"], "scale_bytes": act,
                                "lm_head": head_q})["total"]

    # -- bandwidth (before the runs, while nothing else is running)
    if args.quiet_wait:
        wait_quiet(args.quiet_wait)
    print("bandwidth: measuring ...", flush=True)
    bw_before = measure_bandwidth(args.bandwidth_gib, threads)
    print(f"  {bw_before['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)

    # -- runs, alternating peers
    for p in peers.values():
        if p["kind"] != "hf-eager" or not p["available"]:
            continue
        if args.skip_hf:
            p.update(available=False, note="skipped (--skip-hf)")
        else:
            try:
                import transformers  # noqa: F401
            except ImportError as e:
                p.update(available=False, note=f"transformers is not importable ({e})")
    for rnd in range(args.runs):
        for name, p in peers.items():
            if not p["available"]:
                continue
            print(f"run {rnd + 1}/{args.runs}: {name} ...", flush=True)
            res_file = out / "logs" / f"run-{name}-{rnd}.json"
            log = out / "logs" / f"run-{name}-{rnd}.log"
            cmd = worker_cmd(p["kind"], paths[name], prompt_file, args, threads, res_file)
            if args.quiet_wait:
                waited = wait_quiet(args.quiet_wait)
                if waited > 2.5:
                    print(f"  waited {waited:.0f} s for the machine to go quiet", flush=True)
            r = run_child(cmd, log, env)
            if r["rc"] != 0 or not res_file.exists():
                p.update(available=False, note=f"run failed (exit {r['rc']}); see {log}:\n{_tail(log)}")
                print(f"  {name} failed (exit {r['rc']}):\n{_tail(log)}", file=sys.stderr)
                continue
            res = json.loads(res_file.read_text())
            for key in ("peak_rss_bytes", "wall_s", "cpu_s", "other_cpu_frac", "steal_frac"):
                res[key] = r.get(key)
            p["runs"].append(res)
            busy = r.get("other_cpu_frac")
            print(f"  ttft {res['ttft_s'] * 1000:.1f} ms, decode {res['decode_tok_s']:.2f} tok/s, "
                  f"peak RSS {fmt_bytes(r['peak_rss_bytes'])}, load {res['load_s']:.1f} s"
                  + (f", other CPU load {busy * 100:.0f}%" if busy is not None else ""), flush=True)

    # -- quality: the reference's greedy continuation, teacher-forced under every peer
    continuation = None
    if peers[ref_name]["runs"]:
        continuation = peers[ref_name]["runs"][-1]["tokens"]
        cont_file = out / "continuation.json"
        cont_file.write_text(json.dumps({"from": ref_name, "prompt": prompt, "continuation": continuation}))
        for name, p in peers.items():
            if not p["available"] or not p["runs"]:
                continue
            print(f"score: {name} ...", flush=True)
            res_file = out / "logs" / f"score-{name}.json"
            log = out / "logs" / f"score-{name}.log"
            cmd = worker_cmd(p["kind"], paths[name], prompt_file, args, threads, res_file) + \
                ["--score-file", str(cont_file)]
            r = run_child(cmd, log, env)
            if r["rc"] != 0 or not res_file.exists():
                p["quality_note"] = f"scoring failed (exit {r['rc']}); see {log}:\n{_tail(log)}"
                print(f"  {name} scoring failed (exit {r['rc']}):\n{_tail(log)}", file=sys.stderr)
                continue
            sc = json.loads(res_file.read_text())
            p["nll"], p["score"] = sc["nll"], {k: v for k, v in sc.items() if k != "logprobs"}
            p["score"]["peak_rss_bytes"] = r.get("peak_rss_bytes")
            print(f"  NLL {sc['nll']:.4f} ({sc['score_s']:.1f} s)", flush=True)

    if args.quiet_wait:
        wait_quiet(args.quiet_wait)
    print("bandwidth: measuring again ...", flush=True)
    bw_after = measure_bandwidth(args.bandwidth_gib, threads)
    print(f"  {bw_after['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)
    # the best of both: the floor is a bound, so it uses the highest bandwidth seen
    bw = {"bytes_per_s": max(bw_before["bytes_per_s"], bw_after["bytes_per_s"]), "before_runs": bw_before,
          "after_runs": bw_after}
    floor_s = float_read["total"] / bw["bytes_per_s"]

    for p in peers.values():
        runs = p["runs"]
        if p.get("bytes_read_per_token"):
            p["floor_tok_s"] = bw["bytes_per_s"] / p["bytes_read_per_token"]
        if runs:
            p["ttft_ms"] = median([r["ttft_s"] * 1000 for r in runs])
            p["decode_tok_s"] = median([r["decode_tok_s"] for r in runs])
            p["load_s"] = median([r["load_s"] for r in runs])
            p["run_peak_rss_bytes"] = median([r["peak_rss_bytes"] for r in runs])
            floor_tok_s = p.get("floor_tok_s")
            p["floor_fraction"] = p["decode_tok_s"] / floor_tok_s if p["decode_tok_s"] and floor_tok_s else None
            # the least disturbed run on a shared machine: fastest TTFT and decode (each its own best)
            p["best"] = {"ttft_ms": min(r["ttft_s"] for r in runs) * 1000,
                         "decode_tok_s": max(r["decode_tok_s"] for r in runs)}
    agreement = {}
    if continuation is not None:
        for name, p in peers.items():
            if name != ref_name and p["runs"]:
                toks = p["runs"][-1]["tokens"]
                same = 0
                for a, b in zip(continuation, toks):
                    if a != b:
                        break
                    same += 1
                agreement[name] = {"common_prefix": same, "of": len(continuation)}

    lines, ratios = ratio_lines(peers)
    result = {
        "model": args.model,
        "checkpoint": str(ckpt),
        "config": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
                   "threads": threads, "precision": args.precision, "seed": args.seed, "max_seq_len": max_seq_len,
                   "quiet_wait_s": args.quiet_wait, "quantize": q},
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "checkpoint_bytes": ckpt_bytes,
        "spec": {"model_type": spec.model_type, "num_layers": spec.num_layers, "num_experts": spec.num_experts,
                 "top_k": spec.top_k},
        "weight_bytes_per_token": float_read["total"],
        "weight_bytes_per_token_detail": float_read,
        "bandwidth": bw,
        "floor": {"s_per_token": floor_s, "tok_s": 1 / floor_s},
        "peers": peers,
        "ratios": ratios,
        "reference_peer": ref_name,
        "token_agreement": agreement,
        "out": str(out),
    }
    result["text"] = report_text(result, lines)
    return result


def worker_cmd(kind: str, path: Path, prompt_file: Path, args, threads: int, res_file: Path) -> list[str]:
    return [sys.executable, "-m", "bench.worker", kind, str(path), "--prompt-file", str(prompt_file),
            "--new-tokens", str(args.new_tokens), "--threads", str(threads), "--result", str(res_file),
            "--dtype", HF_DTYPES[args.precision]]


def _record_build(p: dict, r: dict, ckpt_bytes: int, log: Path) -> None:
    p["build_cmd"] = " ".join(r["cmd"])
    if r["rc"] != 0:
        p.update(available=False, note=f"build failed (exit {r['rc']}); see {log}:\n{_tail(log)}")
        print(f"  build failed (exit {r['rc']}):\n{_tail(log)}", file=sys.stderr)
        return
    p["build_s"] = r["wall_s"]
    p["build_peak_rss_bytes"] = r["peak_rss_bytes"]
    p["build_rss_over_ckpt"] = r["peak_rss_bytes"] / ckpt_bytes if ckpt_bytes else None
    p["build_other_cpu_frac"] = r.get("other_cpu_frac")
    busy = r.get("other_cpu_frac")
    print(f"  {r['wall_s']:.1f} s, peak RSS {fmt_bytes(r['peak_rss_bytes'])}"
          + (f", other CPU load {busy * 100:.0f}%" if busy is not None else ""), flush=True)


def report_text(res: dict, ratio_text: list[str]) -> str:
    c, m, peers = res["config"], res["machine"], res["peers"]
    names = list(peers)
    bw = res["bandwidth"]["bytes_per_s"]
    q = c.get("quantize")
    weights = c["precision"]
    if q:
        weights = (f"{q['scheme']} weights (group {q['group_size']}, accuracy level {q['accuracy_level']}; our LM "
                   f"head {q['scheme'] if q['lm_head'] else c['precision']}) vs {c['precision']}")
    head = (f"model {res['model']} ({fmt_bytes(res['checkpoint_bytes'])} safetensors), {weights}, prompt "
            f"{c['prompt_len']} + {c['new_tokens']} new tokens, greedy, batch 1, {c['threads']} threads, "
            f"median of {c['runs']} run(s)\nmachine: {m['cpu']}, {m['cores']} cores")
    sp = res.get("spec") or {}
    moe = (f" (MoE: top_k {sp['top_k']} of {sp['num_experts']} experts, so {sp['top_k']}/{sp['num_experts']} of the "
           "expert bytes)") if sp.get("num_experts") else ""
    fl = [f"memory-bandwidth floor: weight bytes one token reads{moe} / {bw / 1e9:.2f} GB/s measured read bandwidth:"]
    for n in names:
        p = peers[n]
        if not p.get("bytes_read_per_token"):
            continue
        line = (f"  {n}: {p['bytes_read_per_token'] / 1e6:.1f} MB -> {p['bytes_read_per_token'] / bw * 1000:.3g} "
                f"ms/token ({p['floor_tok_s']:.3g} tok/s at best)")
        if p.get("floor_fraction"):
            line += f"; decodes at {p['floor_fraction'] * 100:.0f}% of it"
        fl.append(line)
    notes = [f"{n}: {peers[n]['note'].splitlines()[0]}" for n in names if peers[n].get("note")]
    notes += [f"{n}: {peers[n]['quality_note'].splitlines()[0]}" for n in names if peers[n].get("quality_note")]
    best = [f"  {n}: TTFT {peers[n]['best']['ttft_ms']:.1f} ms, decode {peers[n]['best']['decode_tok_s']:.2f} tok/s"
            for n in names if peers[n].get("best")]
    if len(peers[names[0]]["runs"]) > 1 and best:
        fl += [f"best of {c['runs']} runs (the least disturbed, on a shared machine):", *best]
    per_run = [f"  {n}: " + ", ".join(f"{r['ttft_s'] * 1000:.0f} ms / {r['decode_tok_s']:.2f}"
                                      for r in peers[n]["runs"]) for n in names if peers[n]["runs"]]
    if per_run:
        fl += ["every run (TTFT / decode tok/s), in order:", *per_run]
    over = [n for n in names if (peers[n].get("floor_fraction") or 0) > 1]
    if over:
        fl.append(f"note: {', '.join(over)} decoded faster than the floor allows: the numpy read bandwidth "
                  "underestimates what that runtime's kernels reach")
    noisy = [f"{n} run {i + 1} ({r['other_cpu_frac'] * 100:.0f}%)" for n in names
             for i, r in enumerate(peers[n]["runs"]) if (r.get("other_cpu_frac") or 0) > 0.10]
    if noisy:
        fl.append("warning: other processes used > 10% of the CPU during: " + ", ".join(noisy))
    ref = res.get("reference_peer")
    qual = []
    if any(peers[n].get("nll") is not None for n in names):
        qual.append(f"NLL: mean -log P of {ref}'s {c['new_tokens']} greedy tokens after the prompt, teacher-forced "
                    "under each peer (the fp32 rows give the value a quantized model is compared with; lower is better)")
    agree = res.get("token_agreement") or {}
    if agree:
        qual.append(f"greedy tokens, common prefix with {ref}: " +
                    ", ".join(f"{n} {a['common_prefix']}/{a['of']}" for n, a in agree.items()))
    graphs = [f"  {n}: " + ", ".join(f"{k} x{v}" for k, v in peers[n]["graph"]["ops"].items()
                                      if k.endswith(("MatMulNBits", "QMoE", "GatherBlockQuantized")))
              + f" (LM head {'quantized' if peers[n]['graph']['lm_head_quantized'] else 'float'}, embedding "
                f"{'quantized' if peers[n]['graph']['embedding_quantized'] else 'float'})"
              for n in names if peers[n].get("scheme") and (peers[n].get("graph") or {}).get("ops")]
    if graphs:
        qual += ["quantized graphs:", *graphs]
    out = [head, "", table(peers), "", *ratio_text, "", *fl]
    if qual:
        out += ["", *qual]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    peers = res["peers"]
    names = list(peers)
    colors = [f"C{i}" for i in range(len(names))]
    panels = [("TTFT (ms, lower is better)", "ttft_ms", 1), ("decode tok/s (higher is better)", "decode_tok_s", 1),
              ("run peak RSS (GiB)", "run_peak_rss_bytes", 2**30), ("build s", "build_s", 1),
              ("build peak RSS (GiB)", "build_peak_rss_bytes", 2**30), ("disk (GiB)", "disk_bytes", 2**30)]
    if any(peers[n].get("nll") is not None for n in names):
        panels.append(("NLL of the fp32 continuation", "nll", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.5))
    for ax, (title, key, scale) in zip(axes, panels):
        vals = [(peers[n].get(key) or 0) / scale for n in names]
        bars = ax.bar(names, vals, color=colors)
        for b, v, n in zip(bars, vals, names):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}" if peers[n].get(key) is not None else "n/a",
                    ha="center", va="bottom", fontsize=8)
        if key == "decode_tok_s":
            floors = [(peers[n].get("floor_tok_s") or 0) for n in names]
            ax.scatter(names, floors, color="red", marker="_", s=400, label="bandwidth bound", zorder=3)
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    c = res["config"]
    q = c.get("quantize")
    what = c["precision"] if not q else f"{q['scheme']} (group {q['group_size']}) vs {c['precision']}"
    fig.suptitle(f"{res['model']}: {what}, prompt {c['prompt_len']} + {c['new_tokens']} new, "
                 f"{c['threads']} threads, median of {c['runs']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b-random",
                   help="checkpoint dir, preset, HF repo id (cached), tiny-*, qwen2-0.5b-random (default) or "
                        "gemma-2-9b-random")
    p.add_argument("--prompt-len", type=int_in(1), default=128)
    p.add_argument("--new-tokens", type=int_in(2), default=64)
    p.add_argument("--runs", type=int_in(1), default=3, help="rounds; each round runs every peer once, alternating")
    p.add_argument("--out", default=None, help="results dir (default: ~/.cache/llm-export/bench/<timestamp>)")
    p.add_argument("--threads", type=int_in(1), default=None, help="threads for every runtime (default: all cores)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--quantize", choices=sorted(QUANT_BITS), default=None,
                   help="weight-only quantization for ours (build --quantize) and ort-genai (-p), with fp32 rows "
                        "of both beside them")
    p.add_argument("--group-size", type=int_in(2), default=32,
                   help="with --quantize: inputs per scale, for both (ours --group-size, ort-genai block_size and "
                        "qmoe_block_size; default 32)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[1, 2, 3, 4],
                   help="with --quantize: MatMulNBits/QMoE compute, for both (4 = int8, default; 1 = fp32)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantize: also quantize our LM head (ort-genai's builder always quantizes its own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    p.add_argument("--bandwidth-gib", type=float_in(0, above=True), default=1.0,
                   help="array size of the bandwidth measurement")
    p.add_argument("--quiet-wait", type=float_in(0), default=0, metavar="S",
                   help="before each run and build, wait up to S seconds until other processes use < 10%% of the CPU")
    p.add_argument("--skip-hf", action="store_true", help="leave out HF transformers")
    p.add_argument("--keep-artifacts", action="store_true", help="keep the built models under OUT/models")
    args = p.parse_args(argv)
    if args.quantize and args.precision != "fp32":
        p.error("--quantize is benchmarked with fp32 activations (onnxruntime-genai's CPU int4/int8 models are "
                "fp32 otherwise); leave out --precision")
    if not args.quantize and (args.group_size != 32 or args.accuracy_level != 4 or args.quantize_lm_head):
        p.error("--group-size, --accuracy-level and --quantize-lm-head need --quantize")
    if args.out is not None:
        problem = out_problem(Path(args.out).expanduser())
        if problem:
            print(f"error: --out {args.out}: {problem}", file=sys.stderr)
            return 2

    from export.checkpoint import CheckpointError
    from export.spec import UnsupportedConfigError

    try:
        res = run_benchmark(args)
    except (CheckpointError, UnsupportedConfigError) as e:  # --model: not found, not a checkpoint, not ours
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(res["out"])
    print("\n" + res["text"])
    (out / "results.json").write_text(json.dumps(res, indent=2))
    png = out / "results.png"
    if plot(res, png):
        print(f"\nwrote {out / 'results.json'} and {png}")
    else:
        print(f"\nwrote {out / 'results.json'} (no plot: matplotlib is not installed; pip install -e '.[bench]')")
    if not args.keep_artifacts:
        shutil.rmtree(out / "models", ignore_errors=True)
    return 0 if next(iter(res["peers"].values())).get("decode_tok_s") else 1


if __name__ == "__main__":
    sys.exit(main())
