"""The data layer: pair formats, media loading, and the precompute cache, on real files in tmp_path.

Over 600 lines: the three share fixtures (the pair files and media written here), so they stay together.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdpo.data import (
    CachedPairs,
    CacheError,
    PairList,
    ParquetImage,
    PreferencePair,
    bucket_for,
    check_cache_matches,
    collate_pairs,
    detect_format,
    load_image,
    load_media,
    load_video,
    media_size,
    precompute,
    read_manifest,
    read_pairs,
    resize_center_crop,
    sample_frame_indices,
    write_pairs_jsonl,
)
from sdpo.data.batch import Pair, PairBatch
from sdpo.models.base import MediaFormat

IMAGE_FORMAT = MediaFormat(channels=3, height=8, width=8)


class FakeSpec:
    """Encodes by 2x2 average pooling; prompts become their first bytes (float) and their length (int)."""

    family = "fake"

    def __init__(self, media_format: MediaFormat = IMAGE_FORMAT, fail_on_call: int | None = None, pretrained=None):
        self.media_format = media_format
        self.fail_on_call = fail_on_call
        self.calls = 0
        if pretrained is not None:
            self.pretrained = pretrained

    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("encoder exploded")
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        pooled = F.avg_pool2d(flat, 2)
        return pooled.reshape(*pixels.shape[:-3], *pooled.shape[-3:])

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        codes = [list(p.encode()[:6].ljust(6, b"\0")) for p in prompts]
        return {
            "embeds": torch.tensor(codes, dtype=torch.float32).unsqueeze(1) / 255,
            "length": torch.tensor([len(p) for p in prompts]),
        }


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def solid(value, height=8, width=8) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.uint8), (height, width, 3)).copy()


def noise_image(seed: int, height=8, width=8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image_pairs(folder: Path, count: int, prompts=None) -> list[PreferencePair]:
    pairs = []
    for i in range(count):
        chosen = save_png(folder / f"c{i}.png", noise_image(2 * i))
        rejected = save_png(folder / f"r{i}.png", noise_image(2 * i + 1))
        prompt = prompts[i] if prompts else f"prompt {i}"
        pairs.append(PreferencePair(prompt, chosen, rejected, {"i": i}))
    return pairs


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {key: [row[key] for row in rows] for key in rows[0]}
    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups on purpose
    return path


# --------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_keeps_metadata_and_resolves_paths(tmp_path):
    a = save_png(tmp_path / "img" / "a.png", solid(10))
    b = save_png(tmp_path / "img" / "b.jpg", solid(200))
    outside = save_png(tmp_path.parent / f"{tmp_path.name}-outside.png", solid(50))
    pairs = [
        PreferencePair("a cat", a, b, {"score": 0.5}),
        PreferencePair("a dog", "img/b.jpg", outside),  # relative: relative to the manifest folder
    ]
    path = write_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "a cat", "chosen": "img/a.png", "rejected": "img/b.jpg", "score": 0.5}
    assert lines[1]["chosen"] == "img/b.jpg" and Path(lines[1]["rejected"]).is_absolute()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    read = read_pairs(tmp_path / "pairs.jsonl")
    assert isinstance(read, PairList) and len(read) == 2 and read.skipped == {}
    assert read[0].prompt == "a cat" and read[0].chosen == a and read[0].rejected == b
    assert read[0].metadata == {"score": 0.5} and read[1].metadata == {}
    assert read[1].rejected == outside
    assert read_pairs(tmp_path)[0].prompt == "a cat"  # a folder holding pairs.jsonl


def test_jsonl_skips_blank_lines_and_reads_videos_and_frame_folders(tmp_path):
    for i in range(3):
        save_png(tmp_path / "clip_a" / f"{i}.png", solid(i))
        save_png(tmp_path / "clip_b" / f"{i}.png", solid(i))
    (tmp_path / "v.gif").write_bytes(b"")  # existence and suffix are all a reader checks
    path = write_jsonl(
        tmp_path / "m.jsonl",
        ["", {"prompt": "p", "chosen": "clip_a", "rejected": str(tmp_path / "clip_b")}, "  ",
         {"prompt": "q", "chosen": "v.gif", "rejected": "clip_a"}],
    )  # fmt: skip
    pairs = read_pairs(path)
    assert [p.prompt for p in pairs] == ["p", "q"]
    assert pairs[0].chosen == tmp_path / "clip_a" and pairs[0].rejected == tmp_path / "clip_b"


BAD_LINES = [
    ("{not json", ValueError, "invalid JSON"),
    ("[1, 2]", ValueError, "expected a JSON object"),
    ({"prompt": "p", "chosen": "a.png"}, ValueError, "missing key 'rejected'"),
    ({"chosen": "a.png", "rejected": "b.png"}, ValueError, "missing key 'prompt'"),
    ({"prompt": "  ", "chosen": "a.png", "rejected": "b.png"}, ValueError, "empty prompt"),
    ({"prompt": 3, "chosen": "a.png", "rejected": "b.png"}, ValueError, "'prompt' must be a string"),
    ({"prompt": "p", "chosen": "nope.png", "rejected": "b.png"}, FileNotFoundError, "chosen file not found"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "nope.png"}, FileNotFoundError, "rejected file not found"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "notes.txt"}, ValueError, "unknown media type '.txt'"),
    ({"prompt": "p", "chosen": 5, "rejected": "b.png"}, ValueError, "'chosen' must be a non-empty path"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "a.png"}, ValueError, "same file"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "clip"}, ValueError, "chosen is image but rejected is video"),
    ({"prompt": "p", "chosen": "a.png", "rejected": "empty"}, ValueError, "frame folder has no images"),
]


@pytest.mark.parametrize(("line", "error", "message"), BAD_LINES)
def test_jsonl_errors_name_the_line_and_the_problem(tmp_path, line, error, message):
    save_png(tmp_path / "a.png", solid(1))
    save_png(tmp_path / "b.png", solid(2))
    save_png(tmp_path / "clip" / "0.png", solid(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    good = {"prompt": "fine", "chosen": "a.png", "rejected": "b.png"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, "", line])
    with pytest.raises(error) as caught:
        read_pairs(path)
    text = str(caught.value)
    assert "pairs.jsonl:3: " in text and message in text and "\n" not in text


def test_jsonl_no_pairs_missing_manifest_and_empty_prompt_skipping(tmp_path):
    save_png(tmp_path / "a.png", solid(1))
    save_png(tmp_path / "b.png", solid(2))
    with pytest.raises(ValueError, match="no pairs at all"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", ["", ""]))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "", "chosen": "a.png", "rejected": "b.png"}, {"prompt": "ok", "chosen": "a.png", "rejected": "b.png"}],
    )
    pairs = read_pairs(path, skip_empty_prompts=True)
    assert len(pairs) == 1 and pairs.skipped == {"empty prompt": 1}


def test_detect_format(tmp_path):
    assert detect_format(write_jsonl(tmp_path / "x.jsonl", [])) == "jsonl"
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "train-0.parquet").write_bytes(b"")
    assert detect_format(tmp_path / "pq") == "pickapic"
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="neither"):
        detect_format(tmp_path / "other")
    with pytest.raises(ValueError, match="unknown pair format"):
        detect_format(write_jsonl(tmp_path / "x.csv", []))
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "absent")


def test_write_pairs_jsonl_is_atomic_and_rejects_unwritable_pairs(tmp_path):
    a, b = save_png(tmp_path / "a.png", solid(1)), save_png(tmp_path / "b.png", solid(2))
    path = write_pairs_jsonl([PreferencePair("p", a, b)], tmp_path / "pairs.jsonl")
    before = path.read_text()
    with pytest.raises(ValueError, match="pair 1: metadata is not JSON-serialisable"):
        write_pairs_jsonl([PreferencePair("p", a, b), PreferencePair("q", a, b, {"x": object()})], path)
    with pytest.raises(ValueError, match="pair 0: chosen is bytes"):
        write_pairs_jsonl([PreferencePair("p", b"png", b)], path)
    with pytest.raises(ValueError, match="clashes"):
        write_pairs_jsonl([PreferencePair("p", a, b, {"prompt": "x"})], path)
    with pytest.raises(ValueError, match="no pairs"):
        write_pairs_jsonl([], path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "pairs.jsonl"]
    with pytest.raises(ValueError, match="empty prompt"):
        PreferencePair(" ", a, b)


# --------------------------------------------------------------------------------------------- Pick-a-Pic


def pickapic_rows(labels, captions=None):
    rows = []
    for i, label in enumerate(labels):
        rows.append({
            "caption": captions[i] if captions else f"caption {i}",
            "jpg_0": png_bytes(solid(10 * i)),
            "jpg_1": png_bytes(solid(10 * i + 5)),
            "label_0": label,
            "ranking_id": i,
        })  # fmt: skip
    return rows


def test_pickapic_reads_preference_direction_and_skips_ties(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", pickapic_rows([1.0, 0.0, 0.5, 1.0, 0.0]))
    pairs = read_pairs(path)
    assert len(pairs) == 4 and pairs.skipped == {"tie": 1}
    assert [p.prompt for p in pairs] == ["caption 0", "caption 1", "caption 3", "caption 4"]
    first, second = pairs[0], pairs[1]
    assert isinstance(first.chosen, ParquetImage) and first.chosen.column == "jpg_0" and first.rejected.column == "jpg_1"
    assert second.chosen.column == "jpg_1" and second.rejected.column == "jpg_0"
    assert pairs[2].chosen.row == 3 and pairs[2].chosen.row_group == 1 and pairs[2].chosen.index == 1
    assert first.metadata == {"label_0": 1.0, "ranking_id": 0}
    # The cells decode to the right images, whichever side was preferred.
    fmt = MediaFormat(height=4, width=4)
    expected = torch.full((3, 4, 4), (10 * 3 + 5) / 127.5 - 1)
    torch.testing.assert_close(load_image(pairs[2].rejected, fmt), expected)
    torch.testing.assert_close(load_image(pairs[1].chosen, fmt), torch.full((3, 4, 4), 15 / 127.5 - 1))

    kept = read_pairs(path, skip_ties=False)
    assert len(kept) == 5 and kept[2].metadata["tie"] is True and kept.skipped == {}


def test_pickapic_folder_of_files_and_optional_columns(tmp_path):
    rows = pickapic_rows([1.0, 0.0, 1.0])
    rows[1]["has_label"], rows[0]["has_label"], rows[2]["has_label"] = False, True, True
    for row in rows:
        row["are_different"] = True
    rows[2]["are_different"] = False
    write_parquet(tmp_path / "a.parquet", rows)
    write_parquet(tmp_path / "b.parquet", pickapic_rows([0.0, 0.5]))
    pairs = read_pairs(tmp_path)
    assert [(p.chosen.path.name, p.chosen.row) for p in pairs] == [("a.parquet", 0), ("b.parquet", 0)]
    assert pairs.skipped == {"tie": 1, "unlabelled": 1, "identical images": 1}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"caption": "c", "jpg_0": b"x", "jpg_1": b"y"}], "missing column 'label_0'"),
        (pickapic_rows([1.0, 0.3]), "row 1: label_0 must be 1.0, 0.0 or 0.5"),
        (pickapic_rows([1.0, 1.0, 0.0], captions=["a", "b", " "]), "row 2: empty prompt"),
        (pickapic_rows([0.5, 0.5]), r"no pairs at all \(skipped 2 tie\)"),
    ],
)
def test_pickapic_errors_name_the_row(tmp_path, rows, message):
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


def test_pickapic_empty_captions_can_be_skipped_and_bad_files_fail(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", pickapic_rows([1.0, 0.0], captions=["", "ok"]))
    pairs = read_pairs(path, skip_empty_prompts=True)
    assert len(pairs) == 1 and pairs.skipped == {"empty prompt": 1}
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        read_pairs(tmp_path / "broken.parquet")


# --------------------------------------------------------------------------------------------- media


def test_image_resize_crop_shapes_values_and_channels(tmp_path):
    # 30x10 stripes red | green | blue: a square crop keeps the green middle.
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, :10, 0] = 255
    stripes[:, 10:20, 1] = 255
    stripes[:, 20:, 2] = 255
    path = save_png(tmp_path / "stripes.png", stripes)
    exact = load_image(path, MediaFormat(height=10, width=10))
    assert exact.shape == (3, 10, 10) and exact.dtype == torch.float32
    torch.testing.assert_close(exact, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10))
    small = load_image(path, MediaFormat(height=4, width=6))
    assert small.shape == (3, 4, 6) and small.min() >= -1 and small.max() <= 1
    torch.testing.assert_close(small[:, 2, 3], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05, rtol=0)
    tall = load_image(path, MediaFormat(height=12, width=5))
    assert tall.shape == (3, 12, 5)
    grey = load_image(save_png(tmp_path / "g.png", solid(255)), MediaFormat(channels=1, height=3, width=3))
    assert grey.shape == (1, 3, 3) and torch.all(grey == 1)
    deep = np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)  # 16-bit grey must scale, not clip
    Image.fromarray(deep).save(tmp_path / "deep.png")
    torch.testing.assert_close(
        load_image(tmp_path / "deep.png", MediaFormat(channels=1, height=2, width=2)),
        torch.tensor([[[-1.0, 1.0], [1 / 255, 1.0]]]),
    )
    noisy = load_image(save_png(tmp_path / "n.png", noise_image(0, 37, 23)), MediaFormat(height=16, width=16))
    assert noisy.min() >= -1 and noisy.max() <= 1 and noisy.min() < -0.8 and noisy.max() > 0.8
    assert resize_center_crop(Image.new("RGB", (7, 3)), 5, 4).size == (4, 5)


def test_transparency_is_white_and_bytes_are_images(tmp_path):
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert torch.all(load_image(tmp_path / "clear.png", MediaFormat(height=4, width=4)) == 1)
    assert torch.all(load_image(png_bytes(solid(0)), MediaFormat(height=2, width=2)) == -1)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "bad.png", IMAGE_FORMAT)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png", IMAGE_FORMAT)


def test_sample_frame_indices():
    assert sample_frame_indices(10, 4) == [0, 3, 6, 9]
    assert sample_frame_indices(7, 7) == list(range(7))
    assert sample_frame_indices(5, 1) == [0]
    assert sample_frame_indices(9, 5) == [0, 2, 4, 6, 8]
    many = sample_frame_indices(100, 49)
    assert many[0] == 0 and many[-1] == 99 and len(set(many)) == 49 and many == sorted(many)
    with pytest.raises(ValueError, match="has 3 frames but 5 are needed"):
        sample_frame_indices(3, 5)
    assert sample_frame_indices(3, 5, pad_frames=True) == [0, 1, 2, 2, 2]


LEVELS = [0, 30, 60, 90, 120, 150, 180, 210, 240]  # one grey level per frame identifies it


def write_video(path: Path, count: int = len(LEVELS)) -> Path:
    import imageio.v3 as iio

    frames = np.stack([solid(level, 32, 48) for level in LEVELS[:count]])
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=50, loop=0)
    elif path.suffix == ".webm":
        iio.imwrite(path, frames, fps=8, codec="libvpx-vp9")
    else:
        iio.imwrite(path, frames, fps=8)
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webm"])
def test_video_files_give_evenly_spaced_frames(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}")
    clip = load_video(path, MediaFormat(height=16, width=16, frames=5))
    assert clip.shape == (5, 3, 16, 16) and clip.dtype == torch.float32
    means = (clip.mean(dim=(1, 2, 3)) + 1) * 127.5
    # Lossy codecs shift flat greys by a few levels; neighbouring frames differ by 30.
    np.testing.assert_allclose(means.numpy(), [LEVELS[i] for i in (0, 2, 4, 6, 8)], atol=6)


def test_frame_folder_natural_order_padding_and_errors(tmp_path):
    folder = tmp_path / "frames"
    for i in range(11):  # f0 .. f10: plain string sorting would put f10 before f2
        save_png(folder / f"f{i}.png", solid(20 * i))
    clip = load_media(folder, MediaFormat(height=4, width=4, frames=6))
    levels = ((clip[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert levels == [0, 40, 80, 120, 160, 200]
    short = MediaFormat(height=4, width=4, frames=14)
    with pytest.raises(ValueError, match="11 frames but 14 are needed"):
        load_media(folder, short)
    padded = load_media(folder, short, pad_frames=True)
    assert padded.shape == (14, 3, 4, 4) and torch.equal(padded[10], padded[13])
    with pytest.raises(ValueError, match="is a video but the model takes images"):
        load_media(folder, MediaFormat(height=4, width=4))
    with pytest.raises(ValueError, match="is an image but the model takes 6-frame clips"):
        load_media(folder / "f0.png", MediaFormat(height=4, width=4, frames=6))
    with pytest.raises(ValueError, match="9 frames but 10 are needed"):
        load_media(write_video(tmp_path / "v.mp4"), MediaFormat(height=16, width=16, frames=10))


def test_buckets_and_media_size(tmp_path):
    buckets = [(512, 512), (384, 640), (640, 384)]
    assert bucket_for((100, 200), buckets) == (384, 640)
    assert bucket_for((300, 120), buckets) == (640, 384)
    assert bucket_for((90, 100), buckets) == (512, 512)
    assert bucket_for((1, 1000), MediaFormat(height=64, width=32)) == (64, 32)
    with pytest.raises(ValueError, match="no buckets"):
        bucket_for((1, 1), [])
    assert media_size(save_png(tmp_path / "a.png", solid(0, 5, 9))) == (5, 9)
    assert media_size(write_video(tmp_path / "v.mp4", 2)) == (32, 48)
    assert media_size(png_bytes(solid(0, 3, 7))) == (3, 7)


# --------------------------------------------------------------------------------------------- cache


def expected_item(spec: FakeSpec, pair: PreferencePair) -> Pair:
    fmt = spec.media_format
    cond = spec.encode_prompts([pair.prompt])
    return Pair(
        chosen=spec.encode_media(load_media(pair.chosen, fmt)[None])[0],
        rejected=spec.encode_media(load_media(pair.rejected, fmt)[None])[0],
        conditions={key: value[0] for key, value in cond.items()},
    )


def assert_item_equal(actual: Pair, expected: Pair) -> None:
    assert isinstance(actual, Pair)
    torch.testing.assert_close(actual.chosen, expected.chosen, rtol=0, atol=0)
    torch.testing.assert_close(actual.rejected, expected.rejected, rtol=0, atol=0)
    assert set(actual.conditions) == set(expected.conditions)
    for key in expected.conditions:
        torch.testing.assert_close(actual.conditions[key], expected.conditions[key], rtol=0, atol=0)


def test_precompute_round_trip_and_shards(tmp_path):
    prompts = ["red", "blue", "red", "green", "blue", "red", "a", "b", "c", "red"]  # repeats within batches
    pairs = make_image_pairs(tmp_path / "media", 10, prompts)
    spec = FakeSpec(pretrained=tmp_path / "model")
    out = precompute(pairs, spec, tmp_path / "cache", batch_size=3, shard_size=4, progress=False,
                     extra_manifest={"source": "test"})  # fmt: skip
    assert out == tmp_path / "cache"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
    ]  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "sdpo-pair-cache" and manifest["version"] == 1
    assert manifest["family"] == "fake" and manifest["pretrained"] == str(tmp_path / "model")
    assert manifest["media_format"] == {"channels": 3, "height": 8, "width": 8, "frames": None}
    assert manifest["num_pairs"] == 10 and manifest["extra"] == {"source": "test"}
    assert [s["num_pairs"] for s in manifest["shards"]] == [4, 4, 2]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["shards"])
    assert manifest["tensors"] == {
        "latents_chosen": {"shape": [3, 4, 4], "dtype": "float32"},
        "latents_rejected": {"shape": [3, 4, 4], "dtype": "float32"},
        "cond.embeds": {"shape": [1, 6], "dtype": "float32"},
        "cond.length": {"shape": [], "dtype": "int64"},
    }
    from safetensors.torch import load_file

    assert load_file(out / "shard-00002.safetensors")["latents_chosen"].shape == (2, 3, 4, 4)

    dataset = CachedPairs(out, verify=True)
    assert len(dataset) == 10 and dataset.manifest == manifest and dataset.family == "fake"
    assert dataset.media_format == IMAGE_FORMAT and dataset.cond_keys == ["embeds", "length"]
    reference = FakeSpec()
    for index, pair in enumerate(pairs):
        assert_item_equal(dataset[index], expected_item(reference, pair))
    assert_item_equal(dataset[-1], expected_item(reference, pairs[9]))
    with pytest.raises(IndexError):
        dataset[10]

    batch = collate_pairs([dataset[i] for i in (0, 5, 9)])
    assert isinstance(batch, PairBatch) and len(batch) == 3
    assert batch.chosen.shape == (3, 3, 4, 4) and batch.conditions["embeds"].shape == (3, 1, 6)
    assert batch.conditions["length"].tolist() == [3, 3, 3]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_pairs)
    assert [b.rejected.shape[0] for b in loader] == [4, 4, 2]


def test_the_score_gap_is_carried_into_the_cache_and_its_batches(tmp_path):
    """pair_weighting reads each pair's gap: stored when every pair has a numeric one, else none at all."""
    pairs = make_image_pairs(tmp_path / "media", 5)
    gaps = [0.5, 2.0, 0.25, 1.0, 3]  # an int gap is a number too
    for pair, gap in zip(pairs, gaps, strict=True):
        pair.metadata["gap"] = gap
    out = precompute(pairs, FakeSpec(), tmp_path / "cache", batch_size=2, shard_size=2, progress=False, num_workers=0)
    dataset = CachedPairs(out)
    assert read_manifest(out)["tensors"]["gap"] == {"shape": [], "dtype": "float64"}
    assert dataset.has_gaps and dataset.gaps().tolist() == [0.5, 2.0, 0.25, 1.0, 3.0]
    assert float(dataset[3].gap) == 1.0 and dataset[3].gap.dtype == torch.float64
    batch = collate_pairs([dataset[i] for i in (4, 0)]).to("cpu", torch.float16)
    assert batch.gaps.tolist() == [3.0, 0.5] and batch.gaps.dtype == torch.float64

    # One pair without a gap (or with a non-number) and no pair's gap is stored: the cache reads as
    # before this field existed, and a batch carries none.
    pairs[2].metadata["gap"] = "large"
    bare = CachedPairs(precompute(pairs, FakeSpec(), tmp_path / "bare", progress=False, num_workers=0))
    assert not bare.has_gaps and bare.gaps() is None and bare[2].gap is None
    assert "gap" not in bare.manifest["tensors"]
    assert collate_pairs([bare[0], bare[1]]).gaps is None
    assert collate_pairs([dataset[0], bare[1]]).gaps is None  # a mixed batch has none either


def test_cached_pairs_random_access_with_one_open_shard_and_pickling(tmp_path):
    pairs = make_image_pairs(tmp_path / "media", 7)
    out = precompute(pairs, FakeSpec(), tmp_path / "cache", batch_size=2, shard_size=2, progress=False, num_workers=0)
    dataset = CachedPairs(out, max_open_shards=1)
    reference = FakeSpec()
    for index in [6, 0, 3, 2, 6, 1, 5, 4]:
        assert_item_equal(dataset[index], expected_item(reference, pairs[index]))
        assert len(dataset._open) == 1
    clone = pickle.loads(pickle.dumps(dataset))
    assert_item_equal(clone[3], expected_item(reference, pairs[3]))


def test_precompute_video_pairs_and_pickapic(tmp_path):
    pairs = []
    for i in range(3):
        for side in ("c", "r"):
            for f in range(4):
                save_png(tmp_path / f"{side}{i}" / f"{f}.png", noise_image(100 * i + 10 * f + (side == "r")))
        pairs.append(PreferencePair(f"clip {i}", tmp_path / f"c{i}", tmp_path / f"r{i}"))
    spec = FakeSpec(MediaFormat(height=8, width=8, frames=3))
    dataset = CachedPairs(precompute(pairs, spec, tmp_path / "cache", batch_size=2, progress=False))
    assert dataset[0].chosen.shape == (3, 3, 4, 4)
    for index, pair in enumerate(pairs):
        assert_item_equal(dataset[index], expected_item(spec, pair))

    parquet = write_parquet(tmp_path / "p.parquet", pickapic_rows([1.0, 0.0, 0.5, 0.0]))
    picked = read_pairs(parquet)
    cached = CachedPairs(precompute(picked, FakeSpec(), tmp_path / "pick", batch_size=2, progress=False))
    for index, pair in enumerate(picked):
        assert_item_equal(cached[index], expected_item(FakeSpec(), pair))

    with pytest.raises(ValueError, match="pair 0: chosen is video but fake takes images"):
        precompute(pairs, FakeSpec(), tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("workers", [0, 2])
def test_precompute_failure_leaves_nothing_behind(tmp_path, workers):
    pairs = make_image_pairs(tmp_path / "media", 9)
    spec = FakeSpec(fail_on_call=5)  # third batch: two shards were already written
    with pytest.raises(RuntimeError, match="encoder exploded"):
        precompute(pairs, spec, tmp_path / "out" / "cache", batch_size=2, shard_size=2, progress=False,
                   num_workers=workers)  # fmt: skip
    assert not (tmp_path / "out" / "cache").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_precompute_refuses_existing_cache_unless_overwrite(tmp_path):
    pairs = make_image_pairs(tmp_path / "media", 3)
    out = tmp_path / "cache"
    out.mkdir()  # an empty folder is fine
    precompute(pairs, FakeSpec(), out, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        precompute(pairs[:2], FakeSpec(), out, progress=False)
    # A failing overwrite keeps the old cache.
    with pytest.raises(RuntimeError):
        precompute(pairs[:2], FakeSpec(fail_on_call=1), out, progress=False, overwrite=True)
    assert len(CachedPairs(out)) == 3
    precompute(pairs[:2], FakeSpec(), out, progress=False, overwrite=True)
    assert len(CachedPairs(out)) == 2 and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="no pairs"):
        precompute([], FakeSpec(), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="extra_manifest is not JSON"):
        precompute(pairs, FakeSpec(), tmp_path / "x", progress=False, extra_manifest={"a": object()})


@pytest.fixture
def small_cache(tmp_path):
    pairs = make_image_pairs(tmp_path / "media", 5)
    return precompute(pairs, FakeSpec(), tmp_path / "cache", shard_size=2, progress=False)


def edit_manifest(cache: Path, change) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    change(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated shard": (
        lambda c: (c / "shard-00001.safetensors").write_bytes((c / "shard-00001.safetensors").read_bytes()[:-7]),
        "shard-00001.safetensors has .* bytes, the manifest says",
    ),
    "missing shard": (lambda c: (c / "shard-00002.safetensors").unlink(), "shard shard-00002.safetensors is missing"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    "bad json": (lambda c: (c / "manifest.json").write_text("{oops"), "not valid JSON"),
    "version": (lambda c: edit_manifest(c, lambda m: m.update(version=99)), "version 99 cache"),
    "format": (lambda c: edit_manifest(c, lambda m: m.update(format="x")), "not an sdpo pair-cache manifest"),
    "count": (lambda c: edit_manifest(c, lambda m: m.update(num_pairs=6)), "shards hold 5 pairs but num_pairs is 6"),
    "shard entry": (lambda c: edit_manifest(c, lambda m: m["shards"][0].pop("sha256")), "malformed shard entry"),
    "tensors": (lambda c: edit_manifest(c, lambda m: m["tensors"].pop("latents_chosen")), "missing 'tensors'"),
    "family": (lambda c: edit_manifest(c, lambda m: m.pop("family")), "missing 'family'"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_caches_raise_one_clear_line(small_cache, name):
    corrupt, message = CORRUPTIONS[name]
    corrupt(small_cache)
    with pytest.raises(CacheError, match=message) as caught:
        CachedPairs(small_cache)
    text = str(caught.value)
    assert "\n" not in text and ("sdpo precompute" in text)


def test_checksum_and_shard_content_mismatches(small_cache):
    shard = small_cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum notices
    shard.write_bytes(bytes(data))
    CachedPairs(small_cache, verify=False)  # only the checksum notices
    with pytest.raises(CacheError, match="shard shard-00000.safetensors does not match its checksum"):
        CachedPairs(small_cache)  # verifying is the default

    # A shard that disagrees with the manifest about its contents is caught when it is opened.
    edit_manifest(small_cache, lambda m: m["tensors"]["latents_chosen"].update(shape=[3, 2, 2]))
    dataset = CachedPairs(small_cache, verify=False)
    with pytest.raises(CacheError, match="latents_chosen has shape"):
        dataset[0]
    with pytest.raises(CacheError, match="cache folder not found"):
        CachedPairs(small_cache.parent / "nowhere")


def test_check_cache_matches(small_cache, tmp_path):
    manifest = read_manifest(small_cache)
    check_cache_matches(manifest, "fake")
    check_cache_matches(manifest, "fake", "any/model")  # the fake spec recorded no model
    check_cache_matches(manifest, "fake", media_format=IMAGE_FORMAT)
    with pytest.raises(CacheError, match="made for model family 'fake', this run uses 'sd'"):
        check_cache_matches(manifest, "sd")
    with pytest.raises(CacheError, match="media at"):
        check_cache_matches(manifest, "fake", media_format=MediaFormat(height=16, width=16))
    model = tmp_path / "model"
    model.mkdir()
    with_model = {**manifest, "pretrained": str(model)}
    check_cache_matches(with_model, "fake", model)
    check_cache_matches(with_model, "fake", str(model) + "/")
    with pytest.raises(CacheError, match="made with model"):
        check_cache_matches(with_model, "fake", "org/other-model")
