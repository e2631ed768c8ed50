"""The fused attention node: one name, one attribute set, shared by graphs/ (which emits it) and the TensorRT
plugin (which implements it); its torch reference, its Triton kernels and its TensorRT registration.

What it does: defines the canonical fused attention op (domain ``llm_export``, op ``Attention``) that
``graphs/fuse.py`` puts in place of each layer's attention region, its inputs/outputs/attributes, and the
TensorRT plugin identity (name, version, namespace) the ``trt-plugin`` lowering renames it to. The node covers
everything between the q/k/v projections and the output projection: per-head q/k RMSNorm, RoPE (inside the node,
from ``cos_cache``/``sin_cache`` rows picked by position), KV update (static buffer at the positions, or concat),
causal mask with optional sliding window, scale, tanh softcap, fp32 softmax.

Layouts: ``query [B,S,nH*D]``, ``key``/``value [B,S,KV*D]``, ``past_key``/``past_value [B,KV,M,D]``,
``position_ids [B,S] int64``, ``cos_cache``/``sin_cache [max_len, D/2]`` (any float dtype; rounded to the
activation dtype as the decoder does), ``q_norm_weight``/``k_norm_weight [D]`` or None. Outputs: ``output
[B,S,nH*D]`` and the updated buffers (static mode: slot == position, present aliases past in TensorRT).

Three implementations of one contract:

* :func:`reference`: torch, the same ops in the same dtypes as ``export.model.AttentionCore`` (static and
  concat KV modes).
* :func:`triton_forward`: Triton kernels, static KV mode. Two launches: ``_kv_update_kernel`` (k RMSNorm + RoPE,
  then K and V rows written into the buffer at slot = position) and ``_flash_attention_kernel`` (q RMSNorm + RoPE
  applied as q is loaded, then flash attention over the buffer: online fp32 softmax, GQA by packing the G query
  heads of one kv head into the rows of one tile, causal + sliding window from positions, scale, tanh softcap;
  prefill with ragged positions per row and decode S=1 are the same kernel). ``fused_kv_update=True`` runs the
  whole node as ONE launch of the same flash kernel (each program writes its own tokens' K/V and reads the
  current call's keys from the inputs), which needs contiguous positions per row (``pos[b,s] = pos[b,0] + s``,
  what the runtime's static layout produces); it is the kernel the TensorRT AOT path embeds.
* :func:`register_trt_plugin`: TensorRT ``tensorrt.plugin`` registration (untested here, see its docstring),
  called through plugins/registry.py by the engine build and the TensorRT session.

Importing this module needs neither torch nor triton (graphs/ and runtime_py import it for the constants): the
kernels are plain functions that :func:`_kernels` jit-wraps on first launch (plugins/_triton_jit.py, shared with
plugins/moe.py). On a machine without a GPU they run
in Triton's CPU interpreter: set ``TRITON_INTERPRET=1`` before triton is first imported (Triton fixes the mode
then, process-wide).

What it does not do: concat KV mode in the kernels (the reference has it; TensorRT uses the static buffer), split-K
decoding for long caches with few (batch x kv-head) programs, or build engines (export/).
"""

from plugins._triton_jit import check_device, interpreting, jit_namespace  # noqa: F401  interpreting: public here

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
VALUES = {"kv_mode": ("static", "concat")}  # the values a string attribute may take

# The TensorRT plugin's inputs: static KV mode only, so no attention_mask; the norm weights are always present
# (a [D] tensor of ones when qk_norm == 0; unread) because a Python-defined plugin has no optional inputs.
TRT_INPUTS = tuple(name for name in INPUTS if name != "attention_mask")

_NO_WINDOW = 1 << 30  # window 0 (full causal) is run as a window no position difference reaches


# ---- torch reference -------------------------------------------------------------------------------------------

def reference(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
              q_norm_weight=None, k_norm_weight=None, *, num_heads: int, num_kv_heads: int, head_dim: int,
              scale: float, softcap: float = 0.0, window: int = 0, kv_mode: str = "static", qk_norm: int = 0,
              rms_eps: float = 1e-6):
    """The node in torch: returns ``(output [B,S,nH*D], present_key, present_value)``.

    Same ops, order and dtypes as ``export.model.AttentionCore`` with the decoder's RoPE tables and masks:
    RMSNorm in fp32 then cast; RoPE (rotate-half) in the activation dtype; scores from a matmul in the activation
    dtype, then fp32, scaled, softcapped, masked with ``finfo(fp32).min``; fp32 softmax; probabilities cast back for
    the value matmul. Static mode writes the new rows at slot = position (a new tensor; the caller may alias it);
    concat mode appends them and reads validity from ``attention_mask [B, P+S]`` (left padding).
    """
    import torch

    B, S, _ = query.shape
    nH, KV, D = num_heads, num_kv_heads, head_dim
    G = nH // KV
    q = query.reshape(B, S, nH, D)
    k = key.reshape(B, S, KV, D)
    v = value.reshape(B, S, KV, D).transpose(1, 2)  # [B,KV,S,D]
    if qk_norm:
        q, k = _rms_norm(q, q_norm_weight, rms_eps), _rms_norm(k, k_norm_weight, rms_eps)
    cos = cos_cache[position_ids].to(query.dtype)  # [B,S,D/2]: the decoder's cos(pos * inv_freq) * scale
    sin = sin_cache[position_ids].to(query.dtype)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]  # [B,1,S,D]
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B,nH,S,D], [B,KV,S,D]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    if kv_mode == "concat":
        k_all, v_all = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)  # [B,KV,P+S,D]
        T = k_all.shape[2]
        q_slot = (torch.arange(S, device=query.device) + (T - S))[None, :, None]  # [1,S,1]
        valid = attention_mask[:, None, :] > 0  # [B,1,T]
    elif kv_mode == "static":
        idx = position_ids[:, None, :, None].expand(B, KV, S, D)  # slot = position
        k_all, v_all = past_key.scatter(2, idx, k), past_value.scatter(2, idx, v)  # [B,KV,M,D]
        T = k_all.shape[2]
        q_slot, valid = position_ids[:, :, None], None  # [B,S,1]
    else:
        raise ValueError(f"kv_mode must be 'static' or 'concat', got {kv_mode!r}")
    k_slot = torch.arange(T, device=query.device)[None, None, :]
    allowed = k_slot <= q_slot
    if valid is not None:
        allowed = allowed & valid
    if window:
        allowed = allowed & (q_slot - k_slot < window)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]  # [B,1,1,S,T]

    qg = q.reshape(B, KV, G, S, D)  # query head h uses kv head h // G
    scores = torch.matmul(qg, k_all.unsqueeze(2).transpose(-1, -2)).float() * scale  # [B,KV,G,S,T]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores + mask, dim=-1).to(v_all.dtype)
    out = torch.matmul(probs, v_all.unsqueeze(2))  # [B,KV,G,S,D]
    out = out.reshape(B, nH, S, D).transpose(1, 2).reshape(B, S, nH * D)
    return out, k_all, v_all


def _rms_norm(x, weight, eps: float):
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight).to(x.dtype)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---- Triton kernels --------------------------------------------------------------------------------------------
# Plain functions until _kernels() wraps them (see the module docstring). Every matmul accumulates in fp32;
# rounding to the activation dtype happens where the decoder rounds (after the norm, after RoPE, the probabilities
# before the value matmul).

tl = None  # triton.language in the namespaces _kernels() builds


class constexpr:  # noqa: N801  stands in for tl.constexpr in the kernel signatures (rebound by _kernels())
    pass


def _rms_rope(x1, x2, w_ptr, cos_ptr, sin_ptr, pos, d, dmask, rmask, eps,
              D: constexpr, QK_NORM: constexpr, DT: constexpr):
    """RMSNorm (optional) + rotate-half RoPE of rows held as halves x1 = x[:, :D/2], x2 = x[:, D/2:] (fp32).
    pos [R] int64 picks the cos/sin rows. Returns the rotated halves in fp32, already rounded to DT."""
    HALF: tl.constexpr = D // 2
    if QK_NORM:
        ms = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D
        r = 1.0 / tl.sqrt(ms + eps)
        w1 = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        x1 = (x1 * r[:, None] * w1[None, :]).to(DT).to(tl.float32)
        x2 = (x2 * r[:, None] * w2[None, :]).to(DT).to(tl.float32)
    m2 = rmask[:, None] & dmask[None, :]
    cs = pos[:, None] * HALF + d[None, :]
    c = tl.load(cos_ptr + cs, mask=m2, other=0.0).to(DT).to(tl.float32)
    s = tl.load(sin_ptr + cs, mask=m2, other=0.0).to(DT).to(tl.float32)
    return (x1 * c - x2 * s).to(DT).to(tl.float32), (x2 * c + x1 * s).to(DT).to(tl.float32)


def _kv_update_kernel(k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, knw_ptr, pk_ptr, pv_ptr, n_tokens, S, M, eps,
                      KV: constexpr, D: constexpr, QK_NORM: constexpr, HALF_BLOCK: constexpr,
                      BLOCK_T: constexpr):
    """Grid (cdiv(B*S, BLOCK_T), KV): k RMSNorm + RoPE, then K and V rows -> buffer [B,KV,M,D] at slot = pos."""
    HALF: tl.constexpr = D // 2
    DT: tl.constexpr = pk_ptr.dtype.element_ty
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = t < n_tokens
    t = t.to(tl.int64)
    pos = tl.load(pos_ptr + t, mask=rmask, other=0)
    ok = rmask & (pos >= 0) & (pos < M)  # out-of-range positions write nothing
    d = tl.arange(0, HALF_BLOCK)
    dmask = d < HALF
    src = (t * KV + h) * D  # [T]
    dst = ((t // S * KV + h) * M + pos) * D
    m2 = ok[:, None] & dmask[None, :]
    k1 = tl.load(k_ptr + src[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + src[:, None] + HALF + d[None, :], mask=m2, other=0.0).to(tl.float32)
    k1, k2 = _rms_rope(k1, k2, knw_ptr, cos_ptr, sin_ptr, pos, d, dmask, ok, eps, D, QK_NORM, DT)
    tl.store(pk_ptr + dst[:, None] + d[None, :], k1.to(DT), mask=m2)
    tl.store(pk_ptr + dst[:, None] + HALF + d[None, :], k2.to(DT), mask=m2)
    dd = tl.arange(0, 2 * HALF_BLOCK)
    mv = ok[:, None] & (dd < D)[None, :]
    vrow = tl.load(v_ptr + src[:, None] + dd[None, :], mask=mv, other=0.0)
    tl.store(pv_ptr + dst[:, None] + dd[None, :], vrow.to(pv_ptr.dtype.element_ty), mask=mv)


def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pos_ptr, cos_ptr, sin_ptr, qnw_ptr, knw_ptr,
                            S, M, window, out_ptr, ok_ptr, ov_ptr,
                            H: constexpr, KV: constexpr, D: constexpr, SCALE: constexpr,
                            SOFTCAP: constexpr, EPS: constexpr, QK_NORM: constexpr,
                            FUSED_KV: constexpr, DOT_PRECISION: constexpr, DOT_F32: constexpr,
                            HALF_BLOCK: constexpr,
                            BLOCK_M: constexpr, BLOCK_N: constexpr):
    """Grid (cdiv(S*G, BLOCK_M), B*KV). Row r of a tile is (token s = r // G, query head kvh*G + r % G), so the G
    query heads sharing a kv head share every K/V tile (GQA) and decode (S=1) still fills a tile. Keys are the
    buffer slots [lo, hi) that some row of the tile may see: hi = max position + 1, lo = min position - window + 1.

    Argument order is TensorRT's AOT convention: input pointers (TRT_INPUTS order), int32 scalars, output
    pointers; float attributes are compile-time constants. ``pk``/``ok`` (and ``pv``/``ov``) are the same buffer
    (present aliases past); reads go through pk/pv and writes through ok/ov.

    FUSED_KV: the program also writes its own tokens' K/V into the buffer and takes the keys of this call's slots
    [pos0, pos0 + S) from the key/value inputs (normed and rotated on the fly) instead of the buffer, so no
    program reads a slot another program writes. Needs pos[b, s] = pos[b, 0] + s."""
    HALF: tl.constexpr = D // 2
    G: tl.constexpr = H // KV
    BLOCK_D: tl.constexpr = 2 * HALF_BLOCK
    LOG2E: tl.constexpr = 1.4426950408889634
    DT: tl.constexpr = pk_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // KV).to(tl.int64)
    kvh = bh % KV

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < S * G
    s = r // G
    tok = b * S + s  # [BM] int64
    head = kvh * G + r % G
    pos = tl.load(pos_ptr + tok, mask=rmask, other=0)
    d = tl.arange(0, HALF_BLOCK)
    dmask = d < HALF
    dd = tl.arange(0, BLOCK_D)
    ddmask = dd < D
    m2 = rmask[:, None] & dmask[None, :]

    q_off = (tok * H + head) * D
    q1 = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off[:, None] + HALF + d[None, :], mask=m2, other=0.0).to(tl.float32)
    q1, q2 = _rms_rope(q1, q2, qnw_ptr, cos_ptr, sin_ptr, pos, d, dmask, rmask, EPS, D, QK_NORM, DT)
    q1 = q1.to(DT)
    q2 = q2.to(DT)
    if DOT_F32:  # the interpreter keeps bf16 as raw uint16 and cannot multiply it; fp32 operands, same products
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)

    kv_base = (b * KV + kvh) * M  # first slot of this (batch, kv head) in the buffer
    pos0 = tl.load(pos_ptr + b * S)
    if FUSED_KV:  # rows of query head g == 0 carry each token once: write its K (normed, rotated) and V
        wmask = rmask & (r % G == 0) & (pos >= 0) & (pos < M)
        w2 = wmask[:, None] & dmask[None, :]
        wsrc = (tok * KV + kvh) * D
        wdst = (kv_base + pos) * D
        kw1 = tl.load(k_ptr + wsrc[:, None] + d[None, :], mask=w2, other=0.0).to(tl.float32)
        kw2 = tl.load(k_ptr + wsrc[:, None] + HALF + d[None, :], mask=w2, other=0.0).to(tl.float32)
        kw1, kw2 = _rms_rope(kw1, kw2, knw_ptr, cos_ptr, sin_ptr, pos, d, dmask, wmask, EPS, D, QK_NORM, DT)
        tl.store(ok_ptr + wdst[:, None] + d[None, :], kw1.to(DT), mask=w2)
        tl.store(ok_ptr + wdst[:, None] + HALF + d[None, :], kw2.to(DT), mask=w2)
        wv = wmask[:, None] & ddmask[None, :]
        vw = tl.load(v_ptr + wsrc[:, None] + dd[None, :], mask=wv, other=0.0)
        tl.store(ov_ptr + wdst[:, None] + dd[None, :], vw.to(DT), mask=wv)

    hi = tl.minimum(tl.max(tl.where(rmask, pos, -1), 0) + 1, M).to(tl.int32)
    lo = tl.maximum(tl.min(tl.where(rmask, pos, M), 0) - window + 1, 0).to(tl.int32)
    lo = lo // BLOCK_N * BLOCK_N

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        slot = kv_base + n
        from_buffer = nmask
        if FUSED_KV:  # this call's slots [pos0, pos0 + S) come from the inputs (other programs are writing them)
            from_buffer = nmask & ((n < pos0) | (n >= pos0 + S))
        n2 = from_buffer[:, None] & dmask[None, :]
        k1 = tl.load(pk_ptr + slot[:, None] * D + d[None, :], mask=n2, other=0.0)
        k2 = tl.load(pk_ptr + slot[:, None] * D + HALF + d[None, :], mask=n2, other=0.0)
        nv = from_buffer[:, None] & ddmask[None, :]
        vt = tl.load(pv_ptr + slot[:, None] * D + dd[None, :], mask=nv, other=0.0)
        if FUSED_KV:
            new = nmask & (n >= pos0) & (n < pos0 + S)
            src = ((b * S + (n - pos0)) * KV + kvh) * D
            e2 = new[:, None] & dmask[None, :]
            kn1 = tl.load(k_ptr + src[:, None] + d[None, :], mask=e2, other=0.0).to(tl.float32)
            kn2 = tl.load(k_ptr + src[:, None] + HALF + d[None, :], mask=e2, other=0.0).to(tl.float32)
            kn1, kn2 = _rms_rope(kn1, kn2, knw_ptr, cos_ptr, sin_ptr, n.to(tl.int64), d, dmask, new, EPS, D,
                                 QK_NORM, DT)
            k1 = tl.where(new[:, None], kn1.to(DT), k1)
            k2 = tl.where(new[:, None], kn2.to(DT), k2)
            vn = tl.load(v_ptr + src[:, None] + dd[None, :], mask=new[:, None] & ddmask[None, :], other=0.0)
            vt = tl.where(new[:, None], vn.to(DT), vt)
        if DOT_F32:
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
        z = qk * SCALE
        if SOFTCAP > 0:  # tanh(z / cap) * cap, tanh from exp2 (sign-symmetric, no overflow)
            a = tl.abs(z) * (1.0 / SOFTCAP)
            e = tl.exp2(a * (-2.0 * LOG2E))
            th = (1.0 - e) / (1.0 + e)
            z = tl.where(z < 0, -th, th) * SOFTCAP
        diff = pos[:, None] - n[None, :]
        allowed = (diff >= 0) & (diff < window) & nmask[None, :]
        z = tl.where(allowed, z, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.where(allowed, tl.exp2((z - m_new[:, None]) * LOG2E), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(DT)
        vt = vt.to(DT)
        if DOT_F32:
            p = p.to(tl.float32)
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    o_off = tok * (H * D) + head * D
    tl.store(out_ptr + o_off[:, None] + dd[None, :], o.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & ddmask[None, :])


_KERNEL_NAMES = ("_rms_rope", "_kv_update_kernel", "_flash_attention_kernel")
_KERNELS: list = []


def _kernels():
    """The kernels, jit-wrapped once (in a copy of this module's namespace, where ``tl``, ``constexpr`` and the
    kernels' names mean the jitted objects; the module's own functions stay plain)."""
    if not _KERNELS:
        _KERNELS.append(jit_namespace(globals(), _KERNEL_NAMES, "attention"))
    return _KERNELS[0]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch_config(S: int, G: int, D: int, interpret: bool) -> dict:
    """Tile sizes: small square tiles in the interpreter (numpy per program), wider ones on the GPU; decode
    (S*G rows) gets a small row tile so one tile holds all G heads of a token."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    block_m = 16 if S * G <= 16 else (32 if S * G <= 32 else 64)
    block_n = 64 if D <= 128 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if D <= 128 else 8, num_stages=2)


def triton_forward(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
                   q_norm_weight=None, k_norm_weight=None, *, num_heads: int, num_kv_heads: int, head_dim: int,
                   scale: float, softcap: float = 0.0, window: int = 0, kv_mode: str = "static", qk_norm: int = 0,
                   rms_eps: float = 1e-6, inplace: bool = False, fused_kv_update: bool = False, out=None):
    """The node with the Triton kernels; same arguments and results as :func:`reference` (static KV mode).

    ``inplace=True`` writes the new K/V rows into ``past_key``/``past_value`` and returns them as the presents
    (TensorRT's aliased output); otherwise the buffers are copied first. ``fused_kv_update=True`` runs one launch
    instead of two (needs contiguous positions per row, see the module docstring). ``out`` receives the output if
    given. CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    import torch

    if kv_mode != "static":
        raise NotImplementedError("the attention kernels implement the static KV buffer only (kv_mode='static')")
    kern = _kernels()
    interpret = check_device(query.device)
    B, S, _ = query.shape
    nH, KV, D = num_heads, num_kv_heads, head_dim
    if nH % KV or D % 2:
        raise ValueError(f"need num_heads % num_kv_heads == 0 and an even head_dim, got {nH}, {KV}, {D}")
    G, M = nH // KV, past_key.shape[2]
    dtype = query.dtype
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    position_ids = position_ids.to(torch.int64).contiguous()
    cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    if qk_norm:
        qnw, knw = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    else:
        qnw = knw = cos_cache  # never read (QK_NORM is a compile-time False)
    if inplace and past_key.is_contiguous() and past_value.is_contiguous():
        pk, pv = past_key, past_value
    else:
        pk, pv = past_key.contiguous().clone(), past_value.contiguous().clone()
    if out is None:
        out = torch.empty(B, S, nH * D, dtype=dtype, device=query.device)

    half_block = max(16, _pow2(D // 2))
    cfg = _launch_config(S, G, D, interpret)
    win = int(window) if window else _NO_WINDOW
    if not fused_kv_update:
        block_t = 16
        kern._kv_update_kernel[(triton_cdiv(B * S, block_t), KV)](
            key, value, position_ids, cos_cache, sin_cache, knw, pk, pv, B * S, S, M, float(rms_eps),
            KV=KV, D=D, QK_NORM=bool(qk_norm), HALF_BLOCK=half_block, BLOCK_T=block_t)
    grid = (triton_cdiv(S * G, cfg["BLOCK_M"]), B * KV)
    kern._flash_attention_kernel[grid](
        query, key, value, pk, pv, position_ids, cos_cache, sin_cache, qnw, knw, S, M, win, out, pk, pv,
        H=nH, KV=KV, D=D, SCALE=float(scale), SOFTCAP=float(softcap or 0.0), EPS=float(rms_eps),
        QK_NORM=bool(qk_norm), FUSED_KV=bool(fused_kv_update),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_F32=interpret and dtype == torch.bfloat16,
        HALF_BLOCK=half_block,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, pk, pv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- TensorRT registration (untested here) ---------------------------------------------------------------------

_TRT_DTYPES = ("FP16", "BF16", "FP32")


def register_trt_plugin() -> str:
    """Register ``llm_export::LlmExportAttention`` with TensorRT's Python plugin API; returns the plugin id.

    UNTESTED HERE: full TensorRT (>= 10.9, module ``tensorrt.plugin``) cannot be installed on the development
    and CI machines, and the GPU test machine has none either (DESIGN.md section 5). What is tested is the kernel
    this registers (``triton_forward(..., fused_kv_update=True)``: CPU interpreter in the tests, CUDA in
    ``python -m bench.gpu_suite``) and that :func:`aot_source` compiles for sm_90.

    * ``register``: shapes (output like query; present_key/present_value alias past_key/past_value, which needs
      TensorRT's preview feature for aliased plugin I/O). Inputs are :data:`TRT_INPUTS` (static KV mode).
    * ``autotune``: activation dtype fp16/bf16/fp32; cos/sin caches and norm weights in that dtype or fp32.
    * ``aot_impl``: the single-launch kernel (``_flash_attention_kernel`` with FUSED_KV) compiled to PTX and
      embedded in the engine, so the engine runs without Python (trtexec, C++, Triton's TensorRT backend). TensorRT
      launches exactly one kernel per AOT plugin, hence the fused form; float attributes are compiled in.
    * ``impl``: a JIT fallback that runs :func:`triton_forward` in place on TensorRT's stream (needs torch).

    TensorRT-RTX is no substitute (checked with 1.7.1.116 on the CPU, 2026-11-23): its bindings have the IPluginV3
    classes and its ONNX parser finds a registered Python ``IPluginCreatorV3One`` and calls ``create_plugin``, but
    the process then aborts ("terminate called without an active exception") inside the parser before any plugin
    method is called (every method traced), and the wheel ships no C++ headers for a compiled plugin. So CI cannot
    build the ``trt-plugin`` lowering; it builds ``trt-native``.

    Open questions only a TensorRT run can settle: how the ONNX parser maps the node's empty optional inputs
    (the ``trt-plugin`` lowering must pass :data:`TRT_INPUTS`, norm weights included), INT64 position_ids in a
    plugin, and launching a kernel whose PTX carries Triton's two trailing scratch pointers (unused: checked).
    """
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError("register_trt_plugin needs full TensorRT >= 10.9 with its Python plugin API "
                          "(`tensorrt.plugin`): install `tensorrt` (tensorrt-cu12 or tensorrt-cu13, from NVIDIA's "
                          "index) plus `triton`; TensorRT-RTX (`tensorrt_rtx`) has no Python plugin API") from e
    plugin_id = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
    if plugin_id in _REGISTERED:
        return plugin_id
    from typing import List, Tuple

    TD = trtp.TensorDesc

    @trtp.register(plugin_id)
    def _desc(query: TD, key: TD, value: TD, past_key: TD, past_value: TD, position_ids: TD, cos_cache: TD,
              sin_cache: TD, q_norm_weight: TD, k_norm_weight: TD, num_heads: int, num_kv_heads: int,
              head_dim: int, scale: float, softcap: float, window: int, kv_mode: str, qk_norm: int,
              rms_eps: float) -> Tuple[TD, TD, TD]:
        return query.like(), past_key.aliased(), past_value.aliased()

    @trtp.autotune(plugin_id)
    def _autotune(query: TD, key: TD, value: TD, past_key: TD, past_value: TD, position_ids: TD, cos_cache: TD,
                  sin_cache: TD, q_norm_weight: TD, k_norm_weight: TD,
                  outputs: Tuple[TD, TD, TD]) -> List[trtp.AutoTuneCombination]:
        combos = []
        for t in _TRT_DTYPES:
            for c in sorted({t, "FP32"}):
                for w in sorted({t, "FP32"}):
                    combos.append(trtp.AutoTuneCombination(", ".join([t] * 5 + ["INT64", c, c, w, w] + [t] * 3)))
        return combos

    @trtp.aot_impl(plugin_id)
    def _aot(query: TD, key: TD, value: TD, past_key: TD, past_value: TD, position_ids: TD, cos_cache: TD,
             sin_cache: TD, q_norm_weight: TD, k_norm_weight: TD, num_heads: int, num_kv_heads: int,
             head_dim: int, scale: float, softcap: float, window: int, kv_mode: str, qk_norm: int, rms_eps: float,
             outputs: Tuple[TD, TD, TD], tactic: int):
        import triton

        names = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32", trt.int64: "i64"}
        dtypes = [names[t.dtype] for t in (query, key, value, past_key, past_value, position_ids, cos_cache,
                                           sin_cache, q_norm_weight, k_norm_weight, *outputs)]
        src, options, block_m = aot_source(dtypes, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                           head_dim=head_dim, scale=scale, softcap=softcap, qk_norm=qk_norm,
                                           rms_eps=rms_eps)
        compiled = triton.compile(src, options=options)
        # Triton >= 3.3 appends two scratch pointers to the PTX signature, which TensorRT does not pass; they are
        # only dereferenced when a scratch size is nonzero (tests/test_plugin_kernels.py checks it is zero).
        if compiled.metadata.global_scratch_size or compiled.metadata.profile_scratch_size:
            raise RuntimeError("the attention kernel needs Triton scratch memory, which TensorRT's AOT launch "
                               "cannot provide")
        S, M = query.shape_expr[1], past_key.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(S * (num_heads // num_kv_heads), block_m)
        launch.grid_y = query.shape_expr[0] * num_kv_heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(S), trtp.SymInt32(M),
                                             trtp.SymInt32(window if window else _NO_WINDOW)])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra

    @trtp.impl(plugin_id)
    def _impl(query, key, value, past_key, past_value, position_ids, cos_cache, sin_cache, q_norm_weight,
              k_norm_weight, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float,
              window: int, kv_mode: str, qk_norm: int, rms_eps: float, outputs, stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (query, key, value, past_key, past_value,
                                                               position_ids, cos_cache, sin_cache,
                                                               q_norm_weight, k_norm_weight)]
            triton_forward(*t[:6], None, *t[6:], num_heads=num_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, scale=scale, softcap=softcap, window=window, qk_norm=qk_norm,
                           rms_eps=rms_eps, inplace=True, out=torch.as_tensor(outputs[0], device="cuda"))

    _REGISTERED.add(plugin_id)
    return plugin_id


_REGISTERED: set = set()


def aot_source(dtypes, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float = 0.0,
               qk_norm: int = 0, rms_eps: float = 1e-6, **_ignored):
    """The single-launch kernel as the TensorRT AOT path compiles it: ``(triton ASTSource, compile options,
    BLOCK_M)``. ``dtypes``: Triton type names ("fp16", "bf16", "fp32", "i64") of :data:`TRT_INPUTS` then
    :data:`OUTPUTS`. Float attributes become compile-time constants; S, M and window stay int32 arguments. One
    tile shape serves every batch shape (prefill tiles: decode wastes part of a tile but needs no second kernel).
    Tested by compiling for sm_90 on the CPU in a process without the interpreter
    (tests/test_plugin_kernels.py)."""
    import triton

    fn = _kernels()._flash_attention_kernel
    cfg = _launch_config(64, 1, head_dim, interpret=False)
    args = ("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "pos_ptr", "cos_ptr", "sin_ptr", "qnw_ptr", "knw_ptr",
            "out_ptr", "ok_ptr", "ov_ptr")
    if len(dtypes) != len(args):
        raise ValueError(f"expected {len(args)} dtypes (TRT_INPUTS then OUTPUTS), got {len(dtypes)}")
    signature = {name: "*" + t for name, t in zip(args, dtypes)}
    signature.update(S="i32", M="i32", window="i32")
    signature = {name: signature[name] for name in (*args[:10], "S", "M", "window", *args[10:])}  # kernel order
    constants = dict(H=num_heads, KV=num_kv_heads, D=head_dim, SCALE=float(scale), SOFTCAP=float(softcap or 0.0),
                     EPS=float(rms_eps), QK_NORM=bool(qk_norm), FUSED_KV=True,
                     DOT_PRECISION="ieee" if dtypes[0] == "fp32" else "tf32", DOT_F32=False,
                     HALF_BLOCK=max(16, _pow2(head_dim // 2)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    signature.update({name: "constexpr" for name in constants})
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return src, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), cfg["BLOCK_M"]
