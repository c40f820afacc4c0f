"""ImageFolder: the class-per-folder layout most Kaggle fracture sets ship in.

Layout (either form)::

    root/<class>/*.{png,jpg,jpeg,dcm}
    root/{train,val,test}/<class>/*.{png,jpg,jpeg,dcm}

`valid`/`validation` are read as val and `testing` as test, so the split the dataset
ships with is kept (`Sample.split`). The folder is the only label there is, so the
binary target comes from its name: with `positive`, the named folders are label 1 and
all others 0; without it, names like "fractured"/"abnormal" are 1 and "not fractured",
"unfractured", "normal" are 0, and any other name is refused rather than guessed. The
Kaggle "fracture-multi-region-x-ray-data" set (`train/fractured`, `train/not fractured`,
`val/...`, `test/...`) reads without options. No patients or body parts are known.

The split-name and folder-listing helpers here are shared by the other folder readers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from fractured.training.datasets.base import DatasetError, Sample, SampleSet, is_image

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}
_NEGATIVE = re.compile(r"^(?:(?:not|non|no)_|(?:not|non|no|un)_?fractur)")
_NEGATIVE_WORDS = frozenset({"normal", "negative", "healthy"})
_POSITIVE_WORDS = frozenset({"abnormal", "positive"})


def split_of(name: str) -> str | None:
    """The split a folder name stands for ("Valid" -> "val"), or None if it names none."""
    return _SPLIT_NAMES.get(name.lower())


def subdirs(path: Path) -> list[Path]:
    """The visible sub-folders of `path`, sorted (hidden ones such as .git are not data)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder: Path) -> list[Path]:
    """The visible image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image(p))


def matches(path: Path) -> bool:
    """Whether `path` is a folder with at least one sub-folder holding images directly,
    or split folders holding such class folders."""
    if not path.is_dir():
        return False
    for child in subdirs(path):
        if images_in(child):
            return True
        if split_of(child.name) and any(images_in(c) for c in subdirs(child)):
            return True
    return False


def class_label(name: str) -> int:
    """The binary label a class folder's name means; DatasetError when it is not clear."""
    norm = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if _NEGATIVE.match(norm) or norm in _NEGATIVE_WORDS:
        return 0
    if "fractur" in norm or norm in _POSITIVE_WORDS:
        return 1
    raise DatasetError(f"class folder {name!r}: cannot tell whether it is fractured or not "
                       "from its name; pass positive=[...] (the positive class folders)")


def read_imagefolder(root: Path, positive: Sequence[str] | None = None) -> SampleSet:
    """Read a class-per-folder dataset; see the module docstring for the layout."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (imagefolder expects root/<class>/...)")
    class_dirs = _class_dirs(root)
    names = sorted({d.name for d, _ in class_dirs})
    if len(names) < 2:
        raise DatasetError(f"{root}: found {len(names)} class folder(s) {names}; an "
                           "imagefolder dataset needs at least two (e.g. fractured, normal)")
    if positive is not None:
        positive = [positive] if isinstance(positive, str) else list(positive)
        unknown = sorted(set(positive) - set(names))
        if unknown:
            raise DatasetError(f"{root}: positive class folder(s) {unknown} do not exist; "
                               f"the class folders are {names}")
        labels = {name: int(name in positive) for name in names}
    else:
        labels = {name: class_label(name) for name in names}
    if len(set(labels.values())) < 2:
        raise DatasetError(f"{root}: every class folder {names} reads as label "
                           f"{labels[names[0]]}; pass positive=[...] to say which are positive")
    samples = []
    for folder, split in class_dirs:
        files = images_in(folder)
        if not files:
            raise DatasetError(f"{folder}: class folder holds no images "
                               "(.png, .jpg, .jpeg, .dcm directly inside it)")
        samples.extend(Sample(path=file, label=labels[folder.name], split=split,
                              attributes={"class": folder.name}) for file in files)
    return SampleSet("imagefolder", root, tuple(sorted(samples, key=lambda s: s.path)))


def _class_dirs(root: Path) -> list[tuple[Path, str | None]]:
    """Every class folder with the split it sits in; split and class folders must not mix."""
    children = subdirs(root)
    splits = [c for c in children if split_of(c.name)]
    if not splits:
        if not children:
            raise DatasetError(f"{root}: no class folders (expected root/<class>/<images>)")
        return [(c, None) for c in children]
    others = [c.name for c in children if not split_of(c.name)]
    if others:
        raise DatasetError(f"{root}: mixes split folders {[s.name for s in splits]} with "
                           f"other folders {others}; put every class folder under a split")
    dirs = [(c, split_of(s.name)) for s in splits for c in subdirs(s)]
    if not dirs:
        raise DatasetError(f"{root}: split folders hold no class folders "
                           "(expected root/<split>/<class>/<images>)")
    return dirs
