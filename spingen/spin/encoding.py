"""The collinear spin encoding of the paper: a virtual atom at z + eta*S + d above each magnetic ion.

Stored data keeps raw DFT moments S (uB). deepmd-kit places the virtual atom at
position + spin_vector * virtual_scale, so with virtual_scale = eta the spin vector it must see
is (0, 0, S + d/eta). Only training inputs and model evaluation go through this module.

Canonical sign (``canonical``): collinear DFT+U energies do not change when every moment is
reversed, E(S) = E(-S). A canonical encoding shows deepmd-kit one representative of each pair
{S, -S}, in training and in evaluation alike, so a model is exactly reversal-symmetric and never
sees the sector it was not trained on. The representative has a positive total moment of the
magnetic ions; when |total| is within BALANCE_TOLERANCE (antiparallel states, DFT noise
included), the first magnetic ion beyond it points up (else the first nonzero one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SIDECAR = "spin_encoding.json"
BALANCE_TOLERANCE = 0.5  # uB: a canonical state with |total moment| up to this is "antiparallel"


@dataclass(frozen=True)
class SpinEncoding:
    """eta (virtual_scale, A/uB) and d (offset, A) for the magnetic elements of a type map."""

    magnetic: tuple[str, ...]
    virtual_scale: float
    offset: float
    canonical: bool = False

    def virtual_shift(self, moments: np.ndarray | float) -> np.ndarray:
        """Height (A) of the virtual atom above its real atom: eta*S + d."""
        return self.virtual_scale * np.asarray(moments, dtype=float) + self.offset

    def to_deepmd(self, moments: np.ndarray, symbols: Sequence[str], gauged: bool = True) -> np.ndarray:
        """Raw moments (nframes, natoms) -> deepmd-kit spin vectors (nframes, natoms, 3).

        Non-magnetic atoms get a zero vector; magnetic ones (0, 0, S + d/eta). gauged=False: the moments
        as given, without the canonical sign (a configuration seen in the sector of +1).
        """
        moments = np.atleast_2d(np.asarray(moments, dtype=float))
        mask = self.magnetic_mask(symbols)
        if gauged:
            moments = moments * self.gauge_signs(moments, symbols)[:, None]
        spin = np.zeros(moments.shape + (3,))
        spin[..., 2] = np.where(mask, moments + self.offset / self.virtual_scale, 0.0)
        return spin

    def gauge_signs(self, moments: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
        """+1 or -1 per frame (nframes,): the factor ``to_deepmd`` applies to the moments (all +1 unless
        canonical). Odd: reversing a frame's moments reverses its sign, so S and -S are encoded alike;
        -dE/dS of the model at S is this sign times the z component of deepmd-kit's force_mag."""
        moments = np.atleast_2d(np.asarray(moments, dtype=float))
        if not self.canonical:
            return np.ones(len(moments))
        magnetic = moments[:, self.magnetic_mask(symbols)]
        total = magnetic.sum(axis=1)

        def first_sign(threshold: float) -> np.ndarray:
            beyond = np.abs(magnetic) > threshold
            first = np.argmax(beyond, axis=1)
            values = magnetic[np.arange(len(magnetic)), first] if magnetic.shape[1] else np.zeros(len(magnetic))
            return np.where(beyond.any(axis=1), np.sign(values), 0.0)

        signs = np.where(np.abs(total) > BALANCE_TOLERANCE, np.sign(total), 0.0)
        for fallback in (first_sign(BALANCE_TOLERANCE), first_sign(0.0)):
            signs = np.where(signs == 0, fallback, signs)
        return np.where(signs == 0, 1.0, signs)

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
    def load(cls, path: str | Path) -> SpinEncoding:
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["magnetic"]), float(data["virtual_scale"]), float(data["offset"]),
                   bool(data.get("canonical", False)))

    @classmethod
    def beside(cls, model: str | Path) -> SpinEncoding | None:
        """The encoding saved next to a frozen model (symlinks followed), or None."""
        sidecar = Path(model).resolve().parent / SIDECAR
        return cls.load(sidecar) if sidecar.is_file() else None
