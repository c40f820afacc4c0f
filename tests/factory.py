"""Test images: small valid X-ray DICOM made on the fly, and the real files beside the
checkout (../shared/data/dicom, absent in a user's clone: tests using it skip, saying so).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

if TYPE_CHECKING:
    from fractured.engine.intended_use import ScopeCheck
    from fractured.engine.pipeline import Pipeline

#: ../shared beside the checkout, or where FRACTURED_SHARED_DIR points (CI points it at
#: a folder that does not exist, to prove the suite passes in a user's clone).
SHARED = Path(os.environ.get("FRACTURED_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
SHARED_DICOM = SHARED / "data" / "dicom"
SHARED_FRACATLAS = SHARED / "data" / "fracatlas"

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def shared_dicom_files() -> list[Path | None]:
    """Every file under ../shared/data/dicom, for parametrize; [None] where it is absent,
    so that the one test case made of it skips, saying why (`skip_if_absent`)."""
    return sorted(SHARED_DICOM.rglob("*.dcm")) if SHARED_DICOM.is_dir() else [None]


def skip_if_absent(path: Path | None) -> Path:
    """`path`, or a skip that says ../shared/data/dicom is absent."""
    if path is None:
        print(f"skipping: {SHARED_DICOM} is absent (../shared sits beside the development "
              "checkout)")
        pytest.skip(f"{SHARED_DICOM} is absent")
    return path


#: What each real film of `shared_films` shows, by a reader, by a part of its file name.
FILMS_SHOW = {"RG2": "hip and pelvis", "RG3": "lower leg", "RG1": "chest", "966_fixed": "chest",
              "dx_image": "thorax", "NIH_CXR14_nih": "chest", "JPEG2KLossless": "chest"}


def shared_films() -> list[Path]:
    """The vendor CR/DX files of ../shared/data/dicom and pydicom-data's WG04 set (its
    chest and lower-leg films), each of which FILMS_SHOW describes; a skip that says why
    where ../shared is absent."""
    from pydicom.data import get_testdata_file

    files = sorted(skip_if_absent(SHARED_DICOM if SHARED_DICOM.is_dir() else None)
                   .rglob("*.dcm"))
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"):
        found = get_testdata_file(name)
        if found is not None:
            files.append(Path(str(found)))
    assert {key for key in FILMS_SHOW if any(key in f.name for f in files)} == \
        set(FILMS_SHOW), "a film of FILMS_SHOW is missing"
    return files


def film_shows(path: Path) -> str:
    """What the shared film `path` shows (FILMS_SHOW)."""
    return next(text for key, text in FILMS_SHOW.items() if key in path.name)


def scope_without_body_part(pipeline: Pipeline, path: Path) -> ScopeCheck:
    """What `pipeline` decides for the film at `path` with its Body Part Examined,
    Anatomic Region and age removed, so that only the image can say."""
    from fractured.engine.preprocess import display_pixels, read_dataset
    from fractured.engine.sources import image_ref

    ds = read_dataset(path)
    for keyword in ("BodyPartExamined", "AnatomicRegionSequence", "PatientAge",
                    "PatientBirthDate"):
        if keyword in ds:
            delattr(ds, keyword)
    [finding] = pipeline.run([(image_ref(ds), display_pixels(ds))], [ds])
    return finding.scope


def real_file(name: str) -> Dataset:
    """A real vendor file from ../shared/data/dicom, or a skip that says why."""
    path = SHARED_DICOM / name
    if not path.exists():
        print(f"skipping: {path} is absent (../shared sits beside the development checkout)")
        pytest.skip(f"{path} is absent")
    return pydicom.dcmread(path)


def phantom(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Soft tissue with a dense vertical 'bone' band in the left third and a dense marker
    in the top-left corner (high values = more attenuation), so a flip or an inverted
    grey scale shows in whatever is made from it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(300, 500, size=(rows, cols)).astype(np.uint16)
    pixels[:, cols // 8: cols // 3] += 3000
    pixels[: rows // 10, : cols // 10] = 4000
    return pixels


def xray(study_uid: str, *, patient_id: str = "TEST-0001", modality: str = "DX",
         rows: int = 300, cols: int = 240, monochrome1: bool = False, seed: int = 0,
         series_uid: str | None = None, instance_number: int = 1) -> Dataset:
    """A DX (For Presentation) or CR image with the modules a PACS expects."""
    sop_class = DX_PRESENTATION if modality == "DX" else CR
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient, General Study
    ds.PatientName = "Test^Phantom"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261124"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "103000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC0001"
    # General Series, General Equipment, General Image
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "Synthetic"
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["P", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = "R"
    ds.BodyPartExamined = "LEG"
    ds.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.LowerLeg)]
    ds.BurnedInAnnotation = "NO"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    pixels = phantom(rows, cols, seed)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)  # same anatomy, stored inverted
    ds.PixelData = pixels.tobytes()
    if modality == "DX":  # DX Series, DX Image, DX Detector, DX Anatomy Imaged
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.DetectorType = "DIRECT"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.AcquisitionContextSequence = []
    return ds


def dx_study(n: int, **kwargs: object) -> list[Dataset]:
    """`n` images of one patient, study and series."""
    study, series = generate_uid(), generate_uid()
    return [xray(study, series_uid=series, instance_number=i + 1, seed=i, **kwargs)  # type: ignore[arg-type]
            for i in range(n)]


def write_study(folder: Path, n: int, **kwargs: object) -> list[Path]:
    """Write an n-image study (one series) and return the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(dx_study(n, **kwargs), start=1):
        path = folder / f"img{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def basic_text_sr(path: Path) -> Path:
    """A non-image object (Basic Text SR) for refusal tests."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "TEST-0002", "SR"
    ds.save_as(path, enforce_file_format=True)
    return path
