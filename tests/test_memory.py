"""The memory check before an artifact is opened (runtime_py/memory.py), against real processes and real limits.

- available_bytes against this machine's /proc/meminfo, its cgroup files and an RLIMIT_AS set on a real process;
  the cgroup v2 parser on a directory laid out like a cgroup2 mount (this machine has no v2 memory controller).
- the estimate against the peak RSS of real `python -m runtime_py generate` processes: a tiny artifact (fixed cost
  dominates) and a mid-size fp16 one (the fp16 weight expansion dominates; an estimate without it fails the bound).
- the KV part equals what OrtSession.new_cache really allocates, in place and swap.
- the refusal: a real artifact whose KV buffers at max_seq_len do not fit under a real RLIMIT_AS (set with
  setrlimit before exec) makes `python -m runtime_py generate` exit 2 with both numbers, no traceback, fast and at
  low RSS (before ONNX Runtime loads anything); the same limit without the check really fails to allocate, and
  without the limit the same artifact generates.

Not tested here: a cgroup limit set on a real process (that needs creating cgroups, which this machine's sandbox
owns), or TensorRT.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artifacts.bundle import ArtifactError, open_artifact
from runtime_py import memory
from tests.conftest import CASES, save_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def _spawn(cmd: list[str], tmp_path: Path, rlimit_as: int | None = None, timeout: float = 120):
    """Run cmd through bench/spawn.py (small launcher, so ru_maxrss is the command's own); returns
    (rc, stdout, stderr, result dict with peak_rss_bytes and wall_s)."""
    result = tmp_path / f"spawn-{len(list(tmp_path.glob('spawn-*')))}.json"

    def limit():
        if rlimit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "spawn.py"), str(result), *cmd], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    return done.returncode, done.stdout, done.stderr, json.loads(result.read_text())


# -- what is available ----------------------------------------------------------------------------------------
def test_available_bytes_is_bounded_by_meminfo():
    """available_bytes() is the smallest of the limits, MemAvailable one of them. MemAvailable is machine-wide and
    moves with whatever else runs (the other xdist worker's builds free and take hundreds of MiB), so the reads are
    compared only when MemAvailable stood still around them (within 32 MiB): up to 50 tries, the last one checked
    whatever it read (a probe saw ~1% of unguarded reads off by more than 256 MiB under a 600 MB churn)."""
    for _ in range(50):
        before = _meminfo_available()
        limits = dict(memory.memory_limits())
        value = memory.available_bytes()
        after = _meminfo_available()
        if abs(after - before) <= 32 * MiB:
            break
    assert value is not None and 0 < value <= max(before, after) + 64 * MiB
    meminfo = limits["MemAvailable in /proc/meminfo"]
    assert min(before, after) - 256 * MiB <= meminfo <= max(before, after) + 256 * MiB
    # the smallest limit, read a moment apart
    assert abs(value - min(limits.values())) <= 256 * MiB


def test_cgroup_files_of_this_machine():
    """cgroup_dirs finds, per hierarchy, this process's own memory cgroup first (its cgroup.procs lists us) and
    then each ancestor up to the mount; every limit a cgroup sets bounds available_bytes."""
    dirs = memory.cgroup_dirs()
    if not dirs:
        pytest.skip("no cgroup mount visible")
    for version in {v for v, _ in dirs}:
        chain = [d for v, d in dirs if v == version]
        assert str(os.getpid()) in (chain[0] / "cgroup.procs").read_text().split()
        assert all(child.parent == parent for child, parent in zip(chain, chain[1:]))
        assert (chain[0] / ("memory.limit_in_bytes" if version == "v1" else "cgroup.controllers")).exists()
    value = memory.available_bytes()
    for source, headroom in memory._cgroup_limits(Path("/proc/self")):
        assert value <= headroom, source


def test_cgroup_v2_layout(tmp_path):
    """A cgroup2 mount as /proc/self/mountinfo and /proc/self/cgroup describe it: the leaf's and a parent's limit,
    with reclaimable inactive file cache counted as available; the tighter one wins."""
    mount = tmp_path / "sys" / "fs" / "cgroup"
    leaf = mount / "user.slice" / "job"
    leaf.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu memory\n")
    (mount / "user.slice" / "memory.max").write_text(f"{8 * GiB}\n")
    (mount / "user.slice" / "memory.current").write_text(f"{7 * GiB}\n")
    (mount / "user.slice" / "memory.stat").write_text(f"anon 1\ninactive_file {GiB // 2}\n")
    (leaf / "memory.max").write_text(f"{4 * GiB}\n")
    (leaf / "memory.current").write_text(f"{3 * GiB}\n")
    (leaf / "memory.stat").write_text("anon 1\ninactive_file 0\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/user.slice/job\n")
    (proc / "mountinfo").write_text(f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    assert memory.cgroup_dirs(proc) == [("v2", leaf), ("v2", mount / "user.slice"), ("v2", mount)]
    limits = dict(memory._cgroup_limits(proc))
    assert sorted(limits.values()) == [GiB, GiB + GiB // 2]


def test_rlimit_as_is_seen_by_a_real_process(tmp_path):
    limit = 3 * GiB
    code = ("import json; from runtime_py import memory; "
            "print(json.dumps([memory.memory_limits(), memory.available()]))")
    rc, out, err, _ = _spawn([sys.executable, "-c", code], tmp_path, rlimit_as=limit)
    assert rc == 0, err
    limits, (value, source) = json.loads(out)
    as_limits = [v for name, v in limits if name.startswith("RLIMIT_AS")]
    assert len(as_limits) == 1 and 2 * GiB < as_limits[0] < limit  # the limit less the interpreter's VmSize
    assert source.startswith("RLIMIT_AS") and value == as_limits[0]


# -- what an artifact needs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lowering,binding,sets", [("ort", "in_place", 1), ("reference", "swap", 2)])
def test_kv_part_is_what_the_session_allocates(artifacts, lowering, binding, sets):
    from runtime_py.session import OrtSession

    session = OrtSession(artifacts("qwen2_window", "static", lowering=lowering), threads=1)
    assert session.manifest.decoder.kv_binding == binding
    cache = session.new_cache(3, 40)
    allocated = sum(v.numpy().nbytes for v in cache.values + (cache.spare or []))
    assert memory.kv_bytes(session.manifest, batch=3, seq_len=40) == allocated
    m = session.manifest
    assert allocated == sets * 2 * m.num_layers * 3 * m.num_kv_heads * 40 * m.head_dim * 4


def _peak_of_generate(artifact: Path, tmp_path: Path) -> tuple[int, str]:
    rc, out, err, result = _spawn([sys.executable, "-m", "runtime_py", "generate", str(artifact), "--prompt-ids",
                                   "1,2,3", "--max-new-tokens", "8", "--threads", "2"], tmp_path)
    assert rc == 0, err
    return result["peak_rss_bytes"], out


def test_estimate_is_near_the_peak_rss_of_a_tiny_artifact(artifacts, tmp_path):
    artifact = artifacts("qwen2_window")
    estimate = memory.estimate_bytes(open_artifact(artifact))
    peak, _ = _peak_of_generate(artifact, tmp_path)
    assert 0.8 <= estimate / peak <= 1.6, (estimate / MiB, peak / MiB)


@pytest.fixture(scope="module")
def mid_fp16(tmp_path_factory):
    """A 4-layer qwen2 with a 32k vocabulary (tied), built fp16: about 54 MiB of weights, so the expansion shows."""
    from export.build import build

    root = tmp_path_factory.mktemp("mid")
    fields = dict(CASES["qwen2_sharded"][1], vocab_size=32000, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    ckpt = save_hf_checkpoint("qwen2", fields, root / "ckpt")
    return build(str(ckpt), precision="fp16", out=root / "fp16", max_seq_len=128, progress=False)


def test_estimate_follows_the_fp16_expansion(mid_fp16, tmp_path):
    manifest = open_artifact(mid_fp16)
    parts = memory.estimate_parts(manifest)
    estimate = sum(parts.values())
    peak, _ = _peak_of_generate(mid_fp16, tmp_path)
    assert 0.85 <= estimate / peak <= 1.4, (parts, peak / MiB)
    unexpanded = memory.graph_bytes(manifest) + parts["kv_cache"] + parts["runtime"]
    assert unexpanded / peak < 0.8  # weights taken at their size on disk would let it through: the factor matters


def test_tied_head_shared_holds_the_table_once(tmp_path, monkeypatch):
    """graphs/tied_head.py: a tied fp32 model's head as MatMul(E, h^T) keeps one copy of the 62.5 MiB table where
    the exporter's MatMul(h, Transpose(E)) costs a prepacked second one; same tokens, same log-probabilities."""
    import graphs.tied_head
    from export.build import build
    from runtime_py.score import score

    fields = dict(CASES["qwen2_sharded"][1], vocab_size=32000, hidden_size=512, intermediate_size=256,
                  num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    ckpt = save_hf_checkpoint("qwen2", fields, tmp_path / "ckpt")
    shared = build(str(ckpt), out=tmp_path / "shared", max_seq_len=64, progress=False)
    monkeypatch.setattr(graphs.tied_head, "share_tied_head", lambda model: 0)
    packed = build(str(ckpt), out=tmp_path / "packed", max_seq_len=64, progress=False)
    manifests = [open_artifact(a) for a in (shared, packed)]
    assert [m.graphs["decoder"].fusion["tied_head_shared"] for m in manifests] == [1, 0]
    table = 32000 * 512 * 4
    (peak_shared, out_shared), (peak_packed, out_packed) = (_peak_of_generate(a, tmp_path) for a in (shared, packed))
    assert out_shared == out_packed
    assert peak_packed - peak_shared > 0.7 * table, (peak_shared / MiB, peak_packed / MiB)
    for m, peak in zip(manifests, (peak_shared, peak_packed)):  # the estimate counts the copy only when it is made
        assert 0.85 <= memory.estimate_bytes(m) / peak <= 1.3, (memory.estimate_parts(m), peak / MiB)
    ids = [5, 17, 33, 100, 7, 8, 9, 200, 3]
    a, b = (np.array(score(p, ids)["logprobs"]) for p in (shared, packed))
    assert np.abs(a - b).max() < 1e-4


# -- the refusal ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A real tiny artifact with a 2**20-token context: its KV buffers at max_seq_len are 1 GiB (two sets: the
    reference lowering swaps), while its weights are a few hundred KiB."""
    from export.build import build

    root = tmp_path_factory.mktemp("long")
    ckpt = save_hf_checkpoint("qwen2", dict(CASES["qwen2_sharded"][1], max_position_embeddings=2 ** 20), root / "c")
    return build(str(ckpt), out=root / "a", max_seq_len=2 ** 20, lowering="reference", progress=False)


def _interpreter_vmsize(tmp_path: Path) -> int:
    code = ("import runtime_py.__main__, runtime_py.generate, runtime_py.memory\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize:')][0])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout) * 1024


def test_generate_refuses_what_does_not_fit_under_a_real_limit(long_context, tmp_path):
    manifest = open_artifact(long_context)
    need = memory.estimate_bytes(manifest)
    assert need > GiB and memory.graph_bytes(manifest) < 4 * MiB
    headroom = need // 2
    limit = _interpreter_vmsize(tmp_path) + headroom
    cmd = [sys.executable, "-m", "runtime_py", "generate", str(long_context), "--prompt-ids", "1,2,3"]
    rc, out, err, result = _spawn(cmd, tmp_path, rlimit_as=limit)
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and out == ""
    assert f"needs about {need / GiB:.2f} GiB" in err
    m = re.search(r"only ([0-9.]+) GiB is available to this process \(([0-9.]+) GiB free under RLIMIT_AS", err)
    assert m, err
    assert abs(float(m.group(2)) * GiB - headroom) < 64 * MiB  # the limit less what the interpreter had mapped
    assert "--max-seq-len" in err  # the KV cache is what does not fit: the remedy names it
    assert result["wall_s"] < 30 and result["peak_rss_bytes"] < 300 * MiB  # refused before anything was loaded

    # The limit is real: skipping the check, the same process cannot even allocate the KV buffers.
    code = ("import sys; from runtime_py.session import OrtSession\n"
            f"s = OrtSession({str(long_context)!r}, threads=1, check_memory=False)\n"
            "s.new_cache(1, s.max_seq_len)\nprint('allocated')")
    rc, out, err, _ = _spawn([sys.executable, "-c", code], tmp_path, rlimit_as=limit)
    assert rc != 0 and "allocated" not in out and ("MemoryError" in err or "allocate" in err), (rc, err[-2000:])

    # Without the limit the check lets it through and it generates.
    rc, out, err, _ = _spawn(cmd + ["--max-new-tokens", "4"], tmp_path)
    assert rc == 0, err


def test_check_fits_error_is_an_artifact_error_with_both_numbers(artifacts):
    manifest = open_artifact(artifacts("qwen2_window", precision="fp16"))
    need = memory.estimate_bytes(manifest)
    with pytest.raises(memory.NotEnoughMemoryError) as e:
        memory.check_fits(manifest, where="ART", limit=(0, "a test limit"))
    assert isinstance(e.value, ArtifactError) and isinstance(e.value, MemoryError)
    text = str(e.value)
    assert text.startswith("ART: ") and f"needs about {need / GiB:.2f} GiB" in text and "a test limit" in text
    assert "--precision fp32" in text and "int8/int4" in text and "GPU" in text
    assert memory.check_fits(manifest, limit=(64 * GiB, "plenty")) == need
    assert memory.check_fits(manifest, limit=(None, "")) == need  # nothing readable: no refusal


def test_cpu_expansion_warning():
    text = memory.cpu_expansion_warning("fp16")
    assert f"{memory.ORT_CPU_EXPANSION['fp16']:g}x" in text and "fp32" in text
    assert memory.cpu_expansion_warning("fp32") is None
