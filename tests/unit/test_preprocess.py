"""display_pixels on the header variants real modalities write: padding, several
windows, a VOI LUT sequence, signed pixels."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from fractured.engine.preprocess import DecodeError, display_pixels
from tests import factory


def with_pixels(pixels: np.ndarray, **attrs: object) -> Dataset:
    (ds,) = factory.dx_study(1, rows=pixels.shape[0], cols=pixels.shape[1])
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def collimated(monochrome1: bool) -> np.ndarray:
    """An exposed field (1000-3000) inside a padded border of stored value 4095."""
    pixels = np.full((100, 80), 4095, dtype=np.uint16)
    pixels[20:80, 20:60] = np.linspace(1000, 3000, 40, dtype=np.uint16)
    if monochrome1:
        pixels[20:80, 20:60] = 4000 - pixels[20:80, 20:60]
    return pixels


@pytest.mark.parametrize("monochrome1", [False, True])
def test_pixel_padding_is_black_and_left_out_of_the_range(monochrome1: bool) -> None:
    ds = with_pixels(collimated(monochrome1), PixelPaddingValue=4095,
                     PhotometricInterpretation="MONOCHROME1" if monochrome1 else "MONOCHROME2")
    del ds.WindowCenter, ds.WindowWidth
    shown = display_pixels(ds)
    assert np.all(shown[:20] == 0.0) and np.all(shown[:, :20] == 0.0)
    field = shown[20:80, 20:60]
    # the exposed field alone sets the grey scale: it spans (nearly) black to white
    assert field.max() > 0.95 and field.min() < 0.05
    bright_side = field[:, -1].mean() if not monochrome1 else field[:, 0].mean()
    assert bright_side < 0.5 if monochrome1 else bright_side > 0.5


def test_padding_range_limit_masks_a_range() -> None:
    pixels = collimated(False)
    pixels[:10] = 4090
    ds = with_pixels(pixels, PixelPaddingValue=4095, PixelPaddingRangeLimit=4090)
    assert np.all(display_pixels(ds)[:20] == 0.0)


def test_all_padding_is_a_decode_error() -> None:
    ds = with_pixels(np.full((10, 10), 7, dtype=np.uint16), PixelPaddingValue=7)
    with pytest.raises(DecodeError, match="every pixel is pixel padding"):
        display_pixels(ds, "padded.dcm")


def test_first_of_several_windows_is_used() -> None:
    pixels = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (10, 1))
    ds = with_pixels(pixels, WindowCenter=[1000, 3000], WindowWidth=[500, 500])
    shown = display_pixels(ds)
    column = pixels[0]
    assert np.all(shown[0][column < 700] == 0.0)  # below the first window: black
    assert np.all(shown[0][column > 1300] == 1.0)  # above it: white
    inside = (column > 800) & (column < 1200)
    assert np.all((shown[0][inside] > 0.0) & (shown[0][inside] < 1.0))


def test_voi_lut_sequence_is_applied() -> None:
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))
    ds = with_pixels(pixels)
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [65535 - 16 * v for v in range(4096)]  # an inverting 16-bit LUT
    ds.VOILUTSequence = [item]
    shown = display_pixels(ds)
    assert shown[0, 0] == pytest.approx(1.0) and shown[0, -1] < 0.02


def test_signed_pixels_with_rescale() -> None:
    pixels = np.tile(np.arange(-1000, 1000, 20, dtype=np.int16), (5, 1))
    (ds,) = factory.dx_study(1, rows=5, cols=100)
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = 1000, 1
    ds.WindowCenter, ds.WindowWidth = 1000, 2000
    shown = display_pixels(ds)
    assert np.all(np.diff(shown[0]) >= 0) and shown[0, 0] < 0.01 and shown[0, -1] > 0.98
