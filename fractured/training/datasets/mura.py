"""MURA (Stanford's musculoskeletal radiographs): folders that carry patient, study, label.

Layout::

    root/{train,valid}/XR_<PART>/patient<id>/study<n>_{positive,negative}/image<k>.png

`root` is either the release folder (MURA-v1.1, holding train/ and valid/) or one split
folder itself. Each sample gets body_part = PART lower-cased ("wrist"), patient = the
patient folder, study = "patient<id>/study<n>_<label>", split train or val from the
top folder, and label 1 for a `_positive` study.

MURA's label is "abnormal", not "fractured": a positive study may show a fracture, but
also hardware, degenerative disease or a lesion; a model trained on it learns abnormality
and its scores are not fracture scores. The label belongs to the study (every image of
a study shares it); there are no boxes. The CSVs the release ships (image paths, study
labels) repeat what the folders say and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

from fractured.training.datasets.base import DatasetError, Sample, SampleSet
from fractured.training.datasets.imagefolder import images_in, split_of, subdirs

_STUDY = re.compile(r"^study\d+_(positive|negative)$")


def _part_dirs(folder: Path) -> list[Path]:
    """The XR_<PART> folders directly in `folder`."""
    return [d for d in subdirs(folder) if d.name.startswith("XR_")]


def _split_dirs(root: Path) -> list[tuple[Path, str | None]]:
    """The folders holding XR_* folders, with their split: root itself or its splits."""
    if _part_dirs(root):
        return [(root, split_of(root.name))]
    return [(d, split_of(d.name)) for d in subdirs(root) if split_of(d.name) and _part_dirs(d)]


def matches(path: Path) -> bool:
    """Whether `path` holds XR_* folders directly or under split folders (train/, valid/)."""
    return path.is_dir() and bool(_split_dirs(path))


def read_mura(root: Path) -> SampleSet:
    """Read a MURA release or split folder; see the module docstring for the layout."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (MURA expects root/[train|valid]/XR_*)")
    split_dirs = _split_dirs(root)
    if not split_dirs:
        raise DatasetError(f"{root}: no XR_<PART> folders directly or under train/ and valid/")
    samples = []
    for split_dir, split in split_dirs:
        for part_dir in _part_dirs(split_dir):
            body_part = part_dir.name.removeprefix("XR_").lower()
            for patient_dir in subdirs(part_dir):
                for study_dir in subdirs(patient_dir):
                    found = _STUDY.match(study_dir.name)
                    if not found:
                        raise DatasetError(f"{study_dir}: study folder name must be "
                                           "study<n>_positive or study<n>_negative")
                    files = images_in(study_dir)
                    if not files:
                        raise DatasetError(f"{study_dir}: study folder holds no images")
                    study = f"{patient_dir.name}/{study_dir.name}"
                    label = int(found.group(1) == "positive")
                    samples.extend(Sample(path=file, label=label, body_part=body_part,
                                          patient=patient_dir.name, study=study, split=split)
                                   for file in files)
    if not samples:
        raise DatasetError(f"{root}: the XR_<PART> folders hold no patient/study folders")
    return SampleSet("mura", root, tuple(sorted(samples, key=lambda s: s.path)))
