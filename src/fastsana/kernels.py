"""Triton GPU kernels for the two memory-bound hot spots of SANA inference.

- ``relu_linear_attention``: ReLU linear attention in two passes over the tokens. The first
  reads φ(K) and V once and accumulates φ(K)ᵀV and Σφ(K) per head; the tokens are split into
  chunks so that every streaming multiprocessor has work even at batch 1, and the small
  per-chunk partial sums are added afterwards (deterministically, unlike atomics). The second
  reads φ(Q) once and writes φ(Q)·φ(K)ᵀV / (φ(Q)·Σφ(K) + ε) straight into the caller's layout.
  The PyTorch path needs ReLU copies, a transposed or concatenated copy and a division pass.
- ``dwconv_glu``: Mix-FFN's (and DC-AE's GLUMBConv's) 3×3 depthwise conv and GLU — optionally
  also the SiLU before the conv — in one pass: the (B, 2h, H, W) hidden tensor is read once and
  the (B, h, H, W) gated product written once, instead of silu → conv → split → silu → multiply.

Both kernels are inference-only (no backward) and take views with arbitrary strides, so the
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
# Pixels × channels per program of the depthwise kernel: 16 × 64 fp32 accumulators × 2.
_CONV_BLOCK_W = 16
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


def dwconv_glu(x: Tensor, weight: Tensor, bias: Tensor | None, *, silu_input: bool) -> Tensor:
    """a·SiLU(g) with (a, g) = split(depthwise_conv3×3(SiLU(x) if silu_input else x)).

    x: (B, 2h, H, W) with any strides; weight: (2h, 1, 3, 3); bias: (2h,) or None. Returns
    (B, h, H, W) in x's dtype and x's memory format (channels-last in, channels-last out).
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
    grid = (b * height, triton.cdiv(width, _CONV_BLOCK_W), triton.cdiv(c, _CONV_BLOCK_C))
    _dwconv_glu_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        c, height, width,
        *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, SILU_INPUT=silu_input,
        BLOCK_W=_CONV_BLOCK_W, BLOCK_C=_CONV_BLOCK_C,
    )  # fmt: skip
    return out
