"""What every benchmark shares: the writer of its results into its docs page, the CPU it ran on."""

from __future__ import annotations

from pathlib import Path


def write_results(doc: Path, begin: str, end: str, block: str) -> None:
    """Replace what stands between the markers `begin` and `end` of doc with block (markers kept)."""
    text = doc.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    doc.write_text(text[:start] + "\n\n" + block + "\n" + text[stop:])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
