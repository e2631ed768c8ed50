"""`python -m bench.gpu_suite`: the plugin kernels' GPU suite in one call.

What it does on a CUDA machine:

1. runs tests/test_plugin_kernels.py (with CUDA its kernel tests run compiled on the GPU) and reports the counts;
2. checks the kernels against the torch references at real layer sizes: attention of Qwen2-7B (28 q heads, 4 kv,
   head_dim 128), Gemma-2-9B (16 q, 8 kv, head_dim 256, window 4096, softcap 50) and Qwen3-30B-A3B (32 q, 4 kv,
   head_dim 128, q/k norm), and the Qwen3-30B-A3B MoE (128 experts, top-8, hidden 2048, intermediate 768), for
   prefill (B=1, S=2048) and decode (S=1 after 4096 cached positions, ``--decode-batch`` rows). Low-precision
   outputs must be about as close to the fp32 maths as the same-dtype reference is (as in the tests);
3. prints a speed table (median of ``--iters`` CUDA-event timings after warm-up): our attention node (two
   launches, and the single fused launch TensorRT's AOT path embeds; both include q/k norm, RoPE and the in-place
   KV write) against PyTorch SDPA (``enable_gqa``; attention only, on already rotated q/k, no softcap: SDPA has
   none) and the eager torch reference (the whole node); our MoE against a PyTorch per-expert loop (the
   reference). ``--json PATH`` also writes the rows.

Without CUDA it says so, runs a small correctness subset in Triton's CPU interpreter and exits 0 (1 if that
subset fails).

What it does not do: build or time TensorRT engines (no TensorRT on the GPU test machine, DESIGN.md section 5),
or tune tile sizes per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_LAYERS = {
    "qwen2-7b": dict(num_heads=28, num_kv_heads=4, head_dim=128, window=0, softcap=0.0, qk_norm=0),
    "gemma-2-9b": dict(num_heads=16, num_kv_heads=8, head_dim=256, window=4096, softcap=50.0, qk_norm=0,
                       scale=256 ** -0.5),  # query_pre_attn_scalar 256
    "qwen3-30b-a3b": dict(num_heads=32, num_kv_heads=4, head_dim=128, window=0, softcap=0.0, qk_norm=1),
}
MOE_LAYERS = {"qwen3-30b-a3b": dict(num_experts=128, top_k=8, hidden=2048, intermediate=768, norm_topk_prob=1)}
PREFILL_LEN, DECODE_PAST = 2048, 4096
TOL = {"float16": (1.5, 2.5, 1e-3), "bfloat16": (1.5, 2.5, 8e-3), "float32": (1.5, 2.5, 1e-5)}  # mean, max, atol


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-tests", action="store_true", help="skip step 1 (the pytest kernel tests)")
    ap.add_argument("--json", type=Path, help="also write the speed rows here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("No CUDA device: the GPU suite (kernel tests on the GPU, real-size checks, speed table vs SDPA and a "
              "PyTorch MoE loop) needs one. Running the CPU interpreter correctness subset only.")
        return interpreter_subset()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {_triton_version()} | "
          f"dtype {args.dtype}")
    ok = True
    if not args.skip_tests:
        ok &= run_kernel_tests()
    rows = []
    for name, layer in ATTENTION_LAYERS.items():
        for phase in ("prefill", "decode"):
            row = attention_row(name, layer, phase, dtype, args.decode_batch, args.iters)
            ok &= row["ok"]
            rows.append(row)
    for name, layer in MOE_LAYERS.items():
        for phase in ("prefill", "decode"):
            row = moe_row(name, layer, phase, dtype, args.decode_batch, args.iters)
            ok &= row["ok"]
            rows.append(row)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "missing"


def run_kernel_tests() -> bool:
    print("\n[1] pytest tests/test_plugin_kernels.py")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_plugin_kernels.py")], cwd=ROOT, capture_output=True, text=True)
    tail = [line for line in run.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    print(f"    {tail[0]}  ({time.perf_counter() - t0:.0f}s)")
    if run.returncode:
        print(run.stdout[-6000:], run.stderr[-2000:])
    return run.returncode == 0


# ---- timing and checks -----------------------------------------------------------------------------------------

def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def close_to_fp32(got, ref, ref32, dtype_name: str) -> tuple[bool, float, float]:
    """(ok, max err of ours, max err of the same-dtype reference), both against the fp32 maths."""
    f_mean, f_max, atol = TOL[dtype_name]
    ek, er = (got.float() - ref32).abs(), (ref.float() - ref32).abs()
    ok = ek.mean().item() <= f_mean * er.mean().item() + atol / 10 and ek.max().item() <= f_max * er.max().item() + atol
    return ok, ek.max().item(), er.max().item()


# ---- attention -------------------------------------------------------------------------------------------------

def attention_inputs(layer: dict, phase: str, dtype, batch: int, device="cuda", seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    nH, KV, D = layer["num_heads"], layer["num_kv_heads"], layer["head_dim"]
    if phase == "prefill":
        B, S, M = 1, PREFILL_LEN, PREFILL_LEN + DECODE_PAST
        pos = torch.arange(S, device=device)[None].repeat(B, 1)
    else:
        B, S, M = batch, 1, DECODE_PAST + 64
        pos = torch.full((B, 1), DECODE_PAST, device=device)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.arange(M, device=device).float()[:, None] * inv_freq[None]
    x = dict(query=rnd(B, S, nH * D, scale=2.0), key=rnd(B, S, KV * D), value=rnd(B, S, KV * D),
             past_key=rnd(B, KV, M, D), past_value=rnd(B, KV, M, D), position_ids=pos, attention_mask=None,
             cos_cache=freqs.cos().to(dtype), sin_cache=freqs.sin().to(dtype),
             q_norm_weight=torch.rand(D, generator=g, device=device) + 0.5,
             k_norm_weight=torch.rand(D, generator=g, device=device) + 0.5)
    attrs = dict(num_heads=nH, num_kv_heads=KV, head_dim=D, scale=layer.get("scale", D ** -0.5),
                 softcap=layer["softcap"], window=layer["window"], kv_mode="static", qk_norm=layer["qk_norm"],
                 rms_eps=1e-6)
    return x, attrs


def attention_row(name: str, layer: dict, phase: str, dtype, batch: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from plugins import attention as attn

    x, attrs = attention_inputs(layer, phase, dtype, batch)
    B, S = x["position_ids"].shape
    nH, KV, D, M = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"], x["past_key"].shape[2]
    shape = f"B={B} S={S} M={M}"

    ref = attn.reference(**x, **attrs)
    x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
    ref32 = attn.reference(**x32, **attrs)
    checks = []
    for fused in (False, True):
        got = attn.triton_forward(**x, **attrs, fused_kv_update=fused)
        ok_out, err, err_ref = close_to_fp32(got[0], ref[0], ref32[0], str(dtype).split(".")[1])
        ok_kv = all((a.float() - b.float()).abs().max().item() <= 3e-2 * max(1.0, b.float().abs().max().item())
                    for a, b in zip(got[1:], ref[1:]))
        checks.append((ok_out and ok_kv, err, err_ref))
    del ref32, x32

    pk, pv = x["past_key"].clone(), x["past_value"].clone()  # in place, as TensorRT runs it

    def ours(fused):
        return lambda: attn.triton_forward(**dict(x, past_key=pk, past_value=pv), **attrs, inplace=True,
                                           fused_kv_update=fused)

    # SDPA: attention only, over already rotated q/k (the keys this call sees), GQA native, causal.
    q = x["query"].view(B, S, nH, D).transpose(1, 2)
    if phase == "prefill":
        k = x["key"].view(B, S, KV, D).transpose(1, 2)
        v = x["value"].view(B, S, KV, D).transpose(1, 2)
        causal = True
    else:
        lo = max(0, DECODE_PAST - attrs["window"] + 1) if attrs["window"] else 0
        k, v = x["past_key"][:, :, lo:DECODE_PAST + 1], x["past_value"][:, :, lo:DECODE_PAST + 1]
        causal = False

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=attrs["scale"], enable_gqa=True)

    def torch_ref():
        return attn.reference(**x, **attrs)

    t_two, t_fused = cuda_time_ms(ours(False), iters), cuda_time_ms(ours(True), iters)
    t_sdpa, t_ref = cuda_time_ms(sdpa, iters), cuda_time_ms(torch_ref, max(3, iters // 4))
    ok = all(c[0] for c in checks)
    return dict(kind="attention", layer=name, phase=phase, shape=shape, ok=ok,
                ours_ms=t_two, ours_fused_ms=t_fused, baseline="sdpa", baseline_ms=t_sdpa, torch_ref_ms=t_ref,
                err=max(c[1] for c in checks), ref_err=checks[0][2])


# ---- MoE -------------------------------------------------------------------------------------------------------

def moe_row(name: str, layer: dict, phase: str, dtype, batch: int, iters: int) -> dict:
    import torch

    from plugins import moe

    g = torch.Generator(device="cuda").manual_seed(0)
    E, K, H, I = layer["num_experts"], layer["top_k"], layer["hidden"], layer["intermediate"]
    N = PREFILL_LEN if phase == "prefill" else batch
    x = torch.randn(1, N, H, generator=g, device="cuda").to(dtype)
    router = (torch.randn(H, E, generator=g, device="cuda") * H ** -0.5).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device="cuda") * H ** -0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g, device="cuda") * I ** -0.5).to(dtype)
    attrs = dict(num_experts=E, top_k=K, norm_topk_prob=layer["norm_topk_prob"], moe_intermediate_size=I,
                 activation="silu")
    routing = moe.route(x, router, K, attrs["norm_topk_prob"])
    ref = moe.reference(x, router, gate_up, down, **attrs)
    ref32 = moe.reference(x.float(), router.float(), gate_up.float(), down.float(), **attrs, routing=routing)
    got = moe.triton_forward(x, router, gate_up, down, **attrs)
    ok, err, err_ref = close_to_fp32(got, ref, ref32, str(dtype).split(".")[1])
    del ref32
    used = len(torch.unique(routing[1]))
    t_ours = cuda_time_ms(lambda: moe.triton_forward(x, router, gate_up, down, **attrs), iters)
    t_loop = cuda_time_ms(lambda: moe.reference(x, router, gate_up, down, **attrs), max(3, iters // 4))
    return dict(kind="moe", layer=name, phase=phase, shape=f"N={N} E={E} k={K} used={used}", ok=ok,
                ours_ms=t_ours, ours_fused_ms=None, baseline="torch loop", baseline_ms=t_loop, torch_ref_ms=t_loop,
                err=err, ref_err=err_ref)


def print_table(rows: list[dict]) -> None:
    print("\n[2+3] correctness at layer sizes and speed (ms, median; attention = whole node incl. norm/RoPE/KV "
          "write, SDPA = attention only)")
    head = (f"{'kind':<9} {'layer':<14} {'phase':<8} {'shape':<26} {'ours':>8} {'fused':>8} {'baseline':>10} "
            f"{'x':>6} {'torch ref':>9} {'err':>9} {'ref err':>9} ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        fused = f"{r['ours_fused_ms']:8.3f}" if r["ours_fused_ms"] is not None else f"{'-':>8}"
        best = min(t for t in (r["ours_ms"], r["ours_fused_ms"]) if t is not None)
        speedup = r["baseline_ms"] / best
        print(f"{r['kind']:<9} {r['layer']:<14} {r['phase']:<8} {r['shape']:<26} {r['ours_ms']:8.3f} {fused} "
              f"{r['baseline_ms']:10.3f} {speedup:6.2f} {r['torch_ref_ms']:9.3f} {r['err']:9.2e} "
              f"{r['ref_err']:9.2e} {'yes' if r['ok'] else 'NO'}")
    print("x = baseline / best of ours (>1: ours faster). baseline: SDPA for attention, the per-expert torch loop "
          "(the reference) for MoE. err / ref err: max |.| against fp32 maths on the same inputs.")


# ---- no GPU: the interpreter subset ----------------------------------------------------------------------------

def interpreter_subset() -> int:
    """A few tiny cases in Triton's CPU interpreter (TRITON_INTERPRET=1 must precede triton's import)."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton was imported before TRITON_INTERPRET=1 could be set; run with TRITON_INTERPRET=1")
        return 1
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed (pip install -e .[dev]): nothing to run")
        return 0
    import torch

    from plugins import attention as attn
    from plugins import moe

    t0 = time.perf_counter()
    results = []
    g = torch.Generator().manual_seed(0)
    for nH, KV, D, S, window, cap, qkn in ((4, 2, 64, 6, 3, 5.0, 1), (7, 1, 128, 1, 0, 0.0, 0), (2, 2, 256, 4, 8,
                                                                                                  3.0, 1)):
        B, M = 2, 16
        pos = torch.stack([torch.arange(0, S), torch.arange(5, 5 + S)]) if S > 1 else torch.tensor([[3], [11]])
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        f = torch.arange(32).float()[:, None] * inv
        for dtype in (torch.float32, torch.float16):
            x = dict(query=(torch.randn(B, S, nH * D, generator=g) * 3).to(dtype),
                     key=torch.randn(B, S, KV * D, generator=g).to(dtype),
                     value=torch.randn(B, S, KV * D, generator=g).to(dtype),
                     past_key=torch.randn(B, KV, M, D, generator=g).to(dtype),
                     past_value=torch.randn(B, KV, M, D, generator=g).to(dtype), position_ids=pos,
                     attention_mask=None, cos_cache=f.cos().to(dtype), sin_cache=f.sin().to(dtype),
                     q_norm_weight=torch.rand(D, generator=g) + 0.5, k_norm_weight=torch.rand(D, generator=g) + 0.5)
            attrs = dict(num_heads=nH, num_kv_heads=KV, head_dim=D, scale=D ** -0.5, softcap=cap, window=window,
                         qk_norm=qkn)
            ref = attn.reference(**x, **attrs)
            x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
            ref32 = attn.reference(**x32, **attrs)[0]
            for fused in (False, True):
                got = attn.triton_forward(**x, **attrs, fused_kv_update=fused)
                if dtype == torch.float32:
                    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
                    ok = err <= 2e-5
                else:
                    ok, err, _ = close_to_fp32(got[0], ref[0], ref32, "float16")
                results.append((f"attention G={nH // KV} D={D} S={S} {str(dtype)[6:]}"
                                f"{' fused' if fused else ''}", err, ok))
    for E, K, N in ((8, 2, 12), (128, 8, 5)):
        x = torch.randn(1, N, 32, generator=g)
        router, gu, dn = torch.randn(32, E, generator=g), torch.randn(E, 64, 32, generator=g) * 0.2, \
            torch.randn(E, 32, 32, generator=g) * 0.2
        attrs = dict(num_experts=E, top_k=K, norm_topk_prob=1, moe_intermediate_size=32)
        err = (moe.triton_forward(x, router, gu, dn, **attrs) - moe.reference(x, router, gu, dn, **attrs)).abs()
        results.append((f"moe E={E} k={K} N={N} float32", err.max().item(), err.max().item() <= 2e-5))
    for what, err, ok in results:
        print(f"  {what:<40} max err {err:9.2e}  {'ok' if ok else 'FAIL'}")
    bad = sum(not ok for _, _, ok in results)
    print(f"interpreter subset: {len(results) - bad}/{len(results)} ok ({time.perf_counter() - t0:.1f}s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
