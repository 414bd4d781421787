"""Join finished ``fastsana cache`` folders into one, by symbolic links (no tensor is copied).

Train on scenes cached in several runs (e.g. a second batch of data cached in a later
session) with one ``data.cache_dir``. The sources must have been cached with the same
settings and must stay where they are.

    python scripts/merge_caches.py cache/merged-512 ../s13/cache/mix-512 cache/mix2-512
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastsana.training.cache import CacheError, merge_caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="new folder for the merged cache")
    parser.add_argument("sources", type=Path, nargs="+", help="finished caches to join")
    args = parser.parse_args()
    try:
        count = merge_caches(args.out, args.sources)
    except CacheError as e:
        parser.error(str(e))
    print(f"merged {count} cached image(s) from {len(args.sources)} cache(s) into {args.out}")


if __name__ == "__main__":
    main()
