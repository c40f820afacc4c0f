"""Durable folders and names: a folder made for an acknowledged file survives a power
cut with it, and a UID that names a file is only digits and dots."""

from __future__ import annotations

from pathlib import Path

import pytest

from fractured import durable
from fractured.dicom_uids import is_uid


def test_each_new_folder_is_fsynced_into_its_parent(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda path: (synced.append(path), real(path)))
    study = tmp_path / "incoming" / "1.2.3"
    durable.write_durably(study / "1.2.3.4.dcm", b"DICM")
    # the parent of each created folder, then the file's own folder after the rename
    assert synced == [tmp_path, tmp_path / "incoming", study]
    synced.clear()
    durable.write_durably(study / "1.2.3.5.dcm", b"DICM")  # the folder exists: no more
    assert synced == [study]


@pytest.mark.parametrize("value", ["1.2.840.10008", "0", "1.2.3.4"])
def test_a_uid_of_digits_and_dots_names_a_file(value: str) -> None:
    assert is_uid(value)


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3/..", "", "1..2", ".1", "1.2.", "1" * 65,
                                   "1.2.3 "])
def test_anything_else_is_not_a_uid(value: str) -> None:
    assert not is_uid(value)
