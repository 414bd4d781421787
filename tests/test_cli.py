"""The `fastsana` command line: generate, convert, errors (one line, exit status 2)."""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_text import make_text_components

from fastsana.cli import main
from fastsana.configs import DIT_PRESETS, ae_preset
from fastsana.images import read_png_metadata
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.models.text_encoder import TextEncoder
from fastsana.pipeline import SanaPipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random pipeline folder written by our own save_pretrained (native 256 px)."""
    torch.manual_seed(0)
    config = dataclasses.replace(DIT_PRESETS["sana-tiny"].config, caption_channels=32)
    text_model, tokenizer = make_text_components(PROMPTS, hidden_size=32)
    pipe = SanaPipeline(
        SanaTransformer(config), DCAE(ae_preset("dc-ae-tiny")), TextEncoder(text_model, tokenizer)
    )
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_generate_writes_png_with_settings(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "img.png"
    status, stdout, _ = run(
        capsys,
        "generate",
        PROMPTS[0],
        "-o",
        out,
        "--model",
        model_dir,
        "--steps",
        "2",
        "--seed",
        "5",
        "--size",
        "320x256",
    )
    assert status == 0 and str(out) in stdout
    image = Image.open(out)
    assert image.size == (320, 256)
    meta = read_png_metadata(out)
    assert meta["prompt"] == PROMPTS[0] and meta["seed"] == 5 and meta["steps"] == 2
    assert meta["size"] == "320x256" and meta["sampler"] == "flow_dpm"
    # Same settings → the same pixels; another seed → different pixels.
    run(
        capsys,
        "generate",
        PROMPTS[0],
        "-o",
        tmp_path / "again.png",
        "--model",
        model_dir,
        "--steps",
        "2",
        "--seed",
        "5",
        "--size",
        "320x256",
    )
    run(
        capsys,
        "generate",
        PROMPTS[0],
        "-o",
        tmp_path / "other.png",
        "--model",
        model_dir,
        "--steps",
        "2",
        "--seed",
        "6",
        "--size",
        "320x256",
    )
    assert Image.open(tmp_path / "again.png").tobytes() == image.tobytes()
    assert Image.open(tmp_path / "other.png").tobytes() != image.tobytes()


def test_prompt_file_batch_and_grid(model_dir, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out = tmp_path / "many.png"
    status, _, _ = run(
        capsys,
        "generate",
        "--prompt-file",
        prompts,
        "-o",
        out,
        "--model",
        model_dir,
        "--steps",
        "1",
        "--batch",
        "2",
        "--sampler",
        "flow_euler",
    )
    assert status == 0
    written = sorted(tmp_path.glob("many-*.png"))
    assert [p.name for p in written] == [f"many-00{i}.png" for i in range(4)]
    metas = [read_png_metadata(p) for p in written]
    assert [m["prompt"] for m in metas] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert all(m["sampler"] == "flow_euler" for m in metas)

    grid = tmp_path / "grid.png"
    status, _, _ = run(
        capsys,
        "generate",
        "--prompt-file",
        prompts,
        "-o",
        grid,
        "--model",
        model_dir,
        "--steps",
        "1",
        "--batch",
        "2",
        "--grid",
    )
    assert status == 0 and Image.open(grid).size == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2)
    assert len(read_png_metadata(grid)["images"]) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--size", "100x100"], "multiple of 32"),
        (["generate", "x", "--size", "wide"], "--size must look like 1024x768"),
        (["generate", "x", "--sampler", "heun"], "invalid choice: 'heun'"),
        (["generate"], "give a prompt or --prompt-file"),
        (["generate", "x", "--prompt-file", "/nonexistent.txt"], "does not exist"),
        (["generate", "x", "--model", "/nonexistent/model"], "model not found"),
        (["generate", "x", "--model", "no-such-org/no-such-model"], "could not get"),  # offline
        (["generate", "x", "-o", "out.jpg"], "must end in .png"),
        (["generate", "x", "--guidance", "-1"], "--guidance must be a finite number"),
        (["convert", "/nonexistent.pth", "out"], "not found"),
        (["demo", "--preset", "nope"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path) -> None:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_empty_prompt_file(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    status, _, err = run(capsys, "generate", "--prompt-file", empty)
    assert status == 2 and "has no prompts" in err


def test_missing_model_files(model_dir, tmp_path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    status, _, err = run(capsys, "generate", "x", "--model", broken)
    assert status == 2 and "missing" in err and "transformer" in err


def test_convert_official_checkpoint(tmp_path, capsys) -> None:
    """`fastsana convert` turns a file into a diffusers folder that loads with the same weights."""
    from fastsana import load_transformer, save_transformer

    model = SanaTransformer(DIT_PRESETS["sana-tiny"].config)
    save_transformer(model, tmp_path / "src")
    status, stdout, _ = run(
        capsys, "convert", tmp_path / "src", tmp_path / "dst", "--dtype", "bf16"
    )
    assert status == 0 and "wrote" in stdout
    loaded = load_transformer(tmp_path / "dst")
    assert loaded.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16))


def test_demo_runs(capsys) -> None:
    status, stdout, _ = run(capsys, "demo", "--preset", "sana-tiny", "--text-tokens", "8")
    expected = sum(p.numel() for p in SanaTransformer(DIT_PRESETS["sana-tiny"].config).parameters())
    assert status == 0 and f"{expected:,} parameters" in stdout


def test_generate_encodes_with_the_text_encoder_alone_before_loading_the_dit(
    model_dir, tmp_path, capsys, monkeypatch
) -> None:
    """The text encoder (GBs for SANA's Gemma-2-2B) encodes every prompt and is gone before
    the DiT and the autoencoder are loaded, so the peak is one stage, not their sum."""
    import fastsana.pipeline as pipeline_module

    events: list[str] = []
    encoders: list[weakref.ref] = []

    def load_encoder(*args, _original=pipeline_module.load_text_encoder, **kwargs):
        encoder, defaults = _original(*args, **kwargs)
        encoders.append(weakref.ref(encoder))
        events.append("load text encoder")
        return encoder, defaults

    def encode(*args, _original=pipeline_module.encode_prompts, **kwargs):
        events.append("encode")
        return _original(*args, **kwargs)

    def load_dit(*args, _original=pipeline_module.load_transformer, **kwargs):
        alive = any(ref() is not None for ref in encoders)
        events.append("load DiT, encoder alive" if alive else "load DiT")
        return _original(*args, **kwargs)

    def generate(self, *args, _original=SanaPipeline.__call__, **kwargs):
        assert self.text_encoder is None  # the denoising pipeline never had one
        events.append("generate")
        return _original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "load_text_encoder", load_encoder)
    monkeypatch.setattr(pipeline_module, "encode_prompts", encode)
    monkeypatch.setattr(pipeline_module, "load_transformer", load_dit)
    monkeypatch.setattr(SanaPipeline, "__call__", generate)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n{PROMPTS[1]}\n")
    status, _, _ = run(
        capsys, "generate", "--prompt-file", prompts, "-o", tmp_path / "x.png",
        "--model", model_dir, "--steps", "1", "--max-batch", "1",
    )  # fmt: skip
    assert status == 0
    assert events == ["load text encoder", "encode", "encode", "load DiT", "generate", "generate"]
    assert len(list(tmp_path.glob("x-*.png"))) == 2


def test_generate_same_image_as_the_pipeline(model_dir, tmp_path, capsys) -> None:
    """Encoding outside the pipeline changes nothing: the CLI's image is the pipeline's."""
    out = tmp_path / "cli.png"
    status, _, _ = run(capsys, "generate", PROMPTS[0], "-o", out, "--model", model_dir,
                       "--steps", "2", "--seed", "3")  # fmt: skip
    assert status == 0
    pipe = SanaPipeline.from_pretrained(model_dir, device="cpu")
    (want,) = pipe(PROMPTS[0], num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


@pytest.mark.parametrize(("flag", "expected"), [((), True), (("--no-cuda-graphs",), False)])
def test_generate_cuda_graphs_switch(model_dir, tmp_path, capsys, monkeypatch, flag, expected):
    seen: list[bool] = []
    original = SanaPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(self.cuda_graphs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SanaPipeline, "__call__", spy)
    status, _, _ = run(
        capsys, "generate", PROMPTS[0], "-o", tmp_path / "x.png", "--model", model_dir,
        "--steps", "1", *flag,
    )  # fmt: skip
    assert status == 0 and seen == [expected]
