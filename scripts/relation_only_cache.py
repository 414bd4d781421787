"""Copy a ``fastsana cache`` keeping only the scenes whose complete caption states a relation.

The minimal binding task of docs/shapes.md (session 9): every sample is two objects in a
relation, and its only caption is the relation caption. The latents are linked, not copied.
``--with-counts`` also keeps the counting scenes ("three green stars"), so that a stage aimed
at relations does not unlearn counting (docs/shapes.md, session 22). ``--relations`` keeps
only the named relations ("left of,right of": the horizontal ones, docs/shapes.md, session 23).
With ``--echo PIPELINE`` the captions are re-encoded with echo by PIPELINE's text encoder
(train with ``model.text_echo: true``); otherwise the cached embeddings are kept.

    python scripts/relation_only_cache.py cache/rel-256 cache/bind-256
    python scripts/relation_only_cache.py cache/bind-256 cache/bind-256-echo \
        --echo src/fastsana/assets/sana-shapes
    python scripts/relation_only_cache.py cache/rel4-512 cache/rel-count-512 --with-counts
    python scripts/relation_only_cache.py cache/j-512 cache/lr-512 --relations "left of,right of"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from fastsana.checkpoints.common import atomic_write_bytes, atomic_write_json
from fastsana.models.text_encoder import TextEncoder
from fastsana.shapes.grammar import Caption, parse_caption
from fastsana.shapes.world import RELATIONS
from fastsana.training.cache import (
    INDEX_FILE,
    INFO_FILE,
    LATENT_DIR,
    TEXT_DIR,
    caption_tensors,
    save_tensors,
    text_path,
)
from fastsana.training.components import NULL_CAPTION_FILE, save_null_caption


def is_count(caption: Caption) -> bool:
    """Several objects of one kind: "three green stars"."""
    return len(caption.mentions) == 1 and caption.mentions[0].count > 1


def relation_caption(
    path: Path, *, counts: bool = False, relations: tuple[str, ...] = RELATIONS
) -> tuple[dict, dict, int] | None:
    """(metadata, best caption, its index) of a cached text file, if that caption has one of
    ``relations`` (or, with ``counts``, is a count); the best caption is the one with the
    highest score (the complete one)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    captions = json.loads(meta["captions"])
    best = max(range(len(captions)), key=lambda i: captions[i]["clip_score"])
    parsed = parse_caption(captions[best]["text"])
    if parsed.relation not in relations and not (counts and is_count(parsed)):
        return None
    return meta, captions[best], best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--echo", type=Path, default=None, help="pipeline to re-encode with")
    parser.add_argument("--with-counts", action="store_true", help="also keep the counting scenes")
    parser.add_argument(
        "--relations",
        default=",".join(RELATIONS),
        help=f"comma-separated relations to keep, of {', '.join(RELATIONS)} (default: all)",
    )
    args = parser.parse_args()
    relations = tuple(r.strip() for r in args.relations.split(","))
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown:
        parser.error(f"--relations: unknown {unknown}; expected some of {', '.join(RELATIONS)}")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    info = json.loads((args.source / INFO_FILE).read_text())
    encoder = None
    if args.echo is not None:
        encoder = TextEncoder.from_pretrained(
            args.echo / "text_encoder", args.echo / "tokenizer", dtype=torch.float32
        )
        info["info"].update(echo=True, text_encoder=str((args.echo / "text_encoder").resolve()))
    (args.out / TEXT_DIR).mkdir(parents=True)
    os.symlink((args.source / LATENT_DIR).resolve(), args.out / LATENT_DIR)
    length = int(info["info"]["text_max_length"])
    kept = []
    for line in (args.source / INDEX_FILE).read_text().splitlines():
        stem = json.loads(line)["stem"]
        source = text_path(args.source, stem)
        found = relation_caption(source, counts=args.with_counts, relations=relations)
        if found is None:
            continue
        meta, caption, index = found
        if encoder is None:
            with safe_open(source, "pt") as f:
                tensors = {
                    "emb_0": f.get_tensor(f"emb_{index}"),
                    "mask_0": f.get_tensor(f"mask_{index}"),
                }
        else:
            tensors = caption_tensors(
                *encoder.encode([caption["text"]], instruction=None, max_length=length, echo=True)
            )
        meta = {**meta, "captions": json.dumps([caption])}
        save_tensors(text_path(args.out, stem), tensors, meta)
        kept.append(line)
    if encoder is None:
        shutil.copy(args.source / NULL_CAPTION_FILE, args.out / NULL_CAPTION_FILE)
    else:
        save_null_caption(args.out, *encoder.encode_negative([""], max_length=length, echo=True))
    # cache_info.json last: without it the folder is not read as a cache, so a copy cut short
    # is refused instead of read in part.
    atomic_write_bytes(args.out / INDEX_FILE, ("\n".join(kept) + "\n").encode())
    atomic_write_json(args.out / INFO_FILE, info)
    print(f"kept {len(kept)} of the cached scenes in {args.out}")


if __name__ == "__main__":
    main()
