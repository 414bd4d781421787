"""Training data pipeline: metadata, caption choice, buckets, corrupt images, shards, caches."""

import io
import itertools
import json
import logging
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from fastsana.resolution import bin_for
from fastsana.training.buckets import BucketBatchSampler, bucket_batches, fit_to_bucket
from fastsana.training.cache import CachedLatentDataset, CacheError, merge_caches, write_cache
from fastsana.training.captions import Caption, CaptionSelection
from fastsana.training.data import ImageFolderDataset, MetadataError, collate, read_metadata
from fastsana.training.shards import ShardStream

BASE = 256
# (height, width) of the test images: several fall into the same 256-px bucket.
SIZES = [(40, 40), (44, 40), (30, 60), (32, 64), (60, 30), (64, 30), (20, 80), (40, 44)]


def png_bytes(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, sizes=SIZES, extra_lines=()):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (h, w) in enumerate(sizes):
        (root / f"img{i}.png").write_bytes(png_bytes(h, w, seed=i))
        captions = [
            {"text": f"caption {i} a", "clip_score": 30.0},
            {"text": f"caption {i} b", "clip_score": 27.0},
        ]
        lines.append(json.dumps({"file_name": f"img{i}.png", "captions": captions, "extra": 1}))
    (root / "metadata.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return root


# --- metadata ---------------------------------------------------------------------------


def test_metadata_accepts_every_caption_form(tmp_path):
    lines = [
        {"file_name": "a.png", "captions": [{"text": "x", "clip_score": 31.5}, {"text": "y"}]},
        {"file_name": "b.png", "captions": ["p", "q"]},
        {"file_name": "c.png", "text": "t", "width": 3},
        {"file_name": "d.png", "caption": "c"},
    ]
    # The mixed first record is an error; fix it to check the accepted forms.
    lines[0]["captions"][1]["clip_score"] = 20
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = read_metadata(path)
    assert [r.file_name for r in records] == ["a.png", "b.png", "c.png", "d.png"]
    assert records[0].captions == (Caption("x", 31.5), Caption("y", 20.0))
    assert records[1].captions == (Caption("p"), Caption("q"))
    assert records[2].captions == (Caption("t"),)
    assert records[3].captions == (Caption("c"),)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"file_name": "b.png", "text": ', r"line 2: invalid JSON"),
        ('{"text": "no file"}', r"line 2: missing 'file_name'"),
        ('{"file_name": "b.png"}', r"line 2: no caption"),
        ('{"file_name": "b.png", "captions": []}', r"line 2: 'captions' must be a non-empty"),
        (
            '{"file_name": "b.png", "captions": [{"text": "a", "clip_score": 30}, "b"]}',
            r"line 2: some captions have a clip_score",
        ),
        ('{"file_name": "b.png", "captions": [{"text": 3}]}', r"line 2, captions\[0\]"),
    ],
)
def test_metadata_errors_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n" + bad_line + "\n")
    with pytest.raises(MetadataError, match=message):
        read_metadata(path)


# --- caption selection ------------------------------------------------------------------


def draw_frequencies(selection, captions, n=10000, seed=0):
    rng = np.random.default_rng(seed)
    counts = Counter(selection.choose(captions, rng) for _ in range(n))
    return np.array([counts[i] / n for i in range(len(captions))])


def assert_frequencies(freqs, expected, n=10000):
    # Within 5 binomial standard deviations, per caption.
    sigma = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / n)
    assert np.all(np.abs(freqs - expected) <= 5 * sigma + 1e-12), (freqs, expected)


def test_power_weighting_frequencies_follow_score_power():
    scores = [26.0, 28.0, 30.0, 20.0]  # the last is below the threshold
    captions = [Caption(f"c{i}", s) for i, s in enumerate(scores)]
    kept = np.array(scores[:3])
    weights = kept**10.0  # s ** (1 / 0.1)
    expected = [*(weights / weights.sum()), 0.0]
    freqs = draw_frequencies(CaptionSelection(threshold=25, temperature=0.1), captions)
    assert freqs[3] == 0
    assert_frequencies(freqs, expected)


def test_softmax_weighting_frequencies_follow_exp_score():
    scores = [26.0, 28.0, 30.0]
    captions = [Caption(f"c{i}", s) for i, s in enumerate(scores)]
    weights = np.array([math.exp(s / 2.0) for s in scores])
    selection = CaptionSelection(threshold=25, temperature=2.0, weighting="softmax")
    assert_frequencies(draw_frequencies(selection, captions), weights / weights.sum())


def test_best_caption_is_kept_when_none_passes_the_threshold():
    captions = [Caption("a", 12.0), Caption("b", 21.0), Caption("c", 18.0)]
    freqs = draw_frequencies(CaptionSelection(threshold=25), captions, n=200)
    assert freqs.tolist() == [0.0, 1.0, 0.0]


def test_unscored_captions_are_uniform_and_draws_are_seeded():
    captions = [Caption("a"), Caption("b"), Caption("c"), Caption("d")]
    assert_frequencies(draw_frequencies(CaptionSelection(), captions), [0.25] * 4)
    selection = CaptionSelection()
    draws = [
        [selection.choose(captions, rng) for _ in range(50)]
        for rng in (np.random.default_rng(7), np.random.default_rng(7))
    ]
    assert draws[0] == draws[1]


def test_caption_selection_validates_its_settings():
    with pytest.raises(ValueError, match="temperature must be a positive"):
        CaptionSelection(temperature=0)
    with pytest.raises(ValueError, match="weighting must be"):
        CaptionSelection(weighting="linear")
    with pytest.raises(ValueError, match="needs threshold > 0"):
        CaptionSelection(threshold=0)


# --- buckets ----------------------------------------------------------------------------


def test_fit_to_bucket_scales_to_cover_and_crops_the_centre():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8))
    out = fit_to_bucket(source, 128, 256)
    assert out.shape == (3, 128, 256) and out.dtype == torch.uint8
    # Independent route: scale by max(128/100, 256/300) = 1.28 to 384 x 128, crop 64 px a side.
    reference = np.asarray(source.resize((384, 128), Image.Resampling.BICUBIC))[:, 64:320]
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(float) - reference.astype(float))
    assert diff.mean() < 1.0


def sampler_plan(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_bucket_batch_sampler_batches_are_single_bucket_and_deterministic():
    bucket_ids = ["a"] * 50 + ["b"] * 33 + ["c"] * 17
    rng = np.random.default_rng(1)
    bucket_ids = [bucket_ids[i] for i in rng.permutation(len(bucket_ids))]
    sampler = BucketBatchSampler(bucket_ids, 4, seed=3)
    plan = sampler_plan(sampler, 0)
    assert len(plan) == len(sampler) == 50 // 4 + 33 // 4 + 17 // 4
    for batch in plan:
        assert len(batch) == 4
        assert len({bucket_ids[i] for i, _ in batch}) == 1
        assert all(epoch == 0 for _, epoch in batch)
    indices = [i for batch in plan for i, _ in batch]
    assert len(indices) == len(set(indices))
    assert plan == sampler_plan(BucketBatchSampler(bucket_ids, 4, seed=3), 0)
    assert plan != sampler_plan(sampler, 1)
    assert plan != sampler_plan(BucketBatchSampler(bucket_ids, 4, seed=4), 0)


def test_bucket_batch_sampler_splits_ranks_disjoint_and_equal():
    bucket_ids = ["a"] * 50 + ["b"] * 33 + ["c"] * 17
    world = 3
    plans = [
        sampler_plan(BucketBatchSampler(bucket_ids, 4, seed=0, num_replicas=world, rank=r), 2)
        for r in range(world)
    ]
    total = 50 // 4 + 33 // 4 + 17 // 4
    assert [len(p) for p in plans] == [total // world] * world
    indices = [i for plan in plans for batch in plan for i, _ in batch]
    assert len(indices) == len(set(indices))


def test_bucket_batch_sampler_resumes_exactly():
    bucket_ids = [i % 3 for i in range(90)]
    sampler = BucketBatchSampler(bucket_ids, 5, seed=11, num_replicas=2, rank=1)
    full = sampler_plan(sampler, 4)
    resumed = BucketBatchSampler(bucket_ids, 5, seed=11, num_replicas=2, rank=1)
    assert sampler_plan(resumed, 4, start=3) == full[3:]
    assert len(resumed) == len(full) - 3
    with pytest.raises(ValueError, match="start_batch must be in"):
        resumed.set_epoch(4, len(full) + 1)


def test_bucket_batch_sampler_keeps_partial_batches_without_drop_last():
    bucket_ids = ["a"] * 5 + ["b"] * 3
    sampler = BucketBatchSampler(bucket_ids, 4, shuffle=False, drop_last=False)
    assert [[i for i, _ in b] for b in sampler] == [[0, 1, 2, 3], [4], [5, 6, 7]]


def test_bucket_batches_streams_full_single_bucket_batches():
    samples = [("x", i) for i in range(7)] + [("y", i) for i in range(3)] + [("x", 7)]
    batches = list(bucket_batches(iter(samples), 4, bucket_of=lambda s: s[0]))
    assert batches == [[("x", i) for i in range(4)], [("x", i) for i in range(4, 8)]]


def test_folder_dataset_batches_hold_one_bucket_in_unit_range(tmp_path):
    dataset = ImageFolderDataset(make_folder(tmp_path), BASE, seed=5)
    assert dataset.bucket_ids == [bin_for(h, w, BASE) for h, w in SIZES]
    sampler = BucketBatchSampler(dataset.bucket_ids, 2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler) > 0
    index_of = {r.file_name: i for i, r in enumerate(dataset.records)}
    for batch in batches:
        buckets = {dataset.bucket_ids[index_of[key]] for key in batch["keys"]}
        assert len(buckets) == 1
        assert batch["pixels"].shape == (2, 3, *buckets.pop())
        assert batch["pixels"].dtype == torch.float32
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["num_skipped"] == 0
        for key, caption in zip(batch["keys"], batch["captions"], strict=True):
            assert caption.startswith(f"caption {key[3:-4]} ")
    # The caption drawn for (index, epoch) is reproducible.
    assert dataset[(3, 2)]["caption"] == dataset[(3, 2)]["caption"]


def test_collate_refuses_mixed_buckets():
    samples = [
        {"pixels": torch.zeros(3, 32, 32), "caption": "a", "key": "a", "num_skipped": 0},
        {"pixels": torch.zeros(3, 32, 64), "caption": "b", "key": "b", "num_skipped": 0},
    ]
    with pytest.raises(ValueError, match="mixes pixels shapes"):
        collate(samples)


# --- corrupt images ---------------------------------------------------------------------


def test_corrupt_images_are_skipped_counted_and_logged_once(tmp_path, caplog):
    make_folder(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    truncated = png_bytes(40, 40, seed=99)
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "text.png", "text": "t"}) + "\n")
        f.write(json.dumps({"file_name": "truncated.png", "text": "t"}) + "\n")
    caplog.set_level(logging.WARNING, logger="fastsana.training.data")
    dataset = ImageFolderDataset(tmp_path, BASE)
    # The text file fails at the header read and is left out; the truncated PNG's header reads.
    assert [r.file_name for r in dataset.records][-1] == "truncated.png"
    assert dataset.num_skipped == 1
    bad = len(dataset) - 1
    first = dataset[bad]
    again = dataset[bad]
    assert first["key"] != "truncated.png" and first["num_skipped"] == 1
    assert first["pixels"].shape[1:] == dataset.bucket_ids[bad]
    assert again["key"] == first["key"]
    assert dataset.num_skipped == 3
    logged = [r.getMessage() for r in caplog.records]
    assert sum("truncated.png" in m for m in logged) == 1
    assert sum("text.png" in m for m in logged) == 1


# --- WebDataset shards ------------------------------------------------------------------


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root, num_shards=4, per_shard=4):
    keys = []
    for s in range(num_shards):
        samples = []
        for j in range(per_shard):
            key = f"s{s}_{j}"
            keys.append(key)
            record = {"captions": [{"text": f"{key} caption", "clip_score": 30}]}
            samples.append((f"{key}.png", png_bytes(40, 40, seed=10 * s + j)))
            samples.append((f"{key}.json", json.dumps(record).encode()))
        write_shard(root / f"shard-{s:02d}.tar", samples)
    return keys


def test_shard_stream_batches_split_by_rank_and_worker(tmp_path):
    keys = make_shards(tmp_path)
    pattern = str(tmp_path / "shard-{00..03}.tar")
    seen = []
    for rank in range(2):
        stream = ShardStream(pattern, BASE, 2, rank=rank, num_replicas=2, shuffle_buffer=0)
        batches = list(DataLoader(stream, batch_size=None, num_workers=2))
        rank_keys = [k for b in batches for k in b["keys"]]
        seen.append(set(rank_keys))
        for batch in batches:
            assert batch["pixels"].shape == (2, 3, *bin_for(40, 40, BASE))
            assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
            assert batch["captions"] == [f"{k} caption" for k in batch["keys"]]
        assert len(rank_keys) == len(set(rank_keys)) == 8
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(keys)


def test_shard_stream_is_deterministic_and_reshuffles_by_epoch(tmp_path):
    make_shards(tmp_path, num_shards=6, per_shard=2)
    stream = ShardStream(str(tmp_path / "*.tar"), BASE, 2, shuffle_buffer=4, seed=1)
    assert len(stream.urls) == 6
    first = [b["keys"] for b in stream]
    assert first == [b["keys"] for b in stream]
    assert stream.shards_for(0) != stream.shards_for(1)
    stream.set_epoch(1)
    second = [b["keys"] for b in stream]
    assert second != first
    endless = ShardStream(str(tmp_path / "*.tar"), BASE, 2, shuffle_buffer=4, seed=1, repeat=True)
    assert [b["keys"] for b in itertools.islice(endless, 2 * len(first))] == first + second


def test_shard_stream_skips_corrupt_samples(tmp_path, caplog):
    good = png_bytes(40, 40)
    record = json.dumps({"text": "ok"}).encode()
    write_shard(
        tmp_path / "bad.tar",
        [
            ("a.png", good),
            ("a.json", record),
            ("b.png", good[: len(good) // 2]),  # truncated
            ("b.json", record),
            ("c.jpg", b"not an image"),
            ("c.json", record),
            ("d.png", good),  # no json
            ("e.png", good),
            ("e.json", b"{broken"),
            ("f.webp", good),  # a PNG under another name still decodes
            ("f.json", record),
        ],
    )
    caplog.set_level(logging.WARNING)
    stream = ShardStream([tmp_path / "bad.tar"], BASE, 2, shuffle=False)
    batches = list(stream)
    assert [b["keys"] for b in batches] == [["a", "f"]]
    assert stream.num_skipped == 4 == batches[0]["num_skipped"]
    assert len(caplog.records) == 4


def test_shard_patterns_must_match_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ShardStream(str(tmp_path / "*.tar"), BASE, 2)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        ShardStream(str(tmp_path / "x-{0..1}.tar"), BASE, 2)


# --- latent / text cache ----------------------------------------------------------------

TEXT_LENGTH, TEXT_DIM = 6, 5


def fake_encode_images(pixels):
    # A deterministic stand-in for the DC-AE: 32x average pooling, 4 channels.
    pooled = F.avg_pool2d(pixels, 32)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def fake_encode_text(texts):
    emb = torch.full((len(texts), TEXT_LENGTH, TEXT_DIM), 7.0)  # padding is not zero
    mask = torch.zeros(len(texts), TEXT_LENGTH, dtype=torch.int64)
    for n, text in enumerate(texts):
        length = min(len(text.split()), TEXT_LENGTH)
        mask[n, :length] = 1
        for t, word in enumerate(text.split()[:length]):
            emb[n, t] = torch.arange(TEXT_DIM) + sum(map(ord, word))
    return emb, mask


def test_cache_round_trip_and_resume(tmp_path):
    folder = make_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    kwargs = dict(
        base_size=BASE,
        encode_images=fake_encode_images,
        encode_text=fake_encode_text,
        batch_size=3,
        info={"autoencoder": "fake"},
        progress=False,
    )
    summary = write_cache(folder, cache, **kwargs)
    assert (summary.written, summary.already_cached, summary.skipped) == (len(SIZES), 0, 0)

    images = ImageFolderDataset(folder, BASE)
    cached = CachedLatentDataset(cache, seed=1)
    assert cached.info["info"] == {"autoencoder": "fake"} and len(cached) == len(SIZES)
    for index in range(len(cached)):
        sample = cached[(index, 3)]
        pixels = images[index]["pixels"]
        expected_latent = fake_encode_images(pixels[None])[0]
        torch.testing.assert_close(sample["latents"], expected_latent)
        assert cached.bucket_ids[index] == tuple(expected_latent.shape[1:])
        emb, mask = fake_encode_text([sample["caption"]])
        assert sample["caption"] in (f"caption {index} a", f"caption {index} b")
        assert sample["key"] == f"img{index}.png"
        torch.testing.assert_close(sample["text_mask"], mask[0])
        torch.testing.assert_close(sample["text_embeds"], emb[0] * mask[0, :, None])

    sampler = BucketBatchSampler(cached.bucket_ids, 2, seed=0)
    batch = next(iter(DataLoader(cached, batch_sampler=sampler, collate_fn=collate)))
    assert batch["latents"].shape[:2] == (2, 4)
    assert batch["text_embeds"].shape == (2, TEXT_LENGTH, TEXT_DIM)
    assert batch["text_mask"].shape == (2, TEXT_LENGTH)

    again = write_cache(folder, cache, **kwargs)
    assert (again.written, again.already_cached) == (0, len(SIZES))
    with pytest.raises(CacheError, match="other settings"):
        write_cache(folder, cache, **{**kwargs, "info": {"autoencoder": "other"}})


def test_cache_writer_skips_unreadable_images(tmp_path):
    folder = make_folder(tmp_path / "images", sizes=SIZES[:3])
    truncated = png_bytes(40, 40, seed=5)
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "truncated.png", "text": "t"}) + "\n")
    summary = write_cache(
        folder,
        tmp_path / "cache",
        base_size=BASE,
        encode_images=fake_encode_images,
        encode_text=fake_encode_text,
        progress=False,
    )
    assert (summary.written, summary.skipped) == (3, 1)
    assert len(CachedLatentDataset(tmp_path / "cache")) == 3


def cache_of(folder, cache_dir, info=None):
    write_cache(
        folder,
        cache_dir,
        base_size=BASE,
        encode_images=fake_encode_images,
        encode_text=fake_encode_text,
        info=info or {"autoencoder": "fake"},
        progress=False,
    )
    (cache_dir / "null_caption.safetensors").write_bytes(b"same null caption")
    return cache_dir


def test_merged_cache_reads_every_source_image_under_its_own_stem(tmp_path):
    # Both folders name their images img0.png, img1.png, ...: the merge must keep them apart.
    first = cache_of(make_folder(tmp_path / "a", sizes=SIZES[:3]), tmp_path / "ca")
    second = cache_of(make_folder(tmp_path / "b", sizes=SIZES[3:7]), tmp_path / "cb")
    count = merge_caches(tmp_path / "merged", [first, second])
    merged = CachedLatentDataset(tmp_path / "merged")
    sources = [CachedLatentDataset(first), CachedLatentDataset(second)]
    assert count == len(merged) == 7
    assert merged.info == sources[0].info
    assert (tmp_path / "merged" / "null_caption.safetensors").read_bytes() == b"same null caption"
    pairs = [(reader, i) for reader in sources for i in range(len(reader))]
    for index, (reader, i) in enumerate(pairs):
        got, want = merged[index], reader[i]
        assert got["key"] == want["key"]
        torch.testing.assert_close(got["latents"], want["latents"])
        assert merged.bucket_ids[index] == reader.bucket_ids[i]
        emb, mask = fake_encode_text([got["caption"]])
        torch.testing.assert_close(got["text_embeds"], emb[0] * mask[0, :, None])
    # The two sources hold different images under the same names.
    assert not torch.equal(merged[0]["latents"], merged[3]["latents"])


def test_merge_refuses_mismatched_caches_and_existing_folders(tmp_path):
    first = cache_of(make_folder(tmp_path / "a", sizes=SIZES[:2]), tmp_path / "ca")
    other = cache_of(make_folder(tmp_path / "b", sizes=SIZES[:2]), tmp_path / "cb", {"x": 1})
    with pytest.raises(CacheError, match="other settings"):
        merge_caches(tmp_path / "m1", [first, other])
    assert not (tmp_path / "m1" / "cache_info.json").exists()
    third = cache_of(make_folder(tmp_path / "c", sizes=SIZES[:2]), tmp_path / "cc")
    (third / "null_caption.safetensors").write_bytes(b"another text encoder")
    with pytest.raises(CacheError, match=r"null_caption\.safetensors is missing or differs"):
        merge_caches(tmp_path / "m2", [first, third])
    with pytest.raises(CacheError, match="exists"):
        merge_caches(tmp_path / "a", [first])
    with pytest.raises(CacheError, match="at least one"):
        merge_caches(tmp_path / "m3", [])
    with pytest.raises(CacheError, match="not a cache"):
        merge_caches(tmp_path / "m4", [first, tmp_path / "a"])
