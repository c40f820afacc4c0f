"""The documentation a user's clone holds: every relative link in it resolves, and
none of it sends the reader to ../shared, which only the development checkout has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*(ROOT / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md")),
         ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: [text](target) and ![alt](target), the target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group(1).split("#")[0]
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: links to missing {broken}"


def test_the_front_door_does_not_send_a_user_to_shared() -> None:
    assert "../shared" not in (ROOT / "README.md").read_text(encoding="utf-8")
