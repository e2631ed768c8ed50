"""TensorRT engines built ahead of time with TensorRT-RTX (no GPU needed to build), and the trt-native graph.

Every family's tiny checkpoint is built with `--backend tensorrt` (trt-native lowering); the tests check that the
build succeeds and that the network's I/O names, dtypes and profile ranges recorded in the manifest equal the
graph contract. Running an engine needs a GPU (TensorRT-RTX cannot deserialize without one): not done here.
The trt-native graph itself runs on ONNX Runtime and must match the unfused graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.build import build
from export.engine import EngineError
from export.spec import load_spec
from runtime_py.session import OrtSession
from tests.helpers import HAVE_TRT, ONNX_TO_TRT, PROMPT, hf_greedy, needs_trt, run_steps

REPO = Path(__file__).resolve().parents[1]

FAMILY_CASES = ["qwen2_window", "gemma2_mqa_untied", "qwen3_moe_mixed"]


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    made = {}

    def get(case, precision="fp32"):
        if (case, precision) not in made:
            made[case, precision] = build(str(checkpoints(case)), precision=precision, backend="tensorrt",
                                          out=root / f"{case}-{precision}", max_seq_len=64, max_batch=4,
                                          progress=False)
        return made[case, precision]

    return get


@needs_trt
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_engine_build_matches_graph_contract(case, engines):
    path = engines(case)
    m = json.loads((path / "manifest.json").read_text())
    engine = m["engine"]
    assert (path / engine["file"]).stat().st_size > 0 and engine["file"] in m["files"]
    graph = m["graphs"]["decoder"]
    assert graph["lowering"] == "trt-native"
    for ours, trt in ((graph["inputs"], engine["io"]["inputs"]), (graph["outputs"], engine["io"]["outputs"])):
        assert [t["name"] for t in ours] == [t["name"] for t in trt]
        for a, b in zip(ours, trt):
            assert ONNX_TO_TRT[a["dtype"]] == b["dtype"], (a, b)
            assert [d if isinstance(d, int) else -1 for d in a["shape"]] == b["shape"], (a, b)
    assert engine["profiles"]["prefill"] == {"batch": [1, 4, 4], "sequence": [1, 64, 64], "cache": [1, 64, 64]}
    assert engine["profiles"]["decode"]["sequence"] == [1, 1, 1]
    assert engine["flavour"] in ("tensorrt", "tensorrt_rtx") and engine["version"]


@needs_trt
def test_fp16_engine_builds(engines):
    path = engines("qwen2_window", "fp16")
    m = json.loads((path / "manifest.json").read_text())
    kv = [t for t in m["engine"]["io"]["inputs"] if t["name"].startswith("past_key_values")]
    assert kv and all(t["dtype"] == "half" for t in kv)
    assert "SM75" in m["engine"]["compute_capabilities"] or m["engine"]["flavour"] == "tensorrt"


@pytest.mark.parametrize("case", FAMILY_CASES + ["gemma2"])
def test_trt_native_graph(case, artifacts):
    """Op list: one Attention (+2 RotaryEmbedding) per layer without softcap, decomposed fallback otherwise;
    numerics: equal to the unfused graph on ONNX Runtime."""
    path = artifacts(case, "static", lowering="trt-native", logits="all")
    spec = load_spec(json.loads((path / "manifest.json").read_text())["model"]["source"])
    ops = [n.op_type for n in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node]
    native = 0 if spec.attn_softcap else spec.num_layers
    assert ops.count("Attention") == native and ops.count("RotaryEmbedding") == 2 * native
    from graphs.scopes import norms as norm_scopes

    assert ops.count("RMSNormalization") == (2 * native if spec.qk_norm else 0) + len(norm_scopes(spec))
    assert "ReduceMean" not in ops or spec.attn_softcap  # only a decomposed (softcap) layer keeps its q/k maths
    assert ops.count("ScatterElements") >= 2 * spec.num_layers  # KV updates (+ the MoE's routing scatter)
    assert not any(op.startswith("com.microsoft") for op in ops)
    ref = OrtSession(artifacts(case, "static", lowering="reference", logits="all"), threads=2)
    low = OrtSession(path, threads=2)
    for a, b in zip(run_steps(ref), run_steps(low)):
        assert np.abs(a - b).max() < 1e-4


def test_missing_tensorrt_gives_clear_error(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(EngineError, match="tensorrt-rtx-cu13-libs"):
        build(str(checkpoints("qwen2_window")), backend="tensorrt", out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    from export.__main__ import main

    assert main(["build", "--model", str(checkpoints("qwen2_window")), "--backend", "tensorrt",
                 "--out", str(tmp_path / "y")]) == 2
    assert "no TensorRT found" in capsys.readouterr().err


def test_trt_plugin_without_full_tensorrt_is_refused_before_the_export(checkpoints, tmp_path, monkeypatch):
    # TensorRT-RTX alone (no Python plugin API): said at once, not after tracing and exporting the whole model
    import export.build as build_mod

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(build_mod, "trace_graph", lambda *a, **k: pytest.fail("the export ran"))
    with pytest.raises(EngineError, match="full TensorRT not found"):
        build(str(checkpoints("qwen2_window")), backend="tensorrt", lowering="trt-plugin", out=tmp_path / "x",
              progress=False)
    assert not (tmp_path / "x").exists()


def test_tensorrt_rejects_ort_lowering(checkpoints, tmp_path):
    if not HAVE_TRT:
        pytest.skip("neither tensorrt nor tensorrt_rtx_bindings is installed")
    with pytest.raises(ValueError, match="--lowering ort is for ONNX Runtime"):
        build(str(checkpoints("qwen2_window")), backend="tensorrt", lowering="ort", out=tmp_path / "x",
              progress=False)


@needs_trt
@pytest.mark.parametrize("kwargs, match", [
    # both used to export the whole model, then fail inside TensorRT
    (dict(kv_mode="concat"), "TensorRT engines are built on the static KV buffers"),
    (dict(lowering="reference", quantize="int4", group_size=64), "refused by TensorRT"),
    (dict(lowering="reference", quantize="int8"), "refused by TensorRT"),
])
def test_tensorrt_refuses_what_it_cannot_build_before_any_work(checkpoints, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(str(checkpoints("qwen2_window")), backend="tensorrt", out=tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


@needs_trt
def test_fp8_bundle_builds_its_engine_on_the_device(checkpoints, tmp_path):
    # export engine used to compile an fp8 graph for SM80/86, which have no FP8: Myelin refused it
    from artifacts.bundle import open_artifact
    from artifacts.edge import pack
    from export.edge_cmd import engine

    art = build(str(checkpoints("qwen2_window")), backend="tensorrt", quantize="fp8", out=tmp_path / "art",
                progress=False, max_seq_len=64)
    m = open_artifact(engine(str(pack(art, tmp_path / "b.tar")), str(tmp_path / "device")))
    assert m.engine.compute_capabilities == ("SM89", "SM120") == tuple(open_artifact(art).engine.compute_capabilities)


@needs_trt
def test_tensorrt_build_stdout_is_the_artifact_path(checkpoints, tmp_path):
    """TensorRT's own log lines go to stderr through our logger (trt.Logger prints to stdout): a script reading the
    build's stdout gets the artifact path and nothing else from TensorRT."""
    import subprocess
    from pathlib import Path

    out = tmp_path / "engine-art"
    done = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(checkpoints("qwen2_window")),
                           "--backend", "tensorrt", "--max-seq-len", "32", "--max-batch", "1", "--no-progress",
                           "--out", str(out)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[TRT]" not in done.stdout and done.stdout.strip().splitlines()[-1] == str(out.resolve()), done.stdout


@needs_trt
def test_engine_artifact_runs_its_graph_on_cpu_and_refuses_trt_here(engines, checkpoints, hf_model):
    """On a CPU-only machine the runtime runs a TensorRT artifact's trt-native graph with ONNX Runtime (same
    greedy tokens as HF) and asking for the engine gives a clear error instead of a crash."""
    from artifacts.bundle import ArtifactError
    from runtime_py.generate import Generator
    from runtime_py.sampling import SamplingParams

    path = engines("qwen3_moe_mixed")
    gen = Generator(path, threads=2)
    tokens = gen.generate([PROMPT], SamplingParams(greedy=True, max_new_tokens=16, ignore_eos=True)).tokens[0]
    assert tokens == hf_greedy(hf_model(checkpoints("qwen3_moe_mixed")), PROMPT, 16)
    with pytest.raises(ArtifactError, match="needs a CUDA GPU"):
        Generator(path, backend="tensorrt")
    # the CLI's --backend: tensorrt insists (exit 2, one line), onnxruntime runs the graph, as auto does here
    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "runtime_py", "generate", str(path), "--prompt-ids",
                               ",".join(map(str, PROMPT)), "--max-new-tokens", "4", "--ignore-eos", "--json",
                               *extra], capture_output=True, text=True, timeout=120, cwd=REPO)
    refused = cli("--backend", "tensorrt")
    assert refused.returncode == 2 and "--backend onnxruntime" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    for extra in ((), ("--backend", "onnxruntime")):
        done = cli(*extra)
        assert done.returncode == 0 and json.loads(done.stdout)["tokens"] == tokens[:4], done.stderr


def test_engine_version_and_device_checks():
    from artifacts.bundle import ArtifactError
    from artifacts.manifest import Engine
    from runtime_py.trt_session import check_engine

    manifest = Engine(file="model.engine", flavour="tensorrt_rtx", version="1.7.1.116", profiles={},
                      inputs=(), outputs=(), compute_capabilities=("SM80", "SM86", "SM89", "SM120"))
    check_engine(manifest, "1.7.1.116", (8, 9))
    with pytest.raises(ArtifactError, match="built with tensorrt_rtx 1.7.1.116, this machine has 1.8.0"):
        check_engine(manifest, "1.8.0", (8, 9))
    with pytest.raises(ArtifactError, match="this GPU is SM90; the TensorRT-RTX engine targets .* builds for no other"):
        check_engine(manifest, "1.7.1.116", (9, 0))
    with pytest.raises(ArtifactError, match="needs a CUDA GPU"):
        check_engine(manifest, "1.7.1.116", None)
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        check_engine(None, "1.7.1.116", (8, 9))


def test_tensorrt_session_on_an_artifact_without_an_engine_says_so(artifacts):
    # it used to say "this engine was built with tensorrt, which is not installed"
    from artifacts.bundle import ArtifactError
    from runtime_py.trt_session import TrtSession

    with pytest.raises(ArtifactError, match="the artifact has no TensorRT engine"):
        TrtSession(artifacts("qwen2_window"))


@needs_trt
def test_bf16_engine_builds(engines):
    path = engines("qwen3_moe_mixed", "bf16")
    m = json.loads((path / "manifest.json").read_text())
    kv = [t for t in m["engine"]["io"]["inputs"] if t["name"].startswith("past_key_values")]
    assert kv and all(t["dtype"] == "bf16" for t in kv)
    assert m["graphs"]["decoder"]["fusion"]["attention_fused"] == 4  # rope caches in bf16, like the activations


def test_bf16_for_onnxruntime_is_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="no bf16 kernels on the CPU"):
        build(str(checkpoints("qwen2_window")), precision="bf16", out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
