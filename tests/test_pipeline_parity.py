"""End to end: a tiny diffusers SanaPipeline, saved, loaded by fastsana, gives the same image.

The reference pipeline is built with random weights (tiny Gemma-2, tiny DC-AE with both block
types, tiny Linear DiT), saved with ``save_pretrained`` and loaded with
``fastsana.SanaPipeline.from_pretrained``; the same prompt, seed and settings must give the
same pixels (max abs difference ≤ 2e-3 in [0, 1]).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_text import make_text_components

from fastsana.models.text_encoder import DEFAULT_INSTRUCTION
from fastsana.pipeline import SanaPipeline

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle to the left of a blue square", "three green stars"]
TOLERANCE = 2e-3


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers pipeline, its saved folder)."""
    torch.manual_seed(0)
    text_model, tokenizer = make_text_components(PROMPTS, hidden_size=32)
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=16,  # 512 px: diffusers' resolution binning needs 16/32/64/128
    )
    _randomize(transformer, 1)
    stages = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = diffusers.AutoencoderDC(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=stages,
        decoder_block_types=stages,
        encoder_block_out_channels=(8, 8, 16, 16, 16, 16),
        decoder_block_out_channels=(8, 8, 16, 16, 16, 16),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        scaling_factor=0.41407,
    )
    _randomize(vae, 2, scale=0.02)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )
    pipe = diffusers.SanaPipeline(tokenizer, text_model, vae, transformer, scheduler).to(
        torch.float32
    )
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.eval()  # the tiny AE has BatchNorm layers
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def ours(reference):
    return SanaPipeline.from_pretrained(reference[1], dtype=torch.float32, device="cpu")


def _reference_images(pipe, prompt, seed, **kwargs) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, generator=generator, output_type="pt", return_dict=False, **kwargs)[0]
    return out.float()


CASES = {
    "instruction-cfg-nonsquare": dict(
        height=384, width=640, num_inference_steps=6, guidance_scale=4.5, instruction=True
    ),
    "no-instruction-cfg-batch": dict(
        height=512, width=512, num_inference_steps=4, guidance_scale=3.0, instruction=False
    ),
    "negative-prompt-batch": dict(
        height=448,
        width=576,
        num_inference_steps=3,
        guidance_scale=5.0,
        instruction=False,
        negative_prompt="a white star",
    ),
    "no-cfg-no-binning": dict(
        height=256,
        width=416,
        num_inference_steps=5,
        guidance_scale=1.0,
        instruction=True,
        use_resolution_binning=False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_image_as_diffusers(name: str, reference, ours) -> None:
    case = dict(CASES[name])
    instruction = list(DEFAULT_INSTRUCTION) if case.pop("instruction") else None
    prompt = PROMPTS if name.endswith("batch") else PROMPTS[0]
    expected = _reference_images(
        reference[0], prompt, seed=7, complex_human_instruction=instruction, **case
    )
    got = ours(
        prompt,
        seed=7,
        complex_human_instruction=instruction,
        output_type="pt",
        progress=False,
        **case,
    )
    assert got.shape == expected.shape
    assert got.shape[-2:] == (case["height"], case["width"])
    difference = (got - expected).abs().max().item()
    assert difference <= TOLERANCE, f"max abs pixel difference {difference}"
    # The comparison must be able to fail: another seed gives a different image.
    other = ours(
        prompt,
        seed=8,
        complex_human_instruction=instruction,
        output_type="pt",
        progress=False,
        **case,
    )
    assert (other - expected).abs().max().item() > 10 * TOLERANCE


def test_several_images_per_prompt(reference, ours) -> None:
    """A batch of prompts with 2 images each equals diffusers run prompt by prompt on the
    same noise. (diffusers' own batched path pairs the embeddings, repeated prompt by prompt,
    with masks repeated batch by batch — p0 p0 p1 p1 vs p0 p1 p0 p1 — so each image gets
    another prompt's padding mask when n > 1; we do not reproduce that.)"""
    settings = dict(height=448, width=576, num_inference_steps=3, guidance_scale=5.0)
    noise = torch.randn(4, 8, 14, 18, generator=torch.Generator().manual_seed(5))
    got = ours(
        PROMPTS,
        latents=noise,
        num_images_per_prompt=2,
        output_type="pt",
        complex_human_instruction=None,
        progress=False,
        **settings,
    )
    for i, prompt in enumerate(PROMPTS):
        expected = reference[0](
            prompt,
            latents=noise[2 * i : 2 * i + 2],
            num_images_per_prompt=2,
            output_type="pt",
            return_dict=False,
            complex_human_instruction=None,
            **settings,
        )[0]
        assert (got[2 * i : 2 * i + 2] - expected).abs().max().item() <= TOLERANCE


def test_saved_by_fastsana_loads_in_diffusers(ours, tmp_path) -> None:
    """Our save_pretrained writes a folder diffusers' SanaPipeline loads and runs the same."""
    ours.save_pretrained(tmp_path / "p")
    theirs = diffusers.SanaPipeline.from_pretrained(tmp_path / "p").to(torch.float32)
    settings = dict(
        height=512,
        width=512,
        num_inference_steps=3,
        guidance_scale=4.5,
        complex_human_instruction=list(DEFAULT_INSTRUCTION),
    )
    expected = _reference_images(theirs, PROMPTS[1], seed=3, **settings)
    got = ours(PROMPTS[1], seed=3, output_type="pt", progress=False, **settings)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_pil_output_and_defaults(ours) -> None:
    images = ours(PROMPTS[0], seed=1, num_inference_steps=2, progress=False)
    assert len(images) == 1 and images[0].size == (512, 512)  # native size from sample_size


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=500), "height must be a multiple of 32"),
        (dict(width=16384), "width must be a multiple of 32 between 32 and 8192"),
        (dict(sampler="heun"), "unknown sampler 'heun'"),
        (dict(num_inference_steps=0), "num_inference_steps must be an int"),
        (dict(output_type="np"), "output_type must be"),
        (dict(negative_prompt=["a", "b", "c"]), "negative_prompt must be a string or a list"),
    ],
)
def test_bad_arguments(ours, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS[0], progress=False, **kwargs)


def test_model_defaults_choose_the_caption_encoding(ours, reference, tmp_path) -> None:
    """A model trained on bare, short captions (the Shapes model) says so in its folder: a
    reloaded pipeline then encodes prompts like diffusers with complex_human_instruction=None
    and that max_sequence_length, without being told."""
    shapes_like = SanaPipeline(
        ours.transformer,
        ours.vae,
        ours.text_encoder,
        dataclasses.replace(ours.defaults, instruction=False, max_sequence_length=24),
    )
    loaded = SanaPipeline.from_pretrained(shapes_like.save_pretrained(tmp_path / "p"))
    assert loaded.defaults == shapes_like.defaults
    settings = dict(height=256, width=256, num_inference_steps=3, guidance_scale=4.5)
    expected = _reference_images(
        reference[0],
        PROMPTS[0],
        seed=4,
        complex_human_instruction=None,
        max_sequence_length=24,
        **settings,
    )
    got = loaded(PROMPTS[0], seed=4, output_type="pt", progress=False, **settings)
    assert (got - expected).abs().max().item() <= TOLERANCE
    # The comparison can fail: the SANA encoding (instruction, 300 tokens) differs.
    sana = ours(PROMPTS[0], seed=4, output_type="pt", progress=False, **settings)
    assert (sana - expected).abs().max().item() > 10 * TOLERANCE


def test_prompt_embeds_after_releasing_the_text_encoder(reference, tmp_path) -> None:
    """Encode, drop the text encoder, then generate from the embeddings: still diffusers'
    image. Without the encoder, prompts are refused with a message saying what to pass."""
    pipe = SanaPipeline.from_pretrained(reference[1], dtype=torch.float32, device="cpu")
    settings = dict(height=256, width=256, num_inference_steps=3, guidance_scale=4.5)
    instruction = list(DEFAULT_INSTRUCTION)
    expected = _reference_images(
        reference[0], PROMPTS[0], seed=5, complex_human_instruction=instruction, **settings
    )
    cond, uncond = pipe.encode_prompt(PROMPTS[0], complex_human_instruction=instruction)
    pipe.release_text_encoder()
    assert pipe.text_encoder is None
    got = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        seed=5,
        output_type="pt",
        progress=False,
        **settings,
    )
    assert (got - expected).abs().max().item() <= TOLERANCE
    with pytest.raises(RuntimeError, match="needs the text encoder"):
        pipe(PROMPTS[0], progress=False, **settings)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        pipe(prompt_embeds=cond, progress=False, **settings)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPTS[0], prompt_embeds=cond, negative_prompt_embeds=uncond, **settings)
    with pytest.raises(ValueError, match="must match prompt_embeds"):
        pipe(prompt_embeds=cond, negative_prompt_embeds=_two(uncond), **settings)
    # No guidance: the prompt side alone is enough. A pipeline loaded without a text encoder
    # gives the same image from the same embeddings.
    bare = SanaPipeline.from_pretrained(reference[1], dtype=torch.float32, load_text_encoder=False)
    assert bare.text_encoder is None
    no_cfg = {**settings, "guidance_scale": 1.0}
    a = pipe(prompt_embeds=cond, seed=2, output_type="pt", progress=False, **no_cfg)
    b = bare(prompt_embeds=cond, seed=2, output_type="pt", progress=False, **no_cfg)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="save_pretrained needs the text encoder"):
        bare.save_pretrained(tmp_path / "no-encoder")


def _two(condition):
    return type(condition)(condition.text.repeat(2, 1, 1), condition.mask.repeat(2, 1))
