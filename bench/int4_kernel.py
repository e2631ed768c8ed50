"""`python -m bench.int4_kernel`: how ONNX Runtime's int4 kernel (``com.microsoft.MatMulNBits``) scales with the
batch, on the body linears of a model shape, one node per session.

What it does: for each (block size, accuracy level) it builds one single-node graph per linear of one decoder layer
(random packed weights and scales; the shapes come from the bench model's config: packed q|k|v, o, packed gate|up,
down), times ``--iters`` runs at M=1 and at each ``--batch`` rows after a warm-up, and prints a markdown table of
the layer's time x ``num_hidden_layers`` and the ratio to M=1. It is the kernel-level reason behind the int4 rows of
``bench.serve_bench``: a ratio near M means batching shares almost none of the work.

What it does not do: attention, norms, the LM head, or anything else in the graph (``bench.serve_bench`` and ORT's
profiler measure the whole step); correctness (the weights are random; tests/test_quantize.py checks the kernel's
numbers against the reference lowering).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.models import BENCH_MODELS


def matmul_nbits_session(k: int, n: int, block: int, accuracy: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.random(n * (k // block), dtype=np.float32) * np.float32(0.01)
    node = helper.make_node("MatMulNBits", ["A", "W", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "matmulnbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each body linear of one decoder layer, packed as our ort lowering packs them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    return {"qkv": (hidden, (heads + 2 * kv) * head_dim), "o": (heads * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int4_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2-0.5b-random", choices=sorted(BENCH_MODELS))
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    p.add_argument("--accuracy-levels", type=int, nargs="+", default=[4, 1], choices=range(5), metavar="{0..4}",
                   help="MatMulNBits accuracy_level (0 and 1 fp32, 2 fp16, 3 bf16, 4 int8 compute)")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name, values, low in (("--iters", [args.iters], 1), ("--threads", [args.threads], 1),
                              ("--batch", args.batch, 1), ("--blocks", args.blocks, 16)):
        if any(v < low for v in values):
            p.error(f"{name} must be >= {low}")
    config = BENCH_MODELS[args.model]
    if config.get("num_experts"):
        p.error(f"{args.model} is a MoE model: its experts run through QMoE, not MatMulNBits")
    shapes = layer_shapes(config)
    for block in args.blocks:
        bad = [f"{n} (K={k})" for n, (k, _) in shapes.items() if k % block]
        if bad:
            p.error(f"block {block} must be a power of two dividing every K; it does not divide {', '.join(bad)}")
        if block & (block - 1):
            p.error(f"block {block} must be a power of two (MatMulNBits takes 16, 32, 64, ...)")
    layers = config["num_hidden_layers"]
    batches = [m for m in dict.fromkeys(args.batch) if m != 1]  # M=1 is always the first column
    ms = [1, *batches]
    print(f"MatMulNBits, {args.model}: {layers} layers x {shapes}, {args.threads} threads, {args.iters} runs")
    print("| " + " | ".join(["block, accuracy level", *(f"M={m} ms" for m in ms),
                              *(f"M={m} / M=1" for m in batches)]) + " |")
    print("| --- " * (1 + len(ms) + len(batches)) + "|")
    for block in args.blocks:
        for accuracy in args.accuracy_levels:
            times = []
            for m in ms:
                total = 0.0
                for k, n in shapes.values():
                    session = matmul_nbits_session(k, n, block, accuracy, args.threads)
                    a = np.random.default_rng(1).random((m, k), dtype=np.float32)
                    for _ in range(max(5, args.iters // 10)):
                        session.run(None, {"A": a})
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        session.run(None, {"A": a})
                    total += (time.perf_counter() - start) / args.iters
                times.append(total * layers * 1e3)
            print("| " + " | ".join([f"{block}, {accuracy}", *(f"{t:.1f}" for t in times),
                                     *(f"{t / times[0]:.2f}" for t in times[1:])]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
