"""The fused attention node: one name, one attribute set, shared by graphs/ (which emits it) and the TensorRT
plugin (which implements it).

What it does: defines the canonical fused attention op (domain ``llm_export``, op ``Attention``) that
``graphs/fuse.py`` puts in place of each layer's attention region, its inputs/outputs/attributes, and the
TensorRT plugin identity (name, version, namespace) the ``trt-plugin`` lowering renames it to. The node covers
everything between the q/k/v projections and the output projection: per-head q/k RMSNorm, RoPE (inside the node,
from ``cos_cache``/``sin_cache`` rows picked by position), KV update (static buffer at the positions, or concat),
causal mask with optional sliding window, scale, tanh softcap, fp32 softmax.

What it does not do (yet): hold the Triton kernels and the ``tensorrt.plugin`` registration (issue 5).
"""

DOMAIN = "llm_export"
OP = "Attention"

PLUGIN_NAME = "LlmExportAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "llm_export"

INPUTS = ("query", "key", "value", "past_key", "past_value", "position_ids", "attention_mask", "cos_cache",
          "sin_cache", "q_norm_weight", "k_norm_weight")  # attention_mask and the norms may be absent ("")
OUTPUTS = ("output", "present_key", "present_value")

# attribute name -> python type; INT attributes arrive in a TensorRT plugin as int32.
ATTRS = {
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "scale": float,
    "softcap": float,  # 0 = off
    "window": int,  # 0 = full causal; else a query at position p sees keys at p - window < k <= p
    "kv_mode": str,  # "static" (present aliases past, written at position_ids) | "concat"
    "qk_norm": int,  # 1 = RMSNorm q and k per head with q_norm_weight/k_norm_weight before RoPE
    "rms_eps": float,
}
