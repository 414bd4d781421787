"""The Triton kernels (fastsana.kernels) against the PyTorch reference paths.

On a machine with a GPU the kernels run compiled on CUDA. Without one they run in Triton's
interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py before Triton is first
imported): the same kernel code, indexing and masking, executed with numpy.
The models' dispatch is exercised by forcing ``use_triton`` on.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dit_helpers import dit_inputs, random_dit
from test_dcae import CASES

from fastsana import kernels, runtime
from fastsana.checkpoints.autoencoder import config_from_diffusers
from fastsana.configs import DIT_PRESETS
from fastsana.models import attention, dcae, ops
from fastsana.models.dcae import DCAE

GPU = torch.cuda.is_available()
# conftest.py sets TRITON_INTERPRET=1 without a GPU, before anything imports Triton.
assert GPU or os.environ.get("TRITON_INTERPRET") == "1", "run these tests through pytest"
DEVICE = torch.device("cuda" if GPU else "cpu")
# numpy has no bf16, so the interpreter cannot run it; fp16 exercises the half-precision loads.
HALF_DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float16]


def _tokens(b: int, n: int, heads: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g).to(DEVICE, dtype) for _ in range(3)]


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)  # (B, h, N, d) view


# ---------------------------------------------------------------------- linear attention


@pytest.mark.parametrize(
    ("n", "heads", "d"),
    [(200, 3, 32), (37, 2, 20), (1, 1, 32)],  # several token splits; padded head dim; 1 token
)
def test_linear_attention_kernel_matches_reference(n: int, heads: int, d: int) -> None:
    q, k, v = _tokens(2, n, heads, d, torch.float32)
    ref = attention.relu_linear_attention(q, k, v, heads)  # fp32 sums, as the kernel
    out = torch.full_like(q, float("nan"))  # every element must be written
    kernels.relu_linear_attention(
        *(_per_head(t, heads) for t in (q, k, v, out)), eps=attention.LINEAR_ATTENTION_EPS
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_linear_attention_kernel_half_inputs_sum_in_fp32(dtype: torch.dtype) -> None:
    heads = 4
    q, k, v = _tokens(1, 150, heads, 32, dtype, seed=1)
    ref = attention.relu_linear_attention(q, k, v, heads)  # fp32 sums of the half inputs
    out = torch.empty(1, 150, heads * 32, device=DEVICE, dtype=dtype)
    kernels.relu_linear_attention(*(_per_head(t, heads) for t in (q, k, v, out)), eps=1e-15)
    # Only the final rounding to half precision separates the two.
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_linear_attention_kernel_reads_channel_first_views() -> None:
    """The DC-AE layout: q, k, v are (B, G, d, N) slices of one (B, G, 3d, N) tensor."""
    b, groups, d, n = 2, 3, 8, 45
    qkv = torch.randn(b, groups, 3 * d, n).to(DEVICE)
    q, k, v = qkv.split(d, dim=2)
    ref = dcae._relu_linear_attention(F.relu(q).double(), F.relu(k).double(), v.double())
    out = torch.empty(b, groups, d, n, device=DEVICE)
    views = [t.transpose(-1, -2) for t in (q, k, v, out)]  # (B, G, N, d), strided
    kernels.relu_linear_attention(*views, eps=dcae.ATTENTION_EPS)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_kernel_shape_errors() -> None:
    q = torch.zeros(1, 2, 10, 32)
    with pytest.raises(ValueError, match="v must have q's shape"):
        kernels.relu_linear_attention(q, q, q[:, :, :5], q, eps=1e-15)


# ------------------------------------------------------------------ depthwise conv + GLU


def _reference_dwconv_glu(x, weight, bias, silu_input: bool) -> torch.Tensor:
    x = x.double()
    x = F.silu(x) if silu_input else x
    bias = bias.double() if bias is not None else None
    y = F.conv2d(x, weight.double(), bias, padding=1, groups=x.shape[1])
    a, g = y.chunk(2, dim=1)
    return a * F.silu(g)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("silu_input", [True, False])
def test_dwconv_glu_kernel_matches_reference(channels_last, bias, silu_input) -> None:
    g = torch.Generator().manual_seed(0)
    c = 70  # two channel blocks, the second partly masked
    x = torch.randn(2, 2 * c, 5, 19, generator=g).to(DEVICE)  # 19 columns: two pixel blocks
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(2 * c, 1, 3, 3, generator=g).to(DEVICE)
    b = torch.randn(2 * c, generator=g).to(DEVICE) if bias else None
    out = kernels.dwconv_glu(x, weight, b, silu_input=silu_input)
    assert out.shape == (2, c, 5, 19)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    ref = _reference_dwconv_glu(x, weight, b, silu_input)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dwconv_glu_kernel_half_precision(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, 6, 7, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(64, 1, 3, 3, generator=g) * 0.3).to(DEVICE, dtype)
    bias = torch.randn(64, generator=g).to(DEVICE, dtype)
    out = kernels.dwconv_glu(x, weight, bias, silu_input=True)
    assert out.dtype == dtype
    ref = _reference_dwconv_glu(x, weight, bias, silu_input=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_dwconv_glu_kernel_shape_errors() -> None:
    with pytest.raises(ValueError, match="even channel count"):
        kernels.dwconv_glu(torch.zeros(1, 5, 4, 4), torch.zeros(5, 1, 3, 3), None, silu_input=True)


# ------------------------------------------------------------------------ model dispatch


class _Counting:
    """Wraps a kernel entry point and counts calls, so a test knows the kernel really ran."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def force_kernels(monkeypatch):
    """Make the models take the Triton path on this device (CPU: the interpreter)."""
    counters = {
        name: _Counting(getattr(kernels, name)) for name in ("relu_linear_attention", "dwconv_glu")
    }
    for name, counter in counters.items():
        monkeypatch.setattr(kernels, name, counter)
    forced = lambda device, kernel="linear_attention": not torch.is_grad_enabled()  # noqa: E731
    for module in (attention, ops, dcae):
        monkeypatch.setattr(module, "use_triton", forced)
    return counters


def test_dit_forward_with_kernels_matches_pytorch_path(force_kernels) -> None:
    config = DIT_PRESETS["sana-tiny"].config
    model = random_dit(config).to(DEVICE)
    x, t, text, mask = (a.to(DEVICE) for a in dit_inputs(config, size=(6, 5)))
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as off:  # the reference: PyTorch path
            for module in (attention, ops, dcae):
                off.setattr(module, "use_triton", lambda device, kernel="": False)
            ref = model(x, t, text, mask)
        out = model(x, t, text, mask)
    assert force_kernels["relu_linear_attention"].calls == config.depth
    assert force_kernels["dwconv_glu"].calls == config.depth
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # With autograd on (training), the PyTorch path runs: no further kernel calls.
    model(x, t, text, mask).sum().backward()
    assert force_kernels["relu_linear_attention"].calls == config.depth


def test_dcae_decode_with_kernels_matches_pytorch_path(force_kernels) -> None:
    torch.manual_seed(0)
    model = DCAE(config_from_diffusers(CASES["sana-like"])).to(DEVICE).eval()
    z = torch.randn(1, model.config.latent_channels, 3, 3, device=DEVICE)  # 24×24 image
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as off:
            for module in (attention, ops, dcae):
                off.setattr(module, "use_triton", lambda device, kernel="": False)
            ref = model.decode(z, progress=False)
        out = model.decode(z, progress=False)
    assert force_kernels["relu_linear_attention"].calls > 0
    assert force_kernels["dwconv_glu"].calls > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_use_triton_decision(monkeypatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.delenv("FASTSANA_TRITON", raising=False)
    with torch.no_grad():
        assert runtime.use_triton(cuda)  # Triton is installed (a test dependency)
        assert not runtime.use_triton(torch.device("cpu"))
        monkeypatch.setenv("FASTSANA_TRITON", "0")
        assert not runtime.use_triton(cuda)
    monkeypatch.delenv("FASTSANA_TRITON")
    with torch.enable_grad():
        assert not runtime.use_triton(cuda)  # no backward in the kernels
    with torch.no_grad():  # the fused dwconv + GLU is opt-in (slower than cuDNN on an H100)
        assert not runtime.use_triton(cuda, "dwconv_glu")
        monkeypatch.setenv("FASTSANA_TRITON_DWCONV_GLU", "1")
        assert runtime.use_triton(cuda, "dwconv_glu")
        monkeypatch.setenv("FASTSANA_TRITON_LINEAR_ATTENTION", "0")
        assert not runtime.use_triton(cuda)
        with pytest.raises(ValueError, match="kernel must be one of"):
            runtime.use_triton(cuda, "softmax")
