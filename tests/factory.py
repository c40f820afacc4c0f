"""Small, valid projection X-ray DICOM files made on the fly (no patient is real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def bone_phantom(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A soft-tissue background with a dense 'bone' bar: high values = more attenuation."""
    rng = np.random.default_rng(seed)
    img = 800 + rng.normal(0, 20, (rows, cols))
    img[rows // 4: 3 * rows // 4, cols // 2 - cols // 10: cols // 2 + cols // 10] = 3000
    return np.clip(img, 0, 4095).astype(np.uint16)


def xray(study_uid: str, *, patient_id: str = "TEST-0001", modality: str = "DX",
         rows: int = 320, cols: int = 256, monochrome1: bool = False, seed: int = 0,
         series_uid: str | None = None, instance_number: int = 1) -> Dataset:
    """A DX (For Presentation) or CR image with the modules a PACS expects."""
    sop_class = DX_PRESENTATION if modality == "DX" else CR
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientName = "Test^Phantom"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261124"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "fractured-tests"
    ds.BodyPartExamined = "HAND"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    pixels = bone_phantom(rows, cols, seed)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)  # same anatomy, stored inverted
    ds.PixelData = pixels.tobytes()
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.DetectorType = "DIRECT"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.AcquisitionDeviceProcessingDescription = ""
        ds.ViewPosition = "AP"
        ds.ImageLaterality = "L"
        ds.PatientOrientation = ["L", "F"]
        ds.KVP = ""
    return ds


def write_study(folder: Path, n: int, **kwargs: object) -> list[Path]:
    """Write an n-image study (one series) and return the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = xray(study, series_uid=series, instance_number=i + 1, seed=i, **kwargs)  # type: ignore[arg-type]
        path = folder / f"img{i + 1}.dcm"
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
