"""`python -m export build`: checkpoint -> artifact directory. The one orchestrator of the export stages.

Stages, in order, each a function below (the work itself lives in the module named):

1. ``check`` the flags, resolve the model, read the spec and check every checkpoint tensor against config.json
   and the tokenizer files (each a regular file inside the checkpoint, tokenizer.json parsing, chat templates
   rendering within bounds), all before any work (export/checkpoint.py, spec.py, weights.py, quantize.py);
2. ``trace`` the decoder with meta weights (export/trace.py, the graph contract);
3. ``attach_weights``: lazy loaders from safetensors (export/weights.py);
4. ``fuse_and_lower`` attention, MoE and norms for the lowering's target (graphs/lower.py, fuse.py, ...); a task
   head's graph (seq-cls, token-cls, qa) is then sealed into one full-sequence forward (graphs/task.py);
5. ``fold`` constants (graphs/fold.py);
6. ``quantize_weights`` when ``--quantize`` (graphs/quantize.py, after folding);
7. ``save`` the graph and its external data tensor by tensor (weights stream: checked for NaN/Inf and overflow
   as they are read) and run ``onnx.checker`` on it;
8. ``engine``: the TensorRT engine for ``--backend tensorrt`` (export/engine.py);
9. copy the tokenizer files and write ``manifest.json`` with sha256 of every file (artifacts/bundle.py).

All of it happens in a staging directory renamed into place only when everything succeeded (artifacts/bundle.py
``staging_dir``: it replaces only an artifact of ours, never the checkpoint). The manifest's ``quantization``
records the scheme of every quantized tensor.

What it does not do: any stage's work itself (the modules above), or run the artifact (runtime_py/).
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts.bundle import CHAT_TEMPLATE_DIR, TOKENIZER_FILES, staging_dir, write_manifest
from export.options import (BACKENDS, DEFAULT_BACKEND, DEFAULT_KV_MODE, DEFAULT_LOGITS, DEFAULT_MAX_BATCH,
                            DEFAULT_PRECISION, KV_MODES, LOGITS, LOWERINGS, MAX_BATCH, MAX_SEQ_LEN, PRECISIONS, TASKS,
                            TRT_LOWERINGS, default_lowering)
from export.checkpoint import Checkpoint, CheckpointError, allowed_roots, checkpoint_file, resolve_model
from artifacts.manifest import histogram
from export.trace import DTYPES, NP_DTYPES, io_description, trace_graph
from export.spec import load_spec
from export.weights import attach_weights, check_checkpoint, warn_unexpected, weight_bytes, weight_plan

GRAPH = "model.onnx"
ENGINE = "model.engine"


def default_out(model: str, precision: str, kv_mode: str) -> Path:
    from artifacts.paths import cache_root

    name = Path(model).name if Path(model).is_dir() else model.replace("/", "--")
    return cache_root() / "artifacts" / f"{name}-{precision}-{kv_mode}"


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class Plan:
    """What stage 1 resolved and checked: everything the later stages read."""

    model_dir: Path
    spec: object  # export.spec.ModelSpec
    ckpt: Checkpoint
    weights: list  # export.weights.Weight, one per decoder parameter
    dtype: torch.dtype
    lowering: str
    max_seq_len: int
    quant: object  # export.quantize.QuantConfig | None
    tokenizer_files: dict[str, Path]
    prequant: object = None  # export.prequant.PreQuant: the checkpoint's own quantization_config, or None
    accuracy_level: int | None = None


def check(model: str, precision: str, backend: str, kv_mode: str, max_seq_len: int | None, max_batch: int,
          lowering: str | None, logits: str, quantize: str | None, group_size: int | None,
          accuracy_level: int | None, quantize_lm_head: bool, task: str | None = None) -> Plan:
    """Stage 1: every flag, the checkpoint's config and tensors and the tokenizer files, checked before any work
    (ValueError / CheckpointError / UnsupportedConfigError naming the problem)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend}: choose from {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose from {PRECISIONS}")
    if kv_mode not in KV_MODES:
        raise ValueError(f"--kv-mode {kv_mode}: choose from {KV_MODES}")
    if backend == "tensorrt":
        from export.engine import load_tensorrt
        from plugins import attention as attention_plugin

        if lowering is not None and lowering not in TRT_LOWERINGS:
            raise ValueError(f"--lowering {lowering} is for ONNX Runtime; TensorRT takes {', '.join(TRT_LOWERINGS)}")
        if kv_mode != "static":
            raise ValueError(f"--kv-mode {kv_mode}: TensorRT engines are built on the static KV buffers (the "
                             "default); a concat graph's mask (past + new tokens) has no optimization profile here. "
                             "Build concat for --backend onnxruntime")
        # fail before any work when TensorRT is missing, or cannot take our plugins (TensorRT-RTX)
        load_tensorrt((attention_plugin.PLUGIN_NAME,) if lowering == "trt-plugin" else ())
    lowering = lowering or default_lowering(backend, kv_mode)
    if lowering not in LOWERINGS:
        raise ValueError(f"--lowering {lowering}: choose from {LOWERINGS}")
    if precision == "bf16" and backend == "onnxruntime":
        raise ValueError("--precision bf16: ONNX Runtime has no bf16 kernels on the CPU; use fp32/fp16 here, or "
                         "--backend tensorrt for a bf16 engine")
    if logits not in LOGITS:
        raise ValueError(f"--logits {logits}: choose from {LOGITS}")
    if task is not None and task not in TASKS:
        raise ValueError(f"--task {task}: choose from {TASKS}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"--max-batch {max_batch}: must be in [1, {MAX_BATCH}]")
    from export.prequant_checkpoint import PreQuantCheckpoint, describe, load_prequant
    from export.quantize import check_group_size, quant_config

    model_dir = resolve_model(model)
    spec = load_spec(model_dir, task)
    prequant = load_prequant(model_dir)
    if prequant is None:
        quant = quant_config(quantize, backend, lowering, group_size, accuracy_level, quantize_lm_head)
    else:
        quant = None
        given = [flag for flag, value in (("--quantize", quantize), ("--group-size", group_size),
                                          ("--quantize-lm-head", quantize_lm_head)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)}: {model_dir} is already quantized ({describe(prequant)}, "
                             "config.json quantization_config); build it without them (requantizing would round "
                             "its weights a second time)")
        if lowering == "trt-plugin":
            raise ValueError("--lowering trt-plugin has no quantized form; a pre-quantized checkpoint builds with "
                             "trt-native")
        if accuracy_level is not None and lowering != "ort":
            raise ValueError(f"--accuracy-level is a MatMulNBits/QMoE setting (the ort lowering), not {lowering}")
    if spec.task != "causal-lm":
        if kv_mode != "static":
            raise ValueError(f"--kv-mode {kv_mode}: a {spec.task} graph has no KV cache (one full-sequence forward; "
                             "it is built on the static form)")
        if quantize_lm_head:
            raise ValueError(f"--quantize-lm-head: a {spec.task} model has no LM head")
    check_group_size(spec, quant)
    ckpt = Checkpoint(model_dir) if prequant is None else PreQuantCheckpoint(model_dir, prequant)
    weights = weight_plan(spec)
    warn_unexpected(check_checkpoint(spec, ckpt, weights))
    top = min(spec.max_position_embeddings, MAX_SEQ_LEN)
    if max_seq_len is None:
        max_seq_len = spec.max_position_embeddings
        if max_seq_len > MAX_SEQ_LEN:
            raise ValueError(f"the model's max_position_embeddings {max_seq_len} is above the longest context this "
                             f"tool builds ({MAX_SEQ_LEN}: RoPE tables and KV buffers are sized by it); pass "
                             "--max-seq-len N")
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= top:
        raise ValueError(f"--max-seq-len {max_seq_len}: must be in [2, {top}] (the model's max_position_embeddings, "
                         f"at most {MAX_SEQ_LEN})")
    tokenizer_files = _tokenizer_files(model_dir)
    if precision == "fp16" and backend == "onnxruntime":
        from runtime_py.memory import cpu_expansion_warning

        note = cpu_expansion_warning(precision)
        if note:
            print(f"warning: {note}", file=sys.stderr)
    return Plan(model_dir, spec, ckpt, weights, DTYPES[precision], lowering, max_seq_len, quant, tokenizer_files,
                prequant, accuracy_level)


def build(model: str, precision: str = DEFAULT_PRECISION, backend: str = DEFAULT_BACKEND, out: Path | None = None,
          kv_mode: str = DEFAULT_KV_MODE, max_seq_len: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
          overwrite: bool = False, progress: bool = True, lowering: str | None = None, logits: str = DEFAULT_LOGITS,
          quantize: str | None = None, group_size: int | None = None, accuracy_level: int | None = None,
          quantize_lm_head: bool = False, task: str | None = None) -> Path:
    """Run the stages (module docstring) into a staging directory; the artifact's path once it is in place."""
    plan = check(model, precision, backend, kv_mode, max_seq_len, max_batch, lowering, logits, quantize, group_size,
                 accuracy_level, quantize_lm_head, task)
    model_dir, spec, ckpt, dtype, lowering = plan.model_dir, plan.spec, plan.ckpt, plan.dtype, plan.lowering
    max_seq_len, quant = plan.max_seq_len, plan.quant
    if spec.task != "causal-lm":
        logits = "all"  # a task head's outputs are per input (seq-cls) or per token; no LM head to trim
    out = out if out is not None else default_out(model, precision, kv_mode)  # staging_dir checks it
    io = io_description(spec, kv_mode, dtype, logits)
    t0 = time.perf_counter()
    with staging_dir(out, overwrite=overwrite, protect=[model_dir, *allowed_roots(model_dir)]) as tmp:
        total = weight_bytes(plan.weights, spec, dtype)
        weights = precision if quant is None else f"{quantize} weights (group {quant.group_size or 'per channel'}), " \
            f"{precision} activations"
        if plan.prequant is not None:
            from export.prequant_checkpoint import describe

            weights = f"pre-quantized: {describe(plan.prequant)} weights, {precision} activations"
        what = f"kv {kv_mode}" if spec.task == "causal-lm" else f"{spec.task} head, no KV cache"
        print(f"exporting {spec.model_type} ({spec.num_layers} layers, {total / 2**20:.1f} MiB of weights, "
              f"{weights}, {what}) from {model_dir}", file=sys.stderr)
        graph = trace(spec, kv_mode, dtype, logits, progress)
        folded = attach_weights(graph, spec, plan.weights, ckpt, dtype)
        fusion = fuse_and_lower(graph, spec, lowering, kv_mode, max_seq_len, dtype)
        for line in fusion["skipped"]:
            print(f"note: left unfused: {line}", file=sys.stderr)
        if spec.task != "causal-lm":
            from graphs.task import seal

            fusion["sealed"] = seal(graph)
        fold(graph)
        quantization = quantize_weights(graph, quant, lowering, dtype, ckpt if plan.prequant else None,
                                        plan.accuracy_level)
        if lowering == "ort" and spec.task == "causal-lm":
            from graphs.tied_head import share_tied_head

            fusion["tied_head_shared"] = share_tied_head(graph)  # the table held once (graphs/tied_head.py)
        stored = stored_bytes(graph)
        save(graph, tmp / GRAPH, progress)
        op_histogram = histogram(graph)
        del graph  # its lazy tensors are written: let them go before the engine build
        engine = None
        if backend == "tensorrt":
            from export.engine import has_fp8_weights

            engine = build_engine_stage(tmp, io, kv_mode, max_batch, max_seq_len, precision,
                                        has_fp8_weights(quantization))
        for name, path in plan.tokenizer_files.items():
            (tmp / name).parent.mkdir(exist_ok=True)  # additional_chat_templates/
            shutil.copyfile(path, tmp / name)  # contents only: never a link, never the source's mode
        if "tokenizer.json" not in plan.tokenizer_files:
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
                                   "op_histogram": op_histogram, "fusion": fusion,
                                   # GQA updates the KV buffer in place: present must be bound to past's memory
                                   "kv_binding": "none" if spec.task != "causal-lm"
                                   else "in_place" if fusion.get("GroupQueryAttention")
                                   else ("swap" if kv_mode == "static" else "grow")}},
            "quantization": quantization,  # None: every weight in `precision`
            "sliding_window_cache": "full-length cache on every layer (windows are applied by the mask)",
            **({"engine": engine} if engine else {}),
            "versions": _versions(),
            "build": {"seconds": round(time.perf_counter() - t0, 2), "weight_bytes": stored,
                      "float_weight_bytes": total,
                      "transposes_folded": folded,
                      "checkpoint_bytes": ckpt.size_bytes()},
        }
        write_manifest(tmp, manifest)
        tmp.chmod(0o755)
    return Path(out).expanduser().resolve()


# -- the stages --------------------------------------------------------------------------------------------------
def trace(spec, kv_mode: str, dtype: torch.dtype, logits: str, progress: bool):
    """Stage 2: the decoder traced with meta weights (export/trace.py); the exporter's own stdout goes to stderr."""
    import contextlib

    if progress:
        print("tracing the decoder (torch.export, meta weights) ...", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        return trace_graph(spec, kv_mode, dtype, logits)


def fuse_and_lower(model, spec, lowering: str, kv_mode: str, max_seq_len: int, dtype: torch.dtype) -> dict:
    """Stage 4: fuse the attention/MoE/norm regions for `lowering` and lower them (graphs/lower.py); the counts of
    what was fused, lowered and left unfused (the manifest's ``fusion``)."""
    from graphs.lower import lower

    return lower(model, spec, lowering, kv_mode, max_seq_len, NP_DTYPES[dtype])


def fold(model) -> None:
    """Stage 5: constant folding (graphs/fold.py); a bad weight read meanwhile stays a CheckpointError."""
    from graphs.fold import fold_constants

    fold_constants(model, keep=(CheckpointError,))


def quantize_weights(model, quant, lowering: str, dtype: torch.dtype, prequant_ckpt=None,
                     accuracy_level: int | None = None) -> dict | None:
    """Stage 6: weight-only quantization of the linears (graphs/quantize.py), after folding so the optimizer never
    folds a dequantize back into a float weight; for a pre-quantized checkpoint (prequant_ckpt, an
    export.prequant_checkpoint.PreQuantCheckpoint), its own integers stored in the graph instead. None (no
    --quantize, a float checkpoint): every weight stays in the precision."""
    from graphs.quantize import quantize_graph

    if prequant_ckpt is not None:
        import dataclasses

        result = quantize_graph(model, None, lowering, NP_DTYPES[dtype], accuracy_level)
        why = {name: "its stored integers have no form here" for name in result["dequantized"]}
        why.update({f"decoder.{name}": reason for name, reason in prequant_ckpt.dequantized.items()})
        for name, reason in why.items():
            print(f"note: {name}: stored as its dequantization ({reason})", file=sys.stderr)
        source = {k: v for k, v in dataclasses.asdict(prequant_ckpt.prequant).items()
                  if k in ("method", "bits", "group_size", "sym", "desc_act", "format_version", "lm_head")}
        return {**result, "dequantized": list(why), "source": source}
    if quant is None:
        return None
    return quantize_graph(model, quant, lowering, NP_DTYPES[dtype])


def stored_bytes(model) -> int:
    """Bytes of every initializer as the graph stores it (quantized tensors packed), from shapes and dtypes: no
    lazy weight is read. The manifest's ``build.weight_bytes``; ``float_weight_bytes`` is the same weights in the
    build precision before quantization."""
    import math

    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += math.ceil(math.prod(tensor.shape.numpy()) * tensor.dtype.itemsize)
    return total


def save(model, path: Path, progress: bool) -> None:
    """Stage 7: write `path` and `path.data` tensor by tensor (``onnx_ir.save``: the lazy weights are read, checked
    and, when quantizing, quantized one at a time), then check the written graph with ``onnx.checker``. Progress is
    a bar on a terminal; into a log (stderr not a TTY) it is a line per tenth of the tensors, no carriage returns."""
    import onnx_ir as ir
    from tqdm import tqdm

    model.producer_name = "llm-export"
    total = len(model.graph.initializers)
    tty = sys.stderr.isatty()
    done = [0]

    def tick(tensor, info):
        done[0] += 1
        if progress and not tty and done[0] * 10 // total != (done[0] - 1) * 10 // total:
            print(f"writing weights: {done[0]}/{total} tensors", file=sys.stderr, flush=True)

    with tqdm(total=total, unit="tensor", desc="writing weights", disable=not (progress and tty),
              file=sys.stderr) as bar:
        ir.save(model, path, external_data=path.name + ".data", max_workers=1,
                callback=lambda tensor, info: (bar.update(1), tick(tensor, info)))
        bar.update(bar.total - bar.n)  # tensors small enough to stay inside model.onnx have no callback
    if progress and not tty:
        print(f"writing weights: done ({total} tensors)", file=sys.stderr)
    from graphs.quantize import release

    release()  # drop the last quantized tensor the pass kept for its scales (a no-op without --quantize)
    _check_graph(path)


def build_engine_stage(tmp: Path, io: dict, kv_mode: str, max_batch: int, max_seq_len: int, precision: str,
                       fp8_weights: bool) -> dict:
    """Stage 8: the TensorRT engine from the saved graph (export/engine.py), its I/O checked against the contract."""
    from export.engine import build_engine, check_engine_io

    print("building the TensorRT engine ...", file=sys.stderr)
    engine = build_engine(tmp / GRAPH, tmp / ENGINE, kv_mode, max_batch, max_seq_len, precision,
                          fp8_weights=fp8_weights)
    check_engine_io(io, engine["io"])
    return engine


def _tokenizer_files(model_dir: Path) -> dict[str, Path]:
    """The tokenizer files to copy, checked before any work: each a regular file inside the checkpoint (or its HF
    cache blobs), tokenizer.json parsing as a tokenizer, every chat template rendering a sample conversation."""
    found = {name: path for name in TOKENIZER_FILES if (path := checkpoint_file(model_dir, name)) is not None}
    found.update(_named_templates(model_dir))
    from runtime_py.tokenizer import Tokenizer, generation_token_ids, read_json_object

    if "tokenizer.json" in found:
        try:  # as the runtime will load it from the artifact (parsing, and the bounds on what it makes of a text)
            Tokenizer(model_dir)
        except ValueError as e:  # the message names the file
            raise CheckpointError(str(e)) from None

    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if name in found:
            try:  # what the runtime will read from the artifact, refused here instead of at generate time
                config = read_json_object(found[name])
                if name == "generation_config.json":
                    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
                        generation_token_ids(config, key, str(found[name]))
            except ValueError as e:  # the message names the file
                raise CheckpointError(str(e)) from None
    from runtime_py.chat import check_chat_templates

    check_chat_templates(model_dir)
    return found


def _named_templates(model_dir: Path) -> dict[str, Path]:
    """``additional_chat_templates/NAME.jinja`` (transformers' named templates, e.g. tool_use), each a regular file
    inside the checkpoint with a plain name, so the artifact keeps every template the checkpoint has."""
    from artifacts.paths import UnsafePathError, check_name

    d = model_dir / CHAT_TEMPLATE_DIR
    found = {}
    # what runtime_py.chat reads; the files of a directory linked out of the checkpoint are refused by checkpoint_file
    for f in sorted(d.glob("*.jinja")) if d.is_dir() else ():
        name = f"{CHAT_TEMPLATE_DIR}/{f.name}"
        try:
            check_name(name, f"{model_dir}: chat template file")
        except UnsafePathError as e:
            raise CheckpointError(str(e)) from None
        found[name] = checkpoint_file(model_dir, name)
    return {name: path for name, path in found.items() if path is not None}


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"exported graph failed onnx.checker: {e}") from None

