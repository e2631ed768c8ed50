"""TensorRT session over an artifact's engine: same ``new_cache``/``forward`` interface as ``OrtSession``.

What it does: before touching the engine it checks, with clear errors instead of a crash, that TensorRT (the
flavour the engine was built with) is importable, that its version equals the one recorded in the manifest, that
a CUDA GPU is present and that its compute capability is one the engine targets. Then it deserializes the
engine, keeps one execution context per optimization profile (prefill, decode), holds the KV cache as device
buffers (torch CUDA tensors: two sets swapped after each call, since the graph's ScatterElements update must not
alias its input), binds addresses and runs ``execute_async_v3``. CUDA-graph capture of decode steps is not
implemented yet.

Verification status: the checks above are tested on CPU-only machines. Everything from deserialization on needs
a GPU with TensorRT and has NOT been run in this project yet (no GPU machine was available); treat it as
unverified until the GPU suite has exercised it.

What it does not do: build engines (export/engine.py) or sample (generate.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from artifacts.bundle import ArtifactError, open_artifact
from artifacts.manifest import TENSORRT_DTYPES, Engine

TENSOR_ALIGNMENT = 256  # bytes: what setTensorAddress requires of every binding


def stderr_logger(trt):
    """A TensorRT logger that writes warnings and errors to stderr (trt.Logger prints to stdout, where the build's
    last line must be the artifact path)."""
    class StderrLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TRT] {msg}", file=sys.stderr, flush=True)

    return StderrLogger()


def _import_flavour(flavour: str):
    try:
        if flavour == "tensorrt":
            import tensorrt as trt
        else:
            import tensorrt_rtx_bindings as trt
    except ImportError:
        pkg = "tensorrt" if flavour == "tensorrt" else "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"
        raise ArtifactError(f"this engine was built with {flavour}, which is not installed (pip install {pkg})") \
            from None
    return trt


def check_engine(engine: Engine | None, trt_version: str, device_cc: tuple[int, int] | None) -> None:
    """Raise ArtifactError when this machine cannot load the engine the manifest describes."""
    if engine is None:
        raise ArtifactError("the artifact has no TensorRT engine (build with --backend tensorrt or `export engine`)")
    if trt_version != engine.version:
        raise ArtifactError(f"engine built with {engine.flavour} {engine.version}, this machine has "
                            f"{trt_version}: engines are not portable across versions; rebuild it here "
                            "(`python -m export bundle ARTIFACT --out X.tar`, then `python -m export engine X.tar`)")
    if device_cc is None:
        raise ArtifactError("running a TensorRT engine needs a CUDA GPU (none found); run the artifact's ONNX "
                            "graph on ONNX Runtime here (--backend onnxruntime)")
    targets = list(engine.compute_capabilities)
    sm = f"SM{device_cc[0]}{device_cc[1]}"
    if engine.flavour == "tensorrt_rtx" and sm not in targets:  # a rebuild targets the same fixed list
        raise ArtifactError(f"this GPU is {sm}; the TensorRT-RTX engine targets {targets}, and TensorRT-RTX builds "
                            f"for no other GPUs (export/engine.py RTX_TARGETS); install full TensorRT and build "
                            "the engine on this machine, or run the artifact on ONNX Runtime (--backend onnxruntime)")
    if engine.flavour == "tensorrt" and engine.device_cc and engine.device_cc != sm:
        raise ArtifactError(f"engine built on {engine.device_cc}, this GPU is {sm}; rebuild it on this device")


def _cuda_device_cc() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


class TrtSession:
    def __init__(self, artifact: str | Path, verify: bool = True):
        self.root = Path(artifact)
        self.manifest = open_artifact(self.root, verify=verify)
        if self.manifest.task != "causal-lm":
            raise ArtifactError(f"{self.root}: a {self.manifest.task} artifact has no LM head to generate with; "
                                "use `python -m runtime_py classify`")
        engine = self.manifest.engine
        if engine is None:  # said as such, not as "tensorrt is not installed"
            check_engine(engine, "", None)
        trt = _import_flavour(engine.flavour)
        check_engine(engine, trt.__version__, _cuda_device_cc())
        from plugins.registry import register_for_manifest

        graph = self.manifest.decoder
        try:  # an engine with plugin layers (trt-plugin graph) deserializes only once its plugins are registered
            register_for_manifest(graph.lowering, graph.op_histogram, graph.fusion)
        except (ImportError, ValueError) as e:
            raise ArtifactError(str(e)) from None
        import torch

        self.torch, self.trt = torch, trt
        self.kv_mode = self.manifest.kv_mode
        if self.kv_mode != "static":
            raise ArtifactError("the TensorRT session runs static-KV engines only")
        self.max_seq_len = self.manifest.max_seq_len
        self.vocab_size = self.manifest.vocab_size
        self.last_logits = self.manifest.decoder.logits == "last"
        self.kv_heads, self.head_dim = self.manifest.num_kv_heads, self.manifest.head_dim
        self.kv_in = [t.name for t in engine.inputs if t.name.startswith("past_key_values.")]
        self.kv_out = [t.name for t in engine.outputs if t.name.startswith("present.")]
        self.kv_dtype = getattr(torch, TENSORRT_DTYPES[engine.inputs[-1].dtype])
        self._logger = stderr_logger(trt)  # TensorRT keeps a pointer to it: it must live as long as the engine
        self._runtime = runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine((self.root / engine.file).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{self.root}: TensorRT could not deserialize {engine.file}")
        self.contexts = {}
        for index, name in enumerate(engine.profiles):  # "prefill", "decode" in build order
            ctx = self.engine.create_execution_context()
            if ctx is None or not ctx.set_optimization_profile_async(index, torch.cuda.current_stream().cuda_stream):
                raise ArtifactError(f"{self.root}: TensorRT could not create a context for profile '{name}' "
                                    "(see the TensorRT errors above)")
            self.contexts[name] = ctx
        self.stream = torch.cuda.current_stream()

    def pad(self, prompts: list[list[int]], pad_id: int):
        from runtime_py.session import pad_prompts

        return pad_prompts(self.kv_mode, prompts, pad_id)

    def new_cache(self, batch: int, max_len: int):
        from runtime_py.session import KVCache

        shape = (batch, self.kv_heads, max_len, self.head_dim)
        make = lambda: [self.torch.zeros(shape, dtype=self.kv_dtype, device="cuda") for _ in self.kv_in]  # noqa
        return KVCache(make(), make(), max_len)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask, cache) -> np.ndarray:
        torch = self.torch
        B, S = input_ids.shape
        ctx = self.contexts["decode" if S == 1 else "prefill"]
        # TensorRT binds raw pointers: dense copies, whatever views the caller passes
        ids = torch.as_tensor(np.ascontiguousarray(input_ids), dtype=torch.int64, device="cuda")
        pos = torch.as_tensor(np.ascontiguousarray(position_ids), dtype=torch.int64, device="cuda")
        logits = torch.empty((B, 1 if self.last_logits else S, self.vocab_size), dtype=torch.float32, device="cuda")
        bindings = {"input_ids": ids, "position_ids": pos, "logits": logits}
        bindings.update(zip(self.kv_in, cache.values))
        bindings.update(zip(self.kv_out, cache.spare))
        copy_back = []  # (the caller's view, the aligned buffer TensorRT wrote instead)
        for name, tensor in bindings.items():
            if tensor.data_ptr() % TENSOR_ALIGNMENT:  # a row slice of the engine's slots (few KV bytes a row)
                output = name == "logits" or name in self.kv_out
                aligned = torch.empty_like(tensor) if output else tensor.clone()
                if output:
                    copy_back.append((tensor, aligned))
                tensor = aligned
                bindings[name] = tensor  # kept alive until the call has run
            if (name in ("input_ids", "position_ids") or name in self.kv_in) and \
                    not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"TensorRT refused the shape {tuple(tensor.shape)} for input '{name}' (outside "
                                   "the engine's optimization profile)")
            if not ctx.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of '{name}'")
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for view, aligned in copy_back:
            view.copy_(aligned)
        self.stream.synchronize()
        cache.values, cache.spare = cache.spare, cache.values
        return logits.cpu().numpy()
