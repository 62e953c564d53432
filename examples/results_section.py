"""One section of docs/results.md, replaced in place between its markers: each results script owns
its section, so ``make results`` can re-run any of them without touching the others."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def write_section(begin: str, end: str, text: str, path: Path = RESULTS) -> None:
    """Put ``text`` between the ``begin`` and ``end`` markers (appended with them if absent)."""
    current = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current:
        current = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)
