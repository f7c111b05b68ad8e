"""Video files written and read in this process through PyAV (FFmpeg's libraries), one clip at a time.

Starting an ffmpeg program per clip cost about 40 ms of process start-up for a 24-frame 32x32 clip,
six times the encoding itself; on the embedded video world that made `sdpo generate` the slowest
stage. MP4s are H.264 in yuv420p, the stream browsers and VBench play. GIFs stay with imageio.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from sdpo.errors import InputError

if TYPE_CHECKING:
    from av.container import InputContainer

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"  # the one H.264 layout every browser decodes
# x264's "veryfast" preset at its default quality (CRF 23) encodes 2.9x faster than "medium" on a 49x240x360
# clip, into a file of about the same size. Below SMALL_FRAME pixels a frame the encoder's set-up is the
# cost: one thread and no lookahead or B-frames ("zerolatency"), 1.4 ms for a 5x16x16 clip against 2.3 ms
# (one thread) and 3.4 ms (x264's defaults), in a file of about the same size.
ENCODER_OPTIONS = {"preset": "veryfast"}
SMALL_FRAME = 256 * 256
SMALL_FRAME_OPTIONS = {**ENCODER_OPTIONS, "tune": "zerolatency"}


def write_mp4(frames: np.ndarray, path: str | os.PathLike[str], fps: int = 8) -> None:
    """Write ``frames`` (F, H, W, 3) or (F, H, W, 1) uint8 as an H.264 MP4 at ``fps``.

    Grey clips (one channel) are encoded from grey frames. yuv420p halves the colour planes, so both
    sides must be even: an odd side is one line naming the size.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8:
        raise InputError(f"a clip to encode must be (frames, height, width, 1 or 3) uint8, got {frames.shape} "
                         f"{frames.dtype}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if height % 2 or width % 2:
        raise InputError(f"cannot encode a {height}x{width} clip as H.264 {PIXEL_FORMAT}: both sides must be even")
    pixel_format = "gray" if frames.shape[-1] == 1 else "rgb24"
    with av.open(str(path), mode="w", format="mp4") as container:
        small = height * width <= SMALL_FRAME
        stream = container.add_stream(CODEC, rate=fps, options=SMALL_FRAME_OPTIONS if small else ENCODER_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        if small:
            stream.codec_context.thread_count = 1
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame[..., 0] if pixel_format == "gray" else frame,
                                                 format=pixel_format)
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))  # flush the frames the encoder still holds


def iter_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """The frames of a video file as (H, W, 3) uint8 RGB arrays, decoded one at a time.

    Stopping the iteration early stops decoding. A file that cannot be read is one line naming it.
    """
    with _opened(path, "decode") as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def count_frames(path: str | os.PathLike[str]) -> int:
    """The frames of a video file's first video stream, counted from its packets without decoding them.

    Container headers often lack a frame count, so the packets are demuxed and counted.
    """
    with _opened(path, "read") as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def frame_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of a video file's frames, from its stream header."""
    with _opened(path, "read") as container:
        context = container.streams.video[0].codec_context
        return int(context.height), int(context.width)


def _reason(error: Exception) -> str:
    """FFmpeg's own reason (its logged line, e.g. "moov atom not found"), else the error's text, one line."""
    log = getattr(error, "log", None)
    reason = log[2] if isinstance(log, tuple) and len(log) > 2 else getattr(error, "strerror", None) or str(error)
    return " ".join(str(reason).split())[:200] or type(error).__name__


@contextlib.contextmanager
def _opened(path: str | os.PathLike[str], what: str) -> Iterator[InputContainer]:
    """``av.open(path)`` for reading; FFmpeg's log held back so that its reason lands in the one-line error."""
    import av
    import av.logging

    if av.logging.get_level() is None:  # PyAV keeps FFmpeg silent by default, and its errors carry no reason
        av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(), av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"cannot {what} video {path}: it holds no video stream")
            yield container
    except av.error.FFmpegError as error:
        raise InputError(f"cannot {what} video {path}: {_reason(error)}") from None
