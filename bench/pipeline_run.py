"""One whole-pipeline run in a fresh process (called by ``bench.compare``; prints one JSON line).

    python -m bench.pipeline_run ours|diffusers MODEL fp32|bf16 PIXELS STEPS THREADS

Text encoding is excluded: both pipelines get the same precomputed 300-token embeddings
(seeded noise) for the prompt and the negative prompt. Time spent in the DiT and in the
decoder is recorded with hooks, so a run with few steps can be extrapolated to 20
(``est_20_steps_s`` = total + (20 − steps) · DiT seconds per step).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import Tensor, nn

from bench import measure, models


class PrecomputedText:
    """Stands in for our TextEncoder: returns fixed embeddings, costs nothing."""

    def __init__(self, text: Tensor, mask: Tensor) -> None:
        self.text, self.mask = text, mask
        self.hidden_size = text.shape[-1]

    def to(self, device: object) -> PrecomputedText:
        return self

    def offload(self) -> PrecomputedText:
        return self

    def encode(self, prompts: list[str], **_: object) -> tuple[Tensor, Tensor]:
        return self.text.expand(len(prompts), -1, -1), self.mask.expand(len(prompts), -1)

    def encode_negative(self, prompts: list[str], **_: object) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


class CallTimer:
    """Adds up the wall time of a module's forward calls (via hooks) or of a bound method."""

    def __init__(self) -> None:
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

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


def build(which: str, model: str, dtype: torch.dtype, text: Tensor, mask: Tensor):
    """(pipeline callable, transformer, vae) for one implementation."""
    from fastsana.configs import SamplingDefaults
    from fastsana.pipeline import SanaPipeline, _scheduler_config

    config = models.dit_config(model)
    dit = models.build_dit(config, which, dtype)
    vae = models.build_dcae(models.ae_config(), which, dtype)
    if which == "ours":
        pipe = SanaPipeline(dit, vae, PrecomputedText(text, mask), SamplingDefaults())

        def run(pixels: int, steps: int) -> Tensor:
            return pipe("benchmark", height=pixels, width=pixels, num_inference_steps=steps,
                        guidance_scale=4.5, seed=0, output_type="pt", progress=False,
                        use_resolution_binning=False)  # fmt: skip

        return run, pipe.transformer, pipe.vae
    import diffusers

    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        _scheduler_config(SamplingDefaults())
    )
    pipe = diffusers.SanaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=dit, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)

    def run(pixels: int, steps: int) -> Tensor:
        return pipe(prompt=None, prompt_embeds=text.to(dtype), prompt_attention_mask=mask,
                    negative_prompt=None, negative_prompt_embeds=text.to(dtype),
                    negative_prompt_attention_mask=mask,
                    height=pixels, width=pixels, num_inference_steps=steps, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(0), output_type="pt",
                    use_resolution_binning=False).images  # fmt: skip

    return run, pipe.transformer, pipe.vae


def main(argv: list[str]) -> None:
    which, model, dtype_name, pixels, steps, threads = argv
    torch.set_num_threads(int(threads))
    dtype = models.DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, models.TEXT_TOKENS, 2304, generator=g)
    mask = torch.ones(1, models.TEXT_TOKENS, dtype=torch.long)
    run, dit, vae = build(which, model, dtype, text, mask)
    rss_weights = measure.current_rss()
    dit_timer, vae_timer = CallTimer(), CallTimer()
    dit_timer.attach(dit)
    vae.decode = vae_timer.wrap(vae.decode)
    t0 = time.perf_counter()
    with torch.no_grad():
        image = run(int(pixels), int(steps))
    total = time.perf_counter() - t0
    per_step = dit_timer.seconds / max(int(steps), 1)
    print(json.dumps({
        "total_s": round(total, 2),
        "dit_s": round(dit_timer.seconds, 2),
        "dit_calls": dit_timer.calls,
        "decode_s": round(vae_timer.seconds, 2),
        "est_20_steps_s": round(total + (20 - int(steps)) * per_step, 1),
        "rss_after_build": rss_weights,
        "max_rss": measure.max_rss(),
        "image_mean": round(float(image.float().mean()), 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
