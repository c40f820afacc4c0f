"""Dataset readers: each layout read exactly (labels, boxes, splits, groups), detected
without being named, and refused with a message naming the file and the fault."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.uid import generate_uid

from fractured.training.datasets import (
    FORMATS,
    BoxLabel,
    DatasetError,
    SampleSet,
    detect_format,
    open_dataset,
)
from fractured.training.datasets.imagefolder import class_label
from tests import factory


def picture(path: Path) -> Path:
    """A 16x16 grey PNG or JPEG (by suffix) at `path`, folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((16, 16), 128, dtype=np.uint8))
    return path


def dicom(path: Path, *, patient_id: str = "P1", study_uid: str | None = None,
          rows: int = 8, cols: int = 10) -> Path:
    """A small valid DX file (BodyPartExamined LEG) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = factory.xray(study_uid or generate_uid(), patient_id=patient_id, rows=rows, cols=cols)
    ds.save_as(path, enforce_file_format=True)
    return path


def write(path: Path, text: str) -> Path:
    """A text file at `path`, folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def by_name(sample_set: SampleSet, root: Path) -> dict[str, tuple]:
    """{relative path: (label, split, body part, patient, study, boxes)} for exact checks."""
    return {s.path.relative_to(root).as_posix(): (s.label, s.split, s.body_part, s.patient,
                                                  s.study, s.boxes)
            for s in sample_set.samples}


def assert_sorted(sample_set: SampleSet) -> None:
    paths = [s.path for s in sample_set.samples]
    assert paths == sorted(paths)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_reads_the_kaggle_multi_region_layout(tmp_path: Path) -> None:
    for split, cls, name in [("train", "fractured", "a.jpg"), ("train", "fractured", "b.png"),
                             ("train", "not fractured", "c.jpg"), ("val", "fractured", "d.jpg"),
                             ("val", "not fractured", "e.jpg"), ("test", "not fractured", "f.jpg")]:
        picture(tmp_path / split / cls / name)
    (tmp_path / "train" / "fractured" / "notes.txt").write_text("not an image")

    data = open_dataset(tmp_path)

    assert data.format == "imagefolder" and detect_format(tmp_path) == "imagefolder"
    assert {k: v[:2] for k, v in by_name(data, tmp_path).items()} == {
        "test/not fractured/f.jpg": (0, "test"),
        "train/fractured/a.jpg": (1, "train"), "train/fractured/b.png": (1, "train"),
        "train/not fractured/c.jpg": (0, "train"),
        "val/fractured/d.jpg": (1, "val"), "val/not fractured/e.jpg": (0, "val")}
    assert_sorted(data)
    assert data.samples[0].attributes == {"class": "not fractured"}
    assert not data.has_boxes


def test_imagefolder_reads_split_aliases_and_flat_layouts(tmp_path: Path) -> None:
    picture(tmp_path / "split" / "validation" / "Fracture" / "a.png")
    picture(tmp_path / "split" / "validation" / "Normal" / "b.png")
    picture(tmp_path / "split" / "testing" / "Fracture" / "c.png")
    picture(tmp_path / "flat" / "abnormal" / "d.png")
    picture(tmp_path / "flat" / "healthy" / "e.png")

    split = open_dataset(tmp_path / "split")
    flat = open_dataset(tmp_path / "flat", "imagefolder")

    assert [(s.path.name, s.label, s.split) for s in split.samples] == [
        ("c.png", 1, "test"), ("a.png", 1, "val"), ("b.png", 0, "val")]
    assert [(s.path.name, s.label, s.split) for s in flat.samples] == [
        ("d.png", 1, None), ("e.png", 0, None)]


@pytest.mark.parametrize(("name", "label"), [
    ("fractured", 1), ("Fracture", 1), ("hip-fracture", 1), ("abnormal", 1), ("Positive", 1),
    ("not fractured", 0), ("Non-Fractured", 0), ("no_fracture", 0), ("unfractured", 0),
    ("notfractured", 0), ("normal", 0), ("NEGATIVE", 0), ("healthy", 0)])
def test_imagefolder_reads_the_label_from_the_class_name(name: str, label: int) -> None:
    assert class_label(name) == label


def test_imagefolder_positive_names_the_positive_folders(tmp_path: Path) -> None:
    picture(tmp_path / "class_a" / "1.png")
    picture(tmp_path / "class_b" / "2.png")
    picture(tmp_path / "class_c" / "3.png")

    data = open_dataset(tmp_path, positive=["class_b"])

    assert [(s.path.name, s.label) for s in data.samples] == [("1.png", 0), ("2.png", 1),
                                                              ("3.png", 0)]
    with pytest.raises(DatasetError, match=r"positive class folder\(s\) \['class_d'\] do not "
                                           r"exist; the class folders are \['class_a'"):
        open_dataset(tmp_path, positive=["class_d"])


def test_imagefolder_refuses_an_unclear_class_name(tmp_path: Path) -> None:
    picture(tmp_path / "fractured" / "1.png")
    picture(tmp_path / "elbow" / "2.png")
    with pytest.raises(DatasetError, match=r"class folder 'elbow': cannot tell .* pass positive"):
        open_dataset(tmp_path)


@pytest.mark.parametrize(("layout", "message"), [
    ({"fractured/1.png"}, r"found 1 class folder\(s\) \['fractured'\]; .* at least two"),
    ({"fractured/1.png", "normal/x.txt"}, r"normal: class folder holds no images"),
    ({"fractured/1.png", "hip_fracture/2.png"}, r"every class folder .* reads as label 1"),
    ({"train/fractured/1.png", "train/normal/2.png", "extra/3.png"},
     r"mixes split folders \['train'\] with other folders \['extra'\]"),
])
def test_imagefolder_refuses_malformed_layouts(tmp_path: Path, layout: set[str],
                                               message: str) -> None:
    for relative in layout:
        path = tmp_path / relative
        picture(path) if path.suffix == ".png" else write(path, "not an image")
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path, "imagefolder")


# ---------------------------------------------------------------- MURA


def make_mura(root: Path) -> None:
    picture(root / "train/XR_WRIST/patient00001/study1_positive/image1.png")
    picture(root / "train/XR_WRIST/patient00001/study1_positive/image2.png")
    picture(root / "train/XR_HAND/patient00002/study1_negative/image1.png")
    picture(root / "valid/XR_WRIST/patient00003/study2_negative/image1.png")


def test_mura_reads_body_part_patient_study_label_and_split(tmp_path: Path) -> None:
    root = tmp_path / "MURA-v1.1"
    make_mura(root)
    write(root / "train_image_paths.csv", "ignored\n")

    data = open_dataset(root)

    assert data.format == "mura"
    assert by_name(data, root) == {
        "train/XR_HAND/patient00002/study1_negative/image1.png":
            (0, "train", "hand", "patient00002", "patient00002/study1_negative", None),
        "train/XR_WRIST/patient00001/study1_positive/image1.png":
            (1, "train", "wrist", "patient00001", "patient00001/study1_positive", None),
        "train/XR_WRIST/patient00001/study1_positive/image2.png":
            (1, "train", "wrist", "patient00001", "patient00001/study1_positive", None),
        "valid/XR_WRIST/patient00003/study2_negative/image1.png":
            (0, "val", "wrist", "patient00003", "patient00003/study2_negative", None)}
    assert_sorted(data)


def test_mura_reads_a_split_folder_on_its_own(tmp_path: Path) -> None:
    make_mura(tmp_path)
    data = open_dataset(tmp_path / "valid")
    assert detect_format(tmp_path / "valid") == "mura"
    assert [(s.path.name, s.split, s.patient) for s in data.samples] == [
        ("image1.png", "val", "patient00003")]


def test_mura_refuses_a_study_folder_without_a_label(tmp_path: Path) -> None:
    make_mura(tmp_path)
    picture(tmp_path / "train/XR_HAND/patient00002/study2/image1.png")
    with pytest.raises(DatasetError, match=r"patient00002/study2: study folder name must be "
                                           r"study<n>_positive or study<n>_negative"):
        open_dataset(tmp_path)


def test_mura_refuses_an_empty_study(tmp_path: Path) -> None:
    make_mura(tmp_path)
    (tmp_path / "valid/XR_WRIST/patient00004/study1_positive").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"patient00004/study1_positive: study folder holds "
                                           r"no images"):
        open_dataset(tmp_path, "mura")


# ---------------------------------------------------------------- YOLO


def make_yolo(root: Path) -> None:
    picture(root / "images/train/a.jpg")
    picture(root / "images/train/b.png")  # no label file: a background image
    picture(root / "images/val/c.jpeg")
    picture(root / "images/d.png")  # not in a split folder
    write(root / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n\n1 0.1 0.9 0.2 0.2\n")
    write(root / "labels/val/c.txt", "")
    write(root / "labels/d.txt", "0 0.0999 0.5 0.2 0.2\n")  # overshoots by 1e-4: clipped


@pytest.mark.parametrize(("class_file", "text"), [
    ("data.yaml", "path: elsewhere\nnames: [fracture, metal]\n"),
    ("data.yaml", "names:\n  0: fracture\n  1: metal\n"),
    ("classes.txt", "fracture\nmetal\n\n"),
    ("obj.names", "fracture\nmetal\n"),
])
def test_yolo_reads_boxes_splits_and_class_names(tmp_path: Path, class_file: str,
                                                 text: str) -> None:
    make_yolo(tmp_path)
    write(tmp_path / class_file, text)

    data = open_dataset(tmp_path)

    assert data.format == "yolo" and data.box_labels == ("fracture", "metal")
    got = by_name(data, tmp_path)
    assert list(got) == ["images/d.png", "images/train/a.jpg", "images/train/b.png",
                         "images/val/c.jpeg"]
    assert {k: v[:2] for k, v in got.items()} == {
        "images/d.png": (1, None), "images/train/a.jpg": (1, "train"),
        "images/train/b.png": (0, "train"), "images/val/c.jpeg": (0, "val")}
    assert got["images/train/a.jpg"][5] == (
        BoxLabel(0.4, 0.3, 0.6, 0.7, "fracture"), BoxLabel(0.0, 0.8, 0.2, 1.0, "metal"))
    assert got["images/train/b.png"][5] == () and got["images/val/c.jpeg"][5] == ()
    (clipped,) = got["images/d.png"][5]
    assert clipped.x0 == 0.0 and clipped.x1 == pytest.approx(0.1999)


def test_yolo_without_class_names_allows_only_class_zero(tmp_path: Path) -> None:
    picture(tmp_path / "images/a.png")
    write(tmp_path / "labels/a.txt", "0 0.5 0.5 0.2 0.2\n")
    assert open_dataset(tmp_path).box_labels == ("fracture",)

    write(tmp_path / "labels/a.txt", "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"a\.txt:2: class 1, but without a classes file "
                                           r"\(data\.yaml, classes\.txt, obj\.names\)"):
        open_dataset(tmp_path)


@pytest.mark.parametrize(("line", "message"), [
    ("0 0.5 0.5 0.2", r"expected 5 fields 'class xc yc w h', got 4"),
    ("0 0.5 0.5 0.2 0.2 0.1 0.1", r"expected 5 fields 'class xc yc w h', got 7"),
    ("0 0.5 half 0.2 0.2", r"expected an integer class and four numbers"),
    ("0 0.5 0.5 nan 0.2", r"box values must be finite numbers"),
    ("2 0.5 0.5 0.2 0.2", r"class 2 is not one of the named classes \[0, 1\]"),
    ("0 0.95 0.5 0.2 0.2", r"box \(0\.8500, 0\.4000, 1\.0500, 0\.6000\) lies outside the image"),
    ("1 0.5 0.5 0.0 0.2", r"box has zero size"),
])
def test_yolo_refuses_a_malformed_line_naming_file_and_line(tmp_path: Path, line: str,
                                                            message: str) -> None:
    make_yolo(tmp_path)
    write(tmp_path / "data.yaml", "names: [fracture, metal]\n")
    write(tmp_path / "labels/val/c.txt", f"0 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(DatasetError, match=re.escape("labels/val/c.txt:2: ") + message):
        open_dataset(tmp_path)


@pytest.mark.parametrize(("class_file", "text", "message"), [
    ("data.yaml", "nc: 1\n", r"data\.yaml: needs 'names:'"),
    ("data.yaml", "names: [fracture\n", r"data\.yaml: cannot be read as YAML"),
    ("classes.txt", "fracture\n\nmetal\n", r"classes\.txt:2: blank line inside the class list"),
])
def test_yolo_refuses_a_malformed_classes_file(tmp_path: Path, class_file: str, text: str,
                                               message: str) -> None:
    make_yolo(tmp_path)
    write(tmp_path / class_file, text)
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path, "yolo")


# ---------------------------------------------------------------- FracAtlas

MANIFEST_HEADER = ("image,label,body_part,hardware,multiscan,frontal,lateral,oblique,"
                   "n_boxes,width,height,orig_width,orig_height\n")


def make_fracatlas(root: Path) -> None:
    picture(root / "images/IMG0000001.jpg")
    picture(root / "images/IMG0000002.jpg")
    write(root / "labels/IMG0000001.txt", "0 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.25 0.25\n")
    write(root / "labels/IMG0000002.txt", "")
    write(root / "manifest.csv", MANIFEST_HEADER
          + "IMG0000002.jpg,not_fractured,leg,0,1,0,1,1,0,16,16,1760,2140\n"
          + "IMG0000001.jpg,fractured,hand,1,0,1,0,0,2,16,16,2304,2880\n")


def test_fracatlas_reads_manifest_labels_body_parts_and_boxes(tmp_path: Path) -> None:
    make_fracatlas(tmp_path)

    data = open_dataset(tmp_path)

    assert data.format == "fracatlas" and data.box_labels == ("fracture",)
    assert by_name(data, tmp_path) == {
        "images/IMG0000001.jpg": (1, None, "hand", "", "", (
            BoxLabel(0.25, 0.25, 0.75, 0.75), BoxLabel(0.125, 0.125, 0.375, 0.375))),
        "images/IMG0000002.jpg": (0, None, "leg", "", "", ())}
    assert data.samples[0].attributes == {
        "hardware": "1", "multiscan": "0", "frontal": "1", "lateral": "0", "oblique": "0",
        "n_boxes": "2", "width": "16", "height": "16", "orig_width": "2304",
        "orig_height": "2880"}


@pytest.mark.parametrize(("change", "message"), [
    (lambda root: picture(root / "images/IMG0000003.jpg"),
     r"images/IMG0000003\.jpg: image is not in .*manifest\.csv"),
    (lambda root: (root / "images/IMG0000002.jpg").unlink(),
     r"manifest\.csv:2: image 'IMG0000002\.jpg' is missing from"),
    (lambda root: write(root / "labels/IMG0000002.txt", "0 0.5 0.5 0.1 0.1\n"),
     r"manifest\.csv:2: IMG0000002\.jpg is not_fractured but .*IMG0000002\.txt has 1 box"),
    (lambda root: write(root / "labels/IMG0000001.txt", "0 0.5 0.5 0.1 0.1\n"),
     r"manifest\.csv:3: n_boxes is '2' but .*IMG0000001\.txt has 1 box"),
    (lambda root: write(root / "labels/IMG0000001.txt", "0 0.5 0.5 0.1\n"),
     r"IMG0000001\.txt:1: expected 5 fields"),
    (lambda root: write(root / "manifest.csv", MANIFEST_HEADER
                        + "IMG0000001.jpg,broken,hand,1,0,1,0,0,2,16,16,1,1\n"),
     r"manifest\.csv:2: label 'broken' is not fractured or not_fractured"),
    (lambda root: write(root / "manifest.csv", "image,label,body_part,n_boxes\n"),
     r"manifest\.csv: missing required column\(s\) \['hardware'\]"),
    (lambda root: write(root / "manifest.csv", MANIFEST_HEADER + "IMG0000001.jpg,fractured\n"),
     r"manifest\.csv:2: 2 cells where the header has 13 columns"),
])
def test_fracatlas_refuses_a_damaged_copy(tmp_path: Path, change: Callable[[Path], object],
                                          message: str) -> None:
    make_fracatlas(tmp_path)
    change(tmp_path)
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path)


def test_fracatlas_shared_copy_loads_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (factory.SHARED_FRACATLAS / "manifest.csv").is_file():
        print(f"skipping: {factory.SHARED_FRACATLAS} is absent "
              "(../shared sits beside the checkout)")
        pytest.skip(f"{factory.SHARED_FRACATLAS} is absent")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reader decoded an image")

    monkeypatch.setattr(cv2, "imread", no_decoding)
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    start = time.perf_counter()
    data = open_dataset(factory.SHARED_FRACATLAS)
    seconds = time.perf_counter() - start
    print(f"FracAtlas: {len(data)} samples read in {seconds:.2f} s")

    assert data.format == "fracatlas" and len(data) == 3268
    assert sum(s.label for s in data.samples) == 574
    assert Counter(s.body_part for s in data.samples) == {
        "hand": 1025, "leg": 1700, "hip": 143, "shoulder": 81, "mixed": 319}
    assert all(s.boxes for s in data.samples if s.label == 1)
    assert all(s.boxes == () for s in data.samples if s.label == 0)
    assert all(s.attributes["hardware"] in ("0", "1") for s in data.samples)
    assert seconds < 5, "reading the layout must not take the time of decoding 3268 JPEGs"


# ---------------------------------------------------------------- COCO


def coco_json(**changes: object) -> dict:
    data: dict = {
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                   {"id": 2, "file_name": "b.png", "width": 200, "height": 100}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [20, 10, 40, 50], "category_id": 2},
            {"id": 11, "image_id": 1, "bbox": [100, -0.5, 100.5, 101], "category_id": 1,
             "iscrowd": 1}],
        "categories": [{"id": 2, "name": "metal"}, {"id": 1, "name": "fracture"}]}
    data.update(changes)
    return data


def make_coco(root: Path, data: dict) -> Path:
    picture(root / "images/a.png")
    picture(root / "images/b.png")
    return write(root / "annotations/instances.json", json.dumps(data))


def test_coco_reads_pixel_boxes_as_normalised_boxes(tmp_path: Path) -> None:
    json_path = make_coco(tmp_path, coco_json())

    data = open_dataset(tmp_path)

    assert data.format == "coco" and data.root == json_path
    assert data.box_labels == ("fracture", "metal")
    assert by_name(data, tmp_path) == {
        "images/a.png": (1, None, "", "", "", (
            BoxLabel(0.1, 0.1, 0.3, 0.6, "metal"), BoxLabel(0.5, 0.0, 1.0, 1.0, "fracture"))),
        "images/b.png": (0, None, "", "", "", ())}
    assert [s.attributes for s in data.samples] == [{"image_id": "1"}, {"image_id": "2"}]


def test_coco_finds_images_beside_the_json_file(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.png")
    json_path = write(tmp_path / "_annotations.coco.json", json.dumps(coco_json()))

    assert detect_format(json_path) == "coco"
    assert [s.path for s in open_dataset(json_path).samples] == [tmp_path / "a.png",
                                                                 tmp_path / "b.png"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"categories": None}, r"missing top-level list 'categories'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 200}]},
     r"images\[0\]: missing key\(s\) \['height'\]"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                 {"id": 1, "file_name": "b.png", "width": 200, "height": 100}]},
     r"images\[1\]: duplicate image id 1"),
    ({"images": [{"id": 1, "file_name": "gone.png", "width": 200, "height": 100}]},
     r"images\[0\] \(id 1\): image file 'gone\.png' not found in"),
    ({"annotations": [{"id": 7, "image_id": 3, "bbox": [0, 0, 5, 5], "category_id": 1}]},
     r"annotations\[0\] \(id 7\): image_id 3 is not in images"),
    ({"annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 9}]},
     r"annotations\[0\] \(id 7\): category_id 9 is not in categories"),
    ({"annotations": [{"id": 7, "image_id": 1, "bbox": [150, 0, 52, 5], "category_id": 1}]},
     r"annotations\[0\] \(id 7\): box \(150\.0, 0\.0, 202\.0, 5\.0\) lies outside the "
     r"200x100 image"),
    ({"annotations": [{"id": 7, "image_id": 1, "bbox": [10, 10, 0, 5], "category_id": 1}]},
     r"annotations\[0\] \(id 7\): box .* has zero size"),
    ({"annotations": [{"id": 7, "image_id": 1, "bbox": [10, 10, 5], "category_id": 1}]},
     r"annotations\[0\] \(id 7\): bbox must be \[x, y, w, h\] numbers"),
])
def test_coco_refuses_malformed_json_naming_the_entry(tmp_path: Path, changes: dict,
                                                      message: str) -> None:
    data = coco_json(**changes)
    if data["categories"] is None:
        del data["categories"]
    make_coco(tmp_path, data)
    with pytest.raises(DatasetError, match=r"instances\.json: " + message):
        open_dataset(tmp_path)


def test_coco_folder_with_two_annotation_files_is_ambiguous(tmp_path: Path) -> None:
    make_coco(tmp_path, coco_json())
    write(tmp_path / "annotations/other.json", "{}")
    with pytest.raises(DatasetError, match=r"expected exactly one COCO \.json .* found 2"):
        open_dataset(tmp_path, "coco")


# ---------------------------------------------------------------- DICOM + CSV


def test_dicom_csv_reads_labels_boxes_and_groups_from_csv_and_headers(tmp_path: Path) -> None:
    study = generate_uid()
    dicom(tmp_path / "dcm/a.dcm", patient_id="PAT-A", study_uid=study)
    dicom(tmp_path / "dcm/b.dcm", patient_id="PAT-B")
    dicom(tmp_path / "dcm/c.dcm", patient_id="PAT-C")
    csv_path = write(tmp_path / "labels.csv",
                     "file,label,patient,body_part,split,x0,y0,x1,y1,site\n"
                     "dcm/a.dcm,Fractured,,,train,1,2,6,4,north\n"
                     "dcm/a.dcm,Fractured,,,train,0,0,10,8,north\n"
                     "dcm/b.dcm,no,H-42,Wrist,validation,,,,,south\n"
                     "dcm/c.dcm,1,,,,,,,,south\n")

    data = open_dataset(csv_path)

    assert data.format == "dicom-csv" and data.root == csv_path
    assert [(s.path.name, s.label, s.split, s.body_part, s.patient, s.attributes)
            for s in data.samples] == [
        ("a.dcm", 1, "train", "leg", "PAT-A", {"site": "north"}),
        ("b.dcm", 0, "val", "wrist", "H-42", {"site": "south"}),
        ("c.dcm", 1, None, "leg", "PAT-C", {"site": "south"})]
    a, b, c = data.samples
    assert a.study == study and a.path == tmp_path / "dcm/a.dcm"
    assert a.boxes == (BoxLabel(0.1, 0.25, 0.6, 0.5), BoxLabel(0.0, 0.0, 1.0, 1.0))
    assert b.boxes == () and c.boxes == ()


def test_dicom_csv_without_box_columns_has_unknown_boxes(tmp_path: Path) -> None:
    dicom(tmp_path / "a.dcm")
    csv_path = write(tmp_path / "list.csv", "file,label,study\na.dcm,TRUE,S-1\n")
    (sample,) = open_dataset(csv_path, "dicom-csv").samples
    assert (sample.label, sample.boxes, sample.study) == (1, None, "S-1")
    assert not open_dataset(csv_path).has_boxes


@pytest.mark.parametrize(("csv_text", "message"), [
    ("path,label\na.dcm,1\n", r"list\.csv: missing required column\(s\) \['file'\]"),
    ("file,label\na.dcm,maybe\n", r"list\.csv:2: label 'maybe' is not one of"),
    ("file,label\nmissing.dcm,1\n", r"list\.csv:2: .*missing\.dcm: no such file"),
    ("file,label\nfake.dcm,1\n", r"list\.csv:2: .*fake\.dcm: not a DICOM file"),
    ("file,label,split\na.dcm,1,holdout\n", r"list\.csv:2: split 'holdout' is not"),
    ("file,label,x0,y0\na.dcm,1,1,1\n", r"box columns must be all of .* only \['x0', 'y0'\]"),
    ("file,label,x0,y0,x1,y1\na.dcm,0,1,1,4,4\n",
     r"list\.csv:2: a\.dcm is labelled negative but has 1 box"),
    ("file,label,x0,y0,x1,y1\na.dcm,1,1,1,4,4\na.dcm,0,,,,\n",
     r"list\.csv:3: label '0' disagrees with '1' on line 2 for the same file"),
    ("file,label,x0,y0,x1,y1\na.dcm,1,1,1,12,4\n",
     r"list\.csv:2: box \(1\.0, 1\.0, 12\.0, 4\.0\) lies outside the 10x8 image"),
    ("file,label,x0,y0,x1,y1\na.dcm,1,1,1,,4\n", r"list\.csv:2: box cells .* all filled"),
    ("file,label\n", r"list\.csv: has a header but no rows"),
    ("file,label,label\na.dcm,1,0\n", r"list\.csv: column\(s\) \['label'\] appear more than once"),
    ("file,label\na.dcm,1,extra\n", r"list\.csv:2: 3 cells where the header has 2 columns"),
])
def test_dicom_csv_refuses_malformed_rows(tmp_path: Path, csv_text: str, message: str) -> None:
    dicom(tmp_path / "a.dcm")
    write(tmp_path / "fake.dcm", "not dicom at all")
    with pytest.raises(DatasetError, match=message):
        open_dataset(write(tmp_path / "list.csv", csv_text))


# ---------------------------------------------------------------- open_dataset


def test_open_dataset_says_which_layouts_it_looked_for(tmp_path: Path) -> None:
    write(tmp_path / "readme.txt", "hello")
    with pytest.raises(DatasetError) as caught:
        open_dataset(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: not a dataset layout")
    for name in FORMATS:
        assert f"  {name}:" in str(caught.value)


def test_open_dataset_refuses_unknown_formats_and_misplaced_options(tmp_path: Path) -> None:
    make_yolo(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown dataset format 'voc'"):
        open_dataset(tmp_path, "voc")
    with pytest.raises(DatasetError, match=r"positive class folders apply only to imagefolder "
                                           r"datasets, not yolo"):
        open_dataset(tmp_path, positive=["fractured"])
    with pytest.raises(DatasetError, match=r"gone: no such file or directory"):
        open_dataset(tmp_path / "gone", "yolo")


def test_a_stray_json_does_not_make_an_imagefolder_look_like_coco(tmp_path: Path) -> None:
    picture(tmp_path / "fractured" / "a.png")
    picture(tmp_path / "not fractured" / "b.png")
    write(tmp_path / "dataset-metadata.json", '{"title": "bones", "licenses": []}')
    assert detect_format(tmp_path) == "imagefolder"
    assert len(open_dataset(tmp_path)) == 2


def test_yolo_reads_the_roboflow_layout_with_split_folders_first(tmp_path: Path) -> None:
    for split, name in (("train", "a"), ("valid", "b"), ("test", "c")):
        picture(tmp_path / split / "images" / f"{name}.jpg")
    write(tmp_path / "train" / "labels" / "a.txt", "1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "valid" / "labels").mkdir(parents=True)
    (tmp_path / "test" / "labels").mkdir(parents=True)
    write(tmp_path / "data.yaml", "train: ../train/images\nnames: ['elbow', 'wrist']\n")
    assert detect_format(tmp_path) == "yolo"
    sample_set = open_dataset(tmp_path)
    assert {s.path.relative_to(tmp_path).as_posix(): (s.label, s.split,
                                                      tuple(b.label for b in s.boxes))
            for s in sample_set.samples} == {
        "train/images/a.jpg": (1, "train", ("wrist",)),
        "valid/images/b.jpg": (0, "val", ()),
        "test/images/c.jpg": (0, "test", ()),
    }
    assert_sorted(sample_set)
