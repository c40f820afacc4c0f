"""Where the tests find the checkout, whichever tier folder they sit in."""

from pathlib import Path

#: The repository root: docs, deploy, engines, tools.
REPO = Path(__file__).resolve().parents[1]
