"""Writing Shapes datasets: folder format, WebDataset shards, held-out pairs, the CLI."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastsana.shapes.cli import add_shapes_commands
from fastsana.shapes.dataset import make_dataset
from fastsana.shapes.world import HELD_OUT_PAIRS, MAX_SIZE, MIN_SIZE, PALETTE, SHAPES, SceneMix


def _folder_records(path):
    lines = (path / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_folder_format(tmp_path):
    out = make_dataset(tmp_path / "ds", 12, size=64, seed=3, progress=False)
    records = _folder_records(out)
    assert [r["file_name"] for r in records] == [f"{i:08d}.png" for i in range(12)]
    assert sorted(p.name for p in out.glob("*.png")) == [r["file_name"] for r in records]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    for r in records:
        image = Image.open(out / r["file_name"])
        assert image.size == (64, 64) and image.mode == "RGB"
        assert len(r["captions"]) >= 3
        for c in r["captions"]:
            assert isinstance(c["text"], str) and c["text"]
            assert isinstance(c["clip_score"], float)
        assert sum(c["clip_score"] >= 25 for c in r["captions"]) >= 2  # survive the trainer's cut
        assert sum(c["clip_score"] < 25 for c in r["captions"]) >= 1
        for o in r["objects"]:
            assert o["shape"] in SHAPES and o["colour"] in PALETTE
            assert 0 <= o["cx"] <= 1 and 0 <= o["cy"] <= 1
            assert MIN_SIZE <= o["size"] <= MAX_SIZE
    info = json.loads((out / "shapes_info.json").read_text())
    assert info["n"] == 12 and info["seed"] == 3


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = make_dataset(tmp_path / "a", 4, size=64, seed=1, progress=False)
    b = make_dataset(tmp_path / "b", 4, size=64, seed=1, progress=False)
    c = make_dataset(tmp_path / "c", 4, size=64, seed=2, progress=False)
    for name in ["metadata.jsonl"] + [f"{i:08d}.png" for i in range(4)]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()


def test_parallel_workers_write_the_same_files(tmp_path):
    one = make_dataset(tmp_path / "one", 5, size=48, seed=6, progress=False)
    two = make_dataset(tmp_path / "two", 5, size=48, seed=6, workers=2, progress=False)
    for name in ["metadata.jsonl"] + [f"{i:08d}.png" for i in range(5)]:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    shards = [
        make_dataset(tmp_path / f"w{w}", 5, size=48, seed=6, webdataset_shards=2, workers=w,
                     progress=False)
        for w in (1, 2)
    ]  # fmt: skip
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (shards[0] / name).read_bytes() == (shards[1] / name).read_bytes()


def test_webdataset_shards_hold_the_same_records(tmp_path):
    folder = make_dataset(tmp_path / "f", 7, size=64, seed=4, progress=False)
    shards = make_dataset(tmp_path / "w", 7, size=64, seed=4, webdataset_shards=3, progress=False)
    assert sorted(p.name for p in shards.glob("*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    members = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    keys = [f"{i:08d}" for i in range(7)]
    assert sorted(members) == sorted([f"{k}.png" for k in keys] + [f"{k}.json" for k in keys])
    for rec, key in zip(_folder_records(folder), keys, strict=True):
        expected = {k: v for k, v in rec.items() if k != "file_name"}
        assert json.loads(members[f"{key}.json"]) == expected
        tar_pixels = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        folder_pixels = np.asarray(Image.open(folder / rec["file_name"]))
        assert np.array_equal(tar_pixels, folder_pixels)


def test_held_out_pairs_only_when_asked(tmp_path):
    def pairs(path):
        return {(o["colour"], o["shape"]) for r in _folder_records(path) for o in r["objects"]}

    without = make_dataset(tmp_path / "a", 60, size=32, seed=0, progress=False)
    with_held = make_dataset(
        tmp_path / "b", 60, size=32, seed=0, include_held_out=True, progress=False
    )
    assert not pairs(without) & HELD_OUT_PAIRS
    texts = " ".join(c["text"] for r in _folder_records(without) for c in r["captions"])
    for colour, shape in HELD_OUT_PAIRS:
        assert f"{colour} {shape}" not in texts
    assert pairs(with_held) & HELD_OUT_PAIRS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 3, "size": 8}, "size must be"),
        ({"n": 3, "seed": -1}, "seed must be"),
        ({"n": 3, "webdataset_shards": 4}, "webdataset_shards"),
        ({"n": 3, "workers": 0}, "workers must be"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path, progress=False, **kwargs)


def test_scene_mix_reaches_the_dataset_and_its_info(tmp_path):
    mix = SceneMix(single=0, count=0, pair=1, mixed=0, relation=1)
    make_dataset(tmp_path / "rel", n=6, size=48, seed=1, mix=mix, progress=False)
    info = json.loads((tmp_path / "rel" / "shapes_info.json").read_text())
    assert info["scene_mix"] == mix.as_dict()
    words = ("left of", "right of", "above", "below")
    for record in _folder_records(tmp_path / "rel"):
        assert len(record["objects"]) == 2
        complete = [c["text"] for c in record["captions"] if c["kind"] == "complete"]
        assert any(w in text for text in complete for w in words), complete
    with pytest.raises(TypeError, match="mix must be a SceneMix"):
        make_dataset(tmp_path / "bad", n=1, mix={"pair": 1.0}, progress=False)


def test_cli_scene_mix(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shapes_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["shapes", "make", str(tmp_path / "m"), "--n", "2", "--size", "48",
                              "--scene-mix", "single=1,count=0,pair=0,mixed=0"])  # fmt: skip
    assert args.func(args) == 0
    assert all(len(r["objects"]) == 1 for r in _folder_records(tmp_path / "m"))
    with pytest.raises(SystemExit):
        parser.parse_args(["shapes", "make", str(tmp_path / "x"), "--n", "2",
                           "--scene-mix", "pair=2"])  # fmt: skip
    assert "SceneMix.pair must be a number in [0, 1]" in capsys.readouterr().err


def test_cli_make(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shapes_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["shapes", "make", str(tmp_path / "cli"), "--n", "3", "--size", "48", "--seed", "2"]
    )
    assert args.func(args) == 0
    assert len(_folder_records(tmp_path / "cli")) == 3
    assert Image.open(tmp_path / "cli" / "00000002.png").size == (48, 48)
    args = parser.parse_args(
        [
            "shapes",
            "make",
            str(tmp_path / "wds"),
            "--n",
            "3",
            "--size",
            "48",
            "--webdataset-shards",
            "2",
        ]
    )
    assert args.func(args) == 0
    assert len(list((tmp_path / "wds").glob("shard-*.tar"))) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["shapes", "make", str(tmp_path), "--n", "0"])
