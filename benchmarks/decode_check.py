"""What the decode check (``sdpo.data.check_media``, run on every pair before a precompute) costs per file.

A 512x512 PNG and a 24-frame 16x16 MP4 of random pixels are written once; each is checked once to warm
the caches (the ffmpeg binary, imports), then ``--repeats`` times; the median milliseconds per file are
printed. The check is meant to cost milliseconds, so it can run over a whole pairs file up front.

    python -m benchmarks.decode_check
    python -m benchmarks.decode_check --repeats 50 --frames 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_media(folder: Path) -> dict[str, Path]:
    """The PNG and the MP4 the check reads."""
    import imageio.v3 as iio
    from PIL import Image

    rng = np.random.default_rng(0)
    image, clip = folder / "big.png", folder / "clip.mp4"
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(image)
    iio.imwrite(clip, rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), fps=8)
    return {"png 512x512": image, "mp4 24 frames 16x16": clip}


def median_ms(path: Path, frames: int, repeats: int) -> float:
    """Median milliseconds of one ``check_media`` call after one warm-up call."""
    from sdpo.data import check_media

    check_media(path, frames)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        check_media(path, frames)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--frames", type=int, default=5, help="frames a clip must have")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdpo-decode-check-") as folder:
        result = {name: median_ms(path, args.frames, args.repeats) for name, path in write_media(Path(folder)).items()}
    print("| file | ms per check (median) |\n|---|---|")
    for name, ms in result.items():
        print(f"| {name} | {ms:.2f} |")
    return result


if __name__ == "__main__":
    main()
