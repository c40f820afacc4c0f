"""Pixel decoding in the node's decoder process (daemon.decoding) against decoding in the
calling process: what the isolation costs per image.

Each real vendor file of ../shared/data/dicom (JPEG Lossless, JPEG-LS, JPEG 2000, RLE,
uncompressed; up to 2140 x 1760) and a synthetic 4300 x 3500 16-bit DX (the largest
detector size) is decoded to display pixels `--repeat` times both ways, alternating; the
median of each, the difference and the ratio are printed. The decoder's difference is
the pipe: the pixels come back as float32 bytes, 4 bytes a pixel.

    .venv/bin/python -m bench.decoding [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from fractured.daemon.decoding import Decoder
from fractured.engine.preprocess import display_pixels, read_dataset
from tests import factory


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        large = Path(folder) / "large.dcm"
        factory.xray(generate_uid(), rows=4300, cols=3500).save_as(
            large, enforce_file_format=True)
        files = [*sorted(factory.SHARED_DICOM.rglob("*.dcm")), large]
        decoder = Decoder(max_megapixels=40.0)
        decoder.start()
        decoder.display_pixels(large)  # imported and warm
        print(f"{'file':44} {'pixels':>11} {'here ms':>8} {'child ms':>9} {'extra ms':>9} "
              "ratio")
        for path in files:
            here, child = [], []
            for _ in range(args.repeat):
                here.append(_timed(lambda p=path: display_pixels(read_dataset(p))))
                child.append(_timed(lambda p=path: decoder.display_pixels(p)))
            shape = display_pixels(read_dataset(path)).shape
            a, b = statistics.median(here) * 1e3, statistics.median(child) * 1e3
            name = path.name if path != large else "synthetic 4300x3500 16-bit DX"
            print(f"{name[:44]:44} {shape[0]:>5}x{shape[1]:<5} {a:8.1f} {b:9.1f} "
                  f"{b - a:9.1f} {b / a:5.2f}")
        decoder.close()


if __name__ == "__main__":
    main()
