"""`python -m export build`: checkpoint -> artifact directory (ONNX graph + tokenizer + manifest).

What it does: checks the flags, resolves the model, checks every tensor against config.json and the tokenizer files
(each a regular file inside the checkpoint, tokenizer.json parsing, chat templates rendering within bounds) before
any work, exports the graph with weights streamed from safetensors (export/onnx_export.py), copies the tokenizer
and generation config, runs ``onnx.checker`` on the written graph (with its external data), writes
``manifest.json`` with sha256 of every file, and renames the staging directory into place only when everything
above succeeded (artifacts/bundle.py ``staging_dir``: it replaces only an artifact of ours, never the checkpoint).

`--quantize int4|int8|fp8` (weights only; activations stay `--precision`) is checked against the backend and every
input dimension before any work (export/quantize.py); the manifest's ``quantization`` records the scheme of every
tensor.

What it does not do: the fusion, lowering and quantization passes themselves (graphs/, called by export_onnx) or the TensorRT
build itself (export/engine.py, called here for `--backend tensorrt`).
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from artifacts.bundle import staging_dir, write_manifest
from export.options import MAX_BATCH
from export.checkpoint import Checkpoint, CheckpointError, allowed_roots, checkpoint_file, resolve_model
from export.model import LOGITS
from export.onnx_export import DTYPES, export_onnx, io_description, weight_bytes
from export.spec import load_spec
from export.weights import check_checkpoint, warn_unexpected, weight_plan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
GRAPH = "model.onnx"
ENGINE = "model.engine"
BACKENDS = ("onnxruntime", "tensorrt")


def default_out(model: str, precision: str, kv_mode: str) -> Path:
    from export.tiny import cache_root

    name = Path(model).name if Path(model).is_dir() else model.replace("/", "--")
    return cache_root() / "artifacts" / f"{name}-{precision}-{kv_mode}"


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def build(model: str, precision: str = "fp32", backend: str = "onnxruntime", out: Path | None = None,
          kv_mode: str = "static", max_seq_len: int | None = None, max_batch: int = 8, overwrite: bool = False,
          progress: bool = True, lowering: str | None = None, logits: str = "last", quantize: str | None = None,
          group_size: int | None = None, accuracy_level: int | None = None, quantize_lm_head: bool = False) -> Path:
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend}: choose from {BACKENDS}")
    dtype = DTYPES[precision]
    if backend == "tensorrt":
        from export.engine import load_tensorrt

        load_tensorrt()  # fail before any work when TensorRT is missing
        lowering = lowering or "trt-native"
        if lowering not in ("trt-native", "trt-plugin", "reference"):
            raise ValueError(f"--lowering {lowering} is for ONNX Runtime; TensorRT takes trt-native or trt-plugin")
    lowering = lowering or ("ort" if kv_mode == "static" else "reference")
    if precision == "bf16" and backend == "onnxruntime":
        raise ValueError("--precision bf16: ONNX Runtime has no bf16 kernels on the CPU; use fp32/fp16 here, or "
                         "--backend tensorrt for a bf16 engine")
    if logits not in LOGITS:
        raise ValueError(f"--logits {logits}: choose from {LOGITS}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"--max-batch {max_batch}: must be in [1, {MAX_BATCH}]")
    from export.quantize import check_group_size, quant_config

    quant = quant_config(quantize, backend, lowering, group_size, accuracy_level, quantize_lm_head)
    model_dir = resolve_model(model)
    spec = load_spec(model_dir)
    check_group_size(spec, quant)
    ckpt = Checkpoint(model_dir)
    plan = weight_plan(spec)
    warn_unexpected(check_checkpoint(spec, ckpt, plan))
    if max_seq_len is None:
        max_seq_len = spec.max_position_embeddings
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or \
            not 2 <= max_seq_len <= spec.max_position_embeddings:
        raise ValueError(f"--max-seq-len {max_seq_len}: must be in [2, {spec.max_position_embeddings}] "
                         "(the model's max_position_embeddings)")
    tokenizer_files = _tokenizer_files(model_dir)
    if precision == "fp16" and backend == "onnxruntime":
        from runtime_py.memory import cpu_expansion_warning

        note = cpu_expansion_warning(precision)
        if note:
            print(f"warning: {note}", file=sys.stderr)
    out = Path(out) if out else default_out(model, precision, kv_mode)
    io = io_description(spec, kv_mode, dtype, logits)
    t0 = time.perf_counter()
    with staging_dir(out, overwrite=overwrite, protect=[model_dir, *allowed_roots(model_dir)]) as tmp:
        total = weight_bytes(plan, spec, dtype)
        weights = precision if quant is None else f"{quantize} weights (group {quant.group_size or 'per channel'}), " \
            f"{precision} activations"
        print(f"exporting {spec.model_type} ({spec.num_layers} layers, {total / 2**20:.1f} MiB of weights, "
              f"{weights}, kv {kv_mode}) from {model_dir}", file=sys.stderr)
        facts = export_onnx(spec, ckpt, plan, tmp / GRAPH, kv_mode, dtype, progress=progress, lowering=lowering,
                            max_seq_len=max_seq_len, logits=logits, quant=quant)
        for line in facts["fusion"]["skipped"]:
            print(f"note: left unfused: {line}", file=sys.stderr)
        _check_graph(tmp / GRAPH)
        engine = None
        if backend == "tensorrt":
            from export.engine import build_engine, check_engine_io

            print("building the TensorRT engine ...", file=sys.stderr)
            engine = build_engine(tmp / GRAPH, tmp / ENGINE, kv_mode, max_batch, max_seq_len, precision,
                                  fp8_weights=quantize == "fp8")
            check_engine_io(io, engine["io"])
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, tmp / name)  # contents only: never a link, never the source's mode
        if "tokenizer.json" not in tokenizer_files:
            print(f"warning: {model_dir} has no tokenizer.json; generate will need --prompt-ids", file=sys.stderr)
        manifest = {
            "model": {"source": str(model_dir), "name": model, "model_type": spec.model_type},
            "spec": spec.to_dict(),
            "backend": backend,
            "precision": precision,
            "kv_mode": kv_mode,
            "max_seq_len": max_seq_len,
            "max_batch": max_batch,
            "graphs": {"decoder": {"file": GRAPH, "lowering": lowering, "logits": logits,
                                   **io,
                                   "op_histogram": facts["op_histogram"], "fusion": facts["fusion"],
                                   # GQA updates the KV buffer in place: present must be bound to past's memory
                                   "kv_binding": "in_place" if facts["fusion"].get("GroupQueryAttention")
                                   else ("swap" if kv_mode == "static" else "grow")}},
            "quantization": facts["quantization"],  # None: every weight in `precision`
            "sliding_window_cache": "full-length cache on every layer (windows are applied by the mask)",
            **({"engine": engine} if engine else {}),
            "versions": _versions(),
            "build": {"seconds": round(time.perf_counter() - t0, 2), "weight_bytes": total,
                      "checkpoint_bytes": ckpt.size_bytes()},
        }
        write_manifest(tmp, manifest)
        tmp.chmod(0o755)
    return out.resolve()


def _tokenizer_files(model_dir: Path) -> dict[str, Path]:
    """The tokenizer files to copy, checked before any work: each a regular file inside the checkpoint (or its HF
    cache blobs), tokenizer.json parsing as a tokenizer, every chat template rendering a sample conversation."""
    found = {name: path for name in TOKENIZER_FILES if (path := checkpoint_file(model_dir, name)) is not None}
    if "tokenizer.json" in found:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(found["tokenizer.json"]))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for every parse error
            raise CheckpointError(f"{found['tokenizer.json']}: not a valid tokenizer.json ({e})") from None
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if name in found:
            try:
                json.loads(found[name].read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{found[name]}: not valid JSON ({e})") from None
    from runtime_py.chat import check_chat_templates

    check_chat_templates(model_dir)
    return found


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"exported graph failed onnx.checker: {e}") from None


def describe(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    return f"{m['model']['model_type']} {m['precision']} kv={m['kv_mode']} max_seq_len={m['max_seq_len']}"
