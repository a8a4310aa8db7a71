"""The one writer of a benchmark's results into its docs page, between its two marker lines."""

from __future__ import annotations

from pathlib import Path


def write_results(doc: Path, begin: str, end: str, block: str) -> None:
    """Replace what stands between the markers `begin` and `end` of doc with block (markers kept)."""
    text = doc.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    doc.write_text(text[:start] + "\n\n" + block + "\n" + text[stop:])
