"""ONNX Runtime session over an artifact's decoder graph, with I/O binding and preallocated KV buffers.

What it does: opens ``manifest.json`` (checksums verified), creates one ``onnxruntime.InferenceSession`` and runs
the graph through I/O binding. In static-buffer mode the KV cache is preallocated OrtValues
``[B, KV, max_len, D]``: with the ``ort`` lowering (GroupQueryAttention) ``present.*`` is bound to the same
memory as ``past_key_values.*`` and updated in place, and every call of one shape reuses one prepared binding (the
token ids and positions are copied into arrays it points at; the logits land in a preallocated array), so a decode
step costs one ``run_with_iobinding`` and no rebinding; with the reference graph each call reads one set and
writes a second, then they swap (no allocation, no growing copies). In concat mode the presents ORT allocates are
fed back as OrtValues without a round trip through numpy.

Before the InferenceSession is created, :func:`runtime_py.memory.check_fits` refuses an artifact that cannot fit
in the memory this process can get (``check_memory=False`` skips it).

:func:`pad_prompts` is the padding policy each KV mode needs (right-padded static buffers, left-padded masked
concat), which both sessions apply through ``session.pad``.

What it does not do: sampling, tokenizing or choosing what runs together (generate.py does), or TensorRT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifacts.bundle import ArtifactError, open_artifact
from artifacts.manifest import DTYPES
from runtime_py.memory import check_fits

ORT_KV_DTYPES = ("float32", "float16")  # what the CPU provider has kernels for
ORT_LOWERINGS = ("reference", "ort", "trt-native")


@dataclass
class Padded:
    """A batch of prompts laid out for one prefill call (see :func:`pad_prompts`)."""

    ids: np.ndarray  # [B, S] int64
    positions: np.ndarray  # [B, S] int64
    mask: np.ndarray | None  # [B, S] int64 in concat mode (1 = real token), None in static mode
    last: np.ndarray  # [B] index of each row's last prompt token in the call


def pad_prompts(kv_mode: str, prompts: list[list[int]], pad_id: int) -> Padded:
    """The padding policy of a KV mode. Static buffers (slot == position): right-padded, positions 0..S-1 in every
    row; a pad writes a slot past its row's prompt, which that row's own tokens overwrite before anything reads
    it. Concat (the cache grows for the whole batch): left-padded, the pads masked, positions counted from each
    row's first real token."""
    B, S = len(prompts), max(len(p) for p in prompts)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    positions = np.zeros((B, S), dtype=np.int64)
    if kv_mode == "static":
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        positions[:] = np.arange(S)
        return Padded(ids, positions, None, np.array([len(p) - 1 for p in prompts]))
    mask = np.zeros((B, S), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        mask[b, S - len(p):] = 1
        positions[b, S - len(p):] = np.arange(len(p))
    return Padded(ids, positions, mask, np.full(B, S - 1))


def session_options(threads: int | None) -> "ort.SessionOptions":
    """The options every runtime_py ONNX Runtime session opens an artifact with."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.log_severity_level = 3
    # ORT fuses a trt-native graph's int4/int8 DequantizeLinear -> MatMul into MatMulNBits, by default with int8
    # activations (level 4: logits off by ~1e-2). Those graphs are the exact TensorRT form; on ONNX Runtime they
    # keep fp32 compute, as their unfused ops define. (The ort lowering's own MatMulNBits carry their level.)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def open_session(root: Path, graph_file: str, options) -> "ort.InferenceSession":
    """ONNX Runtime's CPU session over root/graph_file; ArtifactError when it cannot load the graph (a file the
    manifest seals but that is truncated or corrupt, external data it refuses to read: outside the directory,
    through a link, missing)."""
    try:
        return ort.InferenceSession(str(root / graph_file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's pybind errors (Fail, InvalidProtobuf, ...) share no useful base
        raise ArtifactError(f"{root}: ONNX Runtime cannot load {graph_file}: {str(e)[:500]}; rebuild the "
                            "artifact") from None


def check_graph_io(session, graph, root: Path, spec: dict | None = None) -> None:
    """The graph ONNX Runtime loaded has the inputs and outputs the manifest lists (names, ranks, fixed dims,
    dtypes) and, given the manifest's `spec`, the vocabulary and KV head count / head size the session sizes its
    buffers from; ArtifactError otherwise (a manifest edited by hand, or one beside the wrong graph: its checksum
    covers the graph file, not what the manifest says about it)."""
    for kind, listed, actual in (("input", graph.inputs, session.get_inputs()),
                                 ("output", graph.outputs, session.get_outputs())):
        found = {t.name: t for t in actual}
        for t in listed:
            got = found.get(t.name)
            shape = None if got is None else got.shape
            if shape is None or len(shape) != len(t.shape) or any(
                    isinstance(want, int) and want != dim for want, dim in zip(t.shape, shape)):
                raise ArtifactError(f"{root}: the manifest lists {kind} {t.name} {list(t.shape)}, but {graph.file} "
                                    f"has {'no such ' + kind if shape is None else list(shape)}; the manifest does "
                                    "not describe this graph (rebuild the artifact)")
            if got.type != _ORT_TYPES.get(t.dtype, f"tensor({t.dtype})"):
                raise ArtifactError(f"{root}: the manifest lists {kind} {t.name} as {t.dtype}, but {graph.file} has "
                                    f"{got.type}; the manifest does not describe this graph (rebuild the artifact)")
    if spec is None:
        return
    wanted = {"logits": {2: ("vocab_size", spec["vocab_size"])}}
    kv_dims = {1: ("num_kv_heads", spec["num_kv_heads"]), 3: ("head_dim", spec["head_dim"])}
    for t in session.get_inputs() + session.get_outputs():
        for axis, (key, value) in (kv_dims if t.name.startswith(("past_key_values.", "present."))
                                   else wanted.get(t.name, {})).items():
            if axis < len(t.shape) and isinstance(t.shape[axis], int) and t.shape[axis] != value:
                raise ArtifactError(f"{root}: {graph.file}'s {t.name} is {t.shape}, but the manifest's "
                                    f"spec.{key} is {value}; the manifest does not describe this graph (rebuild "
                                    "the artifact)")


_ORT_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)"}  # else ORT writes the ONNX name: tensor(int64)


class KVCache:
    """The per-layer KV tensors of one batch, as ORT values."""

    def __init__(self, values: list, spare: list | None, length: int):
        self.values = values  # inputs of the next call (past_key_values.*)
        self.spare = spare  # static mode: the buffers the next call writes (present.*)
        self.length = length  # concat: current past length; static: buffer length
        self.bound: _Bound | None = None  # in-place mode: the prepared binding of the last call's shape


class _Bound:
    """One prepared I/O binding and the arrays it points at (kept alive here: bind_cpu_input does not own them)."""

    def __init__(self, io, ids: np.ndarray, pos: np.ndarray, logits: np.ndarray):
        self.io, self.ids, self.pos, self.logits = io, ids, pos, logits


class OrtSession:
    def __init__(self, artifact: str | Path, threads: int | None = None, verify: bool = True, batch: int = 1,
                 check_memory: bool = True, profile: str | None = None):
        """`batch`: how many sequences (of up to max_seq_len tokens) the caller will run at once; with
        `check_memory` the session refuses, before ONNX Runtime loads anything, an artifact whose estimated memory
        (weights as the CPU provider holds them, KV buffers for `batch` x max_seq_len, fixed cost) exceeds what this
        process can get (runtime_py/memory.py: NotEnoughMemoryError, an ArtifactError). `profile`: a file prefix
        for ONNX Runtime's profiler (on when given; ``self.session.end_profiling()`` writes the JSON)."""
        self.root = Path(artifact)
        self.manifest = open_artifact(self.root, verify=verify)
        if self.manifest.task != "causal-lm":
            raise ArtifactError(f"{self.root}: a {self.manifest.task} artifact has no LM head to generate with; "
                                "use `python -m runtime_py classify`")
        graph = self.manifest.decoder
        if graph.lowering not in ORT_LOWERINGS:
            raise ArtifactError(f"{self.root}: the '{graph.lowering}' graph needs TensorRT with our plugins; "
                                "ONNX Runtime runs the reference, ort and trt-native lowerings")
        self.kv_mode = self.manifest.kv_mode
        self.in_place = graph.kv_binding == "in_place"
        self.last_logits = graph.logits == "last"  # logits [B,1,V] of each call's last position
        self.max_seq_len = self.manifest.max_seq_len
        self.vocab_size = self.manifest.vocab_size
        self.num_layers = self.manifest.num_layers
        self.kv_heads, self.head_dim = self.manifest.num_kv_heads, self.manifest.head_dim
        kv_type = graph.kv_dtype
        if kv_type not in ORT_KV_DTYPES:
            raise ArtifactError(f"{self.root}: KV dtype {kv_type} has no ONNX Runtime CPU kernels; "
                                "build with --precision fp32 or fp16 for the CPU")
        self.kv_dtype = np.dtype(DTYPES[kv_type].numpy)
        options = session_options(threads)
        if profile is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        if batch > self.manifest.max_batch:  # said as such, not as a memory shortfall
            raise ArtifactError(f"{self.root}: a batch of {batch} > the artifact's max batch {self.manifest.max_batch}")
        if check_memory:
            check_fits(self.manifest, batch=batch, where=self.root)
        self.session = open_session(self.root, graph.file, options)
        check_graph_io(self.session, graph, self.root, self.manifest.spec)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.kv_in = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.kv_out = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    def pad(self, prompts: list[list[int]], pad_id: int) -> Padded:
        return pad_prompts(self.kv_mode, prompts, pad_id)

    def _zeros(self, batch: int, length: int) -> list:
        shape = (batch, self.kv_heads, length, self.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)) for _ in self.kv_in]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.kv_mode == "static":
            spare = None if self.in_place else self._zeros(batch, max_len)
            return KVCache(self._zeros(batch, max_len), spare, max_len)
        return KVCache(self._zeros(batch, 0), None, 0)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray | None,
                cache: KVCache) -> np.ndarray:
        """Run one prefill or decode call; updates `cache` in place and returns fp32 logits [B, S, V], or
        [B, 1, V] (the last position) when the graph was built with ``--logits last``."""
        if self.in_place:
            return self._forward_in_place(input_ids, position_ids, cache)
        io = self.session.io_binding()
        # bind_cpu_input does not own the array: keep every bound array alive until the run has finished.
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        if self.kv_mode == "concat":
            feeds["attention_mask"] = np.ascontiguousarray(attention_mask, dtype=np.int64)
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        for name, value in zip(self.kv_in, cache.values):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits")
        if self.kv_mode == "static":
            for name, value in zip(self.kv_out, cache.spare):
                io.bind_ortvalue_output(name, value)
        else:
            for name in self.kv_out:
                io.bind_output(name)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        if self.kv_mode == "static":
            cache.values, cache.spare = cache.spare, cache.values
        else:
            cache.values = list(outputs[1:])
            cache.length += input_ids.shape[1]
        return outputs[0].numpy()

    def _forward_in_place(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        bound = cache.bound
        if bound is None or bound.ids.shape != input_ids.shape:
            cache.bound = bound = self._bind_in_place(input_ids.shape, cache)
        bound.ids[...] = input_ids
        bound.pos[...] = position_ids
        self.session.run_with_iobinding(bound.io)
        return bound.logits.copy()  # the next call overwrites the bound array

    def _bind_in_place(self, shape: tuple[int, int], cache: KVCache) -> _Bound:
        ids, pos = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        logits = np.empty((shape[0], 1 if self.last_logits else shape[1], self.vocab_size), np.float32)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        for name, value in zip(self.kv_in, cache.values):
            io.bind_ortvalue_input(name, value)
        for name, value in zip(self.kv_out, cache.values):  # present.* aliases past_key_values.*
            io.bind_ortvalue_output(name, value)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return _Bound(io, ids, pos, logits)
