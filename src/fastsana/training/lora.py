"""LoRA fine-tuning of the DiT through ``peft``, and merging the adapters back into it.

peft injects the adapters (``lora_A``, ``lora_B`` per targeted ``nn.Linear``, A random and
B zero so training starts from the base model), freezes the rest, and defines the update
ΔW = (alpha / rank)·B·A (``get_delta_weight``).

How the update reaches the DiT. The DiT does not call its linear layers: it reads their
``weight`` and applies it with ``F.linear`` in the activations' dtype. A peft wrapper's forward
would therefore never run and the adapters would silently train nothing. So each wrapped
layer's base weight is parametrized (``torch.nn.utils.parametrize``) to return W + ΔW, which
every read of ``layer.weight`` sees, with gradients flowing to A and B; and the wrapper is
marked as merged, so that calling it directly runs its base layer with that weight and applies
ΔW exactly once as well. LoRA dropout acts on a layer's input and has no weight form, so it is
not offered.

Targets: ``nn.Linear`` layers and 1×1 ungrouped ``nn.Conv2d`` layers (the Mix-FFN's
``conv_inverted`` / ``conv_point``, which the DiT applies as matrices on tokens; the adapted
weight serves that path too). Other convolutions (the depthwise 3×3) are refused. A merged
model is a plain :class:`~fastsana.models.dit.SanaTransformer`.

Adapter files (:func:`save_adapter`) hold peft's keys (``transformer_blocks.0.attn1.to_q.lora_A
.weight`` …) in safetensors, with the LoRA settings in the metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fastsana.checkpoints.common import CheckpointError, atomic_write, load_state_dict_into
from fastsana.training.config import LoRAConfig

ADAPTER = "default"
_ORIGINAL = ".parametrizations.weight.original"


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The module names each target matches (the name or a dotted suffix), all of a kind LoRA
    can adapt (see the module docstring)."""
    names = []
    for target in targets:
        matches = [
            (n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)
        ]
        if not matches:
            raise ValueError(f"lora.target_modules: {target!r} matches no module of the model")
        for name, module in matches:
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.kernel_size != (1, 1)
            ):
                raise ValueError(
                    f"lora.target_modules: {name} is a {module.kernel_size[0]}×"
                    f"{module.kernel_size[1]} convolution with {module.groups} group(s); only "
                    "1×1 ungrouped convolutions (and nn.Linear layers) are adapted"
                )
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(
                    f"lora.target_modules: {name} is a {type(module).__name__}, not an "
                    "nn.Linear or nn.Conv2d"
                )
            names.append(name)
    return sorted(set(names))


class AdaptedWeight(nn.Module):
    """Parametrization W ↦ W + s·B·A of one peft LoRA layer (see the module docstring).

    Written out rather than calling peft's ``get_delta_weight``, whose convolution version
    reads the base weight (this very parametrization) for its shape. For a linear or 1×1
    convolution layer the two agree (tested).
    """

    def __init__(self, layer: LoraLayer) -> None:
        super().__init__()
        self._layer = (layer,)  # a tuple, not a submodule: the layer owns this module

    def forward(self, weight: Tensor) -> Tensor:
        layer = self._layer[0]
        a = layer.lora_A[ADAPTER].weight.flatten(1)  # (r, in)
        b = layer.lora_B[ADAPTER].weight.flatten(1)  # (out, r)
        delta = (b @ a) * layer.scaling[ADAPTER]  # (out, in)
        return weight + delta.view(weight.shape).to(weight.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else."""
    targets = resolve_targets(model, list(config.target_modules))
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=targets, bias="none"
    )
    LoraModel(model, lora_config, ADAPTER)  # injects the layers, freezes the base weights
    for layer in lora_layers(model).values():
        parametrize.register_parametrization(layer.base_layer, "weight", AdaptedWeight(layer))
        layer.merged_adapters = [ADAPTER]  # a new list: the class attribute is shared
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def merged_state_dict(
    model: nn.Module, lora_values: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The state dict of the plain model with every adapter merged in (W + ΔW).

    ``lora_values`` (name → tensor, e.g. the EMA of the adapters) replace the live adapter
    parameters for the merge; the model is left as it was.
    """
    adapters = lora_parameters(model)
    saved = {}
    if lora_values is not None:
        if lora_values.keys() != adapters.keys():
            raise ValueError("lora_values must hold exactly the adapter parameters")
        for name, p in adapters.items():
            saved[name] = p.detach().clone()
            p.copy_(lora_values[name])
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if ".lora_" in name:
                continue
            if name.endswith(_ORIGINAL):
                owner = name[: -len(_ORIGINAL)]
                name, tensor = f"{owner}.weight", model.get_submodule(owner).weight  # W + ΔW
            state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    finally:
        for name, value in saved.items():
            adapters[name].copy_(value)
    return state


def save_adapter(
    adapters: Mapping[str, Tensor], path: str | os.PathLike[str], config: LoRAConfig
) -> Path:
    """Write adapter weights (named as :func:`lora_parameters` names them, e.g. their EMA) to
    a safetensors file under peft's names, the LoRA settings in its metadata."""
    path = Path(path)
    settings = {"rank": config.rank, "alpha": config.alpha, "target_modules": config.target_modules}
    metadata = {"format": "pt", "lora": json.dumps(settings)}
    tensors = {
        name.replace(f".{ADAPTER}.", "."): t.detach().to("cpu", copy=True).contiguous()
        for name, t in adapters.items()
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike[str], merge: bool = True) -> nn.Module:
    """Apply an adapter file written by :func:`save_adapter` to a plain DiT.

    ``merge=True`` returns a plain model with the adapters merged; otherwise ``model`` itself,
    with its LoRA layers (e.g. to train them further).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora", "null"))
        if meta is None:
            raise CheckpointError(f"{path} is not a fastsana LoRA adapter (no 'lora' metadata)")
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    config = LoRAConfig(
        rank=meta["rank"], alpha=meta["alpha"], target_modules=meta["target_modules"]
    )
    apply_lora(model, config)
    params = lora_parameters(model)
    expected = {name.replace(f".{ADAPTER}.", "."): name for name in params}
    if expected.keys() != tensors.keys():
        raise CheckpointError(f"{path}: adapter keys do not match the model's LoRA layers")
    with torch.no_grad():
        for short, name in expected.items():
            params[name].copy_(tensors[short])
    if not merge:
        return model
    with torch.device("meta"):
        plain = type(model)(model.config)
    return load_state_dict_into(plain, merged_state_dict(model), f"DiT merged with {path}")
