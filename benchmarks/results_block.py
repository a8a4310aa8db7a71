"""What every benchmark shares: the writer of its results into its docs page, the CPU it ran on."""

from __future__ import annotations

import json
import re
from pathlib import Path

STEP_DONE = re.compile(r"^(\S+ \S+) INFO iter (\d{6}) step (\d{2}): (\w+?)_(\w+) done in ([\d.]+) s")


def write_results(doc: Path, begin: str, end: str, block: str) -> None:
    """Replace what stands between the markers `begin` and `end` of doc with block (markers kept)."""
    text = doc.read_text()
    start = text.index(begin) + len(begin)
    stop = text.index(end, start)
    doc.write_text(text[:start] + "\n\n" + block + "\n" + text[stop:])


def write_if_marked(doc: Path, begin: str, end: str, block: str) -> None:
    """write_results where doc has the marker `begin`; else say where to add it."""
    if begin in doc.read_text():
        write_results(doc, begin, end, block)
    else:
        print(f"(not written: {doc} has no marker {begin!r}; add it with {end!r} where the block goes)")


def keep_rows(store: Path, rows: list[dict]) -> list[dict]:
    """Every row of the JSON list in store with rows appended, written back (read now: runs may overlap)."""
    kept = (json.loads(store.read_text()) if store.is_file() else []) + rows
    store.write_text(json.dumps(kept, indent=1))
    return kept


def step_durations(log: Path) -> dict[str, float]:
    """Total seconds per 'phase_stage' over the main loop (init's own loop counted as init_*)."""
    totals: dict[str, float] = {}
    in_init = True
    for line in log.read_text().splitlines():
        match = STEP_DONE.match(line)
        if match:
            _, iteration, _, phase, stage, seconds = match.groups()
            if stage == "train":
                in_init = False
            key = f"{'init ' if in_init else ''}{phase}_{stage}"
            totals[key] = totals.get(key, 0.0) + float(seconds)
    return totals


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def time_two_frames(calc, atoms, folder: Path) -> tuple[float, dict, float]:
    """An explore task's frame writer (deviations + spin disagreement) at atoms, then at atoms displaced by
    0.02 A rms: (seconds of the first frame, where they went, seconds of the next frame)."""
    import time

    import numpy as np

    from spingen.tasks.explore import FrameWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = FrameWriter(folder, calc, spin_devi_freq=1)
    t0 = time.perf_counter()
    writer(0, atoms)
    first = time.perf_counter() - t0
    split = dict(writer.timings)
    atoms.positions += np.random.default_rng(2).normal(0, 0.02, atoms.positions.shape)
    atoms.get_potential_energy()
    t0 = time.perf_counter()
    writer(10, atoms)  # the next frame: members start from what the first one left
    return first, split, time.perf_counter() - t0
