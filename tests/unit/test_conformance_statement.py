"""The DICOM Conformance Statement (docs/conformance-statement.md) says what the code does.

A PACS engineer configures the hospital's PACS from that document: a SOP class, transfer
syntax, status code or code value in it that the node no longer uses would misconfigure
the PACS silently. So its generated tables must equal what tools/conformance_tables.py
prints from the code today, and the hand-written ones are held against real objects:
an SR and overlays built as the worker builds them, the listener's status constants,
the configuration's sections.
"""

from __future__ import annotations

import dataclasses
import io
import re
import typing
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fractured.config import (
    AccessSettings,
    DeliverySettings,
    Destination,
    NodeSettings,
    Peer,
    ResultsSettings,
    StudySettings,
    TlsSettings,
)
from fractured.daemon import audit, scp, sender
from fractured.daemon.access import Refusal
from fractured.daemon.sender import proposed_syntaxes
from fractured.daemon.worker import OVERLAY_SERIES_NUMBER, SR_SERIES_NUMBER
from fractured.engine.findings import (
    Box,
    DecisionLevel,
    Finding,
    ImageRef,
    ModelInfo,
    OperatingPoints,
)
from fractured.engine.preprocess import display_pixels
from fractured.engine.regions import PointsRegion, Region
from fractured.results.overlay import make_overlay
from fractured.results.sr import make_sr
from fractured.results.summary import make_summary
from tests.factory import dx_study
from tools import conformance_tables

TEXT = conformance_tables.STATEMENT.read_text(encoding="utf-8")
UID_CELL = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")


def checked_table(name: str) -> list[list[str]]:
    """The body rows (cells stripped) of the table under `<!-- checked: name -->`."""
    lines = TEXT.splitlines()
    start = lines.index(f"<!-- checked: {name} -->") + 1
    rows = []
    for line in lines[start + 2:]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"the table under 'checked: {name}' is empty"
    return rows


def finding(source: Dataset, model: ModelInfo, probability: float,
            boxes: tuple[Box, ...] = (), spread: float | None = None,
            region: PointsRegion | None = None) -> Finding:
    image = ImageRef(str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                     str(source.SOPInstanceUID), str(source.SOPClassUID))
    heat = np.zeros((source.Rows, source.Columns), np.float32)
    heat[:, : source.Columns // 2] = 1.0
    return Finding(image, np.float32(probability), OperatingPoints(0.3, 0.7), heat, model,
                   boxes, spread, operating_region=region)


def written(ds: Dataset) -> Dataset:
    """`ds` as the worker writes it to the spool and the sender reads it back."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def results() -> dict[str, Dataset]:
    """One of each result object, with every optional item the SR can hold: boxes of
    both levels, a TTA spread, the untrained warning, whose operating points decided."""
    sources = dx_study(2)
    model = ModelInfo("fractured-test", "0.0.1", trained=False)
    findings = [
        finding(sources[0], model, 0.8, spread=0.05, boxes=(
            Box(10, 20, 80, 90, 0.9, DecisionLevel.LIKELY),
            Box(100, 120, 150, 200, 0.4, DecisionLevel.POSSIBLE))),
        finding(sources[1], model, 0.1, region=Region.HAND),
    ]
    series = generate_uid()
    return {
        "sr": written(make_sr(findings, sources, series_instance_uid=generate_uid(),
                              series_number=SR_SERIES_NUMBER, device_uid=generate_uid())),
        "overlay": written(make_overlay(findings[0], sources[0], series_instance_uid=series,
                                        series_number=OVERLAY_SERIES_NUMBER,
                                        instance_number=1)),
        "summary": written(make_summary(findings, sources,
                                        [display_pixels(ds) for ds in sources],
                                        series_instance_uid=series,
                                        series_number=OVERLAY_SERIES_NUMBER,
                                        instance_number=3)),
    }


@pytest.mark.parametrize("name", list(conformance_tables.TABLES))
def test_generated_table_is_the_codes(name: str) -> None:
    in_statement = conformance_tables.marked_tables(TEXT)
    assert name in in_statement, f"the statement has no '<!-- generated: {name} -->' table"
    assert in_statement[name] == conformance_tables.TABLES[name](), (
        f"table {name!r} differs from the code: run "
        "`python -m tools.conformance_tables --write docs/conformance-statement.md` "
        "and read what changed")


def test_rewrite_keeps_a_current_statement_as_it_is() -> None:
    assert conformance_tables.rewrite(TEXT) == TEXT


def test_scu_contexts_are_those_of_the_result_files(results: dict[str, Dataset]) -> None:
    listed = {tuple(UID_CELL.findall(" ".join(row))) for row in checked_table("scu-contexts")}
    made = {(str(ds.SOPClassUID), *proposed_syntaxes(str(ds.file_meta.TransferSyntaxUID)))
            for ds in results.values()}
    assert listed == made


def test_result_objects_are_as_listed(results: dict[str, Dataset]) -> None:
    rows = {row[0].split(",")[0]: row for row in checked_table("result-objects")}
    for label, key in [("Fracture SR", "sr"), ("Overlay", "overlay"),
                       ("Summary image", "summary")]:
        ds, row = results[key], rows[label]
        meta = ds.file_meta
        assert row[1] == f"`{ds.SOPClassUID}`"
        assert row[2] == ds.Modality
        assert row[3] == str(ds.SeriesNumber)
        assert row[5] == f"`{meta.ImplementationClassUID}`"
        assert row[6] == f"`{meta.ImplementationVersionName}`"


def _codes(items: Iterator[Dataset] | list[Dataset]) -> Iterator[tuple[str, str]]:
    """(code value, scheme) of every coded entry anywhere in `items`, nested ones too."""
    for item in items:
        value = item.get("CodeValue") or item.get("LongCodeValue")
        if value and "CodingSchemeDesignator" in item:
            yield str(value), str(item.CodingSchemeDesignator)
        for element in item:
            if element.VR == "SQ":
                yield from _codes(element.value)


def test_every_code_in_the_results_is_in_the_statement(results: dict[str, Dataset]) -> None:
    rows = [line for line in TEXT.splitlines() if line.startswith("|")]
    missing = sorted(
        (value, scheme) for ds in results.values() for value, scheme in set(_codes([ds]))
        if not any(f"`{value}`" in row and f"| {scheme} |" in row for row in rows))
    assert not missing, f"coded concepts in the results but in no table of the statement: {missing}"


def test_c_store_statuses_are_the_listeners() -> None:
    listed = {int(row[0], 16) for row in checked_table("c-store-statuses")}
    # The module's public integer constants are its statuses (PS3.4 B.2.3).
    constants = {value for name, value in vars(scp).items()
                 if name.isupper() and not name.startswith("_") and type(value) is int}
    pynetdicom_handler_error = 0xC211
    assert listed == constants | {pynetdicom_handler_error}


def _statuses(cell: str) -> set[int]:
    """The statuses a cell lists: `0x0001, 0xB000` or a range `0xA900-0xA9FF`."""
    found: set[int] = set()
    for part in cell.split(","):
        low, _, high = part.strip().partition("-")
        found |= set(range(int(low, 16), int(high or low, 16) + 1))
    return found


def test_c_store_scu_statuses_are_the_senders() -> None:
    rows = {row[0]: row for row in checked_table("scu-statuses") if row[0].startswith("0x")}
    by_outcome: dict[str, set[int]] = {"delivered": set(), "permanent": set()}
    for cell, row in rows.items():
        outcome = "delivered" if row[2].startswith("Delivered") else (
            "permanent" if row[2].startswith("Permanent") else "")
        assert outcome, f"status row {cell!r} is neither delivered nor permanent"
        by_outcome[outcome] |= _statuses(cell)
    assert by_outcome["delivered"] == {sender.SUCCESS, sender.ALREADY_STORED, *sender.WARNINGS}
    permanent = {status for status in range(0x10000) if sender.is_permanent_failure(status)}
    assert by_outcome["permanent"] == permanent


def test_every_rejection_reason_is_named() -> None:
    reasons = {str(r) for r in Refusal} | set(audit.REJECTION_REASONS.values())
    missing = sorted(r for r in reasons | {"tls_handshake_failed"} if f"`{r}`" not in TEXT)
    assert not missing, f"association.rejected reasons the statement does not name: {missing}"


@pytest.mark.parametrize("section, settings", [
    ("[node]", NodeSettings), ("[access]", AccessSettings), ("[[access.peers]]", Peer),
    ("[tls]", TlsSettings), ("[study]", StudySettings), ("[results]", ResultsSettings),
    ("[delivery]", DeliverySettings), ("[[destinations]]", Destination),
])
def test_every_setting_of_the_networking_sections_is_listed(section: str,
                                                            settings: type) -> None:
    hints = typing.get_type_hints(settings)
    missing = [f"{section}.{f.name}" for f in dataclasses.fields(settings)
               if hints[f.name] != list[Peer]  # [access].peers: the [[access.peers]] tables
               and f"`{section}.{f.name}`" not in TEXT]
    assert not missing, f"settings the statement's configuration section lacks: {missing}"


def test_tls_cipher_suites_are_the_contexts() -> None:
    """The suites the statement lists are those the listener and the sender offer."""
    import ssl

    from fractured.daemon import tls

    listed = {row[0].replace(" ", "v"): {c.strip() for c in row[1].split(",")}
              for row in checked_table("tls-ciphers")}
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        offered: dict[str, set[str]] = {}
        for cipher in tls.bcp195_context(purpose).get_ciphers():
            offered.setdefault(cipher["protocol"], set()).add(cipher["name"])
        assert offered == listed
