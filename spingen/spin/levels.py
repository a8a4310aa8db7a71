"""Discrete moment levels of the magnetic ions of one structure and the configurations they span.

A configuration is a row of level indices, one per magnetic ion in structure order; the signed
moment (uB) of ion i at index k is ``levels.values[i][k]``. Valid configurations satisfy the
optional fixed total moment (like VASP NUPDOWN) and, with ``fix_global_sign``, are first-up:
of a configuration S and its reversal -S (same collinear energy) only the one whose first nonzero
moment is positive is kept. Where -S is not allowed (pinned signs, nonzero total) S is kept as is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property

import numpy as np

_SUM_GRID = 1e-9  # moment sums are compared on this grid (float levels such as 1.85 add up)


def _signed_values(magnitudes: Sequence[float], element: str) -> np.ndarray:
    mags = np.asarray(magnitudes, dtype=float)
    if mags.ndim != 1 or mags.size == 0:
        raise ValueError(f"moment magnitudes of {element} must be a non-empty list, got {magnitudes!r}")
    if not np.all(np.isfinite(mags)) or np.any(mags < 0):
        raise ValueError(f"moment magnitudes of {element} must be finite and >= 0, got {magnitudes!r}")
    mags = np.sort(mags)
    if np.any(np.diff(mags) < 1e-6):
        raise ValueError(f"moment magnitudes of {element} repeat a level: {magnitudes!r}")
    nonzero = mags[mags > 0]
    zero = [0.0] if mags[0] == 0 else []
    return np.concatenate([-nonzero[::-1], zero, nonzero])


def _sum_key(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, dtype=float) / _SUM_GRID).astype(np.int64)


class MomentLevels:
    """Allowed signed moments of each magnetic ion of one structure, and constraints on their sum."""

    def __init__(
        self,
        magnitudes: Mapping[str, Sequence[float]],
        symbols: Sequence[str],
        *,
        total_moment: float | None = None,
        total_tolerance: float = 1e-6,
        fixed_signs: Mapping[int, int] | None = None,
        fix_global_sign: bool = True,
    ) -> None:
        """magnitudes: |moment| levels per magnetic element (0 allowed); symbols: every atom.

        fixed_signs maps an atom index of the structure to +1 or -1; a pinned ion keeps only
        moments of that sign, and 0 where its element allows 0 (zero has no sign).
        """
        self.symbols = tuple(symbols)
        self.magnitudes = {el: tuple(float(m) for m in mags) for el, mags in magnitudes.items()}
        per_element = {el: _signed_values(m, el) for el, m in magnitudes.items()}
        self.magnetic_indices = np.array(
            [i for i, s in enumerate(self.symbols) if s in per_element], dtype=int)
        if self.magnetic_indices.size == 0:
            raise ValueError(f"no atom of the structure is one of the magnetic elements {sorted(per_element)}")
        self.magnetic_symbols = tuple(self.symbols[i] for i in self.magnetic_indices)
        self.fixed_signs = {int(k): int(v) for k, v in (fixed_signs or {}).items()}
        values = [per_element[s] for s in self.magnetic_symbols]
        position = {int(a): i for i, a in enumerate(self.magnetic_indices)}
        for atom, sign in self.fixed_signs.items():
            if sign not in (1, -1):
                raise ValueError(f"fixed sign of atom {atom} must be +1 or -1, got {sign}")
            if atom not in position:
                where = self.symbols[atom] if 0 <= atom < len(self.symbols) else "out of range"
                raise ValueError(f"atom {atom} ({where}) has a fixed sign but is not a magnetic ion")
            v = values[position[atom]]
            values[position[atom]] = v[sign * v >= 0]
        self.values = tuple(values)
        self.n_magnetic = len(values)
        self.n_values = np.array([v.size for v in values], dtype=int)
        self.table = np.full((self.n_magnetic, self.n_values.max()), np.nan)
        self.flip_table = np.full(self.table.shape, -1, dtype=int)
        for i, v in enumerate(values):
            self.table[i, : v.size] = v
            for k, m in enumerate(v):
                hit = np.flatnonzero(np.abs(v + m) < 1e-9)
                if hit.size:
                    self.flip_table[i, k] = hit[0]
        self.total_moment = None if total_moment is None else float(total_moment)
        self.total_tolerance = float(total_tolerance)
        if self.total_tolerance < 0:
            raise ValueError(f"total_tolerance must be >= 0, got {total_tolerance}")
        self.fix_global_sign = bool(fix_global_sign)
        if self.total_moment is not None and self._suffix_sums(values)[0].size == 0:
            raise ValueError(
                f"no configuration reaches the total moment {self.total_moment} +- {self.total_tolerance}")

    def within_total(self, total_moment: float, total_tolerance: float) -> MomentLevels:
        """The same ions and signs restricted to the total-moment window total_moment +- total_tolerance."""
        return MomentLevels(self.magnitudes, self.symbols, total_moment=total_moment,
                            total_tolerance=total_tolerance, fixed_signs=self.fixed_signs,
                            fix_global_sign=self.fix_global_sign)

    def __repr__(self) -> str:
        return (f"MomentLevels(n_magnetic={self.n_magnetic}, n_configurations={self.n_configurations}, "
                f"total_moment={self.total_moment}, fix_global_sign={self.fix_global_sign})")

    # -- conversions -------------------------------------------------------------------------
    def to_moments(self, indices: np.ndarray) -> np.ndarray:
        """Level indices (nconf, n_magnetic) -> signed moments (nconf, n_magnetic)."""
        idx = self._check_indices(indices)
        return self.table[np.arange(self.n_magnetic), idx]

    def to_indices(self, moments: np.ndarray, *, snap: bool = False, tol: float = 1e-6) -> np.ndarray:
        """Signed moments (nconf, n_magnetic) -> level indices; snap=True takes the nearest level."""
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        if m.shape[-1] != self.n_magnetic or m.ndim != 2:
            raise ValueError(f"moments must have shape (nconf, {self.n_magnetic}), got {np.shape(moments)}")
        dist = np.abs(self.table[None, :, :] - m[:, :, None])
        dist = np.where(np.isnan(dist), np.inf, dist)
        idx = dist.argmin(axis=2)
        if not snap:
            bad = np.take_along_axis(dist, idx[..., None], 2)[..., 0] > tol
            if bad.any():
                c, i = np.argwhere(bad)[0]
                raise ValueError(
                    f"moment {m[c, i]} of atom {self.magnetic_indices[i]} ({self.magnetic_symbols[i]}) "
                    f"is not one of its levels {self.values[i].tolist()}")
        return idx.astype(np.int8)

    @staticmethod
    def keys(indices: np.ndarray) -> list[bytes]:
        """Hashable keys (bytes of the int8 index rows) for a cache of evaluated configurations."""
        idx = np.ascontiguousarray(np.atleast_2d(indices), dtype=np.int8)
        return [row.tobytes() for row in idx]

    # -- validity ----------------------------------------------------------------------------
    def is_allowed(self, indices: np.ndarray) -> np.ndarray:
        """Rows within each ion's levels and the total-moment window (global sign not checked)."""
        idx = np.atleast_2d(np.asarray(indices))
        if idx.ndim != 2 or idx.shape[1] != self.n_magnetic:
            raise ValueError(f"level indices must have shape (nconf, {self.n_magnetic}), got {idx.shape}")
        ok = np.all((idx >= 0) & (idx < self.n_values), axis=1)
        if self.total_moment is not None:
            totals = np.zeros(len(idx))
            totals[ok] = self.to_moments(idx[ok]).sum(axis=1)
            ok &= self._total_ok(totals)
        return ok

    def is_valid(self, indices: np.ndarray) -> np.ndarray:
        """Allowed rows that are also first-up under fix_global_sign."""
        ok = self.is_allowed(indices)
        if self.fix_global_sign and ok.any():
            idx = np.atleast_2d(np.asarray(indices))
            ok[ok] = ~self._needs_flip(idx[ok])
        return ok

    def first_up(self, indices: np.ndarray) -> np.ndarray:
        """Replace allowed rows by the one of {S, -S} whose first nonzero moment points up (reversed where
        needed): the search's representative of a pair, not SpinEncoding's canonical sign (total moment up)."""
        idx = np.array(self._check_indices(indices), dtype=np.int8)
        if not self.fix_global_sign:
            return idx
        if not self.is_allowed(idx).all():
            raise ValueError("first_up got a configuration outside the levels or total-moment window")
        flip = self._needs_flip(idx)
        idx[flip] = self.flip_table[np.arange(self.n_magnetic), idx[flip]]
        return idx

    def _needs_flip(self, idx: np.ndarray) -> np.ndarray:
        """Allowed rows whose first nonzero moment is negative and whose reversal is allowed."""
        m = self.to_moments(idx)
        nonzero = m != 0
        first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
        negative = m[np.arange(len(m)), first] < 0
        flipped = self.flip_table[np.arange(self.n_magnetic), idx]
        can_flip = np.all(flipped >= 0, axis=1)
        if self.total_moment is not None:
            can_flip &= self._total_ok(-m.sum(axis=1))
        return negative & can_flip

    def _total_ok(self, totals: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(totals) - self.total_moment) <= self.total_tolerance + 1e-9

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.atleast_2d(np.asarray(indices))
        if idx.ndim != 2 or idx.shape[1] != self.n_magnetic:
            raise ValueError(f"level indices must have shape (nconf, {self.n_magnetic}), got {idx.shape}")
        bad = (idx < 0) | (idx >= self.n_values)
        if bad.any():
            c, i = np.argwhere(bad)[0]
            raise ValueError(f"level index {idx[c, i]} of atom {self.magnetic_indices[i]} "
                             f"({self.magnetic_symbols[i]}) outside 0..{self.n_values[i] - 1}")
        return idx

    # -- counting and enumeration ------------------------------------------------------------
    def _suffix_sums(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Sorted reachable sum keys of ions k.. (for k = 0..n), restricted to the total window."""
        sums = [np.zeros(1, dtype=np.int64)]
        for v in reversed(values):
            sums.append(np.unique((_sum_key(v)[:, None] + sums[-1][None, :]).ravel()))
        sums = sums[::-1]
        if self.total_moment is not None:
            lo, hi = self._window_keys()
            sums[0] = sums[0][(sums[0] >= lo) & (sums[0] <= hi)]
        return sums

    def _window_keys(self) -> tuple[int, int]:
        t = self.total_moment
        tol = self.total_tolerance + 1e-9
        return int(np.ceil((t - tol) / _SUM_GRID)), int(np.floor((t + tol) / _SUM_GRID))

    def _count(self, values: Sequence[np.ndarray], windows: Sequence[tuple[float, float]]) -> int:
        """Number of rows over the given per-ion values whose sum lies in every window."""
        if self.total_moment is None:
            return int(np.prod([len(v) for v in values], dtype=object))
        counts: dict[int, int] = {0: 1}
        for v in values:
            new: dict[int, int] = {}
            for key in _sum_key(v).tolist():
                for s, c in counts.items():
                    new[s + key] = new.get(s + key, 0) + c
            counts = new
        total = 0
        for s, c in counts.items():
            if all(lo <= s * _SUM_GRID <= hi for lo, hi in windows):
                total += c
        return total

    def reachable_totals(self) -> np.ndarray:
        """Every total moment an allowed configuration has (sorted, uB)."""
        return self._suffix_sums(self.values)[0] * _SUM_GRID

    @cached_property
    def n_allowed(self) -> int:
        """Configurations within the levels and total window, both global signs counted."""
        return self._count(self.values, [self._window()])

    @cached_property
    def n_configurations(self) -> int:
        """Size of the search space: allowed configurations, one per reversal pair if fix_global_sign."""
        if not self.fix_global_sign:
            return self.n_allowed
        sym = [v[self.flip_table[i, : v.size] >= 0] for i, v in enumerate(self.values)]
        if any(s.size == 0 for s in sym):
            return self.n_allowed
        lo, hi = self._window()
        both = self._count(sym, [(lo, hi), (-hi, -lo)])
        zero_ok = all(np.any(v == 0) for v in self.values) and (lo <= 0 <= hi)
        return self.n_allowed - (both - int(zero_ok)) // 2

    def _window(self) -> tuple[float, float]:
        if self.total_moment is None:
            return (-np.inf, np.inf)
        tol = self.total_tolerance + 1e-9
        return (self.total_moment - tol, self.total_moment + tol)

    def iter_indices(self, chunk_size: int = 65536) -> Iterator[np.ndarray]:
        """Every valid configuration once, as int8 index arrays of at most chunk_size rows.

        Depth-first over ions with exact pruning on the total moment, so memory stays
        O(n_magnetic * chunk_size) and no dead branch is expanded.
        """
        chunk_size = max(int(chunk_size), int(self.n_values.max()))
        suffix = self._suffix_sums(self.values)[1:] if self.total_moment is not None else None
        keys = [_sum_key(v) for v in self.values]
        buffer: list[np.ndarray] = []
        size = 0

        def extend(prefix: np.ndarray, sums: np.ndarray, k: int) -> Iterator[np.ndarray]:
            if k == self.n_magnetic:
                yield prefix
                return
            n = self.n_values[k]
            step = max(1, chunk_size // n)
            for start in range(0, len(prefix), step):
                part, part_sums = prefix[start: start + step], sums[start: start + step]
                new = np.repeat(part, n, axis=0)
                new_sums = np.repeat(part_sums, n) + np.tile(keys[k], len(part))
                new = np.concatenate([new, np.tile(np.arange(n, dtype=np.int8), len(part))[:, None]], axis=1)
                if suffix is not None:
                    lo, hi = self._window_keys()
                    reach = suffix[k]
                    first = np.searchsorted(reach, lo - new_sums, side="left")
                    last = np.searchsorted(reach, hi - new_sums, side="right")
                    keep = last > first
                    new, new_sums = new[keep], new_sums[keep]
                if len(new):
                    yield from extend(new, new_sums, k + 1)

        for rows in extend(np.zeros((1, 0), dtype=np.int8), np.zeros(1, dtype=np.int64), 0):
            if self.fix_global_sign:
                rows = rows[self.is_valid(rows)]
            buffer.append(rows)
            size += len(rows)
            while size >= chunk_size:
                joined = np.concatenate(buffer)
                yield joined[:chunk_size]
                buffer, size = [joined[chunk_size:]], len(joined) - chunk_size
        if size:
            yield np.concatenate(buffer)

    def iter_moments(self, chunk_size: int = 65536) -> Iterator[np.ndarray]:
        """Every valid configuration once, as signed moments (chunks of at most chunk_size rows)."""
        for idx in self.iter_indices(chunk_size):
            yield self.to_moments(idx)

    # -- sampling and moves ------------------------------------------------------------------
    def random_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n random valid configurations (uniform over allowed ones, then taken first-up)."""
        idx = np.empty((n, self.n_magnetic), dtype=np.int8)
        if self.total_moment is None:
            idx[:] = rng.integers(0, self.n_values[None, :], size=(n, self.n_magnetic))
            return self.first_up(idx)
        lo, hi = self._window_keys()
        counts = self._suffix_counts()
        partial = np.zeros(n, dtype=np.int64)
        for k in range(self.n_magnetic):
            reach, cum = counts[k + 1]
            keys = _sum_key(self.values[k])
            cand = partial[:, None] + keys[None, :]
            first = np.searchsorted(reach, lo - cand, side="left")
            last = np.searchsorted(reach, hi - cand, side="right")
            weight = cum[last] - cum[first]
            u = rng.random(n) * weight.sum(axis=1)
            choice = (np.cumsum(weight, axis=1) <= u[:, None]).sum(axis=1)
            choice = np.minimum(choice, self.n_values[k] - 1)
            idx[:, k] = choice
            partial += keys[choice]
        return self.first_up(idx)

    def _suffix_counts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per k: sorted reachable sum keys of ions k.. and the cumulative counts (float) over them."""
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * (self.n_magnetic + 1)  # type: ignore
        sums, cnt = np.zeros(1, dtype=np.int64), np.ones(1)
        out[self.n_magnetic] = (sums, np.concatenate([[0.0], np.cumsum(cnt)]))
        for k in range(self.n_magnetic - 1, -1, -1):
            all_sums = (_sum_key(self.values[k])[:, None] + sums[None, :]).ravel()
            all_cnt = np.tile(cnt, self.n_values[k])
            sums, inverse = np.unique(all_sums, return_inverse=True)
            cnt = np.bincount(inverse.ravel(), weights=all_cnt)
            out[k] = (sums, np.concatenate([[0.0], np.cumsum(cnt)]))
        return out

    def exchange_moves(self, index_row: np.ndarray) -> np.ndarray:
        """Every configuration in which two ions with the same allowed values (one element, neither or both
        pinned to one sign) swap their moments, the total moment kept: a reversed or high-spin ion passing
        to another site. Rows are not taken first-up, as single_moves."""
        row = np.asarray(index_row, dtype=np.int8).reshape(-1)
        kinds: dict[tuple, int] = {}
        groups = np.array([kinds.setdefault(tuple(v), len(kinds)) for v in self.values])
        i, j = np.triu_indices(self.n_magnetic, k=1)
        keep = (row[i] != row[j]) & (groups[i] == groups[j])
        i, j = i[keep], j[keep]
        moves = np.repeat(row[None, :], len(i), axis=0)
        moves[np.arange(len(i)), i], moves[np.arange(len(i)), j] = row[j], row[i]
        return moves

    def single_moves(self, index_row: np.ndarray) -> np.ndarray:
        """Every allowed configuration one ion (or, with a fixed total, up to two ions) away.

        Rows are NOT taken first-up, so moments minus the current moments is the local change
        the spin-force screening needs; take first_up before evaluating.
        """
        row = np.asarray(index_row, dtype=np.int8).reshape(-1)
        ion = np.repeat(np.arange(self.n_magnetic), self.n_values)
        level = np.concatenate([np.arange(n) for n in self.n_values])
        keep = level != row[ion]
        ion, level = ion[keep], level[keep]
        singles = np.repeat(row[None, :], len(ion), axis=0)
        singles[np.arange(len(ion)), ion] = level
        if self.total_moment is None:
            return singles
        current = self.table[np.arange(self.n_magnetic), row]
        delta = self.table[ion, level] - current[ion]
        total = current.sum()
        a, b = np.nonzero((ion[:, None] < ion[None, :])
                          & self._total_ok(total + delta[:, None] + delta[None, :]))
        pairs = singles[a].copy()
        pairs[np.arange(len(a)), ion[b]] = level[b]
        moves = np.concatenate([singles[self._total_ok(total + delta)], pairs])
        return moves


def infer_magnitudes(moments_by_element: Mapping[str, Sequence[float]], tol: float = 0.3) -> dict[str, list[float]]:
    """Cluster observed |moments| (uB) of each element into sorted level centres.

    Sorted magnitudes are split wherever two neighbours differ by more than tol; each cluster
    gives its mean, and a cluster whose mean is below tol is the zero level (exactly 0.0).
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    levels: dict[str, list[float]] = {}
    for element, moments in moments_by_element.items():
        m = np.abs(np.asarray(moments, dtype=float).ravel())
        if m.size == 0:
            raise ValueError(f"no moments given for {element}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"moments of {element} contain NaN or inf")
        m.sort()
        clusters = np.split(m, np.flatnonzero(np.diff(m) > tol) + 1)
        centres = [float(c.mean()) for c in clusters]
        levels[element] = [0.0 if c < tol else round(c, 3) for c in centres]
    return levels


def level_support(frames: Sequence[np.ndarray], levels: Sequence[float]) -> list[int]:
    """For each level, the frames in which at least one ion's |moment| is nearest to it.

    frames: the moments of one element, one array per frame. A level that only one or two frames
    hold is a weak basis for a spin search: the model has barely seen it (docs/cathode-guide.md).
    """
    centres = np.asarray(levels, dtype=float)
    counts = np.zeros(len(centres), dtype=int)
    for moments in frames:
        m = np.abs(np.asarray(moments, dtype=float).ravel())
        if m.size:
            counts[np.unique(np.argmin(np.abs(m[:, None] - centres[None, :]), axis=1))] += 1
    return counts.tolist()
