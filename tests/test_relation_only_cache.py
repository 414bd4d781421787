"""scripts/relation_only_cache.py: a cache cut down to its relation (and counting) scenes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from script_helpers import encoder_folder, load_script, run_script, tiny_cache

# The first caption of each scene scores highest: it is the one judged.
CAPTIONS = [
    ["a red circle to the left of a blue square", "a red circle and a blue square"],
    ["three green stars", "a green star"],
    ["a white triangle", "a triangle above a star"],  # a relation, but not the best caption
    ["a purple star and an orange circle", "a purple star below an orange circle"],
    ["a black square below a yellow star", "a black square"],
    ["two yellow triangles and a red circle", "two triangles"],  # several kinds: not a count
]


def _stems(cache) -> list[str]:
    return [json.loads(line)["stem"] for line in (cache / "index.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        ((), ["0", "4"]),
        (("--with-counts",), ["0", "1", "4"]),
        (("--relations", "left of,right of"), ["0"]),
        (("--relations", "above, below", "--with-counts"), ["1", "4"]),
    ],
)
def test_keeps_the_scenes_whose_best_caption_qualifies(tmp_path, monkeypatch, flags, kept) -> None:
    cache = tiny_cache(tmp_path, encoder_folder(tmp_path / "enc", seed=0), CAPTIONS)
    out = tmp_path / "out"
    run_script(monkeypatch, "relation_only_cache", str(cache), str(out), *flags)
    assert _stems(out) == kept
    for stem in kept:
        tensors = load_file(out / "text" / f"{stem}.safetensors")
        source = load_file(cache / "text" / f"{stem}.safetensors")
        assert tensors.keys() == {"emb_0", "mask_0"}  # the best caption only
        assert torch.equal(tensors["emb_0"], source["emb_0"])
        with safe_open(str(out / "text" / f"{stem}.safetensors"), "pt") as f:
            captions = json.loads(f.metadata()["captions"])
        assert [c["text"] for c in captions] == [CAPTIONS[int(stem)][0]]
    assert (out / "latents").is_symlink() and (out / "cache_info.json").exists()


def test_is_count() -> None:
    script = load_script("relation_only_cache")
    parse = script.parse_caption
    assert script.is_count(parse("four black squares"))
    assert not script.is_count(parse("one black square"))
    assert not script.is_count(parse("two squares and a circle"))


def test_refuses_an_existing_output(tmp_path, monkeypatch) -> None:
    cache = tiny_cache(tmp_path, encoder_folder(tmp_path / "enc", seed=0), CAPTIONS[:1])
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "relation_only_cache", str(cache), str(tmp_path / "taken"))


def test_refuses_an_unknown_relation(tmp_path, monkeypatch, capsys) -> None:
    cache = tiny_cache(tmp_path, encoder_folder(tmp_path / "enc", seed=0), CAPTIONS[:1])
    args = (str(cache), str(tmp_path / "o"), "--relations", "left")
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "relation_only_cache", *args)
    assert "--relations: unknown ['left']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
