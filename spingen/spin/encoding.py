"""The collinear spin encoding of the paper: a virtual atom at z + eta*S + d above each magnetic ion.

Stored data keeps raw DFT moments S (uB). deepmd-kit places the virtual atom at
position + spin_vector * virtual_scale, so with virtual_scale = eta the spin vector it must see
is (0, 0, S + d/eta). Only training inputs and model evaluation go through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


SIDECAR = "spin_encoding.json"


@dataclass(frozen=True)
class SpinEncoding:
    """eta (virtual_scale, A/uB) and d (offset, A) for the magnetic elements of a type map."""

    magnetic: tuple[str, ...]
    virtual_scale: float
    offset: float

    def virtual_shift(self, moments: np.ndarray | float) -> np.ndarray:
        """Height (A) of the virtual atom above its real atom: eta*S + d."""
        return self.virtual_scale * np.asarray(moments, dtype=float) + self.offset

    def to_deepmd(self, moments: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
        """Raw moments (nframes, natoms) -> deepmd-kit spin vectors (nframes, natoms, 3).

        Non-magnetic atoms get a zero vector; magnetic ones (0, 0, S + d/eta).
        """
        moments = np.atleast_2d(np.asarray(moments, dtype=float))
        mask = self.magnetic_mask(symbols)
        spin = np.zeros(moments.shape + (3,))
        spin[..., 2] = np.where(mask, moments + self.offset / self.virtual_scale, 0.0)
        return spin

    def from_deepmd(self, spin: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
        """deepmd-kit spin vectors (nframes, natoms, 3) -> raw moments (nframes, natoms)."""
        spin = np.asarray(spin, dtype=float)
        mask = self.magnetic_mask(symbols)
        return np.where(mask, spin[..., 2] - self.offset / self.virtual_scale, 0.0)

    def magnetic_mask(self, symbols: Sequence[str]) -> np.ndarray:
        """Boolean mask of the magnetic atoms among the given chemical symbols."""
        return np.array([s in self.magnetic for s in symbols], dtype=bool)

    def overlapping_moments(self, moments: Iterable[float], min_distance: float) -> list[float]:
        """Moments whose virtual atom would sit closer than min_distance (A) to its real atom."""
        return sorted({float(m) for m in moments if abs(self.virtual_shift(m)) < min_distance})

    def save(self, path: str | Path) -> None:
        """Write eta, d and the magnetic elements as JSON (the train stage puts it beside each model)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SpinEncoding":
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["magnetic"]), float(data["virtual_scale"]), float(data["offset"]))

    @classmethod
    def beside(cls, model: str | Path) -> "SpinEncoding | None":
        """The encoding saved next to a frozen model (symlinks followed), or None."""
        sidecar = Path(model).resolve().parent / SIDECAR
        return cls.load(sidecar) if sidecar.is_file() else None
