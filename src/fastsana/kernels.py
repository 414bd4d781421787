"""Triton GPU kernels for the memory-bound hot spots of SANA inference, and W8A8's int8 GEMM.

- ``relu_linear_attention``: ReLU linear attention in two passes over the tokens. The first
  reads φ(K) and V once and accumulates φ(K)ᵀV and Σφ(K) per head; the tokens are split into
  chunks so that every streaming multiprocessor has work even at batch 1, and the small
  per-chunk partial sums are added afterwards (deterministically, unlike atomics). The second
  reads φ(Q) once and writes φ(Q)·φ(K)ᵀV / (φ(Q)·Σφ(K) + ε) straight into the caller's layout.
  The PyTorch path needs ReLU copies, a transposed or concatenated copy and a division pass.
- ``dwconv_glu``: Mix-FFN's (and DC-AE's GLUMBConv's) 3×3 depthwise conv and GLU — optionally
  also the SiLU before the conv — in one pass: the (B, 2h, H, W) hidden tensor is read once and
  the (B, h, H, W) gated product written once, instead of silu → conv → split → silu → multiply.

- ``quantize_rows`` and ``int8_linear``: W8A8 layers (``fastsana.quantize``) in two kernels:
  per-token int8 quantisation of the activations in one pass, then an int8 GEMM (int32
  accumulation) whose epilogue applies both scales and the bias, so the int32 product is
  never written out.

The kernels are inference-only (no backward) and take views with arbitrary strides, so the
DiT's token layout (B, N, heads·d) and the DC-AE's channel-first layout use the same code.
All sums run in fp32 (``tl.dot`` with ``input_precision="ieee"``: TF32 would lose the precision
the fp32 reference keeps, and these kernels are bound by memory traffic, not FLOPs).

This module imports Triton; the models only import it when ``fastsana.runtime.use_triton``
says so. The PyTorch functions in ``fastsana.models`` remain the reference: tests/test_kernels.py
checks these kernels against them, on a GPU when there is one and otherwise in Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tokens per program in both attention passes: large enough to keep loads wide, small enough
# that a (BLOCK_N, d) tile of q/k/v stays in registers for d = 32 (every SANA checkpoint).
_ATTN_BLOCK_N = 64
# Aim for a few programs per SM in the reduction pass (an H100 has 132 SMs).
_TARGET_PROGRAMS = 512
# Pixels × channels per program of the depthwise kernel (8 × 64 fp32 accumulators × 2): the
# fastest of nine tiles on an H100 at 1024-4096 px (``python bench/kernels.py
# --sweep-conv-tiles``); the first version's 16 × 64 was 1.4× slower and lost to cuDNN.
_CONV_BLOCK_W = 8
_CONV_BLOCK_C = 64


# ------------------------------------------------------------------------ linear attention


@triton.jit
def _kv_partial_kernel(
    k_ptr, v_ptr, kv_ptr, ksum_ptr,
    N, H, S, tokens_per_split,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, s): φ(K)ᵀV (D×D) and Σφ(K) (D) over token chunk s of head h."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    kv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = (n < end)[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=ok, other=0.0)
        v = tl.load(v_base + n[:, None] * sv_n + d[None, :] * sv_d, mask=ok, other=0.0)
        k = tl.maximum(k.to(tl.float32), 0.0)  # φ = ReLU; padding rows stay 0
        kv += tl.dot(tl.trans(k), v.to(tl.float32), input_precision="ieee")
        ksum += tl.sum(k, axis=0)
    out = bh * S + split
    tl.store(kv_ptr + out * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :], kv)
    tl.store(ksum_ptr + out * BLOCK_D + d, ksum)


@triton.jit
def _attention_out_kernel(
    q_ptr, kv_ptr, ksum_ptr, o_ptr,
    N, H, eps,
    sq_b, sq_h, sq_n, sq_d,
    so_b, so_h, so_n, so_d,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, token block): out = φ(q)·KᵀV / (φ(q)·Σk + ε) for BLOCK_N queries."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (n < N)[:, None] & d_ok[None, :]
    kv = tl.load(kv_ptr + bh * BLOCK_D * BLOCK_D + d[:, None] * BLOCK_D + d[None, :])
    ksum = tl.load(ksum_ptr + bh * BLOCK_D + d)
    q_ptrs = q_ptr + b * sq_b + h * sq_h + n[:, None] * sq_n + d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=ok, other=0.0)
    q = tl.maximum(q.to(tl.float32), 0.0)
    num = tl.dot(q, kv, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
    den = tl.sum(q * ksum[None, :], axis=1)  # (BLOCK_N,)
    out = num / (den[:, None] + eps)
    o_ptrs = o_ptr + b * so_b + h * so_h + n[:, None] * so_n + d[None, :] * so_d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok)


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, eps: float) -> Tensor:
    """out[b, h, n] = Σ_m v_m φ(k_m)·φ(q_n) / (Σ_m φ(k_m)·φ(q_n) + eps), φ = ReLU.

    q, k, v, out: (B, heads, N, d) views with any strides (out may be any float dtype; the
    sums are fp32). Writes ``out`` and returns it.
    """
    b, heads, n, d = q.shape
    for name, t in (("k", k), ("v", v), ("out", out)):
        if tuple(t.shape) != (b, heads, n, d):
            raise ValueError(f"{name} must have q's shape {(b, heads, n, d)}, got {tuple(t.shape)}")
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs ≥ 16 and a power of two
    # Split the tokens so that about _TARGET_PROGRAMS programs share the reduction.
    splits = max(1, min(triton.cdiv(n, _ATTN_BLOCK_N), _TARGET_PROGRAMS // max(1, b * heads)))
    per_split = triton.cdiv(triton.cdiv(n, splits), _ATTN_BLOCK_N) * _ATTN_BLOCK_N
    splits = triton.cdiv(n, per_split)
    partial_kv = torch.empty(b * heads, splits, block_d, block_d, device=q.device)
    partial_ksum = torch.empty(b * heads, splits, block_d, device=q.device)
    _kv_partial_kernel[(b * heads, splits)](
        k, v, partial_kv, partial_ksum,
        n, heads, splits, per_split,
        *k.stride(), *v.stride(),
        D=d, BLOCK_D=block_d, BLOCK_N=_ATTN_BLOCK_N,
    )  # fmt: skip
    kv = partial_kv.sum(dim=1)  # (B·heads, BLOCK_D, BLOCK_D)
    ksum = partial_ksum.sum(dim=1)  # (B·heads, BLOCK_D)
    _attention_out_kernel[(b * heads, triton.cdiv(n, _ATTN_BLOCK_N))](
        q, kv, ksum, out,
        n, heads, eps,
        *q.stride(), *out.stride(),
        D=d, BLOCK_D=block_d, BLOCK_N=_ATTN_BLOCK_N,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------- depthwise conv + GLU


@triton.jit
def _dwconv_glu_kernel(
    x_ptr, w_ptr, bias_ptr, o_ptr,
    C, H, W,
    sx_b, sx_c, sx_y, sx_x,
    so_b, so_c, so_y, so_x,
    HAS_BIAS: tl.constexpr, SILU_INPUT: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (b·H + y, x block, c block): out = a·SiLU(g) with (a, g) = the 3×3 depthwise
    conv (zero padding) of channels c and C + c, over BLOCK_W pixels of row y."""
    row = tl.program_id(0)
    b = row // H
    y = row % H
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc_a = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(3):
        # The row index as a vector: Triton's interpreter rejects masks that mix a scalar
        # condition with a vector one (compiled code is the same either way).
        yy = xs * 0 + y + dy - 1  # (BLOCK_W,)
        for dx in tl.static_range(3):
            xx = xs + dx - 1
            inside = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)  # (BLOCK_W,) zero padding
            ok = inside[:, None] & c_ok[None, :]
            base = x_ptr + b * sx_b + yy[:, None] * sx_y + xx[:, None] * sx_x
            a = tl.load(base + cs[None, :] * sx_c, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(base + (cs[None, :] + C) * sx_c, mask=ok, other=0.0).to(tl.float32)
            if SILU_INPUT:  # SiLU(0) = 0, so the zero padding is unchanged
                a = a * tl.sigmoid(a)
                g = g * tl.sigmoid(g)
            w_a = tl.load(w_ptr + cs * 9 + dy * 3 + dx, mask=c_ok, other=0.0).to(tl.float32)
            w_g = tl.load(w_ptr + (cs + C) * 9 + dy * 3 + dx, mask=c_ok, other=0.0).to(tl.float32)
            acc_a += a * w_a[None, :]
            acc_g += g * w_g[None, :]
    if HAS_BIAS:
        acc_a += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bias_ptr + cs + C, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out = acc_a * acc_g * tl.sigmoid(acc_g)
    o_ptrs = o_ptr + b * so_b + y * so_y + xs[:, None] * so_x + cs[None, :] * so_c
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(xs < W)[:, None] & c_ok[None, :])


def dwconv_glu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    silu_input: bool,
    tile: tuple[int, int, int] | None = None,
) -> Tensor:
    """a·SiLU(g) with (a, g) = split(depthwise_conv3×3(SiLU(x) if silu_input else x)).

    x: (B, 2h, H, W) with any strides; weight: (2h, 1, 3, 3); bias: (2h,) or None. Returns
    (B, h, H, W) in x's dtype and x's memory format (channels-last in, channels-last out).
    ``tile`` overrides (BLOCK_W, BLOCK_C, num_warps) (benchmarks sweep it).
    """
    b, c2, height, width = x.shape
    if c2 % 2 or tuple(weight.shape) != (c2, 1, 3, 3):
        raise ValueError(
            f"dwconv_glu needs an even channel count and a (C, 1, 3, 3) weight, got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    c = c2 // 2
    channels_last = x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(b, c, height, width, dtype=x.dtype, device=x.device, memory_format=fmt)
    weight = weight.contiguous()
    block_w, block_c, warps = tile or (_CONV_BLOCK_W, _CONV_BLOCK_C, 4)
    grid = (b * height, triton.cdiv(width, block_w), triton.cdiv(c, block_c))
    _dwconv_glu_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        c, height, width,
        *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, SILU_INPUT=silu_input,
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------ W8A8 linear layers


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr,
    K, sx_m, sx_k, min_scale,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program m: scale = max(|x_m| / 127, min_scale), q = round-half-even(x_m / scale)."""
    m = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    ok = ks < K
    x = tl.load(x_ptr + m * sx_m + ks * sx_k, mask=ok, other=0.0).to(tl.float32)
    # Both divisions correctly rounded, as torch's (a plain "/" compiles to an approximate
    # division on CUDA, which can move a scale by one ulp).
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), min_scale)
    y = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    # Round half to even (torch.round): floor, then the halfway cases go to the even neighbour.
    f = tl.floor(y)
    frac = y - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1 for odd f, 0 for even
    r = tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + m * K + ks, r.to(tl.int8), mask=ok)
    tl.store(scale_ptr + m, scale)


def quantize_rows(x: Tensor, min_scale: float) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantisation of a 2-D tensor in one pass (one program per row):
    ``fastsana.quantize.quantize_rows`` fused. Returns (q (M, K) int8, scale (M, 1) fp32)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, *x.stride(), min_scale,
        BLOCK_K=block_k, num_warps=min(16, max(1, block_k // 256)),
    )  # fmt: skip
    return q, scale


@triton.jit
def _int8_linear_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, o_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program p: the (BLOCK_M, BLOCK_N) output tile of (a @ wᵀ)·a_scale·w_scale (+ bias).
    a (M, K) and w (N, K) are row-major int8; the int32 product never leaves the registers.
    Tiles go in groups of GROUP_M rows so that neighbouring programs share w tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rn[None, :] * K + rk[:, None]  # (BLOCK_K, BLOCK_N): wᵀ, no copy
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
    # The reference's order: (acc · a_scale) · w_scale in fp32, cast, then + bias in o's dtype.
    y = (acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]).to(o_ptr.dtype.element_ty)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(o_ptr.dtype.element_ty)[None, :]
    o_ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(o_ptr + rm[:, None] * N + rn[None, :], y, mask=o_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the int8 GEMM, the fastest of six in
# a sweep on an H100 at Sana's shapes (``python -m bench.quantize --sweep-tiles``,
# docs/benchmarks.md): 128 × 128 tiles with a short K step from 4096 rows (a 2048² image with
# CFG) up, 64-row tiles below (more programs to fill the 132 SMs).
INT8_TILES = {"large": (128, 128, 64, 4, 4), "small": (64, 128, 128, 4, 4)}
INT8_LARGE_ROWS = 4096


def int8_linear(
    q: Tensor,
    act_scale: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    tile: tuple[int, int, int, int, int] | None = None,
) -> Tensor:
    """(q @ qweightᵀ)·act_scale·weight_scale (+ bias) with the rescale fused into the GEMM.

    q: (M, K) int8, act_scale: (M, 1) fp32, qweight: (N, K) int8 (row-major), weight_scale:
    (N,) fp32, bias: (N,) or None. Returns (M, N) in ``out_dtype``. ``tile`` overrides the
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) choice (benchmarks sweep it).
    """
    m, k = q.shape
    n = qweight.shape[0]
    if qweight.shape[1] != k or q.dtype != torch.int8 or qweight.dtype != torch.int8:
        raise ValueError(
            f"int8_linear needs int8 q (M, K) and qweight (N, K), got {q.dtype} "
            f"{tuple(q.shape)} and {qweight.dtype} {tuple(qweight.shape)}"
        )
    q, qweight = q.contiguous(), qweight.contiguous()
    bm, bn, bk, warps, stages = tile or INT8_TILES["large" if m >= INT8_LARGE_ROWS else "small"]
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_linear_kernel[grid](
        q, qweight, act_scale.contiguous(), weight_scale.contiguous(),
        bias if bias is not None else weight_scale, out,
        m, n, k,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
