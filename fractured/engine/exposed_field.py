"""The exposed field of a radiograph: the rectangle of the image the X-ray beam reached.

The models learn from JPEG exports (FracAtlas) that are mostly cut to the anatomy,
while CR/DX files from a modality keep what the collimator blades and display shutters
left around it: uniform bands, very bright or very dark once windowed. The shipped
model's CAM lands on those edges, outside the body: a shortcut. Cropping to the exposed
field before letterboxing removes it, and gives the anatomy more of the model's pixels.

The field is taken, in this order, from the DICOM Display Shutter attributes, from the
DX collimator attributes, or from the image itself (uniform lines at its borders).
Attribute values that make no sense are ignored with a warning naming the attribute,
never raised: a vendor's odd header must not stop a study. A field under MIN_FRACTION
of either side is not believed, and the next source (finally the whole image) is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

log = structlog.get_logger()

Source = Literal["shutter", "collimator", "image", "whole"]

#: The crops a bundle's `preprocessing.crop` and train.toml's `[data].crop` may name.
NO_CROP = "none"
EXPOSED_FIELD = "exposed_field"
CROPS = (NO_CROP, EXPOSED_FIELD)

#: A field narrower or shorter than this share of the image is taken for a mistake
#: (a detector of a few centimetres exposed is not an X-ray the models can read).
MIN_FRACTION = 0.25
#: A line is uniform when its 2nd-98th percentile spread is within this share of the
#: image's own grey range: quantum and JPEG noise pass, a line through anatomy does
#: not, and a marker letter covering under 2 % of a line is tolerated.
FLAT_SPREAD = 0.08
#: Samples taken along each line: enough to see any anatomy, few enough to be quick on
#: a 3000-pixel detector (the position across lines keeps full resolution).
LINE_SAMPLES = 512
#: Passes of peeling uniform border lines; each pass measures the lines only over the
#: field left by the last, so a band's corner shared with another band stops counting.
_MAX_PASSES = 8
_MIN_RANGE = 1e-3  # an image whose grey range is smaller than this has no content


@dataclass(frozen=True)
class Field:
    """A pixel rectangle of the image, half-open: rows [top, bottom), columns
    [left, right), 0-based; `source` says where it came from."""

    top: int
    bottom: int
    left: int
    right: int
    source: Source

    @classmethod
    def whole(cls, rows: int, cols: int) -> Field:
        return cls(0, rows, 0, cols, "whole")

    @property
    def rows(self) -> int:
        return self.bottom - self.top

    @property
    def cols(self) -> int:
        return self.right - self.left

    def mirrored(self, cols: int) -> Field:
        """The same field in the image flipped left to right (`cols` wide)."""
        return Field(self.top, self.bottom, cols - self.right, cols - self.left, self.source)


def field_for(crop: str, image: np.ndarray, dataset: Dataset | None = None) -> Field | None:
    """The rectangle to letterbox for a model trained with `crop` (None: the whole
    image), so the node and training crop the same pixels the same way."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return exposed_field(image, dataset) if crop == EXPOSED_FIELD else None


def exposed_field(image: np.ndarray, dataset: Dataset | None = None) -> Field:
    """The exposed field of a display image (2-D, [0, 1], bone bright, from
    `preprocess.display_pixels`) whose DICOM dataset, where there is one, is `dataset`."""
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    rows, cols = image.shape
    if dataset is not None:
        for names in (_SHUTTER, _COLLIMATOR):
            declared = _declared(dataset, names, rows, cols)
            if declared is not None and _plausible(declared, rows, cols):
                return declared
    found = _detected(image)
    return found if _plausible(found, rows, cols) else Field.whole(rows, cols)


@dataclass(frozen=True)
class _Names:
    """The keywords of one family of field attributes (PS3.3 C.7.6.11, C.8.7.3)."""

    source: Source
    shape: str
    left: str
    right: str
    upper: str
    lower: str
    centre: str
    radius: str
    vertices: str


_SHUTTER = _Names("shutter", "ShutterShape", "ShutterLeftVerticalEdge",
                  "ShutterRightVerticalEdge", "ShutterUpperHorizontalEdge",
                  "ShutterLowerHorizontalEdge", "CenterOfCircularShutter",
                  "RadiusOfCircularShutter", "VerticesOfThePolygonalShutter")
_COLLIMATOR = _Names("collimator", "CollimatorShape", "CollimatorLeftVerticalEdge",
                     "CollimatorRightVerticalEdge", "CollimatorUpperHorizontalEdge",
                     "CollimatorLowerHorizontalEdge", "CenterOfCircularCollimator",
                     "RadiusOfCircularCollimator", "VerticesOfThePolygonalCollimator")

#: (top, bottom, left, right), half-open and 0-based
_Rect = tuple[int, int, int, int]


def _declared(ds: Dataset, names: _Names, rows: int, cols: int) -> Field | None:
    """The field one attribute family declares: the intersection of its shapes' bounding
    boxes; None where it declares none that makes sense."""
    if names.shape not in ds:
        return None
    try:
        value = ds[names.shape].value
        shapes = [str(v).strip().upper() for v in _values(value)]
    except Exception as exc:  # pydicom decodes lazily: a damaged element raises here
        _ignored(names.shape, f"unreadable ({type(exc).__name__})")
        return None
    rects = []
    for shape in shapes:
        reader = _READERS.get(shape)
        if reader is None:
            _ignored(names.shape, f"shape {shape!r} is not used (only "
                     f"{', '.join(_READERS)} are)", value)
            continue
        rect = reader(ds, names, rows, cols)
        if rect is not None:
            rects.append(rect)
    if not rects:
        return None
    top, bottom = max(r[0] for r in rects), min(r[1] for r in rects)
    left, right = max(r[2] for r in rects), min(r[3] for r in rects)
    if top >= bottom or left >= right:
        _ignored(names.shape, "its shapes do not overlap", value)
        return None
    return Field(top, bottom, left, right, names.source)


def _rectangle(ds: Dataset, names: _Names, rows: int, cols: int) -> _Rect | None:
    """Edges are 1-based: the first and last column (row) inside the field."""
    edges: dict[str, int] = {}
    for keyword, limit in ((names.left, cols), (names.right, cols), (names.upper, rows),
                           (names.lower, rows)):
        numbers = _numbers(ds, keyword, count=1)
        if numbers is None:
            return None
        if not 1 <= numbers[0] <= limit:
            _ignored(keyword, f"outside the image (1 to {limit})", numbers[0])
            return None
        edges[keyword] = round(numbers[0])
    for first, last in ((names.left, names.right), (names.upper, names.lower)):
        if edges[first] > edges[last]:
            _ignored(f"{first}/{last}", "inverted", [edges[first], edges[last]])
            return None
    return (edges[names.upper] - 1, edges[names.lower], edges[names.left] - 1,
            edges[names.right])


def _circle(ds: Dataset, names: _Names, rows: int, cols: int) -> _Rect | None:
    """The circle's bounding box, clipped: a circular field may reach past the image."""
    centre = _numbers(ds, names.centre, count=2)
    radius = _numbers(ds, names.radius, count=1)
    if centre is None or radius is None:
        return None
    row, col = centre  # 1-based, row first
    if not (1 <= row <= rows and 1 <= col <= cols):
        _ignored(names.centre, "outside the image", centre)
        return None
    if radius[0] <= 0:
        _ignored(names.radius, "zero area (not positive)", radius[0])
        return None
    r = radius[0]
    return (max(math.floor(row - 1 - r), 0), min(math.ceil(row + r), rows),
            max(math.floor(col - 1 - r), 0), min(math.ceil(col + r), cols))


def _polygon(ds: Dataset, names: _Names, rows: int, cols: int) -> _Rect | None:
    """The bounding box of the vertices (row, column pairs, 1-based)."""
    numbers = _numbers(ds, names.vertices)
    if numbers is None:
        return None
    if len(numbers) < 6 or len(numbers) % 2:
        _ignored(names.vertices, "needs 3 or more (row, column) pairs", numbers)
        return None
    along, across = numbers[0::2], numbers[1::2]
    if not (all(1 <= r <= rows for r in along) and all(1 <= c <= cols for c in across)):
        _ignored(names.vertices, "a vertex lies outside the image", numbers)
        return None
    if min(along) == max(along) or min(across) == max(across):
        _ignored(names.vertices, "zero area (the vertices lie on a line)", numbers)
        return None
    return (math.floor(min(along)) - 1, math.ceil(max(along)),
            math.floor(min(across)) - 1, math.ceil(max(across)))


_READERS: dict[str, Callable[[Dataset, _Names, int, int], _Rect | None]] = {
    "RECTANGULAR": _rectangle, "CIRCULAR": _circle, "POLYGONAL": _polygon}


def _numbers(ds: Dataset, keyword: str, count: int | None = None) -> list[float] | None:
    """An attribute's values as finite numbers (`count` of them where given); None,
    with a warning naming the attribute, where it is missing or not that."""
    if keyword not in ds:
        _ignored(keyword, "missing")
        return None
    try:
        raw = ds[keyword].value
        numbers = [float(v) for v in _values(raw)]
    except Exception as exc:  # an IS/DS that is not a number, or a damaged element
        _ignored(keyword, f"not a number ({type(exc).__name__})")
        return None
    if not numbers or not all(math.isfinite(n) for n in numbers):
        _ignored(keyword, "empty or not finite", numbers)
        return None
    if count is not None and len(numbers) != count:
        _ignored(keyword, f"needs {count} value(s)", numbers)
        return None
    return numbers


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _ignored(attribute: str, reason: str, value: Any = None) -> None:
    log.warning("exposed_field.attribute_ignored", attribute=attribute, reason=reason,
                **({"value": str(value)[:80]} if value is not None else {}))


def _plausible(found: Field, rows: int, cols: int) -> bool:
    """At least MIN_FRACTION of each side. A header that says less is worth a warning;
    an image whose uniform margins leave less (a finger on a wide plate) is not."""
    if found.rows >= MIN_FRACTION * rows and found.cols >= MIN_FRACTION * cols:
        return True
    report = log.warning if found.source in ("shutter", "collimator") else log.info
    report("exposed_field.implausible", source=found.source, rows=rows, cols=cols,
           field=[found.top, found.bottom, found.left, found.right],
           min_fraction=MIN_FRACTION)
    return False


def _detected(image: np.ndarray) -> Field:
    """The image less its border bands of uniform lines, as collimators and shutters
    leave; the whole image where it has none (or nothing but uniform lines).

    A band is peeled only up to the first line that is not uniform, so the crop can
    never enter the anatomy; a uniform margin of air is peeled too, as it carries none.
    """
    rows, cols = image.shape
    low, high = np.percentile(image, [0.5, 99.5])
    if high - low < _MIN_RANGE:
        return Field.whole(rows, cols)
    flat = FLAT_SPREAD * float(high - low)
    top, bottom, left, right = 0, rows, 0, cols
    for _ in range(_MAX_PASSES):
        region = image[top:bottom, left:right]
        columns, lines = _uniform(region, flat), _uniform(region.T, flat)
        if columns.all() or lines.all():
            return Field.whole(rows, cols)  # a gradient or a blank, not a radiograph
        peel = (_run(lines), _run(lines[::-1]), _run(columns), _run(columns[::-1]))
        if not any(peel):
            break
        top, bottom, left, right = (top + peel[0], bottom - peel[1], left + peel[2],
                                    right - peel[3])
    if (top, bottom, left, right) == (0, rows, 0, cols):
        return Field.whole(rows, cols)
    return Field(top, bottom, left, right, "image")


def _uniform(region: np.ndarray, flat: float) -> np.ndarray:
    """Per column of `region`: whether its values are uniform (spread within `flat`)."""
    step = max(1, math.ceil(region.shape[0] / LINE_SAMPLES))
    low, high = np.percentile(region[::step], [2, 98], axis=0)
    return np.asarray((high - low) <= flat)


def _run(flags: np.ndarray) -> int:
    """The number of True values before the first False."""
    return int(np.argmin(flags)) if not flags.all() else len(flags)
