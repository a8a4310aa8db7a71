"""A cheap pair model of the energy over moment configurations, learned during a search.

E(S) ~ e0 + sum_i a_i(level_i) + sum_{i<j} J_ij S_i S_j, fitted by ridge least squares to every
energy and spin force -dE/dS the search has paid for (a spin force gives n equations for the
price of one evaluation, so J is known after a few configurations). With a fixed global sign the
on-site terms of +m and -m are tied (a reversal-invariant model). It ranks offspring and local
moves; it never replaces an evaluation.
"""

from __future__ import annotations

import numpy as np

from spingen.spin.levels import MomentLevels

MAX_PARAMETERS = 4000  # beyond this (about 85 magnetic ions) the search screens to first order only


class PairSurrogate:
    """Normal equations of the pair model, solved lazily after each batch of data."""

    def __init__(self, levels: MomentLevels, *, smooth_weight: float = 0.03, ridge: float = 1e-8) -> None:
        if self.size(levels) > MAX_PARAMETERS:
            raise ValueError(f"{self.size(levels)} surrogate parameters exceed {MAX_PARAMETERS}")
        self.levels = levels
        n = levels.n_magnetic
        tie = np.full(levels.table.shape, -1, dtype=int)  # level -> on-site parameter
        sign = np.ones(levels.table.shape)  # slope sign of a tied (reversed) level
        count = 0
        for i, nv in enumerate(levels.n_values):
            for k in range(nv):
                partner = levels.flip_table[i, k] if levels.fix_global_sign else -1
                if 0 <= partner < k:
                    tie[i, k], sign[i, k] = tie[i, partner], -1.0
                else:
                    tie[i, k], count = count, count + 1
        self.tie, self.sign, self.n_onsite = tie, sign, count
        self.iu = np.triu_indices(n, 1)
        pair = np.zeros((n, n), dtype=int)
        pair[self.iu] = np.arange(len(self.iu[0]))
        self.pair = pair + pair.T
        # parameters: on-site energies a, on-site slopes b, couplings J
        self.n_parameters = 2 * count + len(self.iu[0])
        self.energy_weight = float(n)  # one energy equation weighs as much as n force equations
        self.smooth_weight, self.ridge = smooth_weight, ridge
        self.AtA = np.zeros((self.n_parameters, self.n_parameters))
        self.Atb = np.zeros(self.n_parameters)
        self.reference: float | None = None
        self.n_data = 0
        self.residuals: list[float] = []  # true - predicted energy of new configurations
        self.move_residuals: list[float] = []  # true - predicted change of local moves
        self._smooth = self._smoothness()
        self._theta: np.ndarray | None = None
        self._coupling: np.ndarray | None = None

    @staticmethod
    def size(levels: MomentLevels) -> int:
        """Number of parameters the pair model of `levels` would have (an upper bound)."""
        n = levels.n_magnetic
        return 2 * int(levels.n_values.sum()) + n * (n - 1) // 2

    def _smoothness(self) -> np.ndarray:
        """Normal matrix of the prior a(v2) - a(v1) = (v2 - v1) * mean slope, neighbouring levels."""
        rows = []
        for i, nv in enumerate(self.levels.n_values):
            v = self.levels.table[i, :nv]
            for k1, k2 in zip(range(nv - 1), range(1, nv)):
                row = np.zeros(self.n_parameters)
                row[self.tie[i, k2]] += 1.0
                row[self.tie[i, k1]] -= 1.0
                half = 0.5 * (v[k2] - v[k1])
                row[self.n_onsite + self.tie[i, k1]] -= half * self.sign[i, k1]
                row[self.n_onsite + self.tie[i, k2]] -= half * self.sign[i, k2]
                rows.append(row)
        A = np.array(rows).reshape(-1, self.n_parameters)
        return A.T @ A

    def _design(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        S = self.levels.to_moments(rows)
        A = np.zeros((len(rows), self.n_parameters))
        np.put_along_axis(A, self.tie[np.arange(S.shape[1]), rows], 1.0, axis=1)
        A[:, 2 * self.n_onsite:] = S[:, self.iu[0]] * S[:, self.iu[1]]
        return A, S

    def add(self, rows: np.ndarray, energies: np.ndarray, minus_grads: np.ndarray | None) -> None:
        """Add evaluated configurations (and their spin forces) to the fit; log prediction errors."""
        rows = np.atleast_2d(rows)
        energies = np.asarray(energies, dtype=float)
        if self.n_data:
            self.residuals = (self.residuals + (energies - self.predict(rows)).tolist())[-200:]
        if self.reference is None:
            self.reference = float(energies[0])
        A, S = self._design(rows)
        self.AtA += self.energy_weight * A.T @ A
        self.Atb += self.energy_weight * A.T @ (energies - self.reference)
        if minus_grads is not None:
            m, n = S.shape
            G = np.zeros((m, n, self.n_parameters))  # dE/dS_i = b_i(level) + sum_j J_ij S_j
            c, ions = np.arange(m)[:, None], np.arange(n)[None, :]
            G[c, ions, self.n_onsite + self.tie[ions, rows]] = self.sign[ions, rows]
            i, j = np.nonzero(~np.eye(n, dtype=bool))
            G[:, i, 2 * self.n_onsite + self.pair[i, j]] = S[:, j]
            G = G.reshape(m * n, self.n_parameters)
            self.AtA += G.T @ G
            self.Atb -= G.T @ np.asarray(minus_grads, dtype=float).reshape(-1)
        self.n_data += len(rows)
        self._theta = None

    @property
    def theta(self) -> np.ndarray:
        """Fitted parameters; the smoothness prior fades as data arrive."""
        if self._theta is None:
            A = self.AtA + self.smooth_weight * 10.0 / (10.0 + self.n_data) * self._smooth
            diag = np.diag(A)
            A = A + np.diag(self.ridge * diag + 1e-9 * max(float(diag.mean()), 1e-12))
            self._theta = np.linalg.solve(A, self.Atb)
            J = np.zeros(self.pair.shape)
            J[self.iu] = self._theta[2 * self.n_onsite:]
            self._coupling = J + J.T
        return self._theta

    @property
    def coupling(self) -> np.ndarray:
        """Fitted J_ij (eV/uB^2), symmetric with a zero diagonal."""
        _ = self.theta  # fits on first access
        return self._coupling

    @property
    def error(self) -> float:
        """RMS error of the last energy predictions for new configurations (inf before 4)."""
        r = self.residuals
        return float(np.sqrt(np.mean(np.square(r)))) if len(r) >= 4 else np.inf

    def log_moves(self, actual: np.ndarray, predicted: np.ndarray) -> None:
        """Record the errors of predicted energy changes of local moves from an evaluated row."""
        self.move_residuals = (self.move_residuals + (np.asarray(actual) - predicted).tolist())[-200:]

    @property
    def move_error(self) -> float:
        """RMS error of predicted energy changes of local moves (inf before 8)."""
        r = self.move_residuals
        return float(np.sqrt(np.mean(np.square(r)))) if len(r) >= 8 else np.inf

    def predict(self, rows: np.ndarray) -> np.ndarray:
        A, _ = self._design(np.atleast_2d(rows))
        return (self.reference or 0.0) + A @ self.theta

    def descend(self, rows: np.ndarray, max_steps: int = 50) -> np.ndarray:
        """Steepest single-ion descent of each row on the surrogate (rows as they are if the
        total moment is fixed, where single-ion moves leave the window)."""
        rows = np.array(np.atleast_2d(rows), dtype=np.int8)
        if self.levels.total_moment is not None:
            return rows
        ions = np.arange(self.levels.n_magnetic)
        a = np.where(self.tie >= 0, self.theta[np.maximum(self.tie, 0)], np.inf)
        values, J = np.nan_to_num(self.levels.table), self.coupling
        active = np.arange(len(rows))
        for _ in range(max_steps):
            S = values[ions, rows[active]]
            field = S @ J
            delta = (a[None] - a[ions, rows[active]][:, :, None]
                     + (values[None] - S[:, :, None]) * field[:, :, None]).reshape(len(active), -1)
            best = delta.argmin(axis=1)
            move = delta[np.arange(len(active)), best] < -1e-12
            if not move.any():
                break
            active = active[move]
            ion, level = np.divmod(best[move], a.shape[1])
            rows[active, ion] = level
        return rows

    def carried(self, levels: MomentLevels, weight: float = 0.3) -> PairSurrogate:
        """A copy for `levels` whose data count `weight` times: the prior for a nearby geometry."""
        new = object.__new__(PairSurrogate)
        new.__dict__.update(self.__dict__)
        new.levels = levels
        new.AtA, new.Atb = weight * self.AtA, weight * self.Atb
        new.residuals, new.move_residuals = list(self.residuals), list(self.move_residuals)
        new._theta = None
        return new

    def fits(self, levels: MomentLevels) -> bool:
        """Same ions, level tables and sign convention (a prior from another structure does not)."""
        a, b = self.levels, levels
        return (a.table.shape == b.table.shape and a.fix_global_sign == b.fix_global_sign
                and np.array_equal(np.nan_to_num(a.table, nan=-1e9), np.nan_to_num(b.table, nan=-1e9)))
