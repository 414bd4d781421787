"""Make a pipeline whose transformer is a weight-space blend of two related pipelines.

    θ = (1 − alpha) · θ_a + alpha · θ_b

Both transformers must have the same parameter names and shapes, and blending only makes
sense where one was fine-tuned from the other (a "model soup"). Everything but the transformer
weights (its config, the text encoder, tokenizer, VAE, scheduler) is copied from ``b``, so
``b``'s config decides e.g. whether the positional embedding is on.

    python scripts/interpolate_weights.py src/fastsana/assets/sana-shapes \
        ../s16/runs/pe-512d/export --alpha 0.5 out/soup-050
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def blend(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Interpolate two state dicts in float32 and return them in ``b``'s dtypes."""
    if set(a) != set(b):
        raise ValueError(
            f"the transformers differ in parameter names: {sorted(set(a) ^ set(b))[:5]}"
        )
    out = {}
    for name, tb in b.items():
        ta = a[name]
        if ta.shape != tb.shape:
            raise ValueError(f"{name}: shape {tuple(ta.shape)} in a, {tuple(tb.shape)} in b")
        mixed = torch.lerp(ta.float(), tb.float(), alpha)
        out[name] = mixed.to(tb.dtype).contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="pipeline folder weighted by 1 - alpha")
    parser.add_argument(
        "b",
        type=Path,
        help="pipeline folder weighted by alpha (every other part is copied from it)",
    )
    parser.add_argument("out", type=Path, help="new pipeline folder (must not exist)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of b, in [0, 1]")
    args = parser.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    for folder in (args.a, args.b):
        if not (folder / WEIGHTS).is_file():
            parser.error(f"{folder} has no {WEIGHTS}")
    if args.out.exists():
        parser.error(f"{args.out} exists; pick a new folder")
    try:
        weights = blend(load_file(args.a / WEIGHTS), load_file(args.b / WEIGHTS), args.alpha)
    except ValueError as e:
        parser.error(str(e))
    # Build the folder beside its destination and rename it into place, so a crash leaves no
    # half-written pipeline behind.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    shutil.copytree(args.b, tmp, dirs_exist_ok=True)
    save_file(weights, str(tmp / WEIGHTS))
    tmp.rename(args.out)
    print(f"wrote {args.out}: {1 - args.alpha:g} x {args.a} + {args.alpha:g} x {args.b}")


if __name__ == "__main__":
    main()
