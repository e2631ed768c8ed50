"""Which of our TensorRT plugins a graph or an artifact needs, and registering exactly those with TensorRT.

What it does: the ``trt-plugin`` lowering (graphs/lower.py) writes each fused node as a plugin node whose op_type is
the plugin's name (``LlmExportAttention``, ``LlmExportMoE``). TensorRT's ONNX parser (engine build) and its runtime
(deserializing an engine with plugin layers) find those plugins only in its plugin registry, so they must be
registered in the process first. :func:`needed` reads the plugin names off a graph's op types (an ONNX file's
nodes: :func:`onnx_op_types`; or an artifact manifest's ``op_histogram`` keys and ``fusion`` counts:
:func:`manifest_op_types`); :func:`register` registers those plugins (each module's ``register_trt_plugin``) and
nothing else, so a graph without plugin nodes never imports TensorRT here. Called by export/engine.py
``build_engine`` before parsing, and (as :func:`register_for_manifest`) by runtime_py/trt_session.py before
deserializing.

Importing this module needs neither TensorRT, torch, triton nor onnx (the plugin modules import lightly; onnx is
imported by :func:`onnx_op_types` when called).

What it does not do: the registrations themselves (plugins/attention.py, plugins/moe.py), or decide which TensorRT
flavour to load (export/engine.py): TensorRT-RTX has no Python plugin API, so plugin nodes need full TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from plugins import attention, moe

PLUGINS = {attention.PLUGIN_NAME: attention, moe.PLUGIN_NAME: moe}  # plugin name (= node op_type) -> its module

INSTALL_HINT = ("full TensorRT >= 10.9 with its Python plugin API (`tensorrt.plugin`): `pip install tensorrt` "
                "(tensorrt-cu12 or tensorrt-cu13, from NVIDIA's index) plus `triton` and `torch`; TensorRT-RTX "
                "(`tensorrt_rtx`) has no Python plugin API, so for it build with --lowering trt-native")


def needed(op_types: Iterable[str]) -> tuple[str, ...]:
    """The names of our plugins among ``op_types`` (node op types, or manifest op keys ``domain.op_type``), in
    :data:`PLUGINS` order, each once."""
    present = {op.rsplit(".", 1)[-1] for op in op_types}
    return tuple(name for name in PLUGINS if name in present)


def onnx_op_types(onnx_path: Path | str) -> set[str]:
    """The op types of every node in an ONNX file's graph and its local functions (external data not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    for function in model.functions:
        ops.update(node.op_type for node in function.node)
    return ops


def manifest_op_types(op_histogram: dict, fusion: dict) -> set[str]:
    """The op types an artifact's manifest records for a graph: its ``op_histogram`` keys plus the ``fusion`` count
    keys that are nonzero (the trt-plugin lowering counts its plugin nodes there by plugin name)."""
    counted = {key for key, value in fusion.items() if isinstance(value, int) and not isinstance(value, bool)
               and value > 0}
    return set(op_histogram) | counted


def register(names: Iterable[str]) -> tuple[str, ...]:
    """Register the named plugins with TensorRT's Python plugin API; their plugin ids (``namespace::name``).
    Idempotent per process. ImportError naming what to install when full TensorRT with ``tensorrt.plugin`` is not
    importable; KeyError for a name that is not one of :data:`PLUGINS`."""
    names = tuple(names)
    unknown = [n for n in names if n not in PLUGINS]
    if unknown:
        raise KeyError(f"unknown plugins {unknown}; ours are {list(PLUGINS)}")
    if not names:
        return ()
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the graph has TensorRT plugin nodes ({', '.join(names)}, from the trt-plugin "
                          f"lowering), which need {INSTALL_HINT}") from e
    return tuple(PLUGINS[name].register_trt_plugin() for name in names)


def register_for_manifest(lowering: str, op_histogram: dict, fusion: dict) -> tuple[str, ...]:
    """Register the plugins an artifact's graph has nodes for, from what its manifest records (``lowering``,
    ``op_histogram``, ``fusion``); their ids, () for a graph without plugin nodes (TensorRT is not imported then).
    ImportError as :func:`register`; ValueError for a trt-plugin graph whose manifest records no plugin nodes."""
    names = needed(manifest_op_types(op_histogram, fusion))
    if lowering == "trt-plugin" and not names:
        raise ValueError("the manifest records a trt-plugin graph without plugin nodes (op_histogram, fusion): "
                         "rebuild the artifact")
    return register(names)
