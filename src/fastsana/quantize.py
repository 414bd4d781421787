"""W8A8 inference for the Linear DiT: int8 weights, int8 activations, int32 accumulation.

A quantised linear layer computes ``y = (s_x ⊗ s_w) · (q_x @ q_wᵀ) + b`` where

- ``q_w = round(w / s_w)`` per output channel, ``s_w = max|w_row| / 127`` (symmetric, fixed);
- ``q_x = round(x / s_x)`` per token, ``s_x = max|x_row| / 127``, computed on the fly;
- ``q_x @ q_wᵀ`` is an int8 × int8 → int32 matmul (``torch._int_mm``), exact;
- the rescale runs in fp32, the result is cast to the activations' dtype and the bias added.

Which layers (``quantize_w8a8``): in every block, the q/k/v/out projections of self- and
cross-attention and Mix-FFN's two 1×1 convs: for Sana-0.6B at 1024 px, 99.8% of the FLOPs
in weight matmuls and ≈95% of all matmul FLOPs (most of the rest is the cross-attention
softmax). Kept in their original precision, and why:

- norms, the adaLN scale-shift tables and the attention reductions (φ(K)ᵀV, softmax): they
  are not weight matmuls, and the reductions accumulate over all tokens;
- Mix-FFN's 3×3 depthwise conv: 9 multiply-adds per output, no matmul to speed up;
- the timestep/guidance embedders and ``time_embed.linear`` (adaLN ``t_block``): they see B
  rows, not tokens, so they cost nothing, and every block's modulation depends on them;
- the caption projection: ≈0.2% of the FLOPs, and LLM features have a few outlier channels
  that per-token int8 scales would let swamp the rest;
- the patch embedding (32 input channels) and ``proj_out`` (32 outputs): tiny, and they
  touch the latents directly (input, and the predicted velocity).

Speed: on CUDA the layer runs two Triton kernels (``fastsana.kernels.quantize_rows`` and
``int8_linear``, an int8 GEMM with the rescale and bias in its epilogue) where
``fastsana.runtime.use_triton(device, "w8a8")`` allows; otherwise ``torch._int_mm`` calls
cuBLASLt's int8 GEMM and the quantisation and rescale run as separate elementwise kernels.
Both need more than 16 rows and both matrix dims multiples of 8; other shapes take a float
matmul of the same integers (same result up to fp32 rounding). On CPU torch 2.13's
``_int_mm`` is a slow generic kernel, about 20-25× slower than an fp32 ``F.linear``
(``python -m bench.quantize``), so there W8A8 saves weight memory (4× vs fp32) and
previews the quantisation error, at a large cost in time.

Inference only: rounding has no gradient. Quantise after the model has its final device and
dtype (``model.to(dtype)`` would also cast the fp32 scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsana.models.dit import SanaTransformer
from fastsana.runtime import use_triton

QUANTIZATION_MODES = ("w8a8",)

# Layers replaced in each block (names relative to ``transformer_blocks.N``).
QUANTIZED_BLOCK_LAYERS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.conv_inverted",
    "ff.conv_point",
)

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left out so that q and -q both exist
# Smallest scale: an all-zero row quantises to zeros instead of dividing by zero.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of each row of a 2-D tensor, in fp32.

    Returns (q (rows, cols) int8, scale (rows, 1) fp32) with x ≈ q · scale."""
    x = x.float()
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)  # (rows, 1)
    scale = amax.div_(INT8_MAX).clamp_min_(_MIN_SCALE)  # (rows, 1)
    q = torch.div(x, scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # (rows, cols)
    return q, scale


def int_mm_fits(rows: int, inner: int, cols: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes a (rows, inner) @ (inner, cols) product on ``device``.

    CPU: any shape. CUDA (cuBLASLt int8): more than 16 rows, inner and cols multiples of 8.
    Other devices: no int8 matmul; the caller takes the float path."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return rows > 16 and inner % 8 == 0 and cols % 8 == 0
    return False


class W8A8Linear(nn.Module):
    """A linear layer (or 1×1 conv used as one) with int8 weights and int8 activations.

    Buffers: ``qweight`` (out, in) int8, ``weight_scale`` (out,) fp32, ``bias`` (out,) in the
    original float dtype or None. ``weight`` is a data-less (meta) tensor with the float
    weight's (out, in) shape and dtype, so code that inspects ``layer.weight.dtype`` (the fp16
    clip in ``SelfAttention``) keeps working; the values are ``qweight · weight_scale``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        float_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.float_dtype = float_dtype
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        bias_tensor = torch.zeros(out_features, dtype=float_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: nn.Module) -> W8A8Linear:
        """Quantise an ``nn.Linear`` or a 1×1, stride-1, ungrouped ``nn.Conv2d``."""
        if isinstance(layer, nn.Conv2d):
            if (
                layer.kernel_size != (1, 1)
                or layer.stride != (1, 1)
                or layer.groups != 1
                or layer.padding not in ((0, 0), "valid", "same")
            ):
                raise ValueError(
                    "W8A8Linear.from_float takes a 1×1 Conv2d with stride 1 and groups 1, got "
                    f"kernel {layer.kernel_size}, stride {layer.stride}, groups {layer.groups}, "
                    f"padding {layer.padding}"
                )
        elif not isinstance(layer, nn.Linear):
            raise TypeError(
                f"W8A8Linear.from_float takes an nn.Linear or a 1×1 nn.Conv2d, "
                f"got {type(layer).__name__}"
            )
        w = layer.weight.detach().flatten(1)  # (out, in): a 1×1 conv's (out, in, 1, 1) too
        out = cls(
            w.shape[1],
            w.shape[0],
            bias=layer.bias is not None,
            float_dtype=w.dtype,
            device=w.device,
        )
        q, scale = quantize_rows(w)  # (out, in), (out, 1)
        out.qweight.copy_(q)
        out.weight_scale.copy_(scale[:, 0])
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach())
        return out

    @property
    def weight(self) -> Tensor:
        return torch.empty(
            self.out_features, self.in_features, dtype=self.float_dtype, device="meta"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, float_dtype={self.float_dtype}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"W8A8Linear expects inputs with last dim {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        rows = x.reshape(-1, self.in_features)  # (M, K) tokens as rows
        if use_triton(x.device, "w8a8") and int_mm_fits(*rows.shape, self.out_features, x.device):
            # Two kernels instead of eight: quantise each row in one pass, then an int8 GEMM
            # whose epilogue rescales and adds the bias (the int32 product stays on chip).
            from fastsana import kernels

            q, act_scale = kernels.quantize_rows(rows, _MIN_SCALE)  # (M, K) int8, (M, 1)
            y = kernels.int8_linear(
                q, act_scale, self.qweight, self.weight_scale, self.bias, x.dtype
            )  # (M, N)
            return y.view(*x.shape[:-1], self.out_features)  # (..., N)
        q, act_scale = quantize_rows(rows)  # (M, K) int8, (M, 1) fp32
        acc = self._integer_matmul(q)  # (M, N) int32, or fp32 holding integers
        y = acc.to(torch.float32).mul_(act_scale).mul_(self.weight_scale.float())  # (M, N)
        y = y.to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y.add_(self.bias.to(x.dtype))  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def _integer_matmul(self, q: Tensor) -> Tensor:
        """q @ qweightᵀ: exact int32 with ``torch._int_mm`` where it takes the shapes, else a
        float matmul of the same integers (exact while partial sums stay below 2^24)."""
        if int_mm_fits(q.shape[0], self.in_features, self.out_features, q.device):
            # qweight.t() is a column-major view: no copy, and the faster layout for _int_mm.
            return torch._int_mm(q, self.qweight.t())  # (M, N) int32
        return F.linear(q.float(), self.qweight.float())  # (M, N) fp32


def quantize_w8a8(model: SanaTransformer) -> SanaTransformer:
    """Replace the DiT's token-wise linear layers by ``W8A8Linear`` in place (see the module
    docstring for which ones and why); returns the model."""
    if not isinstance(model, SanaTransformer):
        raise TypeError(
            f"quantize_w8a8 takes a fastsana SanaTransformer, got {type(model).__name__}"
        )
    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ValueError("quantize_w8a8: the model is already quantised")
    for block in model.transformer_blocks:
        for name in QUANTIZED_BLOCK_LAYERS:
            block.set_submodule(name, W8A8Linear.from_float(block.get_submodule(name)))
    return model
