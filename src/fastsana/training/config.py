"""The training configuration: one typed, nested dataclass per YAML section.

A YAML file maps onto :class:`TrainConfig` key for key (``load_config``); any field can be
overridden on the command line with ``--set section.field=value`` (the value is YAML, so
``--set validation.prompts='[a cat, a dog]'`` works). Every section validates itself in
``__post_init__``; :class:`TrainConfig` checks the combinations. ``docs/training.md`` lists
every field; the comments here say what each one means.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fastsana.configs import (
    AE_PRESETS,
    DIT_PRESETS,
    AutoencoderConfig,
    DiTConfig,
    SamplingDefaults,
)
from fastsana.training.config_parse import (
    ConfigError,
    apply_overrides,
    convert_fields,
    from_dict,
    to_dict,
)

Task = Literal["dit", "lora", "ae"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive(value: float, name: str) -> None:
    _check(math.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    _check(math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network trained and the frozen components around it."""

    # A DiT preset (tasks dit, lora) or an autoencoder preset (task ae); None takes the
    # architecture from init_from.
    preset: str | None = None
    dit: dict[str, Any] = field(default_factory=dict)  # DiTConfig fields set over the preset
    ae: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig fields (task ae)
    # Start from these weights: a training checkpoint (step-* folder or run folder), a
    # transformer or pipeline folder, an official .pth (DiT); an autoencoder folder (task ae).
    init_from: str | None = None
    init_weights: Literal["ema", "model"] = "ema"  # which weights of a training checkpoint
    pipeline: str | None = None  # a pipeline folder supplying vae/, text_encoder/, tokenizer/
    vae: str | None = None  # autoencoder folder (overrides the pipeline's)
    text_encoder: str | None = None  # text-encoder folder (overrides the pipeline's)
    tokenizer: str | None = None  # tokenizer folder (overrides the pipeline's)
    text_max_length: int = 300  # caption tokens when encoding on the fly
    # Prefix captions with the complex human instruction (SANA's Gemma recipe); a text encoder
    # trained on bare captions (Shapes) turns it off. Exported pipelines remember both.
    text_instruction: bool = True
    # Encode captions with echo (TextEncoder.encode): every token sees the whole caption.
    text_echo: bool = False
    # SamplingDefaults fields set over the preset's (steps, guidance_scale, sampler), written
    # into exported pipelines as the model's defaults.
    sampling: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    # bf16 autocast, fp32, or "auto": bf16 where the hardware multiplies it natively (GPUs,
    # AMX / AVX-512 CPUs), fp32 elsewhere (AVX2 CPUs run bf16 7-100x slower). Master weights,
    # optimizer state and EMA stay fp32 either way.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        _check(self.text_max_length >= 1, "model.text_max_length must be >= 1")
        # Field names and types are checked now; the values with the preset when it is built.
        convert_fields(DiTConfig, self.dit, "model.dit")
        convert_fields(SamplingDefaults, self.sampling, "model.sampling")
        convert_fields(AutoencoderConfig, self.ae, "model.ae")


@dataclass(frozen=True)
class DataConfig:
    """Where the training samples come from and how they are batched."""

    folder: str | None = None  # images + metadata.jsonl
    shards: str | list[str] | None = None  # WebDataset tar shards (brace pattern, glob, list)
    cache_dir: str | None = None  # latents + text embeddings written by `fastsana cache`
    base_size: int = 512  # aspect-ratio bins of this base size (a cache fixes its own)
    batch_size: int = 8  # per process and per micro-step
    num_workers: int = 0  # DataLoader worker processes
    caption_threshold: float = 25.0  # CLIP score a caption needs to be drawn
    caption_temperature: float = 0.1  # τ of the caption weighting
    caption_weighting: Literal["power", "softmax"] = "power"
    shuffle_buffer: int = 1000  # WebDataset shards: samples shuffled per worker
    crop_size: int = 256  # task ae: side of the random square crops

    def __post_init__(self) -> None:
        sources = [s for s in ("folder", "shards", "cache_dir") if getattr(self, s) is not None]
        _check(
            len(sources) <= 1,
            f"data: give one of folder, shards, cache_dir, got {' and '.join(sources)}",
        )
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _positive(self.caption_temperature, "data.caption_temperature")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        _check(self.crop_size >= 32, f"data.crop_size must be >= 32, got {self.crop_size}")

    @property
    def source(self) -> str | None:
        """Which of folder / shards / cache_dir is set (None: none yet)."""
        for name in ("folder", "shards", "cache_dir"):
            if getattr(self, name) is not None:
                return name
        return None


@dataclass(frozen=True)
class ObjectiveConfig:
    """The rectified-flow objective of the DiT (tasks dit, lora)."""

    flow_shift: float | None = None  # σ' = s·σ/(1+(s−1)σ); None: the preset's, else 3.0
    logit_mean: float = 0.0  # σ = sigmoid(N(logit_mean, logit_std²)) before the shift
    logit_std: float = 1.0
    caption_dropout: float = 0.1  # probability of training on the null caption (for CFG)
    # Where each object goes is settled by the first sampling steps (σ ≳ 0.95), which the
    # shifted logit-normal almost never draws (1 % of samples at mean 0, std 1, shift 2);
    # learning a layout from the caption there takes ~10⁵ samples (docs/shapes.md, session
    # 10). This fraction of samples draws σ uniformly from [high_sigma_min, 1) instead.
    high_sigma_fraction: float = 0.0
    high_sigma_min: float = 0.95

    def __post_init__(self) -> None:
        if self.flow_shift is not None:
            _positive(self.flow_shift, "objective.flow_shift")
        _positive(self.logit_std, "objective.logit_std")
        _check(
            0.0 <= self.high_sigma_fraction <= 1.0,
            f"objective.high_sigma_fraction must be in [0, 1], got {self.high_sigma_fraction}",
        )
        _check(
            0.0 <= self.high_sigma_min < 1.0,
            f"objective.high_sigma_min must be in [0, 1), got {self.high_sigma_min}",
        )
        _check(
            0.0 <= self.caption_dropout <= 1.0,
            f"objective.caption_dropout must be in [0, 1], got {self.caption_dropout}",
        )


@dataclass(frozen=True)
class AELossConfig:
    """Reconstruction loss of the autoencoder (task ae)."""

    l1_weight: float = 1.0
    # Squared error: where most pixels are background (Shapes), L1 is minimised early by
    # painting the background colour everywhere (its median); MSE pays for every missed object.
    mse_weight: float = 0.0
    ssim_weight: float = 0.5  # weight of 1 − SSIM (11×11 Gaussian window, σ = 1.5)
    adversarial_weight: float = 0.0  # hinge GAN term with a patch discriminator; 0 = off
    adversarial_start_step: int = 0  # the discriminator joins at this step
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_lr: float | None = None  # None: optimizer.lr
    # Batches used at export to measure scaling_factor = 1/std(latents); 0 keeps the config's.
    scaling_factor_batches: int = 8

    def __post_init__(self) -> None:
        for name in ("l1_weight", "mse_weight", "ssim_weight", "adversarial_weight"):
            _non_negative(getattr(self, name), f"ae_loss.{name}")
        _check(
            self.l1_weight + self.mse_weight + self.ssim_weight > 0,
            "ae_loss: l1_weight + mse_weight + ssim_weight must be > 0 (the reconstruction term)",
        )
        _check(self.adversarial_start_step >= 0, "ae_loss.adversarial_start_step must be >= 0")
        _check(self.discriminator_channels >= 1, "ae_loss.discriminator_channels must be >= 1")
        _check(self.discriminator_layers >= 1, "ae_loss.discriminator_layers must be >= 1")
        if self.discriminator_lr is not None:
            _positive(self.discriminator_lr, "ae_loss.discriminator_lr")
        _check(self.scaling_factor_batches >= 0, "ae_loss.scaling_factor_batches must be >= 0")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the DiT's linear layers (task lora), through peft."""

    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # Names (or name suffixes) of nn.Linear modules; the default is every attention projection.
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _positive(self.alpha, "lora.alpha")
        _check(bool(self.target_modules), "lora.target_modules must name at least one module")


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "came"] = "adamw"  # came: pytorch-optimizer's CAME (the paper's)
    lr: float = 1e-4  # peak learning rate (after warm-up)
    betas: list[float] | None = None  # None: (0.9, 0.999) AdamW, (0.9, 0.999, 0.9999) CAME
    eps: list[float] | None = None  # None: [1e-8] AdamW, [1e-30, 1e-16] CAME
    weight_decay: float = 0.0
    grad_clip: float = 0.1  # max global gradient norm; 0 = no clipping
    grad_accumulation: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        _positive(self.lr, "optimizer.lr")
        _non_negative(self.weight_decay, "optimizer.weight_decay")
        _non_negative(self.grad_clip, "optimizer.grad_clip")
        _check(self.grad_accumulation >= 1, "optimizer.grad_accumulation must be >= 1")
        n_betas, n_eps = (2, 1) if self.name == "adamw" else (3, 2)
        if self.betas is not None:
            _check(
                len(self.betas) == n_betas and all(0 <= b < 1 for b in self.betas),
                f"optimizer.betas for {self.name} must be {n_betas} values in [0, 1), "
                f"got {self.betas}",
            )
        if self.eps is not None:
            _check(
                len(self.eps) == n_eps and all(e > 0 for e in self.eps),
                f"optimizer.eps for {self.name} must be {n_eps} positive value(s), got {self.eps}",
            )


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int = 1000  # optimizer steps of the whole run
    warmup_steps: int = 0  # linear warm-up from 0 (the paper: 2000)
    decay: Literal["constant", "cosine"] = "constant"  # after the warm-up
    min_lr_ratio: float = 0.0  # cosine: the final lr as a fraction of the peak

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"schedule.max_steps must be >= 1, got {self.max_steps}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio must be in [0, 1]")


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    # decay_t = min(decay, (1 + t) / (10 + t)): early steps average over a short window, so
    # the EMA of a short run is not stuck near the initial weights.
    warmup: bool = True

    def __post_init__(self) -> None:
        _check(0.0 <= self.decay < 1.0, f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 10  # steps between log rows (CSV, TensorBoard)
    tensorboard: bool = True  # written when the tensorboard package is installed
    plot: bool = True  # loss.png at the end (needs matplotlib; skipped with a log line)
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"logging.every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # older checkpoints are deleted

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"checkpointing.every must be >= 1, got {self.every}")
        _check(self.keep_last >= 1, f"checkpointing.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class ValidationConfig:
    """Images for fixed prompts and seeds, with the EMA weights, saved as one grid PNG."""

    prompts: list[str] = field(default_factory=list)  # none: no validation
    seeds: list[int] = field(default_factory=lambda: [0])  # one grid column per seed
    every: int = 0  # steps between grids; 0 = only at the end
    steps: int = 20
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    sampler: Literal["flow_dpm", "flow_euler"] = "flow_dpm"
    height: int | None = None  # None: data.base_size
    width: int | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"validation.every must be >= 0, got {self.every}")
        _check(self.steps >= 1, f"validation.steps must be >= 1, got {self.steps}")
        _check(bool(self.seeds), "validation.seeds must hold at least one seed")


@dataclass(frozen=True)
class DistributedConfig:
    """Used when started by torchrun (WORLD_SIZE > 1); ignored in a single process."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: fully_shard per block, then the root
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, else gloo
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        _check(self.timeout_minutes >= 1, "distributed.timeout_minutes must be >= 1")


@dataclass(frozen=True)
class ExportConfig:
    on_finish: bool = True  # write a pipeline folder (DiT) or autoencoder folder at the end
    weights: Literal["ema", "model"] = "ema"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    dir: str | None = None  # default: output_dir/export


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str  # logs, checkpoints, validation grids and the export go here
    task: Task = "dit"
    seed: int = 0
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ae_loss: AELossConfig = field(default_factory=AELossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir must be a folder path")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        model, data = self.model, self.data
        _check(data.source is not None, "data: give one of folder, shards, cache_dir")
        if self.task == "ae":
            _check(
                model.preset is None or model.preset in AE_PRESETS,
                f"model.preset {model.preset!r} is not an autoencoder preset; task ae takes one "
                f"of {', '.join(AE_PRESETS)}",
            )
            _check(data.cache_dir is None, "task ae trains on images: data.cache_dir is unused")
            _check(not model.dit, "model.dit is for the DiT; task ae takes model.ae")
            _check(
                self.distributed.strategy == "ddp",
                "task ae trains with distributed.strategy ddp (the autoencoder is small)",
            )
        else:
            _check(
                model.preset is None or model.preset in DIT_PRESETS,
                f"model.preset {model.preset!r} is not a DiT preset; choose one of "
                f"{', '.join(DIT_PRESETS)}",
            )
            _check(not model.ae, "model.ae is for task ae; the DiT takes model.dit")
            _check(
                model.preset is not None or model.init_from is not None,
                "model: give a preset or init_from (the architecture comes from one of them)",
            )
        _check(
            not (self.optimizer.name == "came" and self.distributed.strategy == "fsdp"),
            "optimizer came does not run under distributed.strategy fsdp (its factored second "
            "moments need whole weight matrices, FSDP shards them): use adamw, or ddp",
        )
        if self.task == "lora":
            _check(model.init_from is not None, "task lora needs model.init_from (the base DiT)")
            _check(
                self.distributed.strategy == "ddp",
                "task lora trains with distributed.strategy ddp (the adapters are small)",
            )
        if self.task == "ae":
            _check(
                model.preset is not None or model.init_from is not None or bool(model.ae),
                "model: give an autoencoder preset, model.ae fields or init_from",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir) if self.export.dir else self.run_dir / "export"


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict[str, Any] | None = None,
) -> TrainConfig:
    """A TrainConfig from a YAML file (or a dict), with ``key.sub=value`` overrides applied."""
    if (path is None) == (data is None):
        raise ValueError("load_config takes a YAML path or a data dict, not both or neither")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)), "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return to_dict(config)


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text (every field, defaults included)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
