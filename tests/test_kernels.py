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

from fastsana import kernels, quantize, runtime
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


# ------------------------------------------------------------------------ W8A8 linear layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_rows_kernel_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 300, generator=g) * 3).to(dtype)  # 300 columns: a masked tail
    x[5] = 0  # an all-zero row: the smallest scale, zeros out
    # Row 6 has max 127, so its scale is exactly 1 and these values are halfway cases:
    # rounding must go to the even neighbour (2.5 → 2, -3.5 → -4, 0.5 → 0), as torch.round.
    x[6] = 0
    x[6, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    ref_q, ref_scale = quantize.quantize_rows(x)
    q, scale = kernels.quantize_rows(x.to(DEVICE), quantize._MIN_SCALE)
    assert q.dtype == torch.int8 and scale.shape == (37, 1)
    assert torch.equal(q.cpu(), ref_q)
    assert torch.equal(scale.cpu(), ref_scale)
    assert q[6, :4].tolist() == [127, 2, -4, 0]


def _reference_int8_linear(q, act_scale, qweight, weight_scale, bias, dtype):
    acc = (q.double() @ qweight.double().T).float()  # exact: every partial sum < 2^53
    y = (acc * act_scale * weight_scale).to(dtype)
    return y + bias.to(dtype) if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", [None, (16, 32, 32, 4, 1)])
def test_int8_linear_kernel_matches_reference(dtype, bias, tile) -> None:
    g = torch.Generator().manual_seed(4)
    m, k, n = 70, 200, 50  # no dimension a multiple of the tiles: every mask is exercised
    q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    act_scale = torch.rand(m, 1, generator=g) * 0.01
    weight_scale = torch.rand(n, generator=g) * 0.01
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = _reference_int8_linear(q, act_scale, qweight, weight_scale, b, dtype)
    args = (q, act_scale, qweight, weight_scale, b)
    out = kernels.int8_linear(*(a.to(DEVICE) if a is not None else None for a in args), dtype,
                              tile=tile)  # fmt: skip
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-3,
                               atol=1e-6 if dtype == torch.float32 else 1e-3)  # fmt: skip


def test_int8_linear_kernel_shape_errors() -> None:
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_linear needs"):
        kernels.int8_linear(q, torch.ones(4, 1), torch.zeros(3, 9, dtype=torch.int8),
                            torch.ones(3), None, torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_rows(torch.zeros(2, 3, 4), 1e-30)


def test_w8a8_layer_with_kernels_matches_pytorch_path(monkeypatch) -> None:
    torch.manual_seed(5)
    layer = quantize.W8A8Linear.from_float(torch.nn.Linear(96, 40)).to(DEVICE)
    x = torch.randn(2, 20, 96, device=DEVICE)  # 40 rows: enough for the int8 GEMM path
    with torch.no_grad():
        ref = layer(x)  # the PyTorch path (use_triton is False on the CPU)
        counter = _Counting(kernels.int8_linear)
        monkeypatch.setattr(kernels, "int8_linear", counter)
        monkeypatch.setattr(quantize, "use_triton", lambda device, kernel: kernel == "w8a8")
        out = layer(x)
    assert counter.calls == 1
    assert out.shape == (2, 20, 40)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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
    with torch.no_grad():  # each kernel has its own switch, on by default
        for kernel in ("dwconv_glu", "w8a8"):
            assert runtime.use_triton(cuda, kernel)
            monkeypatch.setenv(f"FASTSANA_TRITON_{kernel.upper()}", "0")
            assert not runtime.use_triton(cuda, kernel)
            monkeypatch.setenv(f"FASTSANA_TRITON_{kernel.upper()}", "1")
            assert runtime.use_triton(cuda, kernel)
        monkeypatch.setattr(runtime, "TRITON_KERNELS", {**runtime.TRITON_KERNELS, "w8a8": False})
        monkeypatch.delenv("FASTSANA_TRITON_W8A8")
        assert not runtime.use_triton(cuda, "w8a8")  # an opt-in default stays off
        monkeypatch.setenv("FASTSANA_TRITON_LINEAR_ATTENTION", "0")
        assert not runtime.use_triton(cuda)
        with pytest.raises(ValueError, match="kernel must be one of"):
            runtime.use_triton(cuda, "softmax")
