"""Copy a ``fastsana cache`` with every caption re-encoded by another text encoder.

The latents do not depend on the text encoder, so they are linked, not copied or encoded
again; only the caption embeddings (and the null caption) are written anew, with the cache's
own settings (caption length, instruction, echo, dtype). Used to continue a DiT on a changed
text encoder (docs/shapes.md, session 20): encoding 9,000 scenes' captions takes about a
minute, against about 80 minutes to cache them from the images.

    python scripts/reencode_cache.py cache/next3-512 cache/next3-512-rel \
        --pipeline runs/te-rel      # a folder with text_encoder/ and tokenizer/
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from fastsana.checkpoints.common import atomic_write_bytes, atomic_write_json
from fastsana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder
from fastsana.training.cache import (
    INDEX_FILE,
    INFO_FILE,
    LATENT_DIR,
    TEXT_DIR,
    caption_tensors,
    save_tensors,
    text_path,
)
from fastsana.training.components import encode_null_caption, save_null_caption

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a finished cache")
    parser.add_argument("out", type=Path, help="new cache folder (must not exist)")
    parser.add_argument(
        "--pipeline", type=Path, required=True, help="folder with text_encoder/ and tokenizer/"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    if not (args.source / INFO_FILE).is_file():
        parser.error(f"{args.source} is not a finished cache (no {INFO_FILE})")
    for sub in ("text_encoder", "tokenizer"):
        if not (args.pipeline / sub).is_dir():
            parser.error(f"--pipeline {args.pipeline} has no {sub}/ folder")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    info = json.loads((args.source / INFO_FILE).read_text())
    settings = info["info"]
    length = int(settings["text_max_length"])
    instruction = DEFAULT_INSTRUCTION if settings.get("instruction", True) else None
    echo = bool(settings.get("echo", False))
    dtype = DTYPES[settings.get("dtype", "float32")]
    encoder = TextEncoder.from_pretrained(
        args.pipeline / "text_encoder", args.pipeline / "tokenizer", dtype=torch.float32
    )
    settings.update(
        text_encoder=str((args.pipeline / "text_encoder").resolve()),
        tokenizer=str((args.pipeline / "tokenizer").resolve()),
    )

    (args.out / TEXT_DIR).mkdir(parents=True)
    os.symlink((args.source / LATENT_DIR).resolve(), args.out / LATENT_DIR)
    lines = (args.source / INDEX_FILE).read_text().splitlines()
    stems = [json.loads(line)["stem"] for line in lines]
    for start in tqdm(range(0, len(stems), args.batch_size), desc="re-encoding", unit="batch"):
        batch = stems[start : start + args.batch_size]
        metas = []
        for stem in batch:
            with safe_open(str(text_path(args.source, stem)), "pt") as f:
                metas.append(f.metadata())
        texts = [c["text"] for meta in metas for c in json.loads(meta["captions"])]
        with torch.no_grad():
            emb, mask = encoder.encode(
                texts, instruction=instruction, max_length=length, echo=echo
            )  # (N, L, D), (N, L)
        emb = emb.to(dtype)
        row = 0
        for stem, meta in zip(batch, metas, strict=True):
            rows = slice(row, row + len(json.loads(meta["captions"])))
            row = rows.stop
            path = text_path(args.out, stem)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, caption_tensors(emb[rows], mask[rows]), meta)
    with torch.no_grad():
        null_emb, null_mask = encode_null_caption(encoder, length, echo)
    save_null_caption(args.out, null_emb.to(dtype), null_mask)
    # cache_info.json last: a copy cut short is not read as a cache.
    atomic_write_bytes(args.out / INDEX_FILE, ("\n".join(lines) + "\n").encode())
    atomic_write_json(args.out / INFO_FILE, info)
    print(f"re-encoded the captions of {len(stems)} images into {args.out}")


if __name__ == "__main__":
    main()
