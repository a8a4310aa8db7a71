"""A cheap certificate that the moments held along an MD trajectory are still the lowest.

Most MD steps do not change the spin ground state, and a search at every step pays for proving
it again. The certificate proves it from what the MD step computes anyway: the energy and the
spin forces -dE/dS at the current moments S0.

The competitors of S0 are every single-ion move to another allowed level, every two-ion move
(when there are at most pair_limit of them: 135 for 6 ions of 4 levels, 252 for 8) and the lowest
configurations of the last search. Each is evaluated exactly at some geometry, its reference: its
gap G_c = E(c) - E(S0) there and the spin forces g at S0 there. At a later geometry its gap is
predicted from the change of the spin forces since, g' - g:

    G_c' = G_c - (g' - g) . (c - S0)

exact for single-ion moves in a landscape E = sum_i f_i(S_i) + sum_ij J_ij S_i S_j whose geometry
dependence lies in the couplings; the on-site curves' own change is its error, and for moves of
several ions also the change of their mutual coupling. That error is measured whenever a
competitor is evaluated again (predicted vs evaluated) and widens the allowance with the age of the
reference. A step evaluates only the competitors predicted within margin + safety x (error per
step) x age, or older than max_age, in one energy-only batch; none: S0 is certified lowest with no
evaluation at all (never before an error was measured). The caller moves the moments when an
evaluated competitor is lower. The ensemble's members evaluate the driving model's competitors
before they search alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spingen.spin.levels import MomentLevels

SAME_ENERGY = 1e-6  # eV: a competitor lower than the current moments by less is numerical noise


@dataclass(frozen=True)
class CertificateSettings:
    """The knobs of the certificate (param.json: model_devi_spin_certify)."""

    margin: float = 0.002  # eV (of the cell): a competitor predicted closer than this is evaluated
    max_age: int = 20  # and every competitor at least every max_age geometries
    search_every: int = 500  # and run a full warm search at least this often (moves of several ions)
    pair_limit: int = 300  # two-ion moves are competitors too when a configuration has at most this many
    safety: float = 2.0  # times the measured prediction error per step, times the age

    def __post_init__(self) -> None:
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0 eV, got {self.margin}")
        if self.pair_limit < 0:
            raise ValueError(f"pair_limit must be >= 0, got {self.pair_limit}")
        for name in ("max_age", "search_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.safety >= 0:
            raise ValueError(f"safety must be >= 0, got {self.safety}")


def pair_moves(levels: MomentLevels, row: np.ndarray) -> np.ndarray:
    """Every allowed level-index row in which exactly two ions of `row` changed level."""
    row = np.asarray(row, dtype=np.int8).reshape(-1)
    others = [np.flatnonzero(np.arange(n) != row[i]) for i, n in enumerate(levels.n_values)]
    found = []
    for i in range(levels.n_magnetic):
        for j in range(i + 1, levels.n_magnetic):
            li, lj = np.meshgrid(others[i], others[j], indexing="ij")
            moves = np.repeat(row[None, :], li.size, axis=0)
            moves[:, i], moves[:, j] = li.ravel(), lj.ravel()
            found.append(moves)
    if not found:
        return np.empty((0, levels.n_magnetic), dtype=np.int8)
    moves = np.concatenate(found)
    return moves[levels.is_allowed(moves)]


def n_pair_moves(levels: MomentLevels) -> int:
    """How many two-ion moves a configuration has (at most; a fixed total moment allows fewer)."""
    k = levels.n_values - 1
    return int((k.sum() ** 2 - (k**2).sum()) // 2)


def competitors(levels: MomentLevels, moments: np.ndarray, lowest: list[np.ndarray] | None = None,
                pair_limit: int = 0, first_up: bool = False) -> np.ndarray:
    """Every allowed single-ion move of `moments`, every two-ion move when there are at most pair_limit of
    them, then the configurations of `lowest` that differ from it. Under a fixed global sign S and -S
    are one state: each is given in the orientation nearest to `moments` (right for a reversal-symmetric
    energy), or first-up with first_up=True (the representative the search evaluates, for an energy
    that is not symmetric)."""
    moments = np.asarray(moments, dtype=float)
    row = levels.to_indices(moments)[0]
    moves = levels.single_moves(row)
    if 0 < n_pair_moves(levels) <= pair_limit:
        moves = np.concatenate([moves, pair_moves(levels, row)])
    if first_up and levels.fix_global_sign and len(moves):
        moves = levels.first_up(moves)
    found = [levels.to_moments(moves)] if len(moves) else []
    for state in lowest or ():
        state = np.asarray(state, dtype=float)
        nearer = np.abs(-state - moments).sum() < np.abs(state - moments).sum()
        if levels.fix_global_sign and nearer and not first_up:
            state = -state
        if np.abs(state - moments).max() > 1e-9:
            found.append(state[None])
    if not found:
        return np.empty((0, levels.n_magnetic))
    return np.unique(np.round(np.concatenate(found), 9), axis=0)


class GroundStateCertificate:
    """The competitors of the held moments S0, each with the gap and the -dE/dS at S0 of the geometry
    where it was last evaluated (its own reference), and how many geometries ago that was."""

    def __init__(self, levels: MomentLevels, settings: CertificateSettings | None = None) -> None:
        self.levels = levels
        self.settings = settings or CertificateSettings()
        self.moments: np.ndarray | None = None  # S0; None: no reference (the caller evaluates every competitor)
        self.competitors = np.empty((0, levels.n_magnetic))
        self.gaps = np.empty(0)  # E(c) - E(S0) at each competitor's reference
        self.minus_grads = np.empty((0, levels.n_magnetic))  # -dE/dS at S0 at each competitor's reference
        self.ages = np.empty(0, dtype=int)  # geometries since each competitor's reference
        self.error_per_step: float | None = None  # measured |predicted - evaluated| gap per geometry, eV

    def holds_for(self, moments: np.ndarray) -> bool:
        """Whether the certificate speaks of these moments (else the caller evaluates every competitor)."""
        return self.moments is not None and np.allclose(moments, self.moments, atol=1e-9)

    def predicted_gaps(self, minus_grad: np.ndarray, indices: np.ndarray | slice = slice(None)) -> np.ndarray:
        """E(c) - E(S0) of competitors[indices] at the geometry where -dE/dS at S0 is minus_grad."""
        step = np.asarray(minus_grad, dtype=float) - self.minus_grads[indices]
        return self.gaps[indices] - np.sum(step * (self.competitors[indices] - self.moments), axis=1)

    def to_check(self, minus_grad: np.ndarray) -> np.ndarray:
        """At a new geometry (ages all competitors by one): the indices of the competitors that must be
        evaluated, those predicted within margin + safety x error per step x age, or older than max_age.
        Empty: S0 is certified lowest here without an evaluation."""
        s = self.settings
        self.ages += 1
        if self.error_per_step is None:  # nothing measured yet: the first prediction is checked whole
            return np.arange(len(self.competitors))
        allowance = s.margin + s.safety * self.error_per_step * self.ages
        return np.flatnonzero((self.predicted_gaps(minus_grad) <= allowance) | (self.ages > s.max_age))

    def update(self, indices: np.ndarray, energy: float, minus_grad: np.ndarray, energies: np.ndarray) -> None:
        """Competitors[indices] evaluated at this geometry (S0 at `energy`, -dE/dS): their prediction error
        is measured (it sizes the allowance), then they take this geometry as their reference."""
        if not len(indices):
            return
        gaps = np.asarray(energies, dtype=float) - float(energy)
        errors = np.abs(self.predicted_gaps(minus_grad, indices) - gaps) / np.maximum(self.ages[indices], 1)
        self.error_per_step = max(float(errors.max()), 0.5 * (self.error_per_step or 0.0))
        self.gaps[indices], self.minus_grads[indices], self.ages[indices] = gaps, minus_grad, 0

    def set_reference(self, moments: np.ndarray, energy: float, minus_grad: np.ndarray,
                      competitors: np.ndarray, competitor_energies: np.ndarray) -> None:
        """A new S0 with every competitor evaluated at this geometry (the measured error is kept)."""
        self.moments = np.asarray(moments, dtype=float).copy()
        self.competitors = np.array(competitors, dtype=float).reshape(-1, self.levels.n_magnetic)
        self.gaps = np.asarray(competitor_energies, dtype=float) - float(energy)
        self.minus_grads = np.tile(np.asarray(minus_grad, dtype=float), (len(self.competitors), 1))
        self.ages = np.zeros(len(self.competitors), dtype=int)
