"""Text to image: prompt → text encoder → Linear DiT + flow solver → DC-AE → image.

``SanaPipeline.from_pretrained`` reads a diffusers-format pipeline folder (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or downloads
one from the Hugging Face Hub; ``save_pretrained`` writes the same layout. Given the same
prompt, seed and settings it produces diffusers' ``SanaPipeline`` image: same noise
(``torch.randn`` from a CPU generator, fp32), same truncated model timesteps, same solver.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastsana.checkpoints.autoencoder import load_autoencoder, save_autoencoder
from fastsana.checkpoints.common import CheckpointError, atomic_write_json, read_json
from fastsana.checkpoints.transformer import load_transformer, save_transformer
from fastsana.configs import SamplingDefaults
from fastsana.cuda_graphs import GraphedTransformer
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.models.text_encoder import DEFAULT_INSTRUCTION, Instruction, TextEncoder
from fastsana.quantize import QUANTIZATION_MODES, quantize_w8a8
from fastsana.resolution import MAX_SIDE, SUPPORTED_BASE_SIZES, bin_for, resize_and_center_crop
from fastsana.sampling import (
    SAMPLERS,
    TextCondition,
    flow_sigmas,
    guided_model_fn,
    sample,
    truncated_timestep_fn,
)

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Hub files a pipeline needs (skips other precisions' duplicates and training leftovers).
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.safetensors", "*/*.model"]


DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "sana-shapes"


class _ModelDefault:
    """Marks an argument the model's ``SamplingDefaults`` decides (see ``MODEL_DEFAULT``)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


# ``complex_human_instruction=MODEL_DEFAULT`` (the default): SANA's instruction when the model
# was trained with it (``SamplingDefaults.instruction``), none when it was trained on bare text.
MODEL_DEFAULT = _ModelDefault()


def default_model_path() -> Path:
    """The embedded default model: a small SANA trained by this project on the Shapes world
    (see docs/shapes.md), as a diffusers-format pipeline folder."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise CheckpointError(
            f"the embedded default model is not installed at {DEFAULT_MODEL_DIR}; "
            "pass a model folder or Hub id (--model)"
        )
    return DEFAULT_MODEL_DIR


@dataclass(frozen=True)
class GenerationSettings:
    """What a call resolved its arguments to (also written into PNG metadata by the CLI)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    flow_shift: float
    sampler: str
    seed: int | None


class SanaPipeline:
    """The whole text-to-image system; see the module docstring."""

    def __init__(
        self,
        transformer: SanaTransformer,
        vae: DCAE,
        text_encoder: TextEncoder | None,
        defaults: SamplingDefaults | None = None,
        offload_text_encoder: bool | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ValueError(
                f"the autoencoder's latent_channels ({vae.config.latent_channels}) must equal "
                f"the transformer's in_channels ({transformer.config.in_channels})"
            )
        if (
            text_encoder is not None
            and text_encoder.hidden_size != transformer.config.caption_channels
        ):
            raise ValueError(
                f"the text encoder's hidden size ({text_encoder.hidden_size}) must equal the "
                f"transformer's caption_channels ({transformer.config.caption_channels})"
            )
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder
        self.defaults = defaults or SamplingDefaults()
        self.offload_text_encoder = offload_text_encoder
        # On CUDA, replay the DiT from CUDA graphs (fastsana.cuda_graphs); kept across calls,
        # so later images of the same size skip the recording. Setting it False frees them.
        self.cuda_graphs = cuda_graphs
        self._graphed: GraphedTransformer | None = None

    # ------------------------------------------------------------------ loading, saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        quantize: str | None = None,
        load_text_encoder: bool = True,
        **kwargs: object,
    ) -> SanaPipeline:
        """Load a diffusers-format pipeline folder, or download one by Hub id when online.

        ``dtype=None``: bf16 on CUDA, fp32 on CPU. ``device=None``: CUDA when available.
        ``quantize="w8a8"``: int8 weights and activations in the transformer's linear layers
        (see ``fastsana.quantize``). ``load_text_encoder=False``: no text encoder (pass
        ``prompt_embeds`` made elsewhere; saves its memory, GBs for Gemma-2-2B).
        """
        if quantize is not None and quantize not in QUANTIZATION_MODES:
            raise ValueError(
                f"quantize must be None or one of {', '.join(QUANTIZATION_MODES)}, got {quantize!r}"
            )
        folder = _locate_pipeline(path_or_hub_id)
        device, dtype = resolve_device_dtype(device, dtype)
        _check_components(folder)
        transformer = load_transformer(folder / "transformer", dtype=dtype, device=device)
        if quantize == "w8a8":
            quantize_w8a8(transformer)
        vae = load_autoencoder(folder / "vae", dtype=dtype, device=device)
        text_encoder = (
            TextEncoder.from_pretrained(
                folder / "text_encoder", folder / "tokenizer", dtype=dtype, device=device
            )
            if load_text_encoder
            else None
        )
        defaults = _folder_defaults(folder)
        return cls(transformer, vae, text_encoder, defaults, **kwargs)  # type: ignore[arg-type]

    def save_pretrained(
        self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None
    ) -> Path:
        """Write a diffusers-format pipeline folder that diffusers and fastsana both load."""
        folder = Path(folder)
        encoder = self._require_text_encoder("save_pretrained")
        save_transformer(self.transformer, folder / "transformer", dtype=dtype)
        save_autoencoder(self.vae, folder / "vae", dtype=dtype)
        encoder.save_pretrained(folder / "text_encoder", folder / "tokenizer", dtype=dtype)
        atomic_write_json(
            folder / "scheduler" / "scheduler_config.json", _scheduler_config(self.defaults)
        )
        atomic_write_json(
            folder / "model_index.json",
            {
                "_class_name": "SanaPipeline",
                "_diffusers_version": "0.32.0",
                # diffusers ignores keys starting with "_": our sampling defaults ride along.
                "_fastsana_defaults": {
                    "steps": self.defaults.steps,
                    "guidance_scale": self.defaults.guidance_scale,
                    "sampler": self.defaults.sampler,
                    "instruction": self.defaults.instruction,
                    "max_sequence_length": self.defaults.max_sequence_length,
                    "echo": self.defaults.echo,
                },
                "transformer": ["diffusers", "SanaTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderDC"],
                "text_encoder": ["transformers", type(encoder.model).__name__],
                "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            },
        )
        return folder

    # ----------------------------------------------------------------------- inference

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def native_size(self) -> int:
        """The training resolution in pixels (sample_size latents × the AE's compression)."""
        return self.transformer.config.sample_size * self.vae.spatial_compression

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        complex_human_instruction: Instruction | _ModelDefault | None = MODEL_DEFAULT,
        guidance: bool = True,
        max_sequence_length: int | None = None,
    ) -> tuple[TextCondition, TextCondition | None]:
        """Text conditions for the prompts and (when guiding) the negative prompts
        (``encode_prompts`` with this pipeline's text encoder and defaults).

        ``max_sequence_length``: caption tokens (default: the model's, 300 for SANA)."""
        encoder = self._require_text_encoder("encode_prompt").to(self.device)
        conditions = encode_prompts(
            encoder,
            self.defaults,
            prompt,
            negative_prompt,
            complex_human_instruction,
            guidance=guidance,
            max_sequence_length=max_sequence_length,
        )
        if self._should_offload():
            encoder.offload()
        return conditions

    def release_text_encoder(self) -> None:
        """Drop the text encoder and free its memory (Gemma-2-2B: about 5 GB in bf16, 10 GB in
        fp32), which denoising and decoding do not need. Encode first: later calls take
        ``prompt_embeds`` / ``negative_prompt_embeds`` from ``encode_prompt``."""
        self.text_encoder = None
        free_memory()

    def _require_text_encoder(self, what: str) -> TextEncoder:
        if self.text_encoder is None:
            raise RuntimeError(
                f"{what} needs the text encoder, which this pipeline does not have (released "
                "or not loaded); pass prompt_embeds= and negative_prompt_embeds= made by "
                "encode_prompt() instead"
            )
        return self.text_encoder

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        prompt_embeds: TextCondition | None = None,
        negative_prompt_embeds: TextCondition | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        sampler: str | None = None,
        num_images_per_prompt: int = 1,
        use_resolution_binning: bool = True,
        complex_human_instruction: Instruction | _ModelDefault | None = MODEL_DEFAULT,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> list[Image.Image] | Tensor:
        """Generate images. Returns PIL images, or with ``output_type="pt"`` a (B, 3, H, W)
        tensor in [0, 1] (``"latent"``: the final latents). ``prompt`` may be a list (one
        batch); images come prompt by prompt, ``num_images_per_prompt`` each.

        ``prompt_embeds`` (and, with guidance, ``negative_prompt_embeds``): conditions from
        ``encode_prompt``, instead of ``prompt``; the text encoder is then not used."""
        settings = self.resolve(height, width, num_inference_steps, guidance_scale, sampler, seed)
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"num_images_per_prompt must be an int ≥ 1, got {num_images_per_prompt!r}"
            )
        guide = settings.guidance_scale != 1.0
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts:
                raise ValueError("prompt must be a string or a non-empty list of strings")
            cond, uncond = self.encode_prompt(
                prompts, negative_prompt, complex_human_instruction, guide, max_sequence_length
            )
        else:
            cond, uncond = _given_conditions(prompt, prompt_embeds, negative_prompt_embeds, guide)

        gen_h, gen_w = settings.height, settings.width
        if use_resolution_binning and self.native_size in SUPPORTED_BASE_SIZES:
            gen_h, gen_w = bin_for(settings.height, settings.width, self.native_size)

        batch = cond.text.shape[0] * num_images_per_prompt
        cond = _repeat(cond, num_images_per_prompt)
        uncond = _repeat(uncond, num_images_per_prompt) if uncond is not None else None
        f = self.vae.spatial_compression
        shape = (batch, self.transformer.config.in_channels, gen_h // f, gen_w // f)
        x = self._initial_noise(shape, settings.seed, latents)  # (B, C, h, w) fp32

        sigmas = flow_sigmas(settings.steps, settings.flow_shift)
        denoise = self._denoiser(truncated_timestep_fn(sigmas))
        model_fn = guided_model_fn(denoise, cond, uncond, settings.guidance_scale)
        x = sample(settings.sampler, model_fn, x, sigmas.to(self.device), progress=progress)
        if output_type == "latent":
            return x

        images = self.vae.decode(
            (x / self.vae.scaling_factor).to(self.vae.dtype), progress=progress
        )
        if (gen_h, gen_w) != (settings.height, settings.width):
            images = resize_and_center_crop(images.float(), settings.height, settings.width)
        images = (images.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        return images.cpu() if output_type == "pt" else to_pil(images)

    def resolve(
        self,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
    ) -> GenerationSettings:
        """Fill unset arguments from the model's defaults and validate all of them."""
        d = self.defaults
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        f = self.vae.spatial_compression
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or side < f or side > MAX_SIDE or side % f:
                raise ValueError(
                    f"{name} must be a multiple of {f} between {f} and {MAX_SIDE}, got {side!r}"
                )
        steps = d.steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int ≥ 1, got {steps!r}")
        guidance_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance_scale}")
        sampler = sampler or d.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return GenerationSettings(height, width, steps, guidance_scale, d.flow_shift, sampler, seed)

    def _forward(self):
        """The DiT as the sampler calls it: replayed from CUDA graphs where they are on."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            self._graphed = None  # turned off: free the recorded graphs' memory
            return self.transformer
        if self._graphed is None or self._graphed.transformer is not self.transformer:
            self._graphed = GraphedTransformer(self.transformer)
        return self._graphed

    def _denoiser(self, timestep_fn):
        model, scale = self.transformer, self.transformer.config.timestep_scale
        forward = self._forward()
        cache: dict[str, object] = {}

        def denoise(x: Tensor, sigma: Tensor, text: Tensor, mask: Tensor) -> Tensor:
            t = timestep_fn(sigma) * scale  # (B,) model timesteps
            # The caption does not change between steps (the guidance wrapper passes the same
            # tensors each time): project it to every block's K/V once per image.
            if cache.get("text") is not text or cache.get("mask") is not mask:
                context = model.prepare_text(text.to(model.dtype), mask)
                cache.update(text=text, mask=mask, context=context)
            return forward(x.to(model.dtype), t, cache["context"]).float()

        return denoise

    def _initial_noise(
        self, shape: tuple[int, ...], seed: int | None, latents: Tensor | None
    ) -> Tensor:
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.float().to(self.device)
        # Drawn on the CPU in fp32, as diffusers does, so a seed means the same image anywhere.
        generator = torch.Generator("cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _should_offload(self) -> bool:
        if self.offload_text_encoder is not None:
            return self.offload_text_encoder
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return free < 8 * 2**30  # memory is short: make room for the DiT and the decoder


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → PIL images (rounded, as diffusers' image processor does)."""
    array = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _given_conditions(
    prompt: object,
    cond: TextCondition,
    uncond: TextCondition | None,
    guide: bool,
) -> tuple[TextCondition, TextCondition | None]:
    """Check the ``prompt_embeds`` / ``negative_prompt_embeds`` a caller passed."""
    if prompt is not None:
        raise ValueError("pass prompt or prompt_embeds, not both")
    for name, c in (("prompt_embeds", cond), ("negative_prompt_embeds", uncond)):
        if c is not None and not isinstance(c, TextCondition):
            raise ValueError(f"{name} must be a TextCondition (from encode_prompt), got {c!r}")
    if not guide:
        return cond, None
    if uncond is None:
        raise ValueError(
            "guidance_scale ≠ 1 needs negative_prompt_embeds as well as prompt_embeds "
            "(encode_prompt returns both)"
        )
    if uncond.text.shape[0] != cond.text.shape[0] or uncond.text.shape[2] != cond.text.shape[2]:
        raise ValueError(
            f"negative_prompt_embeds {tuple(uncond.text.shape)} must match prompt_embeds "
            f"{tuple(cond.text.shape)} in batch size and width"
        )
    return cond, uncond


@torch.no_grad()
def encode_prompts(
    encoder: TextEncoder,
    defaults: SamplingDefaults,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    complex_human_instruction: Instruction | _ModelDefault | None = MODEL_DEFAULT,
    *,
    guidance: bool = True,
    max_sequence_length: int | None = None,
) -> tuple[TextCondition, TextCondition | None]:
    """Text conditions for the prompts and (when ``guidance``) the negative prompts, encoded
    the way a model with sampling ``defaults`` was trained (instruction, caption length, echo).

    Works without a pipeline, so that a caller short of memory can encode with the text
    encoder alone, free it, and only then load the DiT and autoencoder (what ``fastsana
    generate`` does; see ``load_text_encoder``)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = (
        [negative_prompt] * len(prompts)
        if isinstance(negative_prompt, str)
        else list(negative_prompt)
    )
    if len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt must be a string or a list of {len(prompts)} strings, "
            f"got {len(negatives)}"
        )
    if isinstance(complex_human_instruction, _ModelDefault):
        complex_human_instruction = DEFAULT_INSTRUCTION if defaults.instruction else None
    length = max_sequence_length or defaults.max_sequence_length
    echo = defaults.echo
    emb, mask = encoder.encode(
        prompts, instruction=complex_human_instruction, max_length=length, echo=echo
    )
    cond = TextCondition(emb, mask)
    uncond = (
        TextCondition(*encoder.encode_negative(negatives, max_length=length, echo=echo))
        if guidance
        else None
    )
    return cond, uncond


def free_memory() -> None:
    """Return the memory of objects just dropped: Python's cycles, and CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """``device=None``: CUDA when available; ``dtype=None``: bf16 on CUDA, fp32 elsewhere."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_text_encoder(
    path_or_hub_id: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[TextEncoder, SamplingDefaults]:
    """A pipeline folder's text encoder and tokenizer alone, with the folder's sampling
    defaults (for ``encode_prompts``); same ``dtype`` / ``device`` rules as
    ``SanaPipeline.from_pretrained``."""
    folder = _locate_pipeline(path_or_hub_id)
    device, dtype = resolve_device_dtype(device, dtype)
    _check_components(folder)  # the whole folder: fail before minutes of encoding, not after
    encoder = TextEncoder.from_pretrained(
        folder / "text_encoder", folder / "tokenizer", dtype=dtype, device=device
    )
    return encoder, _folder_defaults(folder)


def _check_components(folder: Path) -> None:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(f"{folder} is not a SANA pipeline folder: missing {missing}")


def _folder_defaults(folder: Path) -> SamplingDefaults:
    index = read_json(folder / "model_index.json", "pipeline index")
    return _read_defaults(folder / "scheduler" / "scheduler_config.json", index)


def _repeat(condition: TextCondition, n: int) -> TextCondition:
    if n == 1:
        return condition
    return TextCondition(
        condition.text.repeat_interleave(n, dim=0), condition.mask.repeat_interleave(n, dim=0)
    )


def _locate_pipeline(path_or_hub_id: str | os.PathLike[str]) -> Path:
    path = Path(path_or_hub_id)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} has no model_index.json: not a pipeline folder")
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"model not found: {text} (expected a pipeline folder or a Hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, no access: one clear line
        raise CheckpointError(f"could not get {text!r} from the Hugging Face Hub: {e}") from e


def _read_defaults(scheduler_config: Path, index: dict) -> SamplingDefaults:
    base = SamplingDefaults()
    raw = read_json(scheduler_config, "scheduler config") if scheduler_config.is_file() else {}
    shift = raw.get("flow_shift", raw.get("shift", base.flow_shift))
    ours = index.get("_fastsana_defaults", {})
    return SamplingDefaults(
        steps=int(ours.get("steps", base.steps)),
        guidance_scale=float(ours.get("guidance_scale", base.guidance_scale)),
        flow_shift=float(shift),
        sampler=ours.get("sampler", base.sampler),
        instruction=bool(ours.get("instruction", base.instruction)),
        max_sequence_length=int(ours.get("max_sequence_length", base.max_sequence_length)),
        echo=bool(ours.get("echo", base.echo)),
    )


def _scheduler_config(defaults: SamplingDefaults) -> dict:
    """diffusers' DPMSolverMultistepScheduler set up as SANA's Flow-DPM-Solver."""
    return {
        "_class_name": "DPMSolverMultistepScheduler",
        "_diffusers_version": "0.32.0",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": defaults.flow_shift,
        "num_train_timesteps": 1000,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
