"""One whole-pipeline run in a fresh process (called by ``bench.compare``; prints one JSON line).

    python -m bench.pipeline_run --impl ours|diffusers [--model sana-0.6b] [--dtype bf16]
        [--px 1024] [--steps 20] [--device cpu|cuda] [--batch 1] [--repeats 1]
        [--compile none|blocks|blocks-autotune|blocks-cudagraphs] [--vae-channels-last]
        [--quantize w8a8] [--threads N]

Text encoding is excluded: both pipelines get the same precomputed 300-token embeddings
(seeded noise) for the prompt and the negative prompt. ``--batch`` images are made at once
(classifier-free guidance: the DiT sees twice that). Time spent in the DiT and in the decoder
is recorded with hooks, so a run with few steps can be extrapolated to 20
(``est_20_steps_s`` = total + (20 − steps) · DiT seconds per step).

On CUDA one untimed warm-up image comes first (kernel selection, Triton and ``torch.compile``
compilation; its time is reported as ``warmup_s``), then ``--repeats`` timed runs; the peak is
the CUDA allocator's peak over the timed runs, weights included. On the CPU there is no
warm-up by default (a 20-step image takes minutes) and the peak is the process's peak RSS.

Our pipeline replays the DiT from CUDA graphs on CUDA (``fastsana.cuda_graphs``) unless
``--no-cuda-graphs``; diffusers' runs eagerly. Replayed steps bypass the module hooks, so
with graphs ``dit_s`` and ``dit_calls`` count only the eager (recording) calls.

``--compile blocks`` compiles each transformer block with ``torch.compile`` (regional
compilation: the blocks share one compiled graph, so it compiles in seconds rather than
minutes); ``blocks-autotune`` lets Inductor benchmark GEMM and kernel variants
(``mode="max-autotune-no-cudagraphs"``: our pipeline still replays its own CUDA graphs);
``blocks-cudagraphs`` uses torch's CUDA graphs instead (``mode="reduce-overhead"``).
``--vae-channels-last`` stores the decoder's weights channels-last (NHWC), which cuDNN's
convolutions prefer on tensor cores; it applies to either implementation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import Tensor, nn

from bench import measure, models
from fastsana.quantize import QUANTIZATION_MODES


class PrecomputedText:
    """Stands in for our TextEncoder: returns fixed embeddings, costs nothing."""

    def __init__(self, text: Tensor, mask: Tensor) -> None:
        self.text, self.mask = text, mask
        self.hidden_size = text.shape[-1]

    def to(self, device: object) -> PrecomputedText:
        self.text, self.mask = self.text.to(device), self.mask.to(device)
        return self

    def offload(self) -> PrecomputedText:
        return self

    def encode(self, prompts: list[str], **_: object) -> tuple[Tensor, Tensor]:
        return self.text.expand(len(prompts), -1, -1), self.mask.expand(len(prompts), -1)

    def encode_negative(self, prompts: list[str], **_: object) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


class CallTimer:
    """Adds up the wall time of a module's forward calls (via hooks) or of a bound method.
    On CUDA it synchronises at both ends of each call, so the time is the call's device work;
    that costs the overlap of one call's launches with the previous call's kernels (small)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._t0 = 0.0

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self._start())
        module.register_forward_hook(lambda *_: self._stop())

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._start()
            try:
                return fn(*args, **kwargs)
            finally:
                self._stop()

        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def _capturing(self) -> bool:
        """Inside a CUDA graph recording nothing may synchronise: then the call is skipped."""
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _start(self) -> None:
        if self._capturing():
            return
        measure.synchronize(self.device)
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self._capturing():
            return
        measure.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


# --compile choice -> torch.compile options of every block (None: no compilation).
_COMPILE_OPTIONS: dict[str, dict | None] = {
    "none": None,
    "blocks": {},
    "blocks-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "blocks-cudagraphs": {"mode": "reduce-overhead"},
}
COMPILE_MODES = list(_COMPILE_OPTIONS)


def compile_blocks(transformer: nn.Module, mode: str) -> None:
    """Regional ``torch.compile`` of each transformer block (both implementations name the
    block list ``transformer_blocks``); ``mode`` is one of ``COMPILE_MODES``."""
    options = _COMPILE_OPTIONS[mode]
    if options is None:
        return
    for block in transformer.transformer_blocks:
        block.compile(**options)


def build(args: argparse.Namespace, dtype: torch.dtype, text: Tensor, mask: Tensor):
    """(pipeline callable, transformer, vae) for one implementation."""
    from fastsana.configs import SamplingDefaults
    from fastsana.pipeline import SanaPipeline, _scheduler_config

    config = models.dit_config(args.model)
    dit = models.build_dit(config, args.impl, dtype, args.device)
    vae = models.build_dcae(models.ae_config(), args.impl, dtype, args.device)
    if args.quantize:
        if args.impl != "ours":
            raise SystemExit("--quantize: only our pipeline has W8A8")
        from fastsana.quantize import quantize_w8a8

        dit = quantize_w8a8(dit)
    compile_blocks(dit, args.compile)
    if args.vae_channels_last:
        vae.to(memory_format=torch.channels_last)
    common = dict(height=args.px, width=args.px, num_inference_steps=args.steps,
                  guidance_scale=4.5, output_type="pt", use_resolution_binning=False)  # fmt: skip
    if args.impl == "ours":
        pipe = SanaPipeline(dit, vae, PrecomputedText(text, mask), SamplingDefaults(),
                            cuda_graphs=not args.no_cuda_graphs)  # fmt: skip

        def run() -> Tensor:
            return pipe("benchmark", seed=0, num_images_per_prompt=args.batch, progress=False,
                        **common)  # fmt: skip

        return run, pipe.transformer, pipe.vae
    import diffusers

    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        _scheduler_config(SamplingDefaults())
    )
    pipe = diffusers.SanaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=dit, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    text, mask = text.to(args.device, dtype), mask.to(args.device)

    def run() -> Tensor:
        return pipe(prompt=None, prompt_embeds=text, prompt_attention_mask=mask,
                    negative_prompt=None, negative_prompt_embeds=text,
                    negative_prompt_attention_mask=mask, num_images_per_prompt=args.batch,
                    generator=torch.Generator().manual_seed(0), **common).images  # fmt: skip

    return run, pipe.transformer, pipe.vae


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline_run", description=__doc__)
    p.add_argument("--impl", choices=["ours", "diffusers"], required=True)
    p.add_argument("--model", choices=models.DIT_MODELS, default="sana-0.6b")
    p.add_argument("--dtype", choices=list(models.DTYPES), default="bf16")
    p.add_argument("--px", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--repeats", type=int, default=1, help="timed runs (median reported)")
    p.add_argument(
        "--compile", choices=COMPILE_MODES, default="none", help="torch.compile the DiT blocks"
    )
    p.add_argument("--vae-channels-last", action="store_true", help="decoder weights in NHWC")
    p.add_argument("--quantize", choices=QUANTIZATION_MODES, default=None)
    p.add_argument("--no-cuda-graphs", action="store_true", help="ours: DiT eagerly on CUDA")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = models.DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, models.TEXT_TOKENS, 2304, generator=g)
    mask = torch.ones(1, models.TEXT_TOKENS, dtype=torch.long)
    run, dit, vae = build(args, dtype, text, mask)
    weights = torch.cuda.memory_allocated(device) if cuda else measure.current_rss()
    dit_timer, vae_timer = CallTimer(device), CallTimer(device)
    dit_timer.attach(dit)
    vae.decode = vae_timer.wrap(vae.decode)
    warmup = None
    with torch.no_grad():
        if cuda:
            t0 = time.perf_counter()
            run()
            measure.synchronize(device)
            warmup = time.perf_counter() - t0
            dit_timer.reset()
            vae_timer.reset()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            image = run()
            measure.synchronize(device)
            times.append(time.perf_counter() - t0)
    total = statistics.median(times)
    dit_s, decode_s = dit_timer.seconds / args.repeats, vae_timer.seconds / args.repeats
    per_step = dit_s / max(args.steps, 1)
    peak = torch.cuda.max_memory_allocated(device) if cuda else measure.max_rss()
    print(json.dumps({
        "total_s": round(total, 4),
        "all_s": [round(t, 4) for t in times],
        "images_per_s": round(args.batch / total, 3),
        "warmup_s": None if warmup is None else round(warmup, 2),
        "dit_s": round(dit_s, 4),
        "dit_calls": dit_timer.calls // args.repeats,
        "decode_s": round(decode_s, 4),
        "est_20_steps_s": round(total + (20 - args.steps) * per_step, 3),
        "weights_bytes": weights,
        "peak_bytes": peak,
        "peak_is": "CUDA allocator peak" if cuda else "process peak RSS",
        "image_mean": round(float(image.float().mean()), 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
