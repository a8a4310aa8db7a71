"""Moment levels from stored data: the |moment| clusters of each magnetic element and their support.

"auto" moment levels (spin/moments) come from here: the explore stage, `spingen check` and the
benchmarks cluster the raw moments the data keeps (spin.npy) and count the frames behind each level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spingen.data.npy import get_moments, load_system
from spingen.spin.levels import infer_magnitudes, level_support


def moments_by_frame(systems: Sequence[Any], magnetic: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """The raw moments of each magnetic element in deepmd/npy systems as spingen stores them
    (spin.npy), one array per frame; ValueError when an element has none."""
    observed: dict[str, list[np.ndarray]] = {el: [] for el in magnetic}
    for path in systems:
        system = load_system(path)
        names, types = system.data["atom_names"], np.asarray(system.data["atom_types"])
        moments = get_moments(system)
        for el in magnetic:
            if el in names:
                observed[el].extend(moments[:, types == names.index(el)])
    absent = sorted(el for el, v in observed.items() if not v or not np.concatenate(v).size)
    if absent:
        raise ValueError(f"the data holds no moments of {absent} to infer their magnitudes from")
    return observed


def magnitudes_from_data(systems: Sequence[Any], magnetic: Sequence[str], tol: float = 0.3
                         ) -> dict[str, list[float]]:
    """Allowed |moment| levels of each magnetic element, clustered (``infer_magnitudes``) from the
    raw moments of deepmd/npy systems as spingen stores them (spin.npy)."""
    frames = moments_by_frame(systems, magnetic)
    return infer_magnitudes({el: np.concatenate(v) for el, v in frames.items()}, tol=tol)


@dataclass(frozen=True)
class InferredLevels:
    """Levels clustered from data with their support (frames holding each level); `refused`: the
    levels seen in fewer than min_support frames, left out of `kept`."""

    kept: dict[str, list[float]]
    support: dict[str, dict[float, int]]
    refused: dict[str, list[float]]

    def describe(self) -> str:
        """'Ni 1.736 (87 frames); Co 0 (20 frames), 0.56 (1 frame, refused)'."""
        def level(el, value):
            n = self.support[el][value]
            refused = ", refused" if value in self.refused.get(el, []) else ""
            return f"{value:g} ({n} frame{'s' if n != 1 else ''}{refused})"
        return "; ".join(f"{el} " + ", ".join(level(el, v) for v in levels) for el, levels in self.support.items())


def supported_magnitudes(systems: Sequence[Any], magnetic: Sequence[str], min_support: int, tol: float = 0.3
                         ) -> InferredLevels:
    """``magnitudes_from_data`` with each level's support; levels held by fewer than min_support
    frames (or than the data has frames, when it has fewer) are refused: a spin search would walk
    into states the model has barely seen."""
    frames = moments_by_frame(systems, magnetic)
    levels = infer_magnitudes({el: np.concatenate(v) for el, v in frames.items()}, tol=tol)
    kept, support, refused = {}, {}, {}
    for el, values in levels.items():
        counts = level_support(frames[el], values)
        support[el] = dict(zip(values, counts))
        needed = min(min_support, len(frames[el]))  # data of fewer frames than min_support: every level seen
        keep = [v for v, n in zip(values, counts) if n >= needed]
        kept[el] = keep
        if len(keep) < len(values):
            refused[el] = [v for v in values if v not in keep]
    return InferredLevels(kept, support, refused)
