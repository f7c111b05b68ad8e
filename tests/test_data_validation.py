"""Data that must not train silently wrong: shard checksums and finiteness, the cache's model, every bad
pair listed before the first encode (or skipped and recorded), and property-based tests of the readers."""

from __future__ import annotations

import json
import os
import string
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdpo.data import (
    BadPairsError,
    CachedPairs,
    CacheError,
    MissingMediaError,
    PairList,
    PreferencePair,
    check_cache_matches,
    check_media,
    check_pairs,
    load_video,
    precompute,
    read_checked_pairs,
    read_manifest,
    read_pairs,
    verify_cache,
    write_pairs_jsonl,
)
from sdpo.data.cache import file_sha256
from sdpo.data.cache import verify as cache_verify
from sdpo.models.base import MediaFormat

IMAGE_FORMAT = MediaFormat(channels=3, height=8, width=8)


class FakeSpec:
    """Encodes by 2x2 average pooling (``poison`` makes it return NaN); a prompt becomes its length."""

    family = "fake"

    def __init__(self, media_format: MediaFormat = IMAGE_FORMAT, poison: bool = False) -> None:
        self.media_format = media_format
        self.poison = poison
        self.calls = 0

    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        pooled = torch.nn.functional.avg_pool2d(flat, 2)
        if self.poison:
            pooled[-1, 0, 0, 0] = float("nan")
        return pooled.reshape(*pixels.shape[:-3], *pooled.shape[-3:])

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"length": torch.tensor([[float(len(p))] for p in prompts])}


def save_png(path: Path, seed: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def manifest_of(folder: Path, count: int, *, truncate: tuple[int, ...] = ()) -> Path:
    """A pairs.jsonl of ``count`` image pairs; the chosen PNG of each pair in ``truncate`` is cut short."""
    lines = []
    for i in range(count):
        chosen, rejected = save_png(folder / f"c{i}.png", 2 * i), save_png(folder / f"r{i}.png", 2 * i + 1)
        if i in truncate:
            chosen.write_bytes(chosen.read_bytes()[:-30])
        lines.append({"prompt": f"prompt {i}", "chosen": chosen.name, "rejected": rejected.name})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def small_cache(tmp_path):
    pairs = read_pairs(manifest_of(tmp_path / "media", 5))
    return precompute(pairs, FakeSpec(), tmp_path / "cache", shard_size=2, progress=False)


# --------------------------------------------------------------------------------------------- item 3: checksums


def flip_last_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_flipped_byte_shard_of_the_right_size_is_refused_naming_the_shard(small_cache):
    flip_last_byte(small_cache / "shard-00001.safetensors")
    with pytest.raises(CacheError) as caught:
        CachedPairs(small_cache)  # verifies by default, as the trainer opens it
    text = str(caught.value)
    assert "shard-00001.safetensors does not match its checksum" in text and "\n" not in text


def rewrite_shard(cache: Path, name: str, change) -> None:
    """Rewrite one shard's tensors and its manifest entry consistently (a cache that was made that way)."""
    from safetensors.torch import load_file, save_file

    path = cache / name
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    manifest = json.loads((cache / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["file"] == name:
            shard["bytes"], shard["sha256"] = path.stat().st_size, file_sha256(path)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_nan_in_a_shard_is_refused_whether_or_not_its_checksum_matches(small_cache):
    shard = small_cache / "shard-00000.safetensors"
    original = shard.read_bytes()
    header = int.from_bytes(original[:8], "little") + 8
    nan_bytes = bytearray(original)
    nan_bytes[header : header + 4] = np.float32("nan").tobytes()  # the first value of the first tensor
    shard.write_bytes(bytes(nan_bytes))
    with pytest.raises(CacheError, match="shard-00000.safetensors does not match its checksum"):
        CachedPairs(small_cache)
    shard.write_bytes(original)
    rewrite_shard(small_cache, "shard-00002.safetensors", lambda t: t["latents_rejected"].view(-1)[3:5].fill_(float("inf")))
    with pytest.raises(CacheError, match="shard-00002.safetensors holds non-finite values in latents_rejected"):
        CachedPairs(small_cache)


def test_precompute_refuses_non_finite_encoder_output(tmp_path):
    pairs = read_pairs(manifest_of(tmp_path / "media", 3))
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in latents_chosen for .*pairs.jsonl:3"):
        precompute(pairs, FakeSpec(poison=True), tmp_path / "cache", batch_size=3, progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_verified_shard_is_not_hashed_again_until_it_changes(small_cache, monkeypatch):
    hashed = []
    real = cache_verify.file_sha256
    monkeypatch.setattr(cache_verify, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    CachedPairs(small_cache)
    assert sorted(hashed) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert (small_cache / ".verified.json").is_file()
    hashed.clear()
    CachedPairs(small_cache)
    assert verify_cache(small_cache) == 0 and hashed == []  # the second run reads no shard
    time.sleep(0.05)  # file times tick in jiffies: a rewrite within the same few ms could keep every stamp
    flip_last_byte(small_cache / "shard-00002.safetensors")  # a new mtime and ctime: hashed again, and refused
    with pytest.raises(CacheError, match="shard-00002"):
        CachedPairs(small_cache)
    assert hashed == ["shard-00002.safetensors"]
    (small_cache / ".verified.json").write_text("{torn")  # a torn record only costs a re-hash
    with pytest.raises(CacheError, match="shard-00002"):
        CachedPairs(small_cache)


def test_processes_opening_one_cache_at_once_hash_it_once(small_cache, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    real = cache_verify.file_sha256
    monkeypatch.setattr(cache_verify, "file_sha256", lambda path: time.sleep(0.05) or real(path))
    with ThreadPoolExecutor(2) as pool:  # flock excludes separate opens within one process as between processes
        counts = list(pool.map(lambda _: verify_cache(small_cache), range(2)))
    assert sorted(counts) == [0, 3]


def test_the_record_goes_to_the_user_cache_when_the_cache_folder_is_read_only(small_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SDPO_CACHE_HOME", str(tmp_path / "user"))
    (small_cache / ".verified.json").mkdir()  # cannot be written as a file (root ignores chmod)
    assert verify_cache(small_cache) == 3
    assert len(list((tmp_path / "user" / "verified").glob("*.json"))) == 1
    assert verify_cache(small_cache) == 0


def test_check_cache_matches_compares_the_model_too(small_cache, tmp_path):
    manifest = read_manifest(small_cache)
    check_cache_matches(manifest, "fake")  # the old call still works
    made = {**manifest, "pretrained": "org/model-a"}
    with pytest.raises(CacheError) as caught:
        check_cache_matches(made, "fake", "org/model-b")
    assert "'org/model-a'" in str(caught.value) and "'org/model-b'" in str(caught.value)
    assert "\n" not in str(caught.value)
    snapshot = tmp_path / "hub" / "models--org--model-a" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    check_cache_matches(made, "fake", snapshot)  # a local snapshot of the same hub id
    check_cache_matches({**manifest, "pretrained": str(snapshot)}, "fake", "org/model-a")
    with pytest.raises(CacheError, match="made with model"):
        check_cache_matches({**manifest, "pretrained": str(snapshot)}, "fake", "org/model-b")
    other = tmp_path / "my-model"
    other.mkdir()
    with pytest.raises(CacheError, match="made with model"):
        check_cache_matches(made, "fake", other)
    with pytest.raises(CacheError, match="made for model family 'fake', this run uses 'sd'"):
        check_cache_matches(made, "sd", "org/model-a")


# --------------------------------------------------------------------------------------------- item 11: bad pairs


def test_every_bad_line_is_listed_at_once_with_file_and_line(tmp_path):
    save_png(tmp_path / "a.png", 0)
    save_png(tmp_path / "b.png", 1)
    good = {"prompt": "p", "chosen": "a.png", "rejected": "b.png"}
    lines = [json.dumps(good), "{oops", json.dumps({**good, "chosen": "gone.png"}), json.dumps(good),
             json.dumps({**good, "prompt": 5})]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadPairsError) as caught:
        read_pairs(path)
    text = str(caught.value)
    assert text.startswith("3 bad pairs") and "--on-bad-pair skip" in text
    for line, reason in [(2, "invalid JSON"), (3, "chosen file not found"), (5, "'prompt' must be a string")]:
        assert f"pairs.jsonl:{line}: {reason}" in text
    pairs = read_pairs(path, on_bad_pair="skip")
    assert len(pairs) == 2 and [p.line for p in pairs] == [1, 4]
    assert [(p.line, p.kind) for p in pairs.problems] == [(2, "bad line"), (3, "missing file"), (5, "bad line")]
    assert pairs.skipped == {"bad line": 2, "missing file": 1}
    with pytest.raises(ValueError, match="on_bad_pair must be"):
        read_pairs(path, on_bad_pair="ignore")


def test_missing_files_only_are_a_file_not_found_error(tmp_path):
    save_png(tmp_path / "a.png", 0)
    lines = [{"prompt": "p", "chosen": "a.png", "rejected": f"gone{i}.png"} for i in range(2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(MissingMediaError) as caught:
        read_pairs(path)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)


def test_non_utf8_manifest_names_file_and_line(tmp_path):
    save_png(tmp_path / "a.png", 0)
    save_png(tmp_path / "b.png", 1)
    good = json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b'"p"', b'"caf\xe9"') + b"\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_pairs(path)  # the byte-order mark on line 1 is fine
    path.write_bytes(("\n".join([good.decode()] * 2)).encode("utf-16"))
    with pytest.raises(ValueError, match="UTF-16"):
        read_pairs(path)
    path.write_bytes(good + b'\n{"prompt": "p", "chosen": "a.png", "rejected": "b.png", "x": NaN}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2: invalid JSON .NaN is not a JSON value"):
        read_pairs(path)


def test_chosen_and_rejected_the_same_file_through_another_path_or_a_symlink(tmp_path):
    save_png(tmp_path / "img" / "a.png", 0)
    (tmp_path / "link.png").symlink_to(tmp_path / "img" / "a.png")
    lines = [{"prompt": "p", "chosen": "img/a.png", "rejected": "img/../img/a.png"},
             {"prompt": "q", "chosen": "img/a.png", "rejected": "link.png"}]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(BadPairsError) as caught:
        read_pairs(path)
    assert "pairs.jsonl:1: chosen and rejected are the same file" in str(caught.value)
    assert "pairs.jsonl:2: chosen and rejected are the same file" in str(caught.value)


def test_a_truncated_png_as_the_last_pair_fails_before_any_encode_or_is_skipped_and_recorded(tmp_path):
    path = manifest_of(tmp_path / "media", 7, truncate=(4, 6))
    pairs = read_pairs(path)  # the manifest itself is fine
    spec = FakeSpec()
    with pytest.raises(BadPairsError) as caught:
        precompute(pairs, spec, tmp_path / "cache", batch_size=2, progress=False)
    text = str(caught.value)
    assert spec.calls == 0 and not (tmp_path / "cache").exists()
    assert "2 bad pairs" in text and "pairs.jsonl:5: chosen: cannot read image" in text and "pairs.jsonl:7:" in text
    out = precompute(pairs, spec, tmp_path / "cache", batch_size=2, progress=False, on_bad_pair="skip")
    manifest = read_manifest(out)
    assert manifest["num_pairs"] == 5 and len(CachedPairs(out)) == 5
    assert [(entry["line"], entry["kind"]) for entry in manifest["skipped"]] == [(5, "unreadable media"),
                                                                                 (7, "unreadable media")]
    assert manifest["skipped_counts"] == {"unreadable media": 2}
    assert manifest["skipped"][0]["source"] == str(path) and "Truncated" in manifest["skipped"][0]["reason"]


def test_bad_lines_and_undecodable_media_are_reported_together(tmp_path):
    path = manifest_of(tmp_path / "media", 4, truncate=(3,))
    with path.open("a") as handle:
        handle.write('{"prompt": "p", "chosen": "c0.png"}\n')
    with pytest.raises(BadPairsError) as caught:
        read_checked_pairs(path, IMAGE_FORMAT)
    text = str(caught.value)
    assert text.startswith("2 bad pairs") and "pairs.jsonl:4: chosen: cannot read image" in text
    assert "pairs.jsonl:5: missing key 'rejected'" in text
    kept = read_checked_pairs(path, IMAGE_FORMAT, on_bad_pair="skip")
    assert [p.line for p in kept] == [1, 2, 3] and [p.line for p in kept.problems] == [5, 4]
    # Pairs read with "skip" keep their skips when checked with the default policy.
    assert len(check_pairs(read_pairs(path, on_bad_pair="skip"), IMAGE_FORMAT, on_bad_pair="skip")) == 3
    with pytest.raises(BadPairsError) as only_media:
        check_pairs(read_pairs(path, on_bad_pair="skip"), IMAGE_FORMAT)
    assert "pairs.jsonl:4:" in str(only_media.value) and "pairs.jsonl:5" not in str(only_media.value)


def test_pickapic_ties_are_recorded_in_the_cache_manifest(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
        return buffer.getvalue()

    labels = [0.5, 1.0, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5]
    table = pa.table({"caption": [f"c{i}" for i in range(8)], "jpg_0": [png(i) for i in range(8)],
                      "jpg_1": [png(100 + i) for i in range(8)], "label_0": labels})  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    pairs = read_pairs(tmp_path / "p.parquet")
    assert len(pairs) == 2 and pairs.skipped == {"tie": 6}
    manifest = read_manifest(precompute(pairs, FakeSpec(), tmp_path / "cache", progress=False))
    assert manifest["skipped_counts"] == {"tie": 6}
    assert [entry["line"] for entry in manifest["skipped"]] == [0, 2, 3, 5, 6, 7]
    assert manifest["skipped"][0]["reason"].startswith("tie")


def write_clip(path: Path, frames: int) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, np.zeros((frames, 16, 16, 3), np.uint8) + np.arange(frames, dtype=np.uint8)[:, None, None, None],
                fps=8)  # fmt: skip
    return path


def test_short_clips_offer_pad_frames_and_corrupt_videos_are_one_line(tmp_path):
    short = write_clip(tmp_path / "short.mp4", 3)
    long = write_clip(tmp_path / "long.mp4", 6)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(long.read_bytes()[: len(long.read_bytes()) // 2])
    fmt = MediaFormat(height=16, width=16, frames=5)
    pairs = [PreferencePair("a", short, long), PreferencePair("b", long, broken)]
    with pytest.raises(BadPairsError) as caught:
        check_pairs(pairs, fmt)
    text = str(caught.value)
    assert "pair 0: chosen: " in text and "3 frames but 5 are needed" in text and "--pad-frames" in text
    assert "pair 1: rejected: cannot read video" in text and "moov atom not found" in text
    assert len(text.splitlines()) == 3  # the summary, then one line per pair: no ffmpeg banner
    kept = check_pairs(pairs, fmt, pad_frames=True, on_bad_pair="skip")
    assert [p.prompt for p in kept] == ["a"] and kept.skipped == {"unreadable media": 1}
    for load in (lambda: check_media(broken, 5), lambda: load_video(broken, fmt)):
        with pytest.raises(ValueError) as one:
            load()
        assert "\n" not in str(one.value) and "moov atom not found" in str(one.value)


def test_decode_check_accepts_a_large_image_and_a_long_clip(tmp_path):
    # What the check costs per file is measured by benchmarks/decode_check.py, not asserted here.
    image = save_png(tmp_path / "big.png", 0, size=512)
    clip = write_clip(tmp_path / "clip.mp4", 24)
    for ref in (image, clip):
        assert check_media(ref, 5) is None  # raises on a file it refuses


# --------------------------------------------------------------------------------------------- item 10: CLI


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: these errors must come first."""
    from sdpo.models import registry

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before a data error")

    monkeypatch.setattr(registry, "load_spec", refuse)


def run_precompute(capsys, *flags) -> tuple[int, str]:
    from sdpo.cli import main

    code = main(["--quiet", "precompute", "--family", "sd", *flags])
    return code, capsys.readouterr().err


def test_precompute_cli_errors_come_before_the_model_loads(tmp_path, capsys, no_model):
    model = tmp_path / "model"
    model.mkdir()
    pairs = manifest_of(tmp_path / "media", 3, truncate=(1,))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    base = ["--pretrained", str(model), "--height", "8", "--width", "8"]
    code, err = run_precompute(capsys, *base, "--pairs", str(pairs), "--out", str(tmp_path / "cache"))
    assert code == 2 and err.startswith("sdpo: error: cache folder") and "--overwrite" in err
    assert "overwrite=True" not in err.replace("(overwrite=True; --overwrite", "")
    code, err = run_precompute(capsys, *base, "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"))
    assert code == 2 and err.startswith("sdpo: error: pair source not found")
    code, err = run_precompute(capsys, *base, "--pairs", str(pairs), "--out", str(tmp_path / "x"))
    assert code == 2 and err.startswith("sdpo: error: ") and "pairs.jsonl:2: chosen: cannot read image" in err
    code, err = run_precompute(capsys, *base, "--pairs", str(pairs), "--out", str(tmp_path / "x"), "--batch-size", "0")
    assert code == 2 and "--batch-size" in err


def test_precompute_cli_skips_bad_pairs_and_overwrites(tmp_path, capsys):
    from sdpo.models import tiny

    model = tiny.build_tiny_sd(tmp_path / "model")
    pairs = manifest_of(tmp_path / "media", 3, truncate=(1,))
    out = tmp_path / "cache"
    flags = ["--pretrained", str(model), "--height", "16", "--width", "16", "--pairs", str(pairs), "--out", str(out),
             "--device", "cpu", "--on-bad-pair", "skip"]  # fmt: skip
    code, err = run_precompute(capsys, *flags)
    assert code == 0 and "sdpo: skipped 1 pairs (1 unreadable media)" in err and "pairs.jsonl:2: chosen" in err
    assert read_manifest(out)["num_pairs"] == 2
    code, err = run_precompute(capsys, *flags)
    assert code == 2 and "--overwrite" in err
    code, _ = run_precompute(capsys, *flags, "--overwrite")
    assert code == 0 and read_manifest(out)["skipped"][0]["line"] == 2


# --------------------------------------------------------------------------------------------- item 12: properties

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
odd_paths = st.sampled_from(["a.png", "b.png", "./a.png", "clip", "empty", "notes.txt", "", " ", "~nobody/x.png",
                             "a\x00.png", "x" * 300, "../" * 40 + "a.png", "/", ".", "b.PNG", "a.png/"]) | st.text(
    alphabet=string.printable, max_size=20)  # fmt: skip
records = st.fixed_dictionaries(
    {},
    optional={"prompt": st.text(max_size=8) | json_values, "chosen": odd_paths | json_values,
              "rejected": odd_paths | json_values, "extra": json_values},
)  # fmt: skip
lines = st.one_of(
    records.map(json.dumps).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.just(b""),
)


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    save_png(folder / "a.png", 0)
    save_png(folder / "b.png", 1)
    save_png(folder / "clip" / "0.png", 2)
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("x")
    return folder


def assert_clean_outcome(read, names: Path | None = None) -> PairList | None:
    """A PairList of sane pairs, or a ValueError / FileNotFoundError (naming the file ``names``): never
    another type, never a NaN."""
    try:
        pairs = read()
    except (ValueError, FileNotFoundError) as error:
        assert str(error).strip() and "Traceback" not in str(error)
        assert names is None or str(names) in str(error)
        assert "nan" not in str(error).split(":")[0].lower()
        return None
    assert isinstance(pairs, PairList) and len(pairs) > 0
    for pair in pairs:
        assert isinstance(pair.prompt, str) and pair.prompt.strip()
        assert "NaN" not in json.dumps(pair.metadata, default=str) and "Infinity" not in json.dumps(
            pair.metadata, default=str)  # fmt: skip
    return pairs


@PROPERTY
@given(body=st.lists(lines, max_size=6), policy=st.sampled_from(["fail", "skip"]))
def test_jsonl_reader_on_random_input(media_folder, body, policy):
    path = media_folder / "pairs.jsonl"
    path.write_bytes(b"\n".join(body) + (b"\n" if body else b""))
    pairs = assert_clean_outcome(lambda: read_pairs(path, on_bad_pair=policy), names=path)
    if pairs is not None:
        for pair in pairs:
            assert Path(pair.chosen).exists() and Path(pair.rejected).exists()
            assert not os.path.samefile(pair.chosen, pair.rejected)
        write_pairs_jsonl(pairs, media_folder / "out" / "again.jsonl")  # what was read can be written back


labels = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(), st.none())
captions = st.one_of(st.text(max_size=8), st.none(), st.just(" "))
image_cells = st.one_of(st.binary(max_size=30), st.none())


@PROPERTY
@given(
    rows=st.lists(st.tuples(labels, captions, image_cells, st.none() | st.booleans()), min_size=1, max_size=6),
    drop=st.sampled_from([None, "label_0", "caption", "jpg_1"]),
    policy=st.sampled_from(["fail", "skip"]),
)
def test_pickapic_reader_on_random_rows(tmp_path, rows, drop, policy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "caption": pa.array([row[1] for row in rows], pa.string()),
        "jpg_0": pa.array([row[2] for row in rows], pa.binary()),
        "jpg_1": pa.array([b"x"] * len(rows), pa.binary()),
        "label_0": pa.array([row[0] for row in rows], pa.float64()),
        "has_label": pa.array([row[3] for row in rows], pa.bool_()),
    }
    if drop:
        columns.pop(drop)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    pairs = assert_clean_outcome(lambda: read_pairs(path, on_bad_pair=policy), names=path)
    if pairs is not None:
        assert all(pair.metadata["label_0"] in (0.0, 1.0) for pair in pairs)
        # Undecodable image cells are the media check's to report, one clean line each.
        assert_clean_outcome(lambda: check_pairs(pairs, IMAGE_FORMAT, on_bad_pair="skip", num_workers=0))


@PROPERTY
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".parquet", ".jsonl"]))
def test_random_bytes_files_are_clean_errors(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    assert_clean_outcome(lambda: read_pairs(path)) is None or suffix == ".jsonl"


def test_training_on_a_cache_of_another_model_of_the_same_family_is_refused(tmp_path, capsys):
    import yaml

    from sdpo.cli import main
    from sdpo.models import tiny

    made_with, run_with = tiny.build_tiny_sd(tmp_path / "model-a"), tiny.build_tiny_sd(tmp_path / "model-b")
    pairs = manifest_of(tmp_path / "media", 2)
    code, _ = run_precompute(capsys, "--pretrained", str(made_with), "--height", "16", "--width", "16",
                             "--pairs", str(pairs), "--out", str(tmp_path / "cache"), "--device", "cpu")  # fmt: skip
    assert code == 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"family": "sd", "pretrained": str(run_with), "cache_dir": str(tmp_path / "cache"),
                                      "output_dir": str(tmp_path / "run"), "report_to": "none"}))  # fmt: skip
    assert main(["--quiet", "train", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sdpo: error: the cache was made with model") and "model-a" in last and "model-b" in last
