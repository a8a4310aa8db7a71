"""Energy models over collinear moments of ONE geometry, and an analytic one for tests and benchmarks.

An ``EnergyModel`` is calculator-like: a subclass implements only ``calculate``; ``evaluate``
checks shapes and counts configurations, so every model reports ``n_evaluations`` the same way.
Moments are raw signed moments (uB) of the magnetic ions, in structure order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


class EnergyModel(ABC):
    """Energy (eV) and spin force -dE/dS (eV/uB) of moment configurations of one geometry."""

    def __init__(self, n_magnetic: int) -> None:
        self.n_magnetic = int(n_magnetic)
        self.n_evaluations = 0  # configurations evaluated so far
        self.n_calls = 0  # batched calls so far

    def evaluate(self, moments: np.ndarray, gradient: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """moments (nconf, n_magnetic) -> energies (nconf,), minus_dE_dS (nconf, n_magnetic) or None."""
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        if m.ndim != 2 or m.shape[1] != self.n_magnetic:
            raise ValueError(f"moments must have shape (nconf, {self.n_magnetic}), got {np.shape(moments)}")
        if len(m) == 0:
            return np.empty(0), (np.empty((0, self.n_magnetic)) if gradient else None)
        energies, minus_grad = self.calculate(m, gradient)
        self.n_evaluations += len(m)
        self.n_calls += 1
        energies = np.asarray(energies, dtype=float).reshape(len(m))
        if gradient:
            minus_grad = np.asarray(minus_grad, dtype=float).reshape(m.shape)
        return energies, (minus_grad if gradient else None)

    def sector_energies(self, moments: np.ndarray, sign: float) -> np.ndarray:
        """Energies (nconf,) of configurations as the model sees them in the gauge sector `sign` (+1 or -1),
        whatever their own sector: the energy that is smooth in the moments about a state of that sector.
        A model without a gauge (this default) has one sector: its energies."""
        return self.evaluate(moments)[0]

    @abstractmethod
    def calculate(self, moments: np.ndarray, gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies of the rows of moments and, if gradient, -dE/dS; no counting here."""

    @property
    def neighbours(self) -> np.ndarray | None:
        """Nearest-neighbour graph of the magnetic ions, (n, n) bool, where the model knows its geometry
        (``nearest_neighbours``), else None; the spin search reverses domains on it."""
        return None


class SymmetrizedModel(EnergyModel):
    """E_sym(S) = (E(S) + E(-S)) / 2: restores reversal symmetry of a model trained without it.

    Each configuration costs two inner evaluations, done in one batched inner call;
    ``n_evaluations`` counts symmetrized configurations, ``inner.n_evaluations`` the inner ones.
    """

    def __init__(self, inner: EnergyModel) -> None:
        super().__init__(inner.n_magnetic)
        self.inner = inner

    @property
    def neighbours(self) -> np.ndarray | None:
        return self.inner.neighbours

    def calculate(self, moments, gradient):
        n = len(moments)
        energies, minus_grad = self.inner.evaluate(np.concatenate([moments, -moments]), gradient)
        e = 0.5 * (energies[:n] + energies[n:])
        return e, (0.5 * (minus_grad[:n] - minus_grad[n:]) if gradient else None)

    def sector_energies(self, moments, sign):
        """(E(S) in the inner model's sector `sign` + E(-S) in the sector -sign) / 2."""
        moments = np.atleast_2d(np.asarray(moments, dtype=float))
        return 0.5 * (self.inner.sector_energies(moments, sign) + self.inner.sector_energies(-moments, -sign))


@dataclass(frozen=True)
class Exchange:
    """J(r) = strength * exp(-(r - r_ref) / decay), tapered to 0 over the last 1 A before cutoff.

    Energy term J S_i S_j per pair: strength > 0 favours antiparallel moments (frustrated on a
    triangular lattice), strength < 0 parallel ones.
    """

    strength: float
    decay: float = 0.5
    r_ref: float = 2.85
    cutoff: float = 6.0

    def __call__(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, dtype=float)
        x = np.clip((r - (self.cutoff - 1.0)) / 1.0, 0.0, 1.0)
        taper = 0.5 * (1.0 + np.cos(np.pi * x))
        return np.where(r < self.cutoff, self.strength * np.exp(-(r - self.r_ref) / self.decay) * taper, 0.0)


def minimum_image_distances(positions: np.ndarray, cell: np.ndarray | None) -> np.ndarray:
    """Pairwise distances (n, n); with a cell the shortest over the 27 neighbouring images."""
    pos = np.asarray(positions, dtype=float)
    diff = pos[:, None, :] - pos[None, :, :]
    if cell is None:
        return np.linalg.norm(diff, axis=-1)
    cell = np.asarray(cell, dtype=float).reshape(3, 3)
    frac = diff @ np.linalg.inv(cell)
    frac -= np.round(frac)
    shifts = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij")).reshape(3, -1).T
    cart = (frac[:, :, None, :] + shifts[None, None, :, :]) @ cell
    return np.linalg.norm(cart, axis=-1).min(axis=2)


def nearest_neighbours(distances: np.ndarray, shell: float = 1.2) -> np.ndarray:
    """Pairs closer than `shell` x the typical nearest-neighbour distance (the median over ions of each
    one's shortest distance, so one close pair of a hot geometry does not shrink it), (n, n) bool with a
    False diagonal: the nearest-neighbour shell (Ni-Ni 2.9-3.1 A in the rattled LiNiO2 cells of the
    benchmarks, where the next pairs lie at 4.1 A or more)."""
    distances = np.asarray(distances, dtype=float)
    off_diagonal = ~np.eye(len(distances), dtype=bool)
    if len(distances) < 2:
        return np.zeros_like(off_diagonal)
    nearest = np.where(off_diagonal, distances, np.inf).min(axis=1)
    return off_diagonal & (distances < shell * np.median(nearest))


class _OnsiteCurve:
    """Even, C1 on-site energy e(|S|) through the given (|moment|, energy) nodes (cubic Hermite)."""

    def __init__(self, levels: Mapping[float, float], element: str) -> None:
        if not levels:
            raise ValueError(f"on-site energies of {element} are empty")
        nodes = np.array(sorted(float(k) for k in levels))
        if np.any(nodes < 0):
            raise ValueError(f"on-site levels of {element} must be |moments| >= 0, got {sorted(levels)}")
        values = np.array([float(levels[k]) for k in sorted(levels)])
        if nodes[0] > 0:  # flat continuation down to S = 0 keeps the curve even and smooth
            nodes, values = np.concatenate([[0.0], nodes]), np.concatenate([values[:1], values])
        slopes = np.zeros_like(values)
        if nodes.size > 1:
            slopes[1:-1] = (values[2:] - values[:-2]) / (nodes[2:] - nodes[:-2])
            slopes[-1] = (values[-1] - values[-2]) / (nodes[-1] - nodes[-2])
        self.nodes, self.values, self.slopes = nodes, values, slopes

    def __call__(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energy and dE/dS at signed moments s."""
        x = np.abs(s)
        if self.nodes.size == 1:
            return np.full_like(x, self.values[0]), np.zeros_like(x)
        k = np.clip(np.searchsorted(self.nodes, x, side="right") - 1, 0, self.nodes.size - 2)
        x0, h = self.nodes[k], self.nodes[k + 1] - self.nodes[k]
        t = (x - x0) / h
        y0, y1, d0, d1 = self.values[k], self.values[k + 1], self.slopes[k] * h, self.slopes[k + 1] * h
        e = (2 * t**3 - 3 * t**2 + 1) * y0 + (t**3 - 2 * t**2 + t) * d0 + (-2 * t**3 + 3 * t**2) * y1 + (t**3 - t**2) * d1
        de = ((6 * t**2 - 6 * t) * y0 + (3 * t**2 - 4 * t + 1) * d0 + (-6 * t**2 + 6 * t) * y1 + (3 * t**2 - 2 * t) * d1) / h
        beyond = x > self.nodes[-1]  # linear continuation past the last node
        e = np.where(beyond, self.values[-1] + self.slopes[-1] * (x - self.nodes[-1]), e)
        de = np.where(beyond, self.slopes[-1], de)
        return e, de * np.sign(s)


ExchangeSpec = Exchange | Sequence[Exchange]


class AnalyticSpinModel(EnergyModel):
    """E(S) = sum_i e_el(i)(|S_i|) + sum_{i<j} [J_ij S_i S_j + B_ij (S_i S_j)^2]; reversal-invariant,
    exact gradient.

    onsite: per magnetic element, energy (eV) per |moment| level; its keys pick the magnetic atoms.
    exchange: one Exchange (or a list, summed) for every pair, or a mapping from element pairs.
    biquadratic: the same for B(r) (eV/uB^4), or None; it makes E more than on-site + bilinear,
    as spin-state-dependent exchange does in DFT+U.
    """

    def __init__(
        self,
        positions: np.ndarray,
        cell: np.ndarray | None,
        symbols: Sequence[str],
        onsite: Mapping[str, Mapping[float, float]],
        exchange: ExchangeSpec | Mapping[tuple[str, str], ExchangeSpec],
        biquadratic: ExchangeSpec | Mapping[tuple[str, str], ExchangeSpec] | None = None,
    ) -> None:
        positions = np.asarray(positions, dtype=float)
        if positions.shape != (len(symbols), 3):
            raise ValueError(f"positions must have shape ({len(symbols)}, 3), got {positions.shape}")
        self.magnetic_indices = np.array([i for i, s in enumerate(symbols) if s in onsite], dtype=int)
        if self.magnetic_indices.size == 0:
            raise ValueError(f"no atom is one of the on-site elements {sorted(onsite)}")
        super().__init__(self.magnetic_indices.size)
        self.magnetic_symbols = tuple(symbols[i] for i in self.magnetic_indices)
        self._onsite = {el: _OnsiteCurve(levels, el) for el, levels in onsite.items()}
        self._groups = {el: np.flatnonzero(np.array(self.magnetic_symbols) == el) for el in onsite}
        dist = minimum_image_distances(positions[self.magnetic_indices], cell)
        self.distances = dist
        self.coupling = self._pair_matrix(exchange)  # J_ij (eV/uB^2), zero diagonal
        self.biquadratic = self._pair_matrix(biquadratic) if biquadratic is not None else None

    @cached_property
    def neighbours(self) -> np.ndarray:
        return nearest_neighbours(self.distances)

    def _pair_matrix(self, spec) -> np.ndarray:
        out = np.zeros_like(self.distances)
        for i in range(self.n_magnetic):
            for j in range(i + 1, self.n_magnetic):
                terms = self._terms(spec, self.magnetic_symbols[i], self.magnetic_symbols[j])
                out[i, j] = out[j, i] = sum(float(t(self.distances[i, j])) for t in terms)
        return out

    @staticmethod
    def _terms(exchange, a: str, b: str) -> Sequence[Exchange]:
        if isinstance(exchange, Mapping):
            spec = exchange.get((a, b), exchange.get((b, a)))
            if spec is None:
                raise ValueError(f"no exchange given for the element pair ({a}, {b})")
            exchange = spec
        return (exchange,) if isinstance(exchange, Exchange) else tuple(exchange)

    def calculate(self, moments, gradient):
        energy = 0.5 * np.einsum("ci,ij,cj->c", moments, self.coupling, moments)
        dE = moments @ self.coupling if gradient else None
        if self.biquadratic is not None:
            sq = moments**2
            energy = energy + 0.5 * np.einsum("ci,ij,cj->c", sq, self.biquadratic, sq)
            if gradient:
                dE += 2 * moments * (sq @ self.biquadratic)
        for el, ions in self._groups.items():
            if ions.size:
                e, de = self._onsite[el](moments[:, ions])
                energy = energy + e.sum(axis=1)
                if gradient:
                    dE[:, ions] += de
        return energy, (-dE if gradient else None)


def triangular_layers(nx: int, ny: int, n_layers: int, a: float = 2.85,
                      spacing: float = 4.75) -> tuple[np.ndarray, np.ndarray]:
    """Transition-metal sites of a layered oxide: nx*ny triangular layers (lattice a, A) stacked
    n_layers times with the rhombohedral in-plane shift. Returns positions (n, 3) and cell (3, 3)."""
    a1, a2 = np.array([a, 0.0, 0.0]), np.array([a / 2, a * np.sqrt(3) / 2, 0.0])
    shift = 2 / 3 * a1 + 1 / 3 * a2 + np.array([0.0, 0.0, spacing])
    grid = [i * a1 + j * a2 + k * shift for k in range(n_layers) for j in range(ny) for i in range(nx)]
    cell = np.array([nx * a1, ny * a2, n_layers * shift])
    return np.array(grid), cell
