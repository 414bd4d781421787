"""Whole training runs on tiny models: the loss goes down, images are encoded on the fly or
read from a `fastsana cache`, validation grids and exports load back, corrupt images are
skipped, LoRA merges exactly, the autoencoder trains, WebDataset shards stream."""

import dataclasses
import importlib.util
import json
import logging
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_helpers import (
    TEXT_TOKENS,
    captions_of,
    dit_config,
    make_components,
    make_shapes,
    one_thread,  # noqa: F401 (autouse fixture)
)

from fastsana.checkpoints.autoencoder import load_autoencoder
from fastsana.checkpoints.transformer import load_transformer, save_transformer
from fastsana.cli import main as fastsana_main
from fastsana.configs import DIT_PRESETS
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.models.text_encoder import TextEncoder
from fastsana.pipeline import SanaPipeline
from fastsana.shapes import make_dataset
from fastsana.training import lora
from fastsana.training.ae_losses import PatchDiscriminator
from fastsana.training.cache import CachedLatentDataset
from fastsana.training.checkpointing import TensorReader, latest_checkpoint
from fastsana.training.components import read_null_caption
from fastsana.training.config import LoRAConfig, ModelConfig, load_config
from fastsana.training.config_parse import ConfigError
from fastsana.training.data import ImageFolderDataset
from fastsana.training.metrics import plot_loss, read_log
from fastsana.training.model_setup import build_autoencoder, build_transformer
from fastsana.training.objectives import draw_flow_inputs, flow_matching_loss
from fastsana.training.trainer import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes images, tiny frozen components and a cache written by `fastsana cache`."""
    root = tmp_path_factory.mktemp("runs")
    data = make_shapes(root / "data", n=8)
    paths = make_components(root / "components", captions_of(data))
    argv = ["cache", str(data), str(root / "cache"), "--vae", str(paths.vae)]
    argv += ["--text-encoder", str(paths.text_encoder), "--tokenizer", str(paths.tokenizer)]
    argv += ["--base-size", "256", "--text-max-length", str(TEXT_TOKENS), "--device", "cpu"]
    assert fastsana_main(argv) == 0
    return root, data, paths, root / "cache"


def weights(run_dir, stem="model"):
    reader = TensorReader(latest_checkpoint(run_dir), stem)
    return reader.read_all()


def test_cache_holds_the_encoders_outputs(world):
    _, data, paths, cache = world
    vae = load_autoencoder(paths.vae)
    encoder = TextEncoder.from_pretrained(paths.text_encoder, paths.tokenizer)
    cached = CachedLatentDataset(cache)
    images = ImageFolderDataset(data, 256)
    assert cached.info["info"]["scaling_factor"] == vae.scaling_factor
    sample = cached[0]
    with torch.no_grad():
        latent = vae.encode(images[0]["pixels"][None])[0]
        emb, mask = encoder.encode([sample["caption"]], max_length=TEXT_TOKENS)
    torch.testing.assert_close(sample["latents"], latent, rtol=1e-5, atol=1e-5)
    assert torch.equal(sample["text_mask"], mask[0])
    kept = mask[0].bool()  # padding is not stored (the model never sees it)
    torch.testing.assert_close(sample["text_embeds"][kept], emb[0][kept], rtol=1e-5, atol=1e-5)
    null_emb, null_mask = read_null_caption(cache)
    expected_emb, expected_mask = encoder.encode_negative([""], max_length=TEXT_TOKENS)
    torch.testing.assert_close(null_emb, expected_emb)
    assert torch.equal(null_mask, expected_mask) and int(null_mask.sum()) == 1  # BOS only


def eval_loss(model, cache, scaling_factor):
    """The flow-matching loss over the whole cache with fixed draws (no caption dropout)."""
    dataset = CachedLatentDataset(cache)
    samples = [dataset[i] for i in range(len(dataset))]
    x0 = torch.stack([s["latents"] for s in samples]) * scaling_factor
    text = torch.stack([s["text_embeds"] for s in samples]).float()
    mask = torch.stack([s["text_mask"] for s in samples])
    keys = [s["key"] for s in samples]
    draws = draw_flow_inputs(
        keys, x0.shape[1:], seed=99, step=0, flow_shift=3.0, caption_dropout=0.0
    )
    with torch.no_grad():
        return flow_matching_loss(model.eval(), x0, text, mask, draws).item()


def test_dit_loss_goes_down_on_cached_latents(world):
    root, _, paths, cache = world
    config = load_config(
        data=dit_config(
            root / "dit",
            paths,
            data={"cache_dir": str(cache), "batch_size": 4},
            schedule={"max_steps": 40, "warmup_steps": 5},
            checkpointing={"every": 40},
            logging={"every": 10, "plot": True},
        )
    )
    initial, _ = build_transformer(config.model, config.seed)
    summary = train(config)
    scaling = CachedLatentDataset(cache).info["info"]["scaling_factor"]
    trained = SanaTransformer(initial.config)
    trained.load_state_dict(weights(root / "dit"))
    before, after = eval_loss(initial, cache, scaling), eval_loss(trained, cache, scaling)
    assert after < 0.7 * before, (before, after)
    rows = read_log(root / "dit/train_log.csv")
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["loss"] < rows[0]["loss"] and summary.last_loss == rows[-1]["loss"]
    assert set(rows[0]) >= {"loss", "grad_norm", "lr", "samples_per_s", "skipped_images"}


def test_objective_settings_reach_the_draws(world, tmp_path, monkeypatch):
    """The σ distribution the config asks for is the one each step draws from."""
    _, _, paths, cache = world
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return draw_flow_inputs(*args, **kwargs)

    monkeypatch.setattr("fastsana.training.dit_task.draw_flow_inputs", spy)
    objective = {"flow_shift": 2.0, "logit_mean": 1.5, "logit_std": 0.5}
    objective |= {"caption_dropout": 0.0, "high_sigma_fraction": 0.5, "high_sigma_min": 0.8}
    config = dit_config(
        tmp_path / "run",
        paths,
        data={"cache_dir": str(cache), "batch_size": 2},
        schedule={"max_steps": 2},
        objective=objective,
    )
    train(load_config(data=config))
    assert len(seen) == 2
    for name, value in objective.items():
        assert all(kwargs[name] == value for kwargs in seen), name


def test_loss_plot_is_optional(tmp_path, monkeypatch, caplog):
    (tmp_path / "train_log.csv").write_text("step,loss,lr\n10,2.0,0.1\n20,1.5,0.1\n")
    if importlib.util.find_spec("matplotlib") is not None:
        path = plot_loss(tmp_path)
        assert Image.open(path).format == "PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level(logging.INFO, logger="fastsana.training.metrics"):
        assert plot_loss(tmp_path) is None
    assert "matplotlib is not installed: loss plot skipped" in caplog.text


def test_images_on_the_fly_with_validation_export_and_generation(world):
    root, data, paths, _ = world
    config = load_config(
        data=dit_config(
            root / "otf",
            paths,
            model={"precision": "bf16", "gradient_checkpointing": True},
            data={"folder": str(data)},
            schedule={"max_steps": 3},
            validation={
                "prompts": ["a red circle", "a blue square"],
                "seeds": [0, 1],
                "steps": 2,
                "every": 2,
            },
            export={"on_finish": True},
        )
    )
    summary = train(config)
    grids = sorted((root / "otf/validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000002.png", "step-00000003.png"]
    grid = Image.open(grids[-1])
    assert grid.size == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2)  # 2 seeds × 2 prompts, 2-px pads
    assert json.loads(grid.info["fastsana"])["prompts"] == ["a red circle", "a blue square"]

    exported = load_transformer(summary.export_dir / "transformer")
    ema = weights(root / "otf", "model-ema")
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, ema[key]), key
    pipe = SanaPipeline.from_pretrained(summary.export_dir, device="cpu")
    assert pipe.defaults.flow_shift == 3.0  # the preset's, used for training
    image = pipe("a red circle", num_inference_steps=2, seed=0, progress=False)[0]
    assert image.size == (256, 256)


@pytest.mark.parametrize("echo", [False, True])
def test_bare_caption_models_export_their_encoding(world, tmp_path, echo):
    """A cache of bare captions (--no-instruction, optionally --echo) trains a model whose
    exported pipeline encodes prompts the same way by default; a config that disagrees with
    its cache is refused before any training."""
    _, data, paths, _ = world
    argv = ["cache", str(data), str(tmp_path / "bare"), "--vae", str(paths.vae)]
    argv += ["--text-encoder", str(paths.text_encoder), "--tokenizer", str(paths.tokenizer)]
    argv += ["--base-size", "256", "--text-max-length", "12", "--no-instruction"]
    argv += ["--echo"] if echo else []
    assert fastsana_main([*argv, "--device", "cpu"]) == 0
    encoder = TextEncoder.from_pretrained(paths.text_encoder, paths.tokenizer)
    sample = CachedLatentDataset(tmp_path / "bare")[0]
    with torch.no_grad():
        emb, mask = encoder.encode([sample["caption"]], instruction=None, max_length=12, echo=echo)
    assert torch.equal(sample["text_mask"], mask[0])
    kept = mask[0].bool()
    torch.testing.assert_close(sample["text_embeds"][kept], emb[0][kept], rtol=1e-5, atol=1e-5)

    sections = dict(
        data={"cache_dir": str(tmp_path / "bare"), "batch_size": 2},
        schedule={"max_steps": 2},
        export={"on_finish": True},
    )
    mismatched = dit_config(tmp_path / "refused", paths, **sections)
    refusal = rf"instruction=False, echo={echo}, but model\.text_max_length=16"
    with pytest.raises(ConfigError, match=refusal):
        train(load_config(data=mismatched))
    model = {"text_max_length": 12, "text_instruction": False, "sampling": {"guidance_scale": 3}}
    wrong_echo = {**model, "text_echo": not echo}
    with pytest.raises(ConfigError, match=rf"model\.text_echo={not echo}"):
        train(load_config(data=dit_config(tmp_path / "r2", paths, model=wrong_echo, **sections)))
    model["text_echo"] = echo
    summary = train(
        load_config(data=dit_config(tmp_path / "bare-run", paths, model=model, **sections))
    )
    pipe = SanaPipeline.from_pretrained(summary.export_dir, device="cpu")
    defaults = pipe.defaults
    assert (defaults.instruction, defaults.max_sequence_length, defaults.echo) == (False, 12, echo)
    assert pipe.defaults.guidance_scale == 3.0
    cond, _ = pipe.encode_prompt(sample["caption"], guidance=False)
    torch.testing.assert_close(cond.text, emb)


def test_sampling_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"set model\.text_instruction instead"):
        build_transformer(ModelConfig(preset="sana-tiny", sampling={"instruction": False}), 0)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.sampling\.cfg'"):
        ModelConfig(preset="sana-tiny", sampling={"cfg": 2})


@pytest.mark.parametrize("weights_pe", [True, False])
def test_turning_the_positional_embedding_on_or_off_is_logged(tmp_path, caplog, weights_pe):
    """The PE changes no weight shape, so a preset that differs from the weights in having one
    loads cleanly and would silently change the model; the trainer says so."""
    tiny = DIT_PRESETS["sana-tiny"].config
    pe = {"interpolation_scale": 1.0}
    source = dataclasses.replace(tiny, **(pe if weights_pe else {}))
    save_transformer(SanaTransformer(source), tmp_path / "weights")
    caplog.set_level(logging.WARNING, logger="fastsana.training.model_setup")
    for dit, warned in (({} if weights_pe else pe, True), (pe if weights_pe else {}, False)):
        caplog.clear()
        model = ModelConfig(preset="sana-tiny", dit=dit, init_from=str(tmp_path / "weights"))
        built, _ = build_transformer(model, 0)
        assert (built.config.interpolation_scale is not None) == bool(dit)
        messages = [r.getMessage() for r in caplog.records]
        assert bool(messages) == warned, messages
        if warned:
            kind = "with" if weights_pe else "without"
            assert f"was trained {kind} a positional embedding" in messages[0]


def test_corrupt_images_are_skipped_and_counted(world, tmp_path):
    _, data, paths, _ = world
    folder = tmp_path / "data"
    folder.mkdir()
    lines = (data / "metadata.jsonl").read_text().splitlines()
    for line in lines:
        name = json.loads(line)["file_name"]
        (folder / name).write_bytes((data / name).read_bytes())
    (folder / "00000001.png").write_bytes((data / "00000001.png").read_bytes()[:80])  # header ok
    (folder / "00000002.png").write_bytes(b"not an image")
    extra = json.dumps({"file_name": "missing.png", "text": "gone"})
    (folder / "metadata.jsonl").write_text("\n".join([*lines, extra]) + "\n")
    config = load_config(
        data=dit_config(
            tmp_path / "run",
            paths,
            data={"folder": str(folder), "batch_size": 2},
            schedule={"max_steps": 8},
        )
    )
    summary = train(config)
    assert summary.end_step == 8 and latest_checkpoint(tmp_path / "run").name == "step-00000008"
    # Two images never enter the dataset (no header, no file); the truncated PNG reads as an
    # image until decoded, and each time it is drawn it is replaced by the next image of its
    # bucket and counted.
    assert summary.skipped_images >= 3
    assert read_log(tmp_path / "run/train_log.csv")[-1]["skipped_images"] == summary.skipped_images


@pytest.fixture(scope="module")
def base_dit(world):
    """A sana-tiny DiT with every weight random (none zero), saved as a transformer folder."""
    root = world[0]
    torch.manual_seed(1)
    model = SanaTransformer(DIT_PRESETS["sana-tiny"].config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_transformer(model, root / "base")
    return root / "base", model


def test_lora_trains_adapters_only_and_merges_exactly(world, base_dit):
    root, _, paths, cache = world
    base_dir, base = base_dit
    config = load_config(
        data=dit_config(
            root / "lora",
            paths,
            task="lora",
            model={"preset": None, "init_from": str(base_dir)},
            lora={
                "rank": 4,
                "alpha": 8,
                "target_modules": ["to_q", "to_v", "to_out.0", "proj_out", "conv_inverted"],
            },
            data={"cache_dir": str(cache)},
            optimizer={"lr": 5e-2, "grad_clip": 1.0},
            schedule={"max_steps": 4},
            export={"on_finish": True, "weights": "model"},
        )
    )
    summary = train(config)
    adapters = weights(root / "lora")
    assert adapters and all(".lora_" in k for k in adapters)

    lora_model = SanaTransformer(base.config)
    lora_model.load_state_dict(base.state_dict())
    lora.apply_lora(lora_model, config.lora)
    with torch.no_grad():
        for name, p in lora.lora_parameters(lora_model).items():
            p.copy_(adapters[name])
    # The update the DiT sees is peft's ΔW = (alpha / rank)·B·A.
    layer = lora_model.transformer_blocks[0].attn1.to_q
    torch.testing.assert_close(
        layer.weight - layer.base_layer.parametrizations.weight.original,
        layer.get_delta_weight(lora.ADAPTER),
    )
    exported = load_transformer(summary.export_dir / "transformer")

    torch.manual_seed(0)
    x, t = torch.randn(2, 32, 4, 4), torch.tensor([300.0, 800.0])
    text, mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = lora_model.eval()(x, t, text, mask)
        merged = exported(x, t, text, mask)
        plain = base.eval()(x, t, text, mask)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the adapters changed the model
    # The base weights never moved: the export differs from the base only where LoRA is.
    changed = {
        k for k, v in exported.state_dict().items() if not torch.equal(v, base.state_dict()[k])
    }
    targeted = (
        "to_q.weight",
        "to_v.weight",
        "to_out.0.weight",
        "proj_out.weight",
        "conv_inverted.weight",
    )
    assert changed and all(k.endswith(targeted) for k in changed)
    assert any(k.endswith("conv_inverted.weight") for k in changed)  # the FFN's conv trained

    # The adapter file applies to the base model; `fastsana export` rebuilds the same merged
    # transformer from the checkpoint alone.
    merged_file = lora.load_adapter(
        load_transformer(base_dir), root / "lora/lora_adapter.safetensors"
    )
    for key, tensor in exported.state_dict().items():
        torch.testing.assert_close(merged_file.state_dict()[key], tensor, rtol=0, atol=1e-6)
    argv = ["export", str(root / "lora"), str(root / "lora_cli"), "--weights", "model"]
    assert fastsana_main(argv) == 0
    again = load_transformer(root / "lora_cli/transformer")
    for key, tensor in exported.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_lora_refuses_what_it_cannot_adapt():
    model = SanaTransformer(DIT_PRESETS["sana-tiny"].config)
    with pytest.raises(ValueError, match=r"ff\.conv_depth is a 3×3 convolution with 320 group"):
        lora.apply_lora(model, LoRAConfig(target_modules=["conv_depth"]))
    with pytest.raises(ValueError, match="'to_qkv' matches no module"):
        lora.apply_lora(model, LoRAConfig(target_modules=["to_qkv"]))
    with pytest.raises(ValueError, match=r"caption_norm is a RMSNorm, not an nn\.Linear"):
        lora.apply_lora(model, LoRAConfig(target_modules=["caption_norm"]))


def test_autoencoder_trains_on_crops_and_exports(world):
    root, data, _, _ = world
    config = load_config(
        data={
            "output_dir": str(root / "ae"),
            "task": "ae",
            "device": "cpu",
            "model": {"preset": "dc-ae-tiny", "precision": "fp32"},
            "data": {"folder": str(data), "base_size": 256, "batch_size": 2, "crop_size": 64},
            "ae_loss": {
                "adversarial_weight": 0.05,
                "adversarial_start_step": 20,
                "discriminator_channels": 8,
                "scaling_factor_batches": 2,
            },
            "optimizer": {"lr": 2e-3, "grad_clip": 1.0},
            "schedule": {"max_steps": 30},
            "ema": {"decay": 0.5},
            "logging": {"every": 5, "progress": False, "plot": False},
            "checkpointing": {"every": 30},
        }
    )
    initial = build_autoencoder(config.model, config.seed)
    summary = train(config)
    trained = DCAE(initial.config)
    trained.load_state_dict(weights(root / "ae"))
    images = torch.stack([ImageFolderDataset(data, 256)[i]["pixels"] for i in range(4)])
    images = images[..., 96:160, 96:160]  # the crops' size

    def l1(ae):
        with torch.no_grad():
            return (ae.eval()(images) - images).abs().mean().item()

    assert l1(trained) < 0.8 * l1(initial), (l1(initial), l1(trained))
    rows = read_log(root / "ae/train_log.csv")
    assert {"l1", "ssim", "psnr", "d_loss", "g_adv"} <= set(rows[-1])
    assert rows[-1]["d_loss"] == rows[-1]["d_loss"]  # the discriminator trained (not NaN)
    disc = weights(root / "ae", "discriminator")
    assert disc.keys() == PatchDiscriminator(3, 8, 3).state_dict().keys()
    exported = load_autoencoder(summary.export_dir)
    assert exported.scaling_factor != initial.scaling_factor  # measured on the data
    assert (root / "ae/validation/step-00000030.png").is_file()


def test_webdataset_shards_stream_and_resume(world, tmp_path):
    _, _, paths, _ = world
    make_dataset(tmp_path / "wds", 8, size=64, webdataset_shards=2, progress=False)
    config = dit_config(
        tmp_path / "run",
        paths,
        data={"shards": str(tmp_path / "wds/shard-{000000..000001}.tar"), "shuffle_buffer": 4},
        schedule={"max_steps": 2},
        checkpointing={"every": 1},
    )
    path = tmp_path / "wds.yaml"
    path.write_text(yaml.safe_dump(config))
    assert fastsana_main(["train", str(path)]) == 0
    assert fastsana_main(["train", str(path), "--resume", "--set", "schedule.max_steps=3"]) == 0
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"]["batches"] == 3
    assert load_file(latest_checkpoint(tmp_path / "run") / "model.safetensors")
