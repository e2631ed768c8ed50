"""One tracing-friendly decoder for Qwen2/Qwen2.5, Gemma2 and Qwen3-MoE, built from a ModelSpec.

What it does: ``Decoder(spec, kv_mode, dtype, logits)`` is a pure function of its inputs
``(input_ids [B,S], position_ids [B,S], attention_mask, *past)`` returning ``(logits, *present)``: fp32 logits
``[B,S,V]`` of every position (``logits="all"``, what ``load_model`` builds) or ``[B,1,V]`` of the last position only
(``"last"``: the norm and LM head run on one position, which saves most of a long prefill's LM-head work).
Prefill and decode are the same forward. The forward never tests a family; the spec's data picks what is built
(qkv bias, q/k norm, sandwich norms, norm offset, embedding scale, softcaps, windows, dense or MoE MLP).

KV modes (``past``/``present`` per layer: key then value, ``[B, KV, T, D]``):

* ``concat``: ``present = concat(past, new)`` along T. ``attention_mask [B, P+S]`` (1 = real token, 0 = padding)
  marks valid slots; batches are left-padded; query s sits at slot ``P + s``.
* ``static``: ``past`` is a fixed ``[B, KV, M, D]`` buffer; the new keys/values are written at slot
  ``position_ids`` (slot == position, batches right-padded) and ``present`` is the updated buffer. Validity comes
  from positions (a query at position p sees slots <= p), so ``attention_mask`` is not an input in this mode.

Causal and sliding-window masks are built once per forward (a query at slot q sees key slot k when k <= q and,
on a sliding layer, q - k < window, as transformers does).

What it does not do: load weights (``load_model`` below calls weights.py), export ONNX, or own the KV cache
(the runtime does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.options import EAGER_KV_MODE, KV_MODES, LOGITS
from export.spec import ModelSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight already holds any +1 offset), cast back to the activation dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2  # slices, not chunk(): chunk exports as SplitToSequence
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Norm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.float32, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device="meta")
    layer.requires_grad_(False)
    return layer


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, window: int | None, kv_mode: str, dtype: torch.dtype):
        super().__init__()
        H, D = spec.hidden_size, spec.head_dim
        self.window = window
        self.q = _linear(H, spec.num_heads * D, spec.qkv_bias, dtype)
        self.k = _linear(H, spec.num_kv_heads * D, spec.qkv_bias, dtype)
        self.v = _linear(H, spec.num_kv_heads * D, spec.qkv_bias, dtype)
        self.o = _linear(spec.num_heads * D, H, False, dtype)
        self.q_norm = Norm(D, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = Norm(D, spec.rms_norm_eps) if spec.qk_norm else None
        self.core = AttentionCore(spec, window, kv_mode)

    def forward(self, x, cos, sin, mask, write_index, past_k, past_v):
        qn = self.q_norm.weight if self.q_norm is not None else None
        kn = self.k_norm.weight if self.k_norm is not None else None
        out, k_all, v_all = self.core(self.q(x), self.k(x), self.v(x), qn, kn, cos, sin, mask, write_index,
                                      past_k, past_v)
        return self.o(out), k_all, v_all


class AttentionCore(nn.Module):
    """Everything between the q/k/v projections and the output projection: q/k norm, RoPE, KV update, masked
    (windowed, softcapped) attention. It is a module of its own so the exported nodes carry its name scope
    (``graphs.scopes.attn_core``: the attribute names ``Block.attn`` and ``Attention.core`` make it) and
    graphs/fuse.py can replace the whole region by one fused node."""

    def __init__(self, spec: ModelSpec, window: int | None, kv_mode: str):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window, self.kv_mode, self.eps = window, kv_mode, spec.rms_norm_eps
        self.scale, self.cap = spec.attn_scale, spec.attn_softcap

    def forward(self, q, k, v, q_norm_w, k_norm_w, cos, sin, mask, write_index, past_k, past_v):
        B, S, _ = q.shape
        G = self.n_heads // self.n_kv
        q = q.view(B, S, self.n_heads, self.head_dim)  # [B,S,nH,D]
        k = k.view(B, S, self.n_kv, self.head_dim)  # [B,S,KV,D]
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B,KV,S,D]
        if q_norm_w is not None:
            q, k = rms_norm(q, q_norm_w, self.eps), rms_norm(k, k_norm_w, self.eps)
        q = q.transpose(1, 2)  # [B,nH,S,D]
        k = k.transpose(1, 2)  # [B,KV,S,D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if self.kv_mode == "concat":
            k_all = torch.cat([past_k, k], dim=2)  # [B,KV,P+S,D]
            v_all = torch.cat([past_v, v], dim=2)
        else:
            idx = write_index[:, None, :, None].expand(B, self.n_kv, S, self.head_dim)  # slot = position
            k_all = past_k.scatter(2, idx, k)  # [B,KV,M,D]
            v_all = past_v.scatter(2, idx, v)

        qg = q.reshape(B, self.n_kv, G, S, self.head_dim)  # query head h uses kv head h // G
        scores = torch.matmul(qg, k_all.unsqueeze(2).transpose(-1, -2)).float() * self.scale  # [B,KV,G,S,T]
        scores = softcap(scores, self.cap) + mask  # mask [B,1,1,S,T], 0 or a large negative
        probs = torch.softmax(scores, dim=-1).to(v_all.dtype)
        out = torch.matmul(probs, v_all.unsqueeze(2))  # [B,KV,G,S,D]
        out = out.reshape(B, self.n_heads, S, self.head_dim).transpose(1, 2).reshape(B, S, -1)
        return out, k_all, v_all


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.gate = _linear(spec.hidden_size, spec.intermediate_size, False, dtype)
        self.up = _linear(spec.hidden_size, spec.intermediate_size, False, dtype)
        self.down = _linear(spec.intermediate_size, spec.hidden_size, False, dtype)
        self.act = spec.hidden_act

    def forward(self, x):
        return self.down(activation(self.gate(x), self.act) * self.up(x))


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


class MoE(nn.Module):
    """Router (softmax in fp32, top-k, optional renormalisation) and SwiGLU experts.

    The reference form runs every expert on every token and weights the results by the (mostly zero) routing
    matrix: exact, traceable and simple; the graph passes replace it with a fused MoE node for real runs.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        E, H, I = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.top_k, self.norm_topk_prob, self.act = spec.top_k, spec.norm_topk_prob, spec.hidden_act
        self.router = _linear(H, E, False, dtype)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device="meta"), requires_grad=False)
        self.down = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device="meta"), requires_grad=False)

    def forward(self, x):
        B, S, H = x.shape
        xt = x.reshape(B * S, H)  # [N,H]
        probs = torch.softmax(self.router(xt).float(), dim=-1)  # [N,E] fp32
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # [N,K]
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(1, top_i, top_w).to(x.dtype)  # [N,E]
        gate_up = torch.einsum("nh,eih->eni", xt, self.gate_up)  # [E,N,2I]
        half = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :half], gate_up[..., half:]
        y = torch.einsum("eni,ehi->enh", activation(gate, self.act) * up, self.down)  # [E,N,H]
        out = torch.einsum("enh,ne->nh", y, routing)
        return out.reshape(B, S, H)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, i: int, kv_mode: str, dtype: torch.dtype):
        super().__init__()
        layer, eps = spec.layers[i], spec.rms_norm_eps
        self.attn_norm = Norm(spec.hidden_size, eps)
        self.attn = Attention(spec, layer.window, kv_mode, dtype)
        self.attn_post_norm = Norm(spec.hidden_size, eps) if spec.sandwich_norm else None
        self.mlp_norm = Norm(spec.hidden_size, eps)
        self.mlp = MLP(spec, dtype) if layer.mlp == "dense" else None
        self.moe = MoE(spec, dtype) if layer.mlp == "moe" else None
        self.mlp_post_norm = Norm(spec.hidden_size, eps) if spec.sandwich_norm else None

    def forward(self, x, cos, sin, mask, write_index, past_k, past_v):
        h, k, v = self.attn(self.attn_norm(x), cos, sin, mask, write_index, past_k, past_v)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp_norm(x)
        h = self.mlp(h) if self.mlp is not None else self.moe(h)
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h, k, v


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec, kv_mode: str, dtype: torch.dtype, logits: str):
        super().__init__()
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        self.spec, self.kv_mode, self.dtype, self.logits = spec, kv_mode, dtype, logits
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device="meta")
        self.layers = nn.ModuleList(Block(spec, i, kv_mode, dtype) for i in range(spec.num_layers))
        self.norm = Norm(spec.hidden_size, spec.rms_norm_eps)
        if spec.task == "causal-lm":
            self.lm_head = _linear(spec.hidden_size, spec.vocab_size, False, dtype)
        else:  # transformers' `score` / `qa_outputs`
            self.head = _linear(spec.hidden_size, spec.num_labels, spec.head_bias, dtype)
        self.requires_grad_(False)
        inv_freq, self.rope_scale = spec.rope.inv_freq_and_scale(spec.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.windows = sorted({layer.window for layer in spec.layers if layer.window is not None})

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B,1,S,D]
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(self.dtype), sin.to(self.dtype)

    def masks(self, position_ids, attention_mask, total_len: int) -> dict[int | None, torch.Tensor]:
        """Additive fp32 masks [B,1,1,S,T] keyed by window (None = full causal)."""
        S = position_ids.shape[1]
        k_slot = torch.arange(total_len, device=position_ids.device)  # [T]
        if self.kv_mode == "concat":
            q_slot = (torch.arange(S, device=position_ids.device) + (total_len - S))[None, :, None]  # [1,S,1]
            valid = attention_mask[:, None, :] > 0  # [B,1,T]
        else:
            q_slot = position_ids[:, :, None]  # [B,S,1]
            valid = None
        causal = k_slot[None, None, :] <= q_slot  # [B,S,T]
        allowed = {None: causal if valid is None else causal & valid}
        for w in self.windows:
            allowed[w] = allowed[None] & (q_slot - k_slot[None, None, :] < w)
        neg = torch.finfo(torch.float32).min
        return {w: torch.where(a, 0.0, neg)[:, None, None] for w, a in allowed.items()}

    def forward(self, input_ids, position_ids, attention_mask, *past):
        x = self.embed(input_ids)
        if self.spec.embed_scale is not None:
            x = x * self.spec.embed_scale  # a Python scalar: rounded to x's dtype, as HF does
        cos, sin = self.rope(position_ids)
        masks = self.masks(position_ids, attention_mask, past[0].shape[2] + (
            input_ids.shape[1] if self.kv_mode == "concat" else 0))
        presents = []
        for i, block in enumerate(self.layers):
            x, k, v = block(x, cos, sin, masks[block.attn.window], position_ids, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        if self.spec.task != "causal-lm":
            return (*self.task_head(x, input_ids), *presents)
        if self.logits == "last":
            x = x[:, -1].unsqueeze(1)  # a Gather, so TensorRT infers the static 1 (a Slice gives -1)
        logits = softcap(self.lm_head(self.norm(x)).float(), self.spec.final_softcap)
        return (logits, *presents)

    def task_head(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """transformers' heads (no final softcap: that belongs to the LM head). seq-cls: the rightmost token that
        is not ``pad_token_id`` (the last one when there is none), pooled before the norm and head (both are per
        position, so it equals transformers' pooling after them) -> [B, labels]; token-cls -> [B, S, labels];
        qa -> start_logits, end_logits [B, S]."""
        if self.spec.task == "seq-cls":
            S = input_ids.shape[1]
            if self.spec.pad_token_id is None:
                last = torch.full_like(input_ids[:, 0], S - 1)
            else:
                slots = torch.arange(S, dtype=torch.int64, device=input_ids.device)
                last = (slots * (input_ids != self.spec.pad_token_id).to(torch.int64)).argmax(-1)  # [B]
            x = torch.gather(x, 1, last[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # [B,H]
            return (self.head(self.norm(x)).float(),)
        out = self.head(self.norm(x)).float()
        if self.spec.task == "token-cls":
            return (out,)
        return out[..., 0], out[..., 1]

    def empty_past(self, batch: int, length: int) -> list[torch.Tensor]:
        """Zero KV tensors: length 0 for concat, the buffer length for static."""
        shape = (batch, self.spec.num_kv_heads, length, self.spec.head_dim)
        return [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.spec.num_layers)]


def load_model(model_dir, kv_mode: str = EAGER_KV_MODE, dtype: torch.dtype = torch.float32, progress: bool = False):
    """Build a Decoder returning every position's logits (what the HF comparisons need) and fill it from a
    checkpoint directory, one tensor at a time. Returns (model, spec)."""
    from tqdm import tqdm

    from export.checkpoint import Checkpoint
    from export.spec import load_spec
    from export.weights import check_checkpoint, load_tensor, warn_unexpected, weight_plan

    spec = load_spec(model_dir)
    ckpt = Checkpoint(model_dir)
    plan = weight_plan(spec)
    warn_unexpected(check_checkpoint(spec, ckpt, plan))
    model = Decoder(spec, kv_mode, dtype, logits="all")
    tied = None
    for w in tqdm(plan, desc="loading weights", unit="tensor", disable=not progress):
        if w.name == "lm_head.weight" and spec.tie_embeddings:  # (task heads are never tied)
            tied = w
            continue
        _assign(model, w.name, load_tensor(w, ckpt, dtype, spec.norm_offset))
    if tied is not None:
        model.lm_head.weight = model.embed.weight  # tied: one tensor, not two
    return model.eval(), spec


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))

