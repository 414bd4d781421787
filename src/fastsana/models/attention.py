"""Attention maths for the Linear DiT, as free functions on (B, N, heads·d) token tensors.

``relu_linear_attention`` is the reference path, written like the formula; ``linear_attention``
is what the model calls: it picks the fastest kernel for the device (the Triton kernel of
``fastsana.kernels`` for CUDA inference, else a fused PyTorch path) and must match the
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsana.runtime import use_triton

# Added to the denominator of linear attention; diffusers uses 1e-15, the official code 1e-8.
# With ReLU features the denominator is 0 only when a query or every key is all-zero, where
# the numerator is 0 too, so the value only decides 0/0 → 0 and never changes other outputs.
LINEAR_ATTENTION_EPS = 1e-15

# fp16 checkpoints were trained with their activations clipped to the fp16 range.
FP16_MAX = 65504.0


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """ReLU linear attention: out_n = Σ_m v_m φ(k_m)·φ(q_n) / (Σ_m φ(k_m)·φ(q_n) + ε).

    q, k, v: (B, N, heads·d). Computed as φ(K)ᵀV first (a d×d matrix per head, O(N)), in fp32
    because the sums over N tokens overflow or lose precision in half precision.
    """
    b, n, inner = q.shape
    d = inner // heads
    q = F.relu(q).float().view(b, n, heads, d).transpose(1, 2)  # (B, h, N, d)
    k = F.relu(k).float().view(b, n, heads, d).transpose(1, 2)  # (B, h, N, d)
    v = v.float().view(b, n, heads, d).transpose(1, 2)  # (B, h, N, d)
    kv = k.transpose(-1, -2) @ v  # (B, h, d, d)
    k_sum = k.sum(dim=2, keepdim=True)  # (B, h, 1, d)
    num = q @ kv  # (B, h, N, d)
    den = (q * k_sum).sum(dim=-1, keepdim=True)  # (B, h, N, 1)
    out = num / (den + LINEAR_ATTENTION_EPS)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)  # (B, N, h·d)


def fused_relu_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, inplace: bool = False
) -> Tensor:
    """The same maths as ``relu_linear_attention`` with fewer passes over the (N, C) tokens.

    The key sum Σ_m φ(k_m) is appended to φ(K)ᵀV as a (d+1)-th column, so one small matmul
    gives numerator and denominator together (the official code pads V with a row of ones
    instead, which copies all N tokens); the division writes straight into the (B, N, h·d)
    layout, so no transposed copy is made. ``inplace=True`` applies ReLU in the caller's q and
    k (inference only: they must be temporaries nobody reads again).
    """
    b, n, inner = q.shape
    d = inner // heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    relu = F.relu_ if inplace else F.relu
    q = relu(q).to(acc).view(b, n, heads, d)  # (B, N, h, d)
    k = relu(k).to(acc).view(b, n, heads, d)  # (B, N, h, d)
    v = v.to(acc).view(b, n, heads, d)  # (B, N, h, d)
    kv = torch.einsum("bnhd,bnhe->bhde", k, v)  # (B, h, d, d)
    k_sum = k.sum(dim=1).unsqueeze(-1)  # (B, h, d, 1)
    kv = torch.cat([kv, k_sum], dim=-1)  # (B, h, d, d+1)
    qkv = torch.einsum("bnhd,bhde->bnhe", q, kv)  # (B, N, h, d+1), possibly a strided view
    num, den = qkv.split([d, 1], dim=-1)  # (B, N, h, d), (B, N, h, 1)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # out= breaks both
        return (num / (den + LINEAR_ATTENTION_EPS)).reshape(b, n, inner)  # (B, N, h·d)
    out = torch.empty(b, n, heads, d, dtype=acc, device=q.device)  # (B, N, h, d) contiguous
    torch.div(num, den + LINEAR_ATTENTION_EPS, out=out)  # (B, N, h, d)
    return out.view(b, n, inner)  # (B, N, h·d)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    inplace: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """ReLU linear attention on (B, N, heads·d) tensors, returned in ``out_dtype`` (default
    fp32; fp64 for fp64 input). The kernel choice per device lives here so the model never
    branches on it: the Triton kernel on CUDA inference (``fastsana.runtime.use_triton``),
    else the fused PyTorch path."""
    if inplace and torch.is_grad_enabled():
        raise ValueError("inplace=True is for inference only (torch.is_grad_enabled() is True)")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or acc
    if use_triton(q.device):
        from fastsana.kernels import relu_linear_attention as triton_linear_attention

        b, n, inner = q.shape
        d = inner // heads
        out = torch.empty(b, n, inner, dtype=out_dtype, device=q.device)  # (B, N, h·d)

        def per_head(t: Tensor) -> Tensor:  # (B, N, h·d) → (B, h, N, d) view, no copy
            return t.view(b, n, heads, d).transpose(1, 2)

        triton_linear_attention(
            per_head(q), per_head(k), per_head(v), per_head(out), LINEAR_ATTENTION_EPS
        )
        return out
    return fused_relu_linear_attention(q, k, v, heads, inplace=inplace).to(out_dtype)


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, bias: Tensor | None = None
) -> Tensor:
    """Scaled dot-product attention on (B, N, heads·d) tensors; ``bias`` broadcasts to
    (B, heads, Nq, Nk). Used for cross-attention, and for self-attention in the softmax ablation."""
    b, nq, inner = q.shape
    nk = k.shape[1]
    d = inner // heads
    q = q.view(b, nq, heads, d).transpose(1, 2)  # (B, h, Nq, d)
    k = k.view(b, nk, heads, d).transpose(1, 2)  # (B, h, Nk, d)
    v = v.view(b, nk, heads, d).transpose(1, 2)  # (B, h, Nk, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, Nq, d)
    return out.transpose(1, 2).reshape(b, nq, inner)  # (B, Nq, h·d)


def mask_to_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L) keep-mask (bool or 0/1) → additive bias (B, 1, 1, L).

    −10000 rather than −inf (as the reference does) so that an all-padding caption yields a
    uniform average instead of NaN.
    """
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"text_mask must have shape (B, L), got {tuple(mask.shape)}")
    keep = mask.to(dtype)
    return ((1.0 - keep) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
