"""The documentation a user's clone holds: every relative link in it resolves, and
none of it sends the reader to ../shared, which only the development checkout has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.paths import REPO

PAGES = [*(REPO / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md")),
         REPO / "bench" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
#: [text](target) and ![alt](target), the target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group(1).split("#")[0]
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert broken == [], f"{page.relative_to(REPO)}: links to missing {broken}"


#: Records of what was run, kept as they were written: each run's folder under
#: docs/training (its notes and reports name the data as the run read it), and the
#: shipped model card's record of what was tried, which changes with the next ship.
RECORDS = [path for path in (REPO / "docs" / "training").iterdir() if path.is_dir()] + [
    REPO / "docs" / "training" / "WHAT-WAS-TRIED.md"]


def test_no_page_sends_a_user_to_shared() -> None:
    guides = [page for page in PAGES
              if not any(page == record or page.is_relative_to(record) for record in RECORDS)]
    assert REPO / "docs" / "training.md" in guides and REPO / "README.md" in guides
    sent = [str(page.relative_to(REPO)) for page in guides
            if "../shared" in page.read_text(encoding="utf-8")]
    assert sent == []
