"""Building the trained network: architecture from a preset (+ field overrides) or from the
weights it starts from (``model.init_from``).

``init_from`` accepts:

- a training checkpoint (a ``step-N`` folder) or a training run folder (its newest valid
  checkpoint): the EMA or live weights (``model.init_weights``), sharded or not;
- for the DiT, anything :func:`~fastsana.checkpoints.transformer.load_transformer` reads: a
  diffusers transformer folder, a pipeline folder (e.g. a previous stage's export) or an
  official ``.pth``;
- for the autoencoder, anything :func:`~fastsana.checkpoints.autoencoder.load_autoencoder`
  reads.

A preset (or ``model.dit`` / ``model.ae`` fields) given with ``init_from`` sets the
architecture the weights are loaded into, strictly: that is how a stage changes what does
not change the weights' shapes (``sample_size``, ``interpolation_scale`` for 2K/4K).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import Tensor

from fastsana.checkpoints.autoencoder import load_autoencoder
from fastsana.checkpoints.common import CheckpointError, load_state_dict_into
from fastsana.checkpoints.transformer import load_transformer
from fastsana.configs import (
    AE_PRESETS,
    DIT_PRESETS,
    AutoencoderConfig,
    DiTConfig,
    SamplingDefaults,
)
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.training.checkpointing import (
    STATE_FILE,
    TensorReader,
    read_trainer_state,
    resolve_checkpoint,
)
from fastsana.training.config import ModelConfig
from fastsana.training.config_parse import ConfigError, convert_fields

logger = logging.getLogger(__name__)

DEFAULT_FLOW_SHIFT = 3.0  # SANA's training and sampling shift for its released models


def is_training_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or (path / "checkpoints").is_dir()


def read_checkpoint_weights(
    path: Path, which: str, task: str
) -> tuple[dict[str, Tensor], dict, Path]:
    """Full weights (``which``: "ema" or "model"), the architecture dict and the checkpoint
    folder of a training checkpoint or run folder whose task was ``task``."""
    folder = resolve_checkpoint(path, path)
    if folder is None:
        raise CheckpointError(f"{path} holds no valid checkpoint")
    state = read_trainer_state(folder)
    if state["task"] != task:
        hint = (
            " (export the LoRA run with `fastsana export` and start from that)"
            if (state["task"] == "lora")
            else ""
        )
        raise CheckpointError(f"{folder} is a {state['task']!r} checkpoint, not {task!r}{hint}")
    stem = "model-ema" if which == "ema" else "model"
    if which == "ema" and not any(folder.glob("model-ema*.safetensors")):
        raise CheckpointError(f"{folder} has no EMA weights; set model.init_weights: model")
    reader = TensorReader(folder, stem)
    return reader.read_all(), state["arch"], folder


def dit_config_for(model: ModelConfig) -> tuple[DiTConfig | None, SamplingDefaults]:
    """The preset's DiT config with ``model.dit`` applied (None without a preset), and the
    sampling defaults an exported pipeline gets: the preset's, then ``model.sampling``, with
    the caption encoding the model is trained with."""
    overrides = convert_fields(SamplingDefaults, model.sampling, "model.sampling")
    for name, owner in (
        ("instruction", "text_instruction"),
        ("max_sequence_length", "text_max_length"),
        ("echo", "text_echo"),
    ):
        if name in overrides:
            raise ConfigError(f"set model.{owner} instead of model.sampling.{name}")
    overrides.update(
        instruction=model.text_instruction,
        max_sequence_length=model.text_max_length,
        echo=model.text_echo,
    )
    if model.preset is None:
        return None, SamplingDefaults(**overrides)
    preset = DIT_PRESETS[model.preset]
    fields = convert_fields(DiTConfig, model.dit, "model.dit")
    return (
        dataclasses.replace(preset.config, **fields),
        dataclasses.replace(preset.sampling, **overrides),
    )


def build_transformer(model: ModelConfig, seed: int) -> tuple[SanaTransformer, SamplingDefaults]:
    """The DiT to train, in float32 on the CPU (see the module docstring)."""
    config, sampling = dit_config_for(model)
    if model.init_from is None:
        assert config is not None  # TrainConfig requires a preset or init_from
        torch.manual_seed(seed)  # every rank builds the same initial weights
        return SanaTransformer(config), sampling
    path = Path(model.init_from)
    if is_training_checkpoint(path):
        state, arch, _ = read_checkpoint_weights(path, model.init_weights, "dit")
        base = dit_config_from_arch(arch)
    else:
        loaded = load_transformer(path, dtype=torch.float32)
        state, base = loaded.state_dict(), loaded.config
    if config is None:
        config = dataclasses.replace(base, **convert_fields(DiTConfig, model.dit, "model.dit"))
    _warn_if_pe_changes(base, config, path)
    with torch.device("meta"):
        transformer = SanaTransformer(config)
    load_state_dict_into(transformer, state, f"model.init_from {path}", torch.float32, "cpu")
    return transformer, sampling


def _warn_if_pe_changes(weights: DiTConfig, config: DiTConfig, path: Path) -> None:
    """Turning the positional embedding on or off leaves the weights' shapes alone, so a
    preset without one silently drops a model's PE; say so (it may be meant: session 12)."""
    had, has = weights.interpolation_scale is not None, config.interpolation_scale is not None
    if had != has:
        logger.warning(
            "model.init_from %s was trained %s a positional embedding, but the DiT built from "
            "model.preset/model.dit has %s (model.dit.interpolation_scale=%s); set "
            "model.dit.interpolation_scale%s to keep the weights' behaviour",
            path,
            "with" if had else "without",
            "one" if has else "none",
            config.interpolation_scale,
            f"={weights.interpolation_scale} and model.dit.sample_size={weights.sample_size}"
            if had
            else ": null",
        )


def ae_config_for(model: ModelConfig, base: AutoencoderConfig | None = None) -> AutoencoderConfig:
    """The autoencoder preset (or ``base``, or the SANA default) with ``model.ae`` applied."""
    if model.preset is not None:
        base = AE_PRESETS[model.preset]
    base = base or AutoencoderConfig()
    return dataclasses.replace(base, **convert_fields(AutoencoderConfig, model.ae, "model.ae"))


def build_autoencoder(model: ModelConfig, seed: int) -> DCAE:
    """The autoencoder to train, in float32 on the CPU."""
    if model.init_from is None:
        torch.manual_seed(seed)
        return DCAE(ae_config_for(model))
    path = Path(model.init_from)
    if is_training_checkpoint(path):
        state, arch, _ = read_checkpoint_weights(path, model.init_weights, "ae")
        base = ae_config_from_arch(arch)
    else:
        loaded = load_autoencoder(path, dtype=torch.float32)
        state, base = loaded.state_dict(), loaded.config
    config = ae_config_for(model, base) if (model.preset or model.ae) else base
    with torch.device("meta"):
        ae = DCAE(config)
    load_state_dict_into(ae, state, f"model.init_from {path}", torch.float32, "cpu")
    return ae


def flow_shift_for(
    objective_shift: float | None, sampling: SamplingDefaults, preset: str | None
) -> float:
    """The training flow shift: the configured one, else the preset's sampling shift."""
    if objective_shift is not None:
        return objective_shift
    return sampling.flow_shift if preset is not None else DEFAULT_FLOW_SHIFT


def arch_dict(config: DiTConfig | AutoencoderConfig) -> dict:
    """A config as JSON data (tuples become lists; :func:`_tuples` turns them back)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: object) -> object:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _tuples(raw: dict) -> dict:
    """JSON lists back to the tuples the frozen configs hold."""

    def fix(value: object) -> object:
        return tuple(fix(v) for v in value) if isinstance(value, list) else value

    return {k: fix(v) for k, v in raw.items()}


def dit_config_from_arch(arch: dict) -> DiTConfig:
    """The DiT config a checkpoint's ``trainer_state.json`` recorded (``arch["dit"]``)."""
    return DiTConfig(**_tuples(arch["dit"]))


def ae_config_from_arch(arch: dict) -> AutoencoderConfig:
    """The autoencoder config a checkpoint recorded (``arch["ae"]``)."""
    return AutoencoderConfig(**_tuples(arch["ae"]))
