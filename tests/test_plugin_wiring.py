"""The wiring of plugin registration: who registers which TensorRT plugins, and when (no TensorRT needed).

What it tests: plugins/registry.py reads the plugin names off a graph (ONNX node op types) or a manifest (op
histogram and fusion counts); export/engine.py ``build_engine`` registers exactly the plugins a ``trt-plugin``
graph's nodes name, before TensorRT parses the graph, and refuses clearly (EngineError, exit 2, nothing left behind)
when full TensorRT is missing, with or without TensorRT-RTX installed; runtime_py/trt_session.py registers exactly
the plugins an engine's manifest records before it deserializes the engine, and refuses clearly when TensorRT has no
Python plugin API.

A stand-in ``tensorrt`` module (:func:`_stand_in_tensorrt`) is put in ``sys.modules`` for the registration
checks. It is acceptable here ONLY because these tests test the wiring (that registration is called, with which
plugin names, before the parser / deserializer), not TensorRT or the plugins: the stand-in records what
``register_trt_plugin`` registers through ``tensorrt.plugin.register`` and stops the build at ``OnnxParser`` and the
session at ``Runtime`` (the first TensorRT calls after registration). Whether the registered plugins work in a real
TensorRT is not tested anywhere in this project (full TensorRT cannot be installed here; DESIGN.md section 5).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from plugins import attention as attn
from plugins import moe
from plugins import registry

ATTENTION_ID = f"{attn.PLUGIN_NAMESPACE}::{attn.PLUGIN_NAME}"
MOE_ID = f"{moe.PLUGIN_NAMESPACE}::{moe.PLUGIN_NAME}"


class _Stop(Exception):
    """Raised by the stand-in at the first TensorRT call after registration (the parser, the runtime)."""


def _stand_in_tensorrt(monkeypatch, with_plugin_api: bool = True) -> dict:
    """Put a stand-in ``tensorrt`` (and ``tensorrt.plugin`` unless ``with_plugin_api`` is False: a TensorRT older
    than 10.9) in sys.modules; returns the record it fills: ``registered`` (plugin ids, in order), ``at_parse`` and
    ``at_deserialize`` (what was registered when the parser / runtime was created)."""
    record = {"registered": [], "at_parse": None, "at_deserialize": None}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-stand-in"

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class ILogger:  # what runtime_py.trt_session.stderr_logger subclasses
        Severity = types.SimpleNamespace(WARNING=2)

        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return types.SimpleNamespace()

    def onnx_parser(network, logger):
        record["at_parse"] = list(record["registered"])
        raise _Stop("OnnxParser")

    def runtime(logger):
        record["at_deserialize"] = list(record["registered"])
        raise _Stop("Runtime")

    trt.Logger, trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, ILogger, Builder, onnx_parser, runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    plugin = None
    if with_plugin_api:
        plugin = types.ModuleType("tensorrt.plugin")

        def register(plugin_id):
            def decorate(fn):
                record["registered"].append(plugin_id)
                return fn

            return decorate

        def other_hook(plugin_id):  # autotune / impl / aot_impl: accepted, not recorded
            return lambda fn: fn

        plugin.register = register
        plugin.autotune = plugin.impl = plugin.aot_impl = other_hook
        plugin.TensorDesc = type("TensorDesc", (), {})
        plugin.AutoTuneCombination = type("AutoTuneCombination", (), {"__init__": lambda self, *a, **k: None})
        trt.plugin = plugin
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)  # None: `import tensorrt.plugin` fails
    for module in (attn, moe):  # registration is once per process: start from none, forget the stand-in's after
        monkeypatch.setattr(module, "_REGISTERED", set())
    return record


@pytest.fixture(scope="module")
def plugin_artifact(artifacts):
    """A trt-plugin graph with both plugins (attention on 4 layers, MoE on 1), built for ONNX Runtime (no TensorRT
    needed to export it; shared with tests/test_graphs.py)."""
    return artifacts("qwen3_moe_mixed", "static", lowering="trt-plugin")


def _one_node_graph(path: Path, op_type: str, domain: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain, plugin_namespace=attn.PLUGIN_NAMESPACE)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets), str(path))
    return path


# ---- the registry ----------------------------------------------------------------------------------------------

def test_registry_names_the_plugins_a_graph_or_manifest_needs(monkeypatch):
    assert registry.needed(["Add", "trt.plugins.LlmExportMoE", "MatMul"]) == (moe.PLUGIN_NAME,)
    assert registry.needed(["LlmExportMoE", "LlmExportAttention"]) == (attn.PLUGIN_NAME, moe.PLUGIN_NAME)
    assert registry.needed(["Attention", "com.microsoft.GroupQueryAttention", "MoE"]) == ()
    fusion = {"lowering": "trt-plugin", "attention_fused": 3, "moe_fused": 0, "skipped": [],
              attn.PLUGIN_NAME: 3, moe.PLUGIN_NAME: 0}
    assert registry.needed(registry.manifest_op_types({}, fusion)) == (attn.PLUGIN_NAME,)
    # nothing to register: TensorRT is never imported (here it cannot be)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert registry.register(()) == ()
    assert registry.register_for_manifest("trt-native", {"Attention": 3}, {"attention_fused": 3}) == ()
    with pytest.raises(ImportError, match="pip install tensorrt.*TensorRT-RTX .*no Python plugin API"):
        registry.register([attn.PLUGIN_NAME])
    with pytest.raises(ValueError, match="trt-plugin graph without plugin nodes"):
        registry.register_for_manifest("trt-plugin", {"MatMul": 2}, {"attention_fused": 0})
    with pytest.raises(KeyError, match="unknown plugins"):
        registry.register(["NotOurs"])


def test_registry_imports_nothing_heavy():
    code = ("import sys; import plugins.registry; "
            "bad = [m for m in ('torch', 'triton', 'onnx', 'tensorrt', 'tensorrt_rtx_bindings', 'export', 'graphs', "
            "'runtime_py', 'artifacts') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---- the engine build ------------------------------------------------------------------------------------------

def test_trt_plugin_engine_without_full_tensorrt_fails_clearly(plugin_artifact, tmp_path, monkeypatch, capsys):
    """Full TensorRT absent (TensorRT-RTX, which has no Python plugin API, may be installed): the engine stage and
    `python -m export engine` on a trt-plugin graph stop with the message naming what to install, exit 2, and
    leave no engine and no output directory."""
    from export.build import ENGINE, GRAPH, build_engine_stage
    from export.engine import EngineError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copyfile(plugin_artifact / GRAPH, stage / GRAPH)  # the plugin nodes; no weights needed to refuse
    io = json.loads((plugin_artifact / "manifest.json").read_text())["graphs"]["decoder"]
    with pytest.raises(EngineError, match=r"full TensorRT not found: the graph has TensorRT plugin nodes "
                                          r"\(LlmExportAttention, LlmExportMoE, from the trt-plugin lowering\).*"
                                          r"pip install tensorrt"):
        build_engine_stage(stage, io, "static", 1, 32, "fp32", False)
    assert not (stage / ENGINE).exists()

    from export.__main__ import main

    assert main(["bundle", str(plugin_artifact), "--out", str(tmp_path / "b.tar")]) == 0
    capsys.readouterr()
    assert main(["engine", str(tmp_path / "b.tar"), "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err  # without TensorRT-RTX either, the command stops earlier: no TensorRT
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        pass
    else:  # TensorRT-RTX got as far as the graph: its plugin nodes are refused, by name
        assert "LlmExportAttention, LlmExportMoE" in err and "TensorRT-RTX" in err, err
    assert not (tmp_path / "engine").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "stage"]  # no staging directory left


def test_engine_build_registers_the_graph_plugins_before_parsing(plugin_artifact, tmp_path, monkeypatch):
    """build_engine registers exactly the plugins the graph's nodes name (both, attention only, none), and does so
    before TensorRT's parser is created (stand-in TensorRT: see the module docstring)."""
    from export.build import GRAPH, build_engine_stage
    from export.engine import build_engine

    record = _stand_in_tensorrt(monkeypatch)
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copyfile(plugin_artifact / GRAPH, stage / GRAPH)
    io = json.loads((plugin_artifact / "manifest.json").read_text())["graphs"]["decoder"]
    with pytest.raises(_Stop, match="OnnxParser"):
        build_engine_stage(stage, io, "static", 1, 32, "fp32", False)  # what `export build` runs
    assert record["at_parse"] == [ATTENTION_ID, MOE_ID]

    record = _stand_in_tensorrt(monkeypatch)
    only_attention = _one_node_graph(tmp_path / "attention.onnx", attn.PLUGIN_NAME, "trt.plugins")
    with pytest.raises(_Stop, match="OnnxParser"):
        build_engine(only_attention, tmp_path / "a.engine", "static", 1, 32)
    assert record["at_parse"] == [ATTENTION_ID]

    record = _stand_in_tensorrt(monkeypatch)
    plain = _one_node_graph(tmp_path / "plain.onnx", "Relu", "")
    with pytest.raises(_Stop, match="OnnxParser"):
        build_engine(plain, tmp_path / "p.engine", "static", 1, 32)
    assert record["at_parse"] == []  # no plugin nodes: nothing registered
    assert not any(tmp_path.glob("*.engine"))


# ---- the TensorRT session --------------------------------------------------------------------------------------

def _engine_artifact(plugin_artifact: Path, dest: Path, version: str) -> Path:
    """The trt-plugin artifact as an engine artifact (backend tensorrt, a placeholder engine file, the manifest's
    engine facts as export/engine.py records them): what TrtSession opens."""
    from artifacts.bundle import write_manifest
    from export.engine import ONNX_TO_TRT

    shutil.copytree(plugin_artifact, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    graph = manifest["graphs"]["decoder"]
    (dest / "model.engine").write_bytes(b"placeholder: never deserialized (the stand-in runtime stops first)")

    def facts(tensors):
        return [{"name": t["name"], "dtype": ONNX_TO_TRT[t["dtype"]],
                 "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]} for t in tensors]

    manifest.update(backend="tensorrt", engine={
        "file": "model.engine", "flavour": "tensorrt", "version": version, "device_cc": "SM90",
        "compute_capabilities": ["the build machine's GPU"], "profiles": {"prefill": {}, "decode": {}},
        "io": {"inputs": facts(graph["inputs"]), "outputs": facts(graph["outputs"])}})
    write_manifest(dest, manifest)
    return dest


def test_session_registers_the_engine_plugins_before_deserializing(plugin_artifact, tmp_path, monkeypatch):
    """TrtSession registers exactly the plugins the manifest's graph records, before creating TensorRT's runtime
    (stand-in TensorRT and a stand-in GPU check: see the module docstring); a TensorRT without the Python plugin
    API is refused with the message naming what to install."""
    import runtime_py.trt_session as trt_session
    from artifacts.bundle import ArtifactError

    record = _stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_session, "_cuda_device_cc", lambda: (9, 0))
    path = _engine_artifact(plugin_artifact, tmp_path / "engine-artifact", sys.modules["tensorrt"].__version__)
    with pytest.raises(_Stop, match="Runtime"):
        trt_session.TrtSession(path)
    assert record["at_deserialize"] == [ATTENTION_ID, MOE_ID]

    record = _stand_in_tensorrt(monkeypatch, with_plugin_api=False)  # TensorRT < 10.9
    with pytest.raises(ArtifactError, match=r"plugin nodes \(LlmExportAttention, LlmExportMoE.*pip install tensorrt"):
        trt_session.TrtSession(path)
    assert record["registered"] == [] and record["at_deserialize"] is None
