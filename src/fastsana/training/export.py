"""``fastsana export``: a training checkpoint → a folder the rest of fastsana loads.

- task ``dit``: a diffusers-format pipeline folder (``fastsana generate --model DIR``), the
  transformer from the checkpoint (EMA weights by default), the autoencoder and text
  encoder the run trained with.
- task ``lora``: the same, with the adapters merged into the base transformer.
- task ``ae``: an autoencoder folder (diffusers ``AutoencoderDC`` layout) with the config's
  scaling factor (the end-of-run export measures it on the data instead).

The run's config and architecture are read from the checkpoint's ``trainer_state.json``; the
base model of a LoRA run and the frozen components are read from the paths it recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from fastsana.checkpoints.autoencoder import save_autoencoder
from fastsana.checkpoints.common import CheckpointError, load_state_dict_into
from fastsana.models.dcae import DCAE
from fastsana.models.dit import SanaTransformer
from fastsana.pipeline import SanaPipeline
from fastsana.training import lora
from fastsana.training.cache import INFO_FILE
from fastsana.training.checkpointing import TensorReader, read_trainer_state, resolve_checkpoint
from fastsana.training.components import (
    component_paths,
    load_frozen_text_encoder,
    load_frozen_vae,
)
from fastsana.training.config import TrainConfig
from fastsana.training.config_parse import from_dict
from fastsana.training.model_setup import (
    ae_config_from_arch,
    build_transformer,
    dit_config_for,
    dit_config_from_arch,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    weights: str = "ema",
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
) -> Path:
    """Export a checkpoint (a ``step-N`` folder, or a run folder: its newest valid one)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_checkpoint(Path(checkpoint), Path(checkpoint))
    state = read_trainer_state(path)
    config = from_dict(TrainConfig, state["config"], "")
    stem = "model-ema" if weights == "ema" else "model"
    if not any(path.glob(f"{stem}*.safetensors")):
        raise CheckpointError(f"{path} has no {weights} weights (was ema disabled?)")
    reader = TensorReader(path, stem)
    trained = reader.read_all()
    out = Path(out)
    if config.task == "ae":
        with torch.device("meta"):
            ae = DCAE(ae_config_from_arch(state["arch"]))
        load_state_dict_into(ae, trained, f"{path} {weights} weights", torch.float32, device)
        save_autoencoder(ae, out, dtype=DTYPES[dtype])
        return out
    transformer = _transformer(config, state, trained, device)
    cache_info = None
    if config.data.cache_dir is not None and (Path(config.data.cache_dir) / INFO_FILE).is_file():
        cache_info = json.loads((Path(config.data.cache_dir) / INFO_FILE).read_text())
    paths = component_paths(config.model, cache_info)
    if paths.vae is None:
        raise ValueError(f"{path}: the run's config names no autoencoder to export with")
    _, sampling = dit_config_for(config.model)
    defaults = dataclasses.replace(sampling, flow_shift=float(state["arch"]["flow_shift"]))
    pipe = SanaPipeline(
        transformer,
        load_frozen_vae(paths.vae, torch.device(device)),
        load_frozen_text_encoder(paths, torch.device(device)),
        defaults,
    )
    return pipe.save_pretrained(out, dtype=DTYPES[dtype])


def _transformer(
    config: TrainConfig, state: dict, trained: dict[str, torch.Tensor], device: str | torch.device
) -> SanaTransformer:
    if config.task == "lora":
        base, _ = build_transformer(config.model, config.seed)
        lora.apply_lora(base, config.lora)
        params = lora.lora_parameters(base)
        if params.keys() != trained.keys():
            raise CheckpointError("the checkpoint's adapters do not match the LoRA config")
        merged = lora.merged_state_dict(base, trained)
    else:
        merged = trained
    with torch.device("meta"):
        transformer = SanaTransformer(dit_config_from_arch(state["arch"]))
    load_state_dict_into(transformer, merged, "exported transformer", torch.float32, device)
    return transformer.eval()
