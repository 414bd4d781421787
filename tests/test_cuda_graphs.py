"""CUDA graphs for the DiT (fastsana.cuda_graphs): replayed steps equal eager ones.

The recording and replay need a CUDA GPU and run only there; on CPU the tests check that the
wrapper and the pipeline stay on the eager path."""

import pytest
import torch
from dit_helpers import dit_inputs, random_dit

from fastsana.configs import DIT_PRESETS
from fastsana.cuda_graphs import GraphedTransformer
from fastsana.pipeline import SanaPipeline, default_model_path

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")


def _model_and_inputs(device: str, seed: int = 0):
    config = DIT_PRESETS["sana-tiny"].config
    model = random_dit(config).to(device).eval()
    x, t, text, mask = (a.to(device) for a in dit_inputs(config, size=(6, 5), seed=seed))
    return model, x, t, text, mask


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_steps_equal_eager_steps(dtype) -> None:
    model, x, t, text, mask = _model_and_inputs("cuda")
    model = model.to(dtype)
    graphed = GraphedTransformer(model)
    with torch.no_grad():
        context = model.prepare_text(text.to(dtype), mask)
        other = model.prepare_text(torch.randn_like(text).to(dtype), mask)  # a new caption
        for step, ctx in enumerate([context, context, context, other, other]):
            xs, ts = (x * (1 + step)).to(dtype), t - 50 * step  # new values each step
            want = model(xs, ts, ctx)
            got = graphed(xs, ts, ctx)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert graphed.replays == 4  # the first call recorded, every later one replayed
    first = graphed(xs, ts, other)
    graphed(xs * 2, ts, other)  # the returned tensor is the caller's: not overwritten
    torch.testing.assert_close(first, want, rtol=0, atol=0)


@needs_cuda
def test_pipeline_images_with_and_without_graphs_are_equal() -> None:
    pipe = SanaPipeline.from_pretrained(default_model_path(), device="cuda")
    kwargs = dict(seed=3, num_inference_steps=6, output_type="pt", progress=False)
    graphed = pipe(["a red circle", "two blue stars"], **kwargs)
    assert isinstance(pipe._forward(), GraphedTransformer)
    assert pipe._forward().replays == 5  # 6 steps: one eager (recording), five replays
    pipe.cuda_graphs = False
    eager = pipe(["a red circle", "two blue stars"], **kwargs)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@needs_cuda
def test_at_most_max_graphs_are_kept() -> None:
    model, x, t, text, mask = _model_and_inputs("cuda")
    graphed = GraphedTransformer(model, max_graphs=2)
    with torch.no_grad():
        context = model.prepare_text(text, mask)
        for size in (4, 5, 6, 4):  # three shapes, then the first again
            xs = torch.randn(x.shape[0], x.shape[1], size, size, device="cuda")
            want = model(xs, t, context)
            torch.testing.assert_close(graphed(xs, t, context), want, rtol=0, atol=0)
    assert len(graphed._graphs) == 2 and graphed.replays == 0  # size 4 was forgotten


def test_bad_max_graphs() -> None:
    with pytest.raises(ValueError, match="max_graphs must be a positive int"):
        GraphedTransformer(torch.nn.Identity(), max_graphs=0)


def test_eager_on_cpu() -> None:
    model, x, t, text, mask = _model_and_inputs("cpu")
    graphed = GraphedTransformer(model)
    with torch.no_grad():
        context = model.prepare_text(text, mask)
        torch.testing.assert_close(graphed(x, t, context), model(x, t, context))
    assert graphed.replays == 0


def test_pipeline_on_cpu_runs_the_transformer_itself() -> None:
    pipe = SanaPipeline.from_pretrained(default_model_path(), device="cpu")
    assert pipe.cuda_graphs  # on by default, used on CUDA only
    assert pipe._forward() is pipe.transformer
