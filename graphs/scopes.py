"""The module scopes the fusion passes find regions by, named once.

The exporter stamps every ONNX node with the torch module path that produced it (``pkg.torch.onnx.name_scopes``),
so a scope is a module path of ``export.model.Decoder`` wrapped by the exporter as ``decoder``. export/model.py
names its modules to match (``Block.attn``, ``Attention.core``, ``Block.moe``, the norms below), export/replicate.py
renames ``layers.{i}`` in copied layers, and graphs/fuse.py and graphs/norms.py look regions up here.
tests/test_graphs.py checks that every scope named here is present in a traced graph.

What it does not do: import torch or onnx_ir; it is names only.
"""

from __future__ import annotations

KEY = "pkg.torch.onnx.name_scopes"  # the node metadata the exporter writes
ROOT = "decoder"  # export/trace.py's wrapper holds the Decoder as `decoder`
LAYER_NORMS = ("attn_norm", "mlp_norm")
SANDWICH_NORMS = ("attn_post_norm", "mlp_post_norm")  # Gemma2 only
FINAL_NORM = f"{ROOT}.norm"


def layer(i: int) -> str:
    return f"{ROOT}.layers.{i}"


def attn(i: int) -> str:
    """The attention block: its projections are `{attn(i)}.q|k|v|o`, its q/k norms `{attn(i)}.q_norm|k_norm`."""
    return f"{layer(i)}.attn"


def attn_core(i: int) -> str:
    """Scores, softmax and the KV write: the region llm_export.Attention replaces."""
    return f"{attn(i)}.core"


def moe(i: int) -> str:
    """Router, top-k and the expert loop of a sparse layer: the region llm_export.MoE replaces."""
    return f"{layer(i)}.moe"


def norms(spec) -> list[str]:
    """Every RMSNorm scope of the model, the final norm last."""
    names = LAYER_NORMS + (SANDWICH_NORMS if spec.sandwich_norm else ())
    return [f"{layer(i)}.{n}" for i in range(spec.num_layers) for n in names] + [FINAL_NORM]
