"""DICOM + CSV: a hospital's own export, DICOM files listed in a CSV with their labels.

Layout: one CSV with a header row::

    file,label[,patient,study,body_part,split][,x0,y0,x1,y1][,any other column]

- `file`: the DICOM file, relative to the CSV's folder (absolute paths work too).
- `label`: 1/0, true/false, yes/no, positive/negative, fractured/not_fractured,
  fracture/normal (any case).
- `patient`, `study`, `body_part`: when the column is absent or the cell empty, the
  file's PatientID, StudyInstanceUID and BodyPartExamined are used (body parts are
  lower-cased either way, so "WRIST" from a header and "wrist" from the CSV agree).
- `split`: train, val (valid, validation) or test (testing); empty = none.
- `x0,y0,x1,y1`: a box in the image's pixels (all four columns or none). Several rows
  for one file give several boxes and must agree on every other column; a row with
  empty box cells adds no box. A positive without boxes is fine (not every fracture is
  drawn); a negative with boxes is a contradiction and refused. Without box columns
  the boxes are unknown (None), not absent.
- every other column is kept in `Sample.attributes`.

Only the DICOM header is read (pixels are not), which both proves the file is DICOM
and gives Rows/Columns to normalise the boxes. The CSV reader here also serves the
FracAtlas manifest.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from fractured.training.datasets.base import BoxLabel, DatasetError, Sample, SampleSet
from fractured.training.datasets.coco import pixel_box
from fractured.training.datasets.imagefolder import split_of

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_GROUP_COLUMNS = ("patient", "study", "body_part", "split")
_LABELS = {"1": 1, "true": 1, "yes": 1, "positive": 1, "fractured": 1, "fracture": 1,
           "0": 0, "false": 0, "no": 0, "negative": 0, "not_fractured": 0, "normal": 0}
_HEADER_TAGS = ("PatientID", "StudyInstanceUID", "BodyPartExamined", "Rows", "Columns")

Row = tuple[int, dict[str, str]]


def matches(path: Path) -> bool:
    """Whether `path` is a .csv file."""
    return path.is_file() and path.suffix.lower() == ".csv"


def read_csv_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[Row]]:
    """A CSV's column names and its rows with their line numbers, cells stripped.

    DatasetError names the file when it cannot be read, repeats or lacks a `required`
    column, has no rows, or has a row with more or fewer cells than the header.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            columns = [name.strip() for name in next(reader, [])]
            rows = []
            for cells in reader:
                if not cells:  # a blank line
                    continue
                if len(cells) != len(columns):
                    raise DatasetError(f"{path}:{reader.line_num}: {len(cells)} cells where "
                                       f"the header has {len(columns)} columns")
                rows.append((reader.line_num,
                             {k: v.strip() for k, v in zip(columns, cells, strict=True)}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot be read as CSV ({exc})") from exc
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise DatasetError(f"{path}: column(s) {repeated} appear more than once in the header")
    missing = [name for name in required if name not in columns]
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {missing}; "
                           f"the header has {columns}")
    if not rows:
        raise DatasetError(f"{path}: has a header but no rows")
    return columns, rows


def read_dicom_csv(path: Path) -> SampleSet:
    """Read a CSV listing DICOM files; see the module docstring for the columns."""
    columns, rows = read_csv_rows(path, ("file", "label"))
    present = [c for c in BOX_COLUMNS if c in columns]
    if present and len(present) != len(BOX_COLUMNS):
        raise DatasetError(f"{path}: box columns must be all of {list(BOX_COLUMNS)} or none; "
                           f"the header has only {present}")
    with_boxes = bool(present)
    groups: dict[Path, list[Row]] = {}
    for line, row in rows:
        if not row["file"]:
            raise DatasetError(f"{path}:{line}: empty 'file' cell")
        groups.setdefault(Path(os.path.normpath(path.parent / row["file"])), []).append(
            (line, row))
    samples = [_sample(path, file, group, with_boxes) for file, group in groups.items()]
    return SampleSet("dicom-csv", path, tuple(sorted(samples, key=lambda s: s.path)))


def _sample(csv_path: Path, file: Path, rows: list[Row], with_boxes: bool) -> Sample:
    """One file's sample from its rows (one per box when the CSV has boxes)."""
    first_line, first = rows[0]
    for line, row in rows[1:]:
        for column, value in row.items():
            if column not in ("file", *BOX_COLUMNS) and value != first[column]:
                raise DatasetError(f"{csv_path}:{line}: {column} {value!r} disagrees with "
                                   f"{first[column]!r} on line {first_line} for the same file")
    where = f"{csv_path}:{first_line}"
    label = _LABELS.get(first["label"].lower())
    if label is None:
        raise DatasetError(f"{where}: label {first['label']!r} is not one of "
                           "1/0, true/false, yes/no, positive/negative, fractured/not_fractured, "
                           "fracture/normal")
    split_cell = first.get("split", "")
    split = split_of(split_cell) if split_cell else None
    if split_cell and split is None:
        raise DatasetError(f"{where}: split {split_cell!r} is not train, val or test")
    header = _header(file, where)
    boxes = None
    if with_boxes:
        boxes = tuple(box for line, row in rows
                      if (box := _row_box(row, header, f"{csv_path}:{line}")) is not None)
        if boxes and label == 0:
            raise DatasetError(f"{where}: {file.name} is labelled negative but has "
                               f"{len(boxes)} box(es); fix the label or the boxes")
    attributes = {k: v for k, v in first.items()
                  if k not in ("file", "label", *_GROUP_COLUMNS, *BOX_COLUMNS)}
    body_part = first.get("body_part") or str(header.get("BodyPartExamined") or "")
    return Sample(path=file, label=label, body_part=body_part.lower(),
                  patient=first.get("patient") or str(header.get("PatientID") or ""),
                  study=first.get("study") or str(header.get("StudyInstanceUID") or ""),
                  boxes=boxes, split=split, attributes=attributes)


def _header(file: Path, where: str) -> Dataset:
    """The file's DICOM header (the tags this reader uses, no pixels)."""
    if not file.is_file():
        raise DatasetError(f"{where}: {file}: no such file")
    try:
        return pydicom.dcmread(file, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as exc:  # pydicom raises several types for a bad file
        raise DatasetError(f"{where}: {file}: not a DICOM file ({exc})") from exc


def _row_box(row: dict[str, str], header: Dataset, where: str) -> BoxLabel | None:
    """The row's box normalised by the image size, or None when its box cells are empty."""
    cells = [row[c] for c in BOX_COLUMNS]
    if not any(cells):
        return None
    if not all(cells):
        raise DatasetError(f"{where}: box cells x0,y0,x1,y1 must be all filled or all empty")
    try:
        x0, y0, x1, y1 = (float(cell) for cell in cells)
    except ValueError as exc:
        raise DatasetError(f"{where}: box cells must be numbers, got {cells}") from exc
    if "Rows" not in header or "Columns" not in header:
        raise DatasetError(f"{where}: the DICOM header has no Rows/Columns to place the box")
    try:
        return pixel_box(x0, y0, x1, y1, int(header.Columns), int(header.Rows))
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from exc
