"""The fused mixture-of-experts node, shared by graphs/ (which emits it) and the TensorRT plugin; its torch
reference, its Triton kernels and its TensorRT registration.

What it does: defines the canonical fused MoE op (domain ``llm_export``, op ``MoE``) that ``graphs/fuse.py`` puts
in place of each sparse layer's MoE region: router logits (x @ router_weight), softmax in fp32, top-k, optional
renormalisation of the top-k weights (``norm_topk_prob``), gated experts ``act(x @ gate.T) * (x @ up.T) @ down.T``
with ``act`` = ``activation``: ``silu`` (SwiGLU) or ``gelu_tanh`` (tanh-approximated GELU: GeGLU), gate and up
concatenated in ``gate_up [E, 2I, H]``, gate rows first, ``down [E, H, I]``; weighted sum. ``hidden [B,S,H]``,
``router_weight [H,E]``; output ``[B,S,H]``.

Three implementations of one contract:

* :func:`reference`: torch, the maths of ``export.model.MoE`` (same rounding points), run as a loop over the
  experts that received tokens; both activations.
* :func:`triton_forward`: routing in torch (:func:`route`: one small matmul, fp32 softmax, top-k, renorm; shared
  with the reference so both pick the same experts), then two Triton kernels (silu only:
  :data:`KERNEL_ACTIVATIONS`) over a tile list built from the tokens sorted by expert: ``_moe_gate_up_kernel``
  (x @ gate/up rows of the tile's expert, silu(gate) * up) and ``_moe_down_kernel`` (@ down, times the routing
  weight, written to the token's (token, k) slot); the k slots of each token are then summed in fp32 (the
  scatter-add, deterministic). A tile is (expert, up to BLOCK_M of its
  tokens); experts with no tokens have no tiles, so they cost nothing. The grid is an upper bound on the tile
  count computed without a host sync (spare programs exit at once), so the launch can be graph-captured.
* :func:`register_trt_plugin`: TensorRT ``tensorrt.plugin`` registration (untested here, see its docstring),
  called through plugins/registry.py by the engine build and the TensorRT session.

Importing this module needs neither torch nor triton; :func:`_kernels` jit-wraps the kernels on first launch
(without a GPU, set ``TRITON_INTERPRET=1`` before triton is imported to run them in its CPU interpreter).

What it does not do: gelu_tanh in the Triton kernels (so the TensorRT plugin; the ``trt-plugin`` lowering leaves such
MoE layers decomposed), or an ahead-of-time (single kernel) TensorRT implementation.
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
    "activation": str,  # "silu": SwiGLU experts; "gelu_tanh": GeGLU (tanh-approximated GELU) experts
}
ACTIVATIONS = ("silu", "gelu_tanh")  # what the node (and :func:`reference`) defines
KERNEL_ACTIVATIONS = ("silu",)  # what the Triton kernels, and so the TensorRT plugin, implement
VALUES = {"activation": ACTIVATIONS}  # the values a string attribute may take


# ---- routing (torch, shared) -----------------------------------------------------------------------------------

def route(hidden, router_weight, top_k: int, norm_topk_prob: int):
    """Top-k experts per token: ``(weights [N,K] fp32, experts [N,K] int64)`` for ``hidden [..., H]``.

    Router logits in the activation dtype (as the decoder's nn.Linear), softmax in fp32, top-k, renormalised to
    sum 1 when ``norm_topk_prob``. The weights are rounded to the activation dtype (the decoder multiplies in it)
    and returned as fp32."""
    import torch

    xt = hidden.reshape(-1, hidden.shape[-1])
    probs = torch.softmax((xt @ router_weight).float(), dim=-1)  # [N,E]
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(hidden.dtype).float(), top_i


def _check_activation(activation: str, implemented=ACTIVATIONS) -> None:
    if activation not in implemented:
        raise NotImplementedError(f"MoE experts implement activations {implemented}, got {activation!r}")


def _act(x, activation: str):
    import torch.nn.functional as F

    return F.silu(x) if activation == "silu" else F.gelu(x, approximate="tanh")


# ---- torch reference -------------------------------------------------------------------------------------------

def reference(hidden, router_weight, gate_up, down, *, num_experts: int, top_k: int, norm_topk_prob: int = 0,
              moe_intermediate_size: int | None = None, activation: str = "silu", routing=None):
    """The node in torch: ``output [B,S,H]`` in hidden's dtype.

    Per expert with tokens: ``act(x @ gate.T) * (x @ up.T) @ down.T`` in the activation dtype, times the routing
    weight, accumulated over the token's k experts in fp32 (the decoder's dense einsum form gives the same sum;
    experts a token did not pick contribute exact zeros there). ``routing``: a ``(weights, experts)`` pair from
    :func:`route` to use instead of routing here (to run fp32 maths on the experts an fp16 router picked)."""
    import torch

    _check_activation(activation)
    shape = hidden.shape
    xt = hidden.reshape(-1, shape[-1])  # [N,H]
    weights, experts = routing if routing is not None else route(hidden, router_weight, top_k, norm_topk_prob)
    I = gate_up.shape[1] // 2
    out = torch.zeros(xt.shape, dtype=torch.float32, device=xt.device)
    for e in torch.unique(experts).tolist():  # only experts that received tokens
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        gu = xt[tok] @ gate_up[e].T  # [n,2I]
        h = _act(gu[:, :I], activation) * gu[:, I:]
        y = h @ down[e].T  # [n,H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(hidden.dtype).reshape(shape)


# ---- Triton kernels --------------------------------------------------------------------------------------------
# Plain functions until _kernels() wraps them. Both kernels: program (t, n-block) handles tile t = (expert e, rows
# [start, start + BLOCK_M) of the expert-sorted token list, clipped to the expert's end); e < 0 marks a spare
# program. Matmuls accumulate in fp32; gate, up, silu(gate) * up and the expert output are rounded to the
# activation dtype where the decoder rounds them.

tl = None  # triton.language in the namespaces _kernels() builds


class constexpr:  # noqa: N801  stands in for tl.constexpr in the kernel signatures (rebound by _kernels())
    pass


def _moe_gate_up_kernel(x_ptr, w_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr, act_ptr, H, I,
                        TOPK: constexpr, DOT_PRECISION: constexpr, DOT_F32: constexpr, BLOCK_M: constexpr,
                        BLOCK_N: constexpr, BLOCK_K: constexpr):
    """act[row, n] = silu(x[tok] @ gate_up[e, n]) * (x[tok] @ gate_up[e, I + n]) for the tile's rows."""
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        DT: tl.constexpr = act_ptr.dtype.element_ty
        e64 = e.to(tl.int64)
        rows = tl.load(tile_start_ptr + t) + tl.arange(0, BLOCK_M)
        rmask = rows < tl.load(expert_end_ptr + e)
        tok = (tl.load(sorted_ptr + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        gate_rows = (e64 * 2 * I + n) * H  # [BN]
        up_rows = gate_rows + I * H
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < H
            x = tl.load(x_ptr + tok[:, None] * H + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wm = nmask[:, None] & kmask[None, :]
            wg = tl.load(w_ptr + gate_rows[:, None] + kk[None, :], mask=wm, other=0.0)
            wu = tl.load(w_ptr + up_rows[:, None] + kk[None, :], mask=wm, other=0.0)
            if DOT_F32:  # the interpreter cannot multiply bf16 (raw uint16); fp32 operands give the same products
                x = x.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            acc_g += tl.dot(x, tl.trans(wg), input_precision=DOT_PRECISION)
            acc_u += tl.dot(x, tl.trans(wu), input_precision=DOT_PRECISION)
        g = acc_g.to(DT).to(tl.float32)
        u = acc_u.to(DT).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * I + n[None, :], (a * u).to(DT),
                 mask=rmask[:, None] & nmask[None, :])


def _moe_down_kernel(act_ptr, w_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr, weight_ptr,
                     out_ptr, H, I, DOT_PRECISION: constexpr, DOT_F32: constexpr, BLOCK_M: constexpr,
                     BLOCK_N: constexpr, BLOCK_K: constexpr):
    """out[slot, n] = (act[row] @ down[e, n]) * routing weight, slot = token * top_k + k (fp32, written once)."""
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        DT: tl.constexpr = act_ptr.dtype.element_ty
        rows = tl.load(tile_start_ptr + t) + tl.arange(0, BLOCK_M)
        rmask = rows < tl.load(expert_end_ptr + e)
        slot = tl.load(sorted_ptr + rows, mask=rmask, other=0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < H
        w_rows = (e.to(tl.int64) * H + n) * I  # [BN]
        a_rows = rows.to(tl.int64) * I
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < I
            a = tl.load(act_ptr + a_rows[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        y = acc.to(DT).to(tl.float32) * tl.load(weight_ptr + slot, mask=rmask, other=0.0)[:, None]
        tl.store(out_ptr + slot[:, None] * H + n[None, :], y, mask=rmask[:, None] & nmask[None, :])


_KERNEL_NAMES = ("_moe_gate_up_kernel", "_moe_down_kernel")
_KERNELS: list = []


def _kernels():
    """The kernels, jit-wrapped once in a copy of this module's namespace (plugins/_triton_jit.py)."""
    if not _KERNELS:
        from plugins._triton_jit import jit_namespace

        _KERNELS.append(jit_namespace(globals(), _KERNEL_NAMES, "MoE"))
    return _KERNELS[0]


def tile_plan(experts, num_experts: int, block_m: int):
    """Group the N*K (token, k) slots by expert: ``(sorted_slots [N*K], tile_expert [T], tile_start [T],
    expert_end [E])`` with T = cdiv(N*K, block_m) + min(E, N*K), an upper bound on the number of tiles; tiles
    past the real count have expert -1. No host sync: every size depends only on shapes."""
    import torch

    flat = experts.reshape(-1)
    NK = flat.numel()
    sorted_slots = torch.argsort(flat, stable=True)  # slot = token * K + k, grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]; not bincount, which syncs on CUDA to size its output
    expert_end = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m  # 0 for an expert without tokens: it gets no tile
    tile_end = torch.cumsum(tiles, 0)
    T = -(-NK // block_m) + min(num_experts, NK)
    t = torch.arange(T, device=flat.device)
    te = torch.searchsorted(tile_end, t, right=True)  # expert owning tile t (E when t is spare)
    valid = te < num_experts
    te_c = te.clamp(max=num_experts - 1)
    tile_start = expert_end[te_c] - counts[te_c] + (t - (tile_end[te_c] - tiles[te_c])) * block_m
    tile_expert = torch.where(valid, te_c, -1)
    i32 = torch.int32
    return sorted_slots.to(i32), tile_expert.to(i32), tile_start.to(i32), expert_end.to(i32)


def _launch_config(n_slots: int, interpret: bool) -> dict:
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16 if n_slots <= 256 else 64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def triton_forward(hidden, router_weight, gate_up, down, *, num_experts: int, top_k: int, norm_topk_prob: int = 0,
                   moe_intermediate_size: int | None = None, activation: str = "silu", out=None):
    """The node with the Triton kernels; same arguments and result as :func:`reference`. CPU tensors need
    Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    import torch

    _check_activation(activation, KERNEL_ACTIVATIONS)
    from plugins._triton_jit import check_device

    kern = _kernels()
    interpret = check_device(hidden.device)
    shape, dtype = hidden.shape, hidden.dtype
    H = shape[-1]
    x = hidden.reshape(-1, H).contiguous()
    N = x.shape[0]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    if E != num_experts or (moe_intermediate_size and moe_intermediate_size != I):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} does not match num_experts={num_experts}, "
                         f"moe_intermediate_size={moe_intermediate_size}")
    gate_up, down = gate_up.contiguous(), down.contiguous()
    weights, experts = route(x, router_weight, top_k, norm_topk_prob)
    cfg = _launch_config(N * top_k, interpret)
    sorted_slots, tile_expert, tile_start, expert_end = tile_plan(experts, E, cfg["BLOCK_M"])
    T = tile_expert.numel()
    act = torch.empty(N * top_k, I, dtype=dtype, device=x.device)  # rows in expert-sorted order
    slots = torch.empty(N * top_k, H, dtype=torch.float32, device=x.device)  # (token, k) rows
    blocks = dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                  DOT_F32=interpret and dtype == torch.bfloat16, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kern._moe_gate_up_kernel[(T, -(-I // cfg["BLOCK_N"]))](
        x, gate_up, sorted_slots, tile_expert, tile_start, expert_end, act, H, I, TOPK=top_k, **blocks)
    kern._moe_down_kernel[(T, -(-H // cfg["BLOCK_N"]))](
        act, down, sorted_slots, tile_expert, tile_start, expert_end, weights.reshape(-1).contiguous(), slots, H, I,
        **blocks)
    result = slots.view(N, top_k, H).sum(1).to(dtype).reshape(shape)  # the weighted scatter-add, in fp32
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---- TensorRT registration (untested here) ---------------------------------------------------------------------

def register_trt_plugin() -> str:
    """Register ``llm_export::LlmExportMoE`` with TensorRT's Python plugin API; returns the plugin id.

    UNTESTED HERE: full TensorRT (>= 10.9, module ``tensorrt.plugin``) cannot be installed on the development and CI
    machines, and the GPU test machine has none either (DESIGN.md section 5). The kernels it runs are tested (CPU
    interpreter in the tests, CUDA in ``python -m bench.gpu_suite``). ``register`` (output like hidden), ``autotune``
    (fp16/bf16/fp32; the router weight in that dtype) and a JIT ``impl`` that runs :func:`triton_forward` on
    TensorRT's stream. No ``aot_impl``: TensorRT embeds one kernel per AOT plugin and this node needs routing, sorting
    and two grouped GEMMs, so an engine using it needs Python (and torch) at run time.
    """
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError("register_trt_plugin needs full TensorRT >= 10.9 with its Python plugin API "
                          "(`tensorrt.plugin`): install `tensorrt` (tensorrt-cu12 or tensorrt-cu13, from NVIDIA's "
                          "index) plus `triton` and `torch`; TensorRT-RTX (`tensorrt_rtx`) has no Python plugin "
                          "API") from e
    plugin_id = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
    if plugin_id in _REGISTERED:
        return plugin_id
    from typing import List, Tuple

    TD = trtp.TensorDesc

    @trtp.register(plugin_id)
    def _desc(hidden: TD, router_weight: TD, gate_up: TD, down: TD, num_experts: int, top_k: int,
              norm_topk_prob: int, moe_intermediate_size: int, activation: str) -> Tuple[TD]:
        return hidden.like()

    @trtp.autotune(plugin_id)
    def _autotune(hidden: TD, router_weight: TD, gate_up: TD, down: TD,
                  outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join([t] * 5)) for t in ("FP16", "BF16", "FP32")]

    @trtp.impl(plugin_id)
    def _impl(hidden, router_weight, gate_up, down, num_experts: int, top_k: int, norm_topk_prob: int,
              moe_intermediate_size: int, activation: str, outputs, stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (hidden, router_weight, gate_up, down)]
            triton_forward(*t, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                           moe_intermediate_size=moe_intermediate_size, activation=activation,
                           out=torch.as_tensor(outputs[0], device="cuda"))

    _REGISTERED.add(plugin_id)
    return plugin_id


_REGISTERED: set = set()
