"""Where a bundle trained for DICOM points on real vendor films: never on the collimation.

0.8.1, trained on FracAtlas's JPEG exports only, put its heatmap's peak on RG2's
collimator band, outside the body (x = 1555, the exposed field ends near 1445), and in
the corner of a chest film: a radiologist is sent to the wrong place, and the score may
rest on the band. A bundle made for DICOM crops to the exposed field before the model
sees the image (`[data].crop = "exposed_field"`), so its peak must lie inside the field
that `exposed_field` finds in the header or the image, on every shared DICOM file, in
range or not (the intended-use check comes after; the heatmap is the model's).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from fractured.engine.bundle import Bundle
from fractured.engine.exposed_field import exposed_field
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import display_pixels
from tests.factory import shared_dicom_files, skip_if_absent
from tests.paths import REPO

#: The bundles made for DICOM: the float candidate trained with the crop (float16
#: weights) and the shipped INT8 bundle made from it.
BUNDLES = [REPO / "engines" / name for name in ("fractured-0.9.0", "fractured-0.11.2")]


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda path: path.name)
def pipeline(request: pytest.FixtureRequest) -> Pipeline:
    bundle = Bundle.load(request.param)
    assert bundle.manifest.crop == "exposed_field", "a bundle made for DICOM crops"
    return Pipeline(bundle, threads=2)


@pytest.mark.slow  # about 40 s: eight films of up to 2,140 x 1,760 px through the bundle
@pytest.mark.parametrize("path", shared_dicom_files(),
                         ids=lambda path: path.name if path else "absent")
def test_the_heatmap_peaks_inside_the_exposed_field(pipeline: Pipeline,
                                                    path: Path | None) -> None:
    path = skip_if_absent(path)
    ds = pydicom.dcmread(path)
    image = display_pixels(ds, str(path))
    field = exposed_field(image, ds)
    peak = pipeline.examine([image], [ds]).peaks[0]
    print(f"{path.name}: field {field}, heatmap peak {peak}")
    if peak is None:  # the CAM positive nowhere: the overlay shows no heatmap
        return
    x, y = peak
    assert field.left <= x < field.right and field.top <= y < field.bottom, (field, peak)
