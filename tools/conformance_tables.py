"""The DICOM Conformance Statement's tables, printed from the code that they describe.

docs/conformance-statement.md holds tables of UIDs (SOP classes and transfer syntaxes
the listener accepts, the codes our results carry, the implementation identity) that
would silently go stale if they were typed by hand. Each one sits in the statement under
a marker line `<!-- generated: NAME -->`; this module makes them from the running code
(the listener's real AE from `fractured.daemon.scp.build_ae`, the constants of
`fractured.results.codes`), tests/unit/test_conformance_statement.py fails when the statement
and the code differ, and `--write` puts the code's tables back into the statement.

    python -m tools.conformance_tables                     # print every table
    python -m tools.conformance_tables --write docs/conformance-statement.md
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom.pixels.decoders.base import get_decoder
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fractured.config import Settings
from fractured.daemon import scp
from fractured.results import codes

STATEMENT = Path(__file__).resolve().parent.parent / "docs" / "conformance-statement.md"
MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z0-9-]+) -->$")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _name(uid: str) -> str:
    name = UID(uid).name
    return "(private or unknown)" if name == uid else name


def _listener_contexts() -> dict[str, list[str]]:
    """{abstract syntax: transfer syntaxes} of the listener as it is built at start-up."""
    ae = scp.build_ae(Settings())
    return {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
            for cx in ae.supported_contexts}


def verification() -> str:
    syntaxes = _listener_contexts()[Verification]
    return _table(["SOP Class", "UID", "Transfer syntaxes"],
                  [[_name(Verification), f"`{Verification}`",
                    ", ".join(f"{_name(ts)} `{ts}`" for ts in syntaxes)]])


def storage_analysed() -> str:
    return _table(["SOP Class", "UID"],
                  [[_name(uid), f"`{uid}`"]
                   for uid in sorted(scp.ACCEPTED_SOP_CLASSES, key=_name)])


def storage_contexts() -> str:
    storage = sorted((uid for uid in _listener_contexts() if uid != Verification), key=_name)
    return _table(["SOP Class", "UID", "Stored"],
                  [[_name(uid), f"`{uid}`",
                    "yes" if uid in scp.ACCEPTED_SOP_CLASSES else "0x0122 unless configured"]
                   for uid in storage])


def _decodable(uid: str) -> bool:
    """Whether pydicom, with the plugins installed here, can decode pixel data in `uid`."""
    try:
        return bool(get_decoder(UID(uid)).is_available)
    except NotImplementedError:
        return False


def transfer_syntaxes() -> str:
    storage = {uid: tss for uid, tss in _listener_contexts().items() if uid != Verification}
    offered = {tuple(tss) for tss in storage.values()}
    if len(offered) != 1:
        raise SystemExit("storage contexts offer different transfer syntaxes: the statement's "
                         "single transfer syntax table cannot describe them")
    (syntaxes,) = offered
    return _table(["Transfer Syntax", "UID", "Pixel data decoded for analysis"],
                  [[_name(ts), f"`{ts}`", "yes" if _decodable(ts) else "no (stored, skipped)"]
                   for ts in syntaxes])


def coded_concepts() -> str:
    """Every Code constant of fractured.results.codes (body parts have their own table)."""
    named: list[tuple[str, Code]] = [(k, v) for k, v in vars(codes).items()
                                     if isinstance(v, Code)]
    named += [(f"LEVELS[{level.name}]", code) for level, code in codes.LEVELS.items()]
    named += [(f"OPERATING_POINTS_FROM[{region}]", code)
              for region, code in codes.OPERATING_POINTS_FROM.items()]
    return _table(["Code Value", "Coding Scheme", "Code Meaning", "codes.py"],
                  [[f"`{c.value}`", c.scheme_designator, c.meaning, f"`{k}`"]
                   for k, c in named])


def body_parts() -> str:
    return _table(["Body Part Examined", "Code Value", "Coding Scheme", "Code Meaning"],
                  [[f"`{part}`", f"`{c.value}`", c.scheme_designator, c.meaning]
                   for part, c in codes.BODY_PARTS.items()])


def implementation() -> str:
    ae = AE()
    return _table(["Where", "Implementation Class UID", "Implementation Version Name"], [
        ["A-ASSOCIATE-RQ and -AC (listener and sender)", f"`{ae.implementation_class_uid}`",
         f"`{ae.implementation_version_name}`"],
        ["File Meta of received images in the spool", f"`{PYNETDICOM_IMPLEMENTATION_UID}`",
         f"`{PYNETDICOM_IMPLEMENTATION_VERSION}`"],
    ])


TABLES: dict[str, Callable[[], str]] = {
    "verification": verification,
    "storage-analysed": storage_analysed,
    "storage-contexts": storage_contexts,
    "transfer-syntaxes": transfer_syntaxes,
    "coded-concepts": coded_concepts,
    "body-parts": body_parts,
    "implementation": implementation,
}


def marked_tables(text: str) -> dict[str, str]:
    """{marker name: the table under it} as the statement has them."""
    lines = text.splitlines()
    found: dict[str, str] = {}
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if match:
            table = []
            for row in lines[index + 1:]:
                if not row.startswith("|"):
                    break
                table.append(row)
            found[match["name"]] = "\n".join(table)
    return found


def rewrite(text: str) -> str:
    """`text` with every marked table replaced by the code's."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        out.append(line)
        index += 1
        match = MARKER.match(line)
        if match and match["name"] in TABLES:
            out.append(TABLES[match["name"]]())
            while index < len(lines) and lines[index].startswith("|"):
                index += 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="STATEMENT",
                        help="replace the marked tables in this file with the code's")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(rewrite(args.write.read_text(encoding="utf-8")),
                              encoding="utf-8")
        return 0
    for name, make in TABLES.items():
        sys.stdout.write(f"<!-- generated: {name} -->\n{make()}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
