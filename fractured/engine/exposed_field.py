"""The exposed field of a radiograph: the rectangle of the image the X-ray beam reached.

The models learn from JPEG exports (FracAtlas) that are mostly cut to the anatomy,
while CR/DX files from a modality keep what the collimator blades and display shutters
left around it: uniform bands, very bright or very dark once windowed. The shipped
model's CAM lands on those edges, outside the body: a shortcut. Cropping to the exposed
field before letterboxing removes it, and gives the anatomy more of the model's pixels.

The field is taken, in this order, from the DICOM Display Shutter attributes, from the
DX collimator attributes, or from the image itself: uniform lines at its borders, and
collimator edges, which are straight lines of strong gradient across the field parallel
to a side of the image, found even where the band beyond them is graded (the penumbra,
the heel effect) or holds a second blade and so is not uniform.
Attribute values that make no sense are ignored with a warning naming the attribute,
never raised: a vendor's odd header must not stop a study. A field under MIN_FRACTION
of either side is not believed, and the next source (finally the whole image) is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from fractured.engine.percentiles import column_percentiles, percentiles

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
#: Collimator edges are looked for in a copy of the image shrunk by a whole factor (block
#: means) to at most this many pixels on its longer side: a blade's penumbra then spans
#: a few pixels on any detector, so one threshold fits all, noise is averaged away, and
#: the search is quick. An edge is placed to within that factor (5 px on a 2140-px DX).
EDGE_WORKING_SIDE = 512
#: A strong step: neighbouring working pixels differing by at least this share of the
#: image's grey range, once smoothed along the line over _EDGE_SMOOTHING pixels (so
#: noise neither makes nor breaks a line) but not across it (so the edge stays sharp);
#: and by as much as the image's top EDGE_RARITY of steps at least, so that in an image
#: dense with bone, strong steps are not so common that chance makes lines of them.
EDGE_STEP = 0.02
EDGE_RARITY = 0.1
_EDGE_SMOOTHING = 7
#: A collimator edge is a line parallel to a side of the image along which strong steps
#: of one sign lie, within one working pixel, over at least EDGE_LENGTH of the field's
#: extent. A blade's edge is straight and crosses the whole field; a bone's is curved,
#: and so mostly is the skin's, yet a forearm's or a shin's side can run straight for
#: 60-75 % of a FracAtlas film (measured), so shorter lines are not believed.
EDGE_LENGTH = 0.9
#: ... lying within EDGE_REACH of the image's extent from that side ...
EDGE_REACH = 0.35
#: ... with nothing to see beyond it: detail (a working pixel off its blurred
#: surroundings by EDGE_STEP of the grey range) on under EDGE_QUIET of the band. A band
#: is smooth, however graded; anatomy is not, be it a heel or a finger sticking out past
#: a straight stretch of skin, or the second view on a plate exposed twice, whose
#: divider is as straight as a blade's edge. The band is measured from _BAND_MARGIN
#: working pixels past the edge, clear of the edge's own detail.
EDGE_QUIET = 0.05
_DETAIL_SIGMA = 2.0
_BAND_MARGIN = 4
#: Passes of peeling border lines and cutting at edges; each pass measures the lines
#: only over the field left by the last, so a band's corner shared with another band
#: stops counting, and an edge between two bands is measured along the field only.
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
    try:
        found = _detected(image)
    except Exception as exc:  # odd pixels must not fail the study
        # A search that trips on an image unlike any it was made on (an edge case of
        # its bands once emptied the field and failed every study of a detector size)
        # falls back to the whole image, as an implausible field does, and says why.
        log.warning("exposed_field.search_failed", rows=rows, cols=cols,
                    error=f"{type(exc).__name__}: {exc}")
        return Field.whole(rows, cols)
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
    """The image less its border bands, as collimators and shutters leave: bands of
    uniform lines, and whatever lies beyond the innermost collimator edge near each
    side; the whole image where it has neither (or nothing but uniform lines).

    A uniform band is peeled only up to the first line that is not uniform, and an edge
    must be straight, cross the field and have nothing to see beyond it, so the crop
    does not enter the anatomy; a uniform margin of air is peeled too, as it carries
    none. The debug event names the sides that an edge, not a uniform band, bounds.
    """
    rows, cols = image.shape
    low, high = percentiles(image, [0.5, 99.5])
    grey = float(high - low)
    if grey < _MIN_RANGE:
        return Field.whole(rows, cols)
    flat = FLAT_SPREAD * grey
    columns_edges, row_edges = _Edges.of(image, grey)
    field = (0, rows, 0, cols)
    at_edges: set[str] = set()
    for _ in range(_MAX_PASSES):
        top, bottom, left, right = field
        region = image[top:bottom, left:right]
        columns, lines = _uniform(region, flat), _uniform(region.T, flat)
        if columns.all() or lines.all():
            return Field.whole(rows, cols)  # a gradient or a blank, not a radiograph
        peeled = (top + _run(lines), bottom - _run(lines[::-1]), left + _run(columns),
                  right - _run(columns[::-1]))
        left, right = columns_edges.bounds(peeled[2:], peeled[:2])
        top, bottom = row_edges.bounds(peeled[:2], (left, right))
        cut = (top, bottom, left, right)
        at_edges |= {side for side, edge, band in zip(_SIDES, cut, peeled, strict=True)
                     if edge != band}
        if cut == field:
            break
        field = cut
    if field == (0, rows, 0, cols):
        return Field.whole(rows, cols)
    log.debug("exposed_field.detected", field=list(field), rows=rows, cols=cols,
              at_edges=sorted(at_edges))
    return Field(*field, "image")


_SIDES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class _Edges:
    """What the vertical collimator edges are read from, on the shrunk image (on its
    transpose: the horizontal ones)."""

    #: [rising, falling] x working rows x the column pairs: whether a strong step of
    #: that sign lies in that pair or a pair either side (the line's tolerance)
    steps: np.ndarray
    #: working rows x working columns: whether the pixel is detail (see EDGE_QUIET)
    detail: np.ndarray
    scale: int  # full-resolution pixels per working pixel
    size: int  # full-resolution columns

    @classmethod
    def of(cls, image: np.ndarray, grey: float) -> tuple[_Edges, _Edges]:
        """The image's edges across its columns, and across its rows."""
        rows, cols = image.shape
        scale = max(1, math.ceil(max(rows, cols) / EDGE_WORKING_SIDE))
        # whole blocks only, so a working pixel is the mean of exactly scale x scale
        # pixels and an edge maps back to full resolution without drift
        shape = (max(1, rows // scale), max(1, cols // scale))
        blocks = image[:shape[0] * scale, :shape[1] * scale]
        small = image if scale == 1 else cv2.resize(blocks, shape[::-1],
                                                    interpolation=cv2.INTER_AREA)
        step = EDGE_STEP * grey
        detail = np.abs(small - cv2.GaussianBlur(small, (0, 0), _DETAIL_SIGMA)) > step
        return (cls(_steps(small, step), detail, scale, cols),
                cls(_steps(np.ascontiguousarray(small.T), step), detail.T, scale, rows))

    def bounds(self, across: tuple[int, int], along: tuple[int, int]) -> tuple[int, int]:
        """The columns [start, end) left of `across` once cut at the innermost edge
        on each side that is within EDGE_REACH of it and has a quiet band beyond, lines
        and bands measured over the rows `along` only."""
        first, last = -(-along[0] // self.scale), along[1] // self.scale
        if last <= first or not self.steps.shape[2]:
            return across
        rows = slice(first, last)
        share = self.steps[:, rows].mean(axis=1).max(axis=0)
        # A line at pair q (between working columns q and q + 1) was widened onto the
        # pairs q - 1 to q + 1: a run of qualifying pairs [q0, q1) on the left ends on
        # the first pair inside the field, so the field starts at column q1 - 1; on
        # the right it starts on the last pair inside, so the field ends after q0 + 1.
        # An edge is only as precise as two working pixels: one that close to where a
        # uniform band was peeled is that band's edge, which the peel placed exactly.
        runs = _runs(share >= EDGE_LENGTH)
        start, end = across
        inner = (-(-start // self.scale), end // self.scale)
        # An edge beyond the other side's bound (a band peeled from that side past it)
        # would leave no field: it is not taken.
        for q0, q1 in reversed(runs):
            column = (q1 - 1) * self.scale
            if column <= EDGE_REACH * self.size and self._quiet(
                    rows, inner[0], q0 - _BAND_MARGIN):
                start = column if start + 2 * self.scale < column < end else start
                break
        for q0, q1 in runs:
            column = (q0 + 2) * self.scale
            if column >= (1 - EDGE_REACH) * self.size and self._quiet(
                    rows, q1 + _BAND_MARGIN, inner[1]):
                end = column if start < column < end - 2 * self.scale else end
                break
        return start, end

    def _quiet(self, rows: slice, first: int, last: int) -> bool:
        """Whether the band of working columns [first, last) over `rows` holds under
        EDGE_QUIET of detail (a band narrower than the margin is the penumbra: quiet)."""
        return last <= first or float(self.detail[rows, first:last].mean()) < EDGE_QUIET


def _steps(small: np.ndarray, step: float) -> np.ndarray:
    """_Edges.steps of the working image `small` (see there)."""
    along = cv2.blur(small, (1, _EDGE_SMOOTHING))  # (width, height): down the columns
    differences = np.diff(along, axis=1)
    if differences.size:
        step = max(step, float(percentiles(np.abs(differences), 100 * (1 - EDGE_RARITY))))
    strong = np.stack([differences > step, differences < -step])
    widened = strong.copy()
    widened[..., 1:] |= strong[..., :-1]
    widened[..., :-1] |= strong[..., 1:]
    return widened


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in `flags`, as [start, stop) index pairs, in order."""
    changes = np.flatnonzero(np.diff(flags.astype(np.int8), prepend=0, append=0))
    return [(int(a), int(b)) for a, b in zip(changes[::2], changes[1::2], strict=True)]


def _uniform(region: np.ndarray, flat: float) -> np.ndarray:
    """Per column of `region`: whether its values are uniform (spread within `flat`)."""
    step = max(1, math.ceil(region.shape[0] / LINE_SAMPLES))
    low, high = column_percentiles(region[::step], [2, 98])
    return np.asarray((high - low) <= flat)


def _run(flags: np.ndarray) -> int:
    """The number of True values before the first False."""
    return int(np.argmin(flags)) if not flags.all() else len(flags)
