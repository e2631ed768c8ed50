"""TensorRT engine build from an exported ONNX graph, with full TensorRT or TensorRT-RTX.

What it does: imports ``tensorrt`` or ``tensorrt_rtx_bindings`` lazily (a clear :class:`EngineError` names the
packages when neither is installed), parses the graph (external data next to it), marks TensorRT's attention layers
decomposable (so shapes without a dedicated fused kernel, e.g. fp32 or tiny head sizes, still build), builds a
strongly typed engine (precision comes from the graph's dtypes) with two optimization profiles (prefill: sequence
1..max_seq_len; decode: sequence 1; a task head's sealed graph, which has no KV inputs, gets one: forward = the
prefill ranges) over batch 1..max_batch and cache length 1..max_seq_len, saves the timing cache
beside it (full TensorRT; TensorRT-RTX has none), and returns the facts the manifest records: flavour and version,
compute-capability targets, profiles, the plugins registered for it, and the network's I/O as TensorRT sees it.
TensorRT-RTX builds ahead of time on a machine with no GPU (it targets RTX GPUs: SM 80/86/89/120, plus 75 for fp16);
running an engine needs a GPU.

A ``trt-plugin`` graph (plugin nodes: op_type = plugin name) is built with full TensorRT only: the plugins its nodes
name are registered (plugins/registry.py) before the graph is parsed; with only TensorRT-RTX, or a TensorRT without
the Python plugin API, the build stops with an :class:`EngineError` naming what to install.

What it does not do: run engines (runtime_py) or implement plugins (plugins/).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from runtime_py.trt_session import stderr_logger


class EngineError(RuntimeError):
    """TensorRT is missing, the graph does not parse, or the build failed."""


INSTALL_HINT = ("install full TensorRT (`pip install tensorrt`, needs NVIDIA's index) or TensorRT-RTX "
                "(`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`)")


def load_tensorrt(plugins: tuple[str, ...] = ()):
    """(module, flavour): full TensorRT when importable, else TensorRT-RTX. ``plugins``: the plugin names the graph
    needs (plugins/registry.py ``needed``); when any, only full TensorRT will do (TensorRT-RTX has no Python plugin
    API)."""
    try:
        import tensorrt as trt

        return trt, "tensorrt"
    except ImportError:
        pass
    if plugins:
        from plugins.registry import INSTALL_HINT as PLUGIN_HINT

        raise EngineError(f"full TensorRT not found: the graph has TensorRT plugin nodes ({', '.join(plugins)}, "
                          f"from the trt-plugin lowering), which need {PLUGIN_HINT}") from None
    try:
        import tensorrt_rtx_bindings as trt

        return trt, "tensorrt_rtx"
    except ImportError:
        raise EngineError(f"no TensorRT found: {INSTALL_HINT}") from None


# TensorRT-RTX compiles for these when the build machine has no GPU to ask. Turing (SM75) has no fp32 or bf16
# GEMM in TensorRT-RTX, so it is a target only for fp16 engines.
RTX_TARGETS = ("SM80", "SM86", "SM89", "SM120")
FP8_TARGETS = ("SM89", "SM120")  # FP8 tensor cores: Ada and Blackwell


def has_fp8_weights(quantization: dict | None) -> bool:
    """Whether a manifest's ``quantization`` record describes FP8 weights (``--quantize fp8``, or an FP8
    checkpoint's), which TensorRT-RTX compiles only for FP8_TARGETS."""
    q = quantization or {}
    return q.get("scheme") == "fp8" or (q.get("source") or {}).get("method") == "fp8"


def build_engine(onnx_path: Path, engine_path: Path, kv_mode: str, max_batch: int, max_seq_len: int,
                 precision: str = "fp32", opt_seq_len: int = 128, fp8_weights: bool = False) -> dict:
    """fp8_weights: the graph holds FP8E4M3 weights, which TensorRT-RTX compiles only for SM89 (Ada) and newer."""
    plugins = graph_plugins(onnx_path)
    trt, flavour = load_tensorrt(plugins)
    registered = register_plugins(plugins)  # before the parser looks the plugin nodes up
    logger = stderr_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with _signals_deferred():  # a signal while the parser calls our logger would be swallowed: raised after it
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{flavour} could not parse {onnx_path.name}:\n  " + "\n  ".join(errors[:5]))
    decomposable = _allow_decomposed_attention(trt, network)

    config = builder.create_builder_config()
    targets = []
    if flavour == "tensorrt_rtx":
        targets = (["SM75"] if precision == "fp16" else []) + list(RTX_TARGETS)
        if fp8_weights:
            targets = [t for t in targets if t in FP8_TARGETS]
        config.num_compute_capabilities = len(targets)
        for i, name in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, name), i)
    opt_seq = min(opt_seq_len, max_seq_len)
    profiles = {
        "prefill": {"batch": [1, max_batch, max_batch], "sequence": [1, opt_seq, max_seq_len],
                    "cache": [1, max_seq_len, max_seq_len]},
        "decode": {"batch": [1, max_batch, max_batch], "sequence": [1, 1, 1],
                   "cache": [1, max_seq_len, max_seq_len]},
    }
    if not any(network.get_input(i).name.startswith("past_key_values.") for i in range(network.num_inputs)):
        profiles = {"forward": profiles["prefill"]}  # a task head's sealed graph: one full-sequence forward
    for ranges in profiles.values():
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shapes = _input_shapes(t.name, tuple(t.shape), ranges, kv_mode)
            try:
                profile.set_shape(t.name, *shapes)
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. a dim past int32 from a hand-edited manifest
                raise EngineError(f"{flavour} refused the shapes {shapes} for input '{t.name}' "
                                  f"(max_batch {max_batch}, max_seq_len {max_seq_len}): {e}") from None
        config.add_optimization_profile(profile)
    if flavour == "tensorrt":  # TensorRT-RTX has no timing cache (its runtime cache lives at load time)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    t0 = time.perf_counter()
    with _signals_deferred() as stop:  # a Ctrl-C / SIGTERM cancels the build and is raised after it
        config.progress_monitor = _progress_monitor(trt, stop)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{flavour} engine build failed (see the TensorRT errors above)")
    engine_path.write_bytes(bytes(serialized))
    timing_file = None
    if flavour == "tensorrt":
        timing_file = engine_path.with_suffix(".timing.cache")
        timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    io = {"inputs": [_tensor_fact(network.get_input(i)) for i in range(network.num_inputs)],
          "outputs": [_tensor_fact(network.get_output(i)) for i in range(network.num_outputs)]}
    device_cc = None
    if flavour == "tensorrt":  # full TensorRT builds for the GPU it runs on
        import torch

        if torch.cuda.is_available():
            device_cc = "SM{}{}".format(*torch.cuda.get_device_capability())
    return {"file": engine_path.name, "flavour": flavour, "version": trt.__version__, "device_cc": device_cc,
            "compute_capabilities": targets or ["the build machine's GPU"], "profiles": profiles, "io": io,
            "attention_layers_decomposable": decomposable, "build_seconds": round(time.perf_counter() - t0, 2),
            "timing_cache": timing_file.name if timing_file else None, "plugins": list(registered)}


def graph_plugins(onnx_path: Path) -> tuple[str, ...]:
    """The names of our TensorRT plugins whose nodes the ONNX graph holds (() for trt-native/reference graphs)."""
    from plugins.registry import needed, onnx_op_types

    try:
        return needed(onnx_op_types(onnx_path))
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: not a readable ONNX file
        raise EngineError(f"could not read {Path(onnx_path).name} as an ONNX graph: {e}") from None


def register_plugins(plugins: tuple[str, ...]) -> tuple[str, ...]:
    """Register the plugins with full TensorRT (plugins/registry.py); their ids. EngineError naming what to install
    when TensorRT has no Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9)."""
    if not plugins:
        return ()
    from plugins.registry import register

    try:
        return register(plugins)
    except ImportError as e:
        raise EngineError(str(e)) from None


def _allow_decomposed_attention(trt, network) -> int:
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == getattr(trt.LayerType, "ATTENTION_OUTPUT", None):
            layer.__class__ = trt.IAttentionBoundaryLayer
            layer.attention.decomposable = True
            count += 1
    return count


def _progress_monitor(trt, stop: list):
    """TensorRT's build progress, one stderr line per top-level phase; it cancels the build at the next step once
    `stop` holds a signal (see _signals_deferred)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                print(f"  TensorRT: {phase_name} ...", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return not stop  # False cancels the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


@contextlib.contextmanager
def _signals_deferred():
    """During the parse and the build, SIGINT and SIGTERM are recorded instead of raised: Python would raise them
    inside one of TensorRT's callbacks (the only Python that runs then), where TensorRT catches the exception and
    goes on. The
    progress monitor cancels the build; on the way out the signal is raised again, to its own handler
    (KeyboardInterrupt, export's Terminated), so the staging directory goes as after any Ctrl-C."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield got
        return
    previous = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])


def _input_shapes(name: str, shape: tuple, r: dict, kv_mode: str):
    """(min, opt, max) for one input from the profile's ranges."""
    if name in ("input_ids", "position_ids"):
        return tuple((r["batch"][i], r["sequence"][i]) for i in range(3))
    if name == "attention_mask":  # concat: past + new
        return tuple((r["batch"][i], r["cache"][i]) for i in range(3))
    _, heads, _, dim = shape  # past_key_values.*: [B, KV, cache, D]; concat prefill starts from an empty past
    cache = [0 if kv_mode == "concat" and i == 0 else r["cache"][i] for i in range(3)]
    return tuple((r["batch"][i], heads, cache[i], dim) for i in range(3))


def _tensor_fact(t) -> dict:
    return {"name": t.name, "dtype": str(t.dtype).split(".")[-1].lower(), "shape": list(t.shape)}


ONNX_TO_TRT = {"int64": "int64", "float32": "float", "float16": "half", "bfloat16": "bf16"}


def check_engine_io(graph: dict, engine_io: dict) -> None:
    """The engine's I/O must be the graph contract recorded in the manifest: names in order, dtypes, static dims."""
    problems = []
    for kind in ("inputs", "outputs"):
        ours, theirs = graph[kind], engine_io[kind]
        if [t["name"] for t in ours] != [t["name"] for t in theirs]:
            problems.append(f"{kind}: names {[t['name'] for t in theirs]} != {[t['name'] for t in ours]}")
            continue
        for a, b in zip(ours, theirs):
            want = [d if isinstance(d, int) else -1 for d in a["shape"]]
            if ONNX_TO_TRT.get(a["dtype"]) != b["dtype"] or want != b["shape"]:
                problems.append(f"{a['name']}: engine {b['dtype']}{b['shape']} != manifest {a['dtype']}{want}")
    if problems:
        raise EngineError("engine does not match the manifest's graph contract:\n  " + "\n  ".join(problems))
