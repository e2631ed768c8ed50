"""The fused mixture-of-experts node, shared by graphs/ (which emits it) and the TensorRT plugin.

What it does: defines the canonical fused MoE op (domain ``llm_export``, op ``MoE``) that ``graphs/fuse.py`` puts
in place of each sparse layer's MoE region: router logits (x @ router_weight), softmax in fp32, top-k, optional
renormalisation of the top-k weights (``norm_topk_prob``), SwiGLU experts (gate and up concatenated in
``gate_up [E, 2I, H]``, ``down [E, H, I]``), weighted sum.

What it does not do (yet): hold the Triton kernels and the ``tensorrt.plugin`` registration (issue 5).
"""

DOMAIN = "llm_export"
OP = "MoE"

PLUGIN_NAME = "LlmExportMoE"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "llm_export"

INPUTS = ("hidden", "router_weight", "gate_up", "down")  # router_weight [H, E]
OUTPUTS = ("output",)

ATTRS = {
    "num_experts": int,
    "top_k": int,
    "norm_topk_prob": int,
    "moe_intermediate_size": int,
    "activation": str,  # "silu": SwiGLU experts
}
