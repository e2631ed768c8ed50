"""Will an artifact fit in memory? Checked before ONNX Runtime loads it, so an artifact that cannot fit is refused
with numbers instead of the process being OOM-killed half-way through loading.

What it does:

- :func:`available_bytes` (and :func:`memory_limits`, which says where each number comes from): the memory this
  process may still take, the smallest of every limit that applies:

  * cgroup v2: ``memory.max - memory.current`` of the process's cgroup and of each ancestor visible under the
    cgroup2 mount;
  * cgroup v1: ``memory.limit_in_bytes - memory.usage_in_bytes`` likewise (a limit of 2**62 or more is "none");
  * in both, the cgroup's inactive page cache (``inactive_file`` in memory.stat) counts as available: the kernel
    reclaims it before it OOM-kills (this is how container runtimes compute a working set; it matters because
    opening an artifact reads every file for its checksum, which fills the cache);
  * ``MemAvailable`` of ``/proc/meminfo`` (the machine);
  * ``RLIMIT_AS`` (``ulimit -v``, ``prlimit --as``) minus this process's ``VmSize``, and ``RLIMIT_DATA`` minus its
    ``VmData`` (allocations past them fail).

- :func:`estimate_bytes` (parts in :func:`estimate_parts`): what an ONNX Runtime CPU session over the artifact will
  hold, from its manifest alone: the graph's weight bytes on disk expanded by the factor measured for the precision
  (:data:`ORT_CPU_EXPANSION`; the CPU provider computes fp16 MatMuls in fp32, so it folds every fp16 weight into an
  fp32 copy), plus the extra copy of a tied embedding where the graph makes one (ONNX Runtime prepacks a
  ``MatMul(h, Transpose(E))`` head into a copy of its own; not the ``ort`` graphs whose head graphs/tied_head.py
  shares or whose head is quantized),
  the KV buffers the runtime allocates for ``batch`` sequences of ``seq_len`` tokens (one set when the graph updates
  the cache in place, two when it writes a second set and swaps, or in concat mode where past and present are alive
  together), and the measured fixed cost of the interpreter, numpy, ONNX Runtime and the tokenizer. The factors were
  measured on this project's artifacts (bench/README.md, "Memory needed to open an artifact").

- :func:`check_fits` raises :class:`NotEnoughMemoryError` (an :class:`ArtifactError`, so the CLI exits 2 with
  ``error: ...``) naming what is needed and what is available, in GiB, and what to do instead. The part of the
  fixed cost the process already holds (its VmRSS, up to that cost: the interpreter and imports) is not asked for
  twice.
  runtime_py/session.py calls it right before it creates the InferenceSession.

- :func:`cpu_expansion_warning`: the text the build prints for an fp16 artifact meant for ONNX Runtime on the CPU.

What it does not do: count memory that depends on the prompt (prefill activations, the logits of every position of
a ``--logits all`` graph), TensorRT sessions (GPU memory), or reserve anything: another process may take the memory
between the check and the load. An address-space limit is compared with resident bytes; a process needs somewhat
more address space than resident memory, so passing the check there is necessary, not sufficient.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from artifacts.bundle import ArtifactError
from artifacts.manifest import DTYPES, Manifest

GiB = 1 << 30

# Peak resident bytes per byte of graph weights (model.onnx + external data; a tied embedding counted twice, see
# estimate_parts) of a process that opened an ONNX Runtime CPU session and generated, the fixed cost taken out.
# Measured on the Qwen2-0.5B shape, tied and untied (bench/README.md, "Memory needed to open an artifact"):
# fp32 1.005, fp16 2.07-2.13 (fp16 MatMul weights are folded into fp32 copies while some fp16 ones are still
# loaded). bf16 has no CPU kernels; it is given fp16's factor. Rounded up.
ORT_CPU_EXPANSION = {"fp32": 1.02, "fp16": 2.15, "bf16": 2.15}
# Peak RSS of `python -m runtime_py generate` on a tiny artifact (interpreter, numpy, onnxruntime, tokenizers):
# measured 71 MiB, rounded up.
FIXED_OVERHEAD_BYTES = 80 << 20
_NO_LIMIT = 1 << 62  # cgroup v1 reports "no limit" as LONG_MAX rounded down to a page


class NotEnoughMemoryError(ArtifactError, MemoryError):
    """Opening the artifact would need more memory than this process can get."""


# -- what is available --------------------------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup_dirs(proc: Path = Path("/proc/self")) -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup and each ancestor up to the mount point, leaf first;
    "v2" for the unified hierarchy, "v1" for the memory controller's. Directories that are not visible (a container
    whose mount shows only its own cgroup) are skipped."""
    try:
        cgroups = (proc / "cgroup").read_text().splitlines()
        mountinfo = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    paths = {}  # "v2" | "v1" -> cgroup path
    for line in cgroups:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    found = []
    for line in mountinfo:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, mount, fstype, options = _unescape(fields[3]), Path(_unescape(fields[4])), tail[0], tail[2]
        version = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "memory" in options.split(",") \
            else None
        if version is None or version not in paths:
            continue
        path = paths[version]
        rel = os.path.relpath(path, root) if (path + "/").startswith(root.rstrip("/") + "/") else "."
        leaf = (mount / rel).resolve() if rel != "." else mount
        if not leaf.is_dir():
            leaf = mount  # a cgroup namespace or a container mount: the mount is our cgroup
        d = leaf
        while True:
            found.append((version, d))
            if d == mount or mount not in d.parents:
                break
            d = d.parent
    return found


def _cgroup_limits(proc: Path) -> list[tuple[str, int]]:
    out = []
    for version, d in cgroup_dirs(proc):
        if version == "v2":
            limit, usage, inactive = _read_int(d / "memory.max"), _read_int(d / "memory.current"), \
                _stat_value(d / "memory.stat", "inactive_file")
            name = d / "memory.max"
        else:
            limit, usage, inactive = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes"), \
                _stat_value(d / "memory.stat", "total_inactive_file")
            name = d / "memory.limit_in_bytes"
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        working_set = max(0, usage - inactive)
        out.append((f"cgroup {version} limit {limit / GiB:.2f} GiB in {name}", max(0, limit - working_set)))
    return out


def _status_bytes(proc: Path, key: str) -> int | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def meminfo_available(proc_root: Path = Path("/proc")) -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None on a kernel without it)."""
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limits() -> list[tuple[str, int]]:
    """Every limit that applies to this process: (where it comes from, bytes still available under it)."""
    proc = Path("/proc/self")
    limits = _cgroup_limits(proc)
    avail = meminfo_available()
    if avail is not None:
        limits.append(("MemAvailable in /proc/meminfo", avail))
    for name, rlimit, key in (("RLIMIT_AS", resource.RLIMIT_AS, "VmSize"),
                              ("RLIMIT_DATA", resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(rlimit)[0]
        used = _status_bytes(proc, key)
        if soft != resource.RLIM_INFINITY and used is not None:
            limits.append((f"{name} {soft / GiB:.2f} GiB minus this process's {key}", max(0, soft - used)))
    return limits


def available() -> tuple[int | None, str]:
    """(bytes, where the number comes from) of the tightest limit; (None, "") when none could be read."""
    limits = memory_limits()
    if not limits:
        return None, ""
    source, value = min(limits, key=lambda item: item[1])
    return value, source


def available_bytes() -> int | None:
    """The memory this process may still take: the smallest of the limits in :func:`memory_limits`."""
    return available()[0]


# -- what an artifact needs ----------------------------------------------------------------------------------------
def graph_bytes(manifest: dict) -> int:
    """Bytes of the decoder graph and its external data (model.onnx, model.onnx.data), from the manifest's files;
    the build's weight_bytes when the files are not listed."""
    graph = manifest.decoder.file
    total = sum(int(info["bytes"]) for rel, info in manifest.files.items()
                if rel == graph or rel.startswith(graph + "."))
    return total or int(manifest.build.get("weight_bytes", 0))


def kv_bytes(manifest: Manifest, batch: int = 1, seq_len: int | None = None) -> int:
    """The KV buffers the runtime allocates for `batch` sequences of `seq_len` tokens (default: max_seq_len):
    [batch, kv_heads, seq_len, head_dim] per past_key_values input, one set when the graph updates the cache in
    place (kv_binding in_place), two otherwise (swap: the set the call writes; concat: past and present)."""
    seq_len = int(seq_len or manifest.max_seq_len)
    graph = manifest.decoder
    sets = 1 if graph.kv_binding == "in_place" else 2
    total = 0
    for t in graph.kv_inputs:
        _, heads, _, dim = t.shape
        total += batch * int(heads) * seq_len * int(dim) * DTYPES[t.dtype].itemsize
    return total * sets


def estimate_parts(manifest: Manifest, batch: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """Bytes an ONNX Runtime CPU session over the artifact holds at its peak, by part: ``weights`` (graph bytes x
    the precision's factor), ``tied_lm_head`` (a tied embedding's transposed copy, x the same factor), ``kv_cache``
    (:func:`kv_bytes`) and ``runtime`` (the fixed cost)."""
    precision = manifest.precision
    factor = ORT_CPU_EXPANSION.get(precision, max(ORT_CPU_EXPANSION.values()))
    parts = {"weights": int(graph_bytes(manifest) * factor)}
    # no second copy on ort when the tied head is quantized (MatMulNBits and GatherBlockQuantized read the integers)
    # or shared (graphs/tied_head.py: the table is the left-hand side, never prepacked)
    quantized_head = ((manifest.quantization or {}).get("counts") or {}).get("embedding") == 1
    shared = all(g.lowering == "ort" for g in manifest.graphs.values()) and (
        quantized_head or any(g.fusion.get("tied_head_shared") for g in manifest.graphs.values()))
    if manifest.tie_embeddings and manifest.task == "causal-lm" and not shared:  # task heads have no LM head
        itemsize = 4 if precision == "fp32" else 2
        parts["tied_lm_head"] = int(manifest.vocab_size * manifest.hidden_size * itemsize * factor)
    parts["kv_cache"] = kv_bytes(manifest, batch, seq_len)
    parts["runtime"] = FIXED_OVERHEAD_BYTES
    return parts


def estimate_bytes(manifest: Manifest, batch: int = 1, seq_len: int | None = None) -> int:
    """Peak resident bytes of a process that opens the artifact on ONNX Runtime's CPU provider and generates
    `batch` sequences of up to `seq_len` tokens (default max_seq_len): the total of :func:`estimate_parts`."""
    return sum(estimate_parts(manifest, batch, seq_len).values())


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(manifest: Manifest, batch: int = 1, seq_len: int | None = None, where: str | Path = "",
               limit: tuple[int | None, str] | None = None) -> int:
    """Raise :class:`NotEnoughMemoryError` when the estimate, less what this process already holds, exceeds what is
    available to it; return the estimate. `limit`: (bytes, source) to use instead of :func:`available`."""
    parts = estimate_parts(manifest, batch, seq_len)
    need = sum(parts.values())
    have, source = limit if limit is not None else available()
    # The part of the fixed cost this process has already paid (interpreter, imports) is not asked for again; what
    # it holds beyond that (a host process's own data) stays resident and does not shrink the need.
    resident = min(_status_bytes(Path("/proc/self"), "VmRSS") or 0, parts["runtime"])
    if have is None or need - resident <= have:
        return need
    precision = manifest.precision
    seq_len = int(seq_len or manifest.max_seq_len)
    factor = ORT_CPU_EXPANSION.get(precision, max(ORT_CPU_EXPANSION.values()))
    detail = [f"weights {_gib(graph_bytes(manifest))} on disk x {factor:g} = {_gib(parts['weights'])}"
              + (f" (the CPU provider keeps fp32 copies of {precision} weights)" if precision != "fp32" else "")]
    if "tied_lm_head" in parts:
        detail.append(f"the tied LM head's transposed copy {_gib(parts['tied_lm_head'])}")
    detail.append(f"KV cache {_gib(parts['kv_cache'])} (batch {batch} x {seq_len} tokens)")
    detail.append(f"runtime {_gib(parts['runtime'])}")
    instead = []
    if precision != "fp32":
        fp32 = parts["kv_cache"] + parts["runtime"] + int(
            (parts["weights"] + parts.get("tied_lm_head", 0)) / factor * 2 * ORT_CPU_EXPANSION["fp32"])
        instead.append(f"an fp32 build for the CPU (`--precision fp32`, about {_gib(fp32)})")
    instead.append("int8/int4 weights where the exporter offers them")
    if parts["kv_cache"] >= 0.05 * need:
        instead.append("a smaller `--max-seq-len` (the KV cache grows with it)")
    instead.append("a machine with more memory, or a GPU (`--backend tensorrt`)")
    prefix = f"{where}: " if where else ""
    raise NotEnoughMemoryError(
        f"{prefix}not enough memory to open this {precision} artifact with ONNX Runtime on the CPU: it needs about "
        f"{_gib(need)} but only {_gib(have + resident)} is available to this process ({_gib(have)} free under "
        f"{source}, plus {_gib(resident)} of the runtime it already holds). Needed: " + ", ".join(detail)
        + ". Instead use " + "; or ".join(instead) + ".")


def cpu_expansion_warning(precision: str) -> str | None:
    """What the build says about `precision` for ONNX Runtime's CPU provider (None when there is nothing to say)."""
    if precision not in ("fp16", "bf16"):
        return None
    f16, f32 = ORT_CPU_EXPANSION[precision], ORT_CPU_EXPANSION["fp32"]
    return (f"ONNX Runtime's CPU provider computes {precision} MatMuls in fp32: opening this artifact on the CPU "
            f"folds every {precision} weight into an fp32 copy and takes about {f16:g}x its weight bytes in memory "
            f"(an fp32 artifact of the same model: about {2 * f32:g}x the {precision} weight bytes). {precision} "
            "saves memory on a GPU (--backend tensorrt), not on the CPU.")
