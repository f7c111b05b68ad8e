"""MP4s written and read in process (sdpo.data.video): what a clip holds survives, faults are one line."""

from __future__ import annotations

import numpy as np
import pytest

from sdpo.data import video
from sdpo.errors import InputError


def smooth_clip(frames: int = 12, size: int = 32, channels: int = 3) -> np.ndarray:
    """A moving gradient: H.264 keeps smooth content close, unlike random pixels."""
    y, x = np.mgrid[0:size, 0:size]
    clip = np.stack([(x * 6 + y * 2 + 9 * t) % 256 for t in range(frames)]).astype(np.uint8)
    return np.repeat(clip[..., None], channels, axis=-1)


# 32: a small frame, one encoder thread without lookahead; 272: over SMALL_FRAME, x264's threads.
@pytest.mark.parametrize("size", [32, 272])
def test_a_written_clip_reads_back_with_its_frames_size_and_pixels(tmp_path, size):
    assert (size * size <= video.SMALL_FRAME) == (size == 32)
    path = tmp_path / "clip.mp4"
    clip = smooth_clip(frames=12, size=size)
    video.write_mp4(clip, path, fps=8)
    assert video.count_frames(path) == 12
    assert video.frame_size(path) == (size, size)
    decoded = np.stack(list(video.iter_frames(path)))
    assert decoded.shape == (12, size, size, 3) and decoded.dtype == np.uint8
    # Lossy, but close: a wrong channel order, a flipped frame or a frame off by one would be far off.
    assert np.abs(decoded.astype(int) - clip).mean() < 6


def test_the_mp4_is_h264_in_yuv420p_at_the_given_rate(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    video.write_mp4(smooth_clip(frames=6), path, fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12


def test_a_grey_clip_is_encoded_from_one_channel(tmp_path):
    path = tmp_path / "grey.mp4"
    clip = smooth_clip(frames=4, size=16, channels=1)
    video.write_mp4(clip, path)
    decoded = np.stack(list(video.iter_frames(path)))
    assert decoded.shape == (4, 16, 16, 3)
    assert np.abs(decoded.astype(int) - clip).mean() < 6  # grey in every channel


def test_decoding_stops_when_the_reader_stops(tmp_path):
    path = tmp_path / "clip.mp4"
    video.write_mp4(smooth_clip(frames=10), path)
    frames = video.iter_frames(path)
    first = next(frames)
    frames.close()  # what a `break` does: the container closes, nothing more is decoded
    assert first.shape == (32, 32, 3)


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ((4, 15, 16, 3), np.uint8, "both sides must be even"),
    ((4, 16, 16, 2), np.uint8, "(frames, height, width, 1 or 3) uint8"),
    ((4, 16, 16, 3), np.float32, "(frames, height, width, 1 or 3) uint8"),
])
def test_a_clip_that_cannot_be_encoded_is_one_line(tmp_path, shape, dtype, message):
    with pytest.raises(InputError) as raised:
        video.write_mp4(np.zeros(shape, dtype=dtype), tmp_path / "x.mp4")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_torn_file_names_ffmpegs_reason_on_one_line(tmp_path):
    whole, torn = tmp_path / "whole.mp4", tmp_path / "torn.mp4"
    video.write_mp4(smooth_clip(frames=8), whole)
    torn.write_bytes(whole.read_bytes()[:600])  # the index (moov atom) sits at the end: cut off
    for read in (video.count_frames, video.frame_size, lambda path: list(video.iter_frames(path))):
        with pytest.raises(InputError) as raised:
            read(torn)
        text = str(raised.value)
        assert str(torn) in text and "moov atom not found" in text and "\n" not in text


def test_a_file_without_a_video_stream_is_refused(tmp_path):
    import av

    path = tmp_path / "sound.mp4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="holds no video stream"):
        video.count_frames(path)
