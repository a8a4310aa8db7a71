"""Lowest-energy moment configuration of one geometry: exhaustive enumeration or a memetic GA.

Every configuration is evaluated at most once (a cache keyed by the bytes of its level-index row)
and every model call is one batch. The GA saves evaluations by screening: a pair model fitted to
the energies and spin forces -dE/dS seen so far (spingen.spin.surrogate) ranks offspring after a
free descent on it and orders local moves; without it, the first-order estimate
dE ~ -(-dE/dS)_i * dS_i from the spin force of the current row orders local moves.

With a surrogate the search asks the model for energies only unless use_gradient is set: with
trained deepmd-kit models the spin forces cost 2.5x an energy-only evaluation and led to no better
states (docs/benchmarks/spin_md.md, "The 27-Ni cell"; a reversal moves a virtual atom by about 1 A,
beyond what the slope at one configuration says). Without a surrogate (use_surrogate off, or more
ions than it can fit) it asks for them, since they are then all that orders the local moves. Spin
forces handed over as `known` (the MD step's own) always feed the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from spingen.spin.levels import MomentLevels
from spingen.spin.model import EnergyModel
from spingen.spin.surrogate import MAX_PARAMETERS, PairSurrogate

Known = tuple  # (moments (k, n_magnetic), energies (k,), -dE/dS (k, n_magnetic) or None)


@dataclass(frozen=True)
class SearchSettings:
    """Every knob of search_ground_state, with its default (tuned on benchmarks/spin_search.py, the
    gradient and the size defaults on benchmarks/cold_search.py)."""

    population: int | None = None  # configurations kept, and evaluated per generation on a cold start;
    # None: max(16, number of magnetic ions) for a cold search, 16 with a start or prior
    max_generations: int = 400
    patience: int | None = None  # generations without a new best before a cold search stops;
    # None: max(15, number of magnetic ions)
    warm_patience: int = 5  # the same with a start or prior
    warm_fraction: float = 0.5  # share of population evaluated per generation with a start
    enumerate_limit: int = 2048  # enumerate spaces up to this size
    n_lowest: int = 5  # distinct lowest configurations returned
    tournament_size: int = 3
    crossover_rate: float = 0.9
    extra_mutations: float = 0.5  # mean number of mutations beyond the first (Poisson)
    cluster_rate: float = 0.3  # share of mutations that reverse a cluster (coupled under the surrogate, or a
    # domain of the model's nearest-neighbour graph)
    domain_reversals: bool = True  # reverse domains of the model's nearest-neighbour graph (EnergyModel.neighbours)
    cold_runs: int | None = None  # independent GA runs of a cold search, the lowest kept; None: above LARGE_CELL
    # magnetic ions without max_evaluations LARGE_COLD_RUNS, then one more at a time until two runs reach the
    # lowest state or max_cold_runs ran; else 1
    max_cold_runs: int | None = None  # the most runs such a default cold search of a large cell makes; None:
    # LARGE_MAX_COLD_RUNS
    oversample: int = 8  # offspring generated per population member before screening
    explore: float = 0.25  # share of each generation evaluated without regard to screening
    screen_sigmas: float = 3.0  # screening rules out only what is worse by this many errors
    polish_batch: int = 8  # local moves evaluated per call during polish
    polish_exchanges: bool = True  # polish over exchanges of two ions' moments too, beside single-ion moves
    use_gradient: bool | None = None  # ask the model for -dE/dS (a full evaluation, about 2.5x an energy-only
    # one); None: only without a surrogate
    use_surrogate: bool = True
    max_evaluations: int | None = None
    chunk_size: int = 65536  # configurations per model call when enumerating

    def __post_init__(self) -> None:
        for name in ("population", "max_generations", "patience", "warm_patience", "n_lowest", "cold_runs",
                     "max_cold_runs", "tournament_size", "oversample", "polish_batch", "chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.population is not None and self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        for name in ("warm_fraction", "crossover_rate", "cluster_rate", "explore"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


SEARCH_KEYS = tuple(f.name for f in fields(SearchSettings))  # the search's knobs
LARGE_CELL = 16  # magnetic ions above which one cold GA run often ends in another basin (27 Ni: 57 of 80 runs
LARGE_COLD_RUNS = 3  # > 5 meV/cell above the best seen; docs/benchmarks/spin_md.md, "Cold runs until two agree")
LARGE_MAX_COLD_RUNS = 8  # and then more, one at a time, up to this many while no two reach the lowest state
SAME_RUN_ENERGY = 1e-6  # eV: two runs whose best energies are this close reached the same state


@dataclass(frozen=True)
class SearchResult:
    """Best configuration found, what it cost, and the n lowest distinct configurations seen.

    surrogate is the pair model learned on the way; pass the result as `prior` to the search
    of the next, nearby geometry.
    """

    best_moments: np.ndarray
    best_energy: float
    n_evaluations: int
    lowest: list[tuple[np.ndarray, float]] = field(repr=False)
    method: str  # "enumeration" | "genetic"
    n_generations: int = 0  # summed over the runs of a best-of-runs cold search
    surrogate: PairSurrogate | None = field(default=None, repr=False, compare=False)
    n_runs: int = 1  # independent GA runs of a cold search (cold_runs, max_cold_runs) it is the best of
    run_energies: tuple[float, ...] = ()  # the best energy of each of those runs (several runs only)

    @property
    def runs_at_best(self) -> int:
        """How many of the independent runs reached the best energy (1 for a single run)."""
        if not self.run_energies:
            return 1
        return int(np.sum(np.asarray(self.run_energies) <= self.best_energy + SAME_RUN_ENERGY))


def search_ground_state(model: EnergyModel, levels: MomentLevels, *, start: np.ndarray | None = None,
                        prior: SearchResult | None = None, known: Known | list[Known] | None = None, seed: int = 0,
                        settings: SearchSettings | None = None, **overrides) -> SearchResult:
    """Lowest-energy valid configuration of `levels` under `model`.

    Enumerates when the space has at most enumerate_limit configurations (and fits
    max_evaluations); else a GA: tournament selection, uniform crossover, single-ion and
    cluster-reversal mutation (clusters coupled under the surrogate, domains of the model's
    nearest-neighbour graph), oversample x population offspring screened down to population,
    (mu + lambda) elitism, greedy polish of every new best (single-ion moves and exchanges). Stops
    after `patience` generations without a new best (`warm_patience` with a start), max_generations
    or max_evaluations. A cold search (no start, no prior) runs cold_runs independent GAs and keeps
    the lowest (default: above 16 magnetic ions without max_evaluations, where one run often settles in
    another basin, 3 runs, then one more at a time until two runs reach the lowest state or
    max_cold_runs ran; else 1); n_evaluations and n_generations are then summed over the runs.
    start: moments (n_magnetic,) or (k, n_magnetic), snapped to the levels; prior: the result
    for a nearby geometry (its lowest configurations start too, its surrogate seeds the fit).
    known: evaluations already made at this geometry, (moments (k, n_magnetic), energies (k,),
    -dE/dS (k, n_magnetic) or None), or a list of such batches, e.g. the MD step's own at the current
    moments: used as if evaluated, at no cost (n_evaluations and max_evaluations count new model evaluations only).
    overrides: SearchSettings fields, e.g. population=32.
    """
    s = replace(settings or SearchSettings(), **overrides)
    if model.n_magnetic != levels.n_magnetic:
        raise ValueError(f"model has {model.n_magnetic} magnetic ions, levels {levels.n_magnetic}")
    cold = start is None and prior is None
    s = replace(s, population=s.population or (max(16, levels.n_magnetic) if cold else 16),
                patience=s.patience or max(15, levels.n_magnetic))
    if s.max_evaluations is None or levels.n_configurations <= s.max_evaluations:
        if levels.n_configurations <= s.enumerate_limit:
            return _enumerate(model, levels, s.n_lowest, s.chunk_size)
    runs, most = _cold_runs(s, levels) if cold else (1, 1)
    results: list[SearchResult] = []
    for run in range(most):  # with max_evaluations (runs == most), each run gets an equal part of what is left
        if run >= runs and _best_of(results, s.n_lowest).runs_at_best >= 2:
            break
        budget = (None if s.max_evaluations is None
                  else (s.max_evaluations - sum(r.n_evaluations for r in results)) // (most - run))
        if budget is not None and budget < 1:
            break
        rng = np.random.default_rng(seed if run == 0 else [seed, run])  # run 0 draws what a single run draws
        results.append(_genetic(model, levels, start, prior, known, rng, replace(s, max_evaluations=budget)))
    return results[0] if len(results) == 1 else _best_of(results, s.n_lowest)


def _cold_runs(s: SearchSettings, levels: MomentLevels) -> tuple[int, int]:
    """(runs a cold search makes, the most it makes while fewer than two of them reach its lowest state)."""
    if s.cold_runs:
        return s.cold_runs, s.cold_runs
    if levels.n_magnetic > LARGE_CELL and s.max_evaluations is None:
        most = s.max_cold_runs or LARGE_MAX_COLD_RUNS
        return min(LARGE_COLD_RUNS, most), most
    return 1, 1


def _genetic(model: EnergyModel, levels: MomentLevels, start: np.ndarray | None, prior: SearchResult | None,
             known: Known | list[Known] | None, rng: np.random.Generator, s: SearchSettings) -> SearchResult:
    """One GA run (search_ground_state's, after the enumeration check) with its own evaluations and surrogate."""
    if prior is not None:  # its lowest configurations join the start
        lowest = np.array([m for m, _ in prior.lowest])
        start = lowest if start is None else np.concatenate([np.atleast_2d(start), lowest])
    surrogate = None
    if s.use_surrogate and PairSurrogate.size(levels) <= MAX_PARAMETERS:
        if prior is not None and prior.surrogate is not None and prior.surrogate.fits(levels):
            surrogate = prior.surrogate.carried(levels)
        else:
            surrogate = PairSurrogate(levels)
    gradient = surrogate is None if s.use_gradient is None else s.use_gradient
    evals = _Evaluations(model, levels, gradient, s.max_evaluations, surrogate)
    for batch in [known] if isinstance(known, tuple) else known or []:
        evals.add_known(*batch)
    generations = _Genetic(evals, rng, s).run(start)
    lowest = [(levels.to_moments(evals.rows[k])[0], e) for k, e in evals.lowest(s.n_lowest)]
    return SearchResult(lowest[0][0], lowest[0][1], evals.count, lowest, "genetic", generations, surrogate)


def _best_of(results: list[SearchResult], n_lowest: int) -> SearchResult:
    """Independent runs as one result: the lowest distinct configurations of all, their summed cost, the
    surrogate of the run that found the best."""
    seen: dict[bytes, tuple[np.ndarray, float]] = {}
    for result in results:
        for moments, energy in result.lowest:
            seen.setdefault(np.asarray(moments, dtype=float).tobytes(), (moments, energy))
    lowest = sorted(seen.values(), key=lambda state: state[1])[:n_lowest]
    winner = min(results, key=lambda r: r.best_energy)
    return SearchResult(lowest[0][0], lowest[0][1], sum(r.n_evaluations for r in results), lowest, "genetic",
                        sum(r.n_generations for r in results), winner.surrogate, len(results),
                        tuple(float(r.best_energy) for r in results))


def sector_windows(levels: MomentLevels, ground: np.ndarray, max_sectors: int) -> list[tuple[float, float]]:
    """The total-moment sectors around `ground` as windows (lowest, highest total), sorted.

    The totals the levels reach are binned into windows 2 m wide, m the mean |moment| of ground's nonzero
    ions, centred on ground's total + 2 k m (k ions of ground's magnitudes reversed where the magnitudes
    are equal); ground's own bin (k = 0) is left out, each other bin spans the totals it holds. With
    fix_global_sign and no pinned signs, S and -S are one state: totals count by magnitude. Where there
    are more than max_sectors bins, max_sectors of them are kept, spread evenly from the nearest to the
    farthest. Empty where ground has no nonzero moment or max_sectors < 1.
    """
    ground = np.asarray(ground, dtype=float)
    nonzero = np.abs(ground[ground != 0])
    if nonzero.size == 0 or max_sectors < 1:
        return []
    width = 2 * float(nonzero.mean())
    totals, own = levels.reachable_totals(), float(ground.sum())
    if levels.fix_global_sign and not levels.fixed_signs:
        totals, own = np.unique(np.abs(totals)), abs(own)
    bins = np.floor((totals - own) / width + 0.5).astype(int)
    ks = sorted(set(bins.tolist()) - {0}, key=lambda k: (abs(k), k))
    if len(ks) > max_sectors:
        ks = [ks[i] for i in np.unique(np.round(np.linspace(0, len(ks) - 1, max_sectors)).astype(int))]
    return sorted((float(totals[bins == k].min()), float(totals[bins == k].max())) for k in ks)


def sector_ground_states(model: EnergyModel, levels: MomentLevels, ground: np.ndarray, *, max_sectors: int = 4,
                         seed: int = 0, settings: SearchSettings | None = None,
                         **overrides) -> list[tuple[np.ndarray, float]]:
    """The lowest configuration (moments, energy) of each total-moment sector around `ground` (``sector_windows``).

    What a DFT run with the total moment fixed to that sector's (VASP NUPDOWN, GPAW fixmagmom) relaxes to,
    as the model sees it: orderings far from the ground state (half the ions reversed, whole layers) that MD
    never visits, where a model trained near its ground state is least constrained. One search per sector
    (``search_ground_state`` within the window).
    """
    states = []
    for k, (lowest, highest) in enumerate(sector_windows(levels, ground, max_sectors)):
        window = levels.within_total((lowest + highest) / 2, (highest - lowest) / 2)
        result = search_ground_state(model, window, seed=seed + k, settings=settings, **overrides)
        states.append((np.asarray(result.best_moments, dtype=float), float(result.best_energy)))
    return states


def _enumerate(model: EnergyModel, levels: MomentLevels, n_lowest: int, chunk_size: int) -> SearchResult:
    best_rows = np.empty((0, levels.n_magnetic), dtype=np.int8)
    best_e = np.empty(0)
    count = 0
    for rows in levels.iter_indices(chunk_size):
        e, _ = model.evaluate(levels.to_moments(rows))
        count += len(rows)
        best_rows, best_e = np.concatenate([best_rows, rows]), np.concatenate([best_e, e])
        keep = np.argsort(best_e, kind="stable")[:n_lowest]
        best_rows, best_e = best_rows[keep], best_e[keep]
    lowest = [(m, float(e)) for m, e in zip(levels.to_moments(best_rows), best_e)]
    return SearchResult(lowest[0][0], lowest[0][1], count, lowest, "enumeration")


class _Evaluations:
    """Batched, deduplicated, budgeted evaluation of first-up level-index rows."""

    def __init__(self, model, levels, gradient, budget, surrogate):
        self.model, self.levels, self.gradient, self.surrogate = model, levels, gradient, surrogate
        self.budget = np.inf if budget is None else int(budget)
        self.energy: dict[bytes, float] = {}
        self.minus_grad: dict[bytes, np.ndarray] = {}
        self.rows: dict[bytes, np.ndarray] = {}
        self.n_known = 0

    @property
    def count(self) -> int:
        """Model evaluations made (known ones excluded)."""
        return len(self.energy) - self.n_known

    def add_known(self, moments: np.ndarray, energies: np.ndarray, minus_grad: np.ndarray | None) -> None:
        """Record evaluations made elsewhere; moments off the levels or outside the window are ignored."""
        moments = np.atleast_2d(np.asarray(moments, dtype=float))
        energies = np.atleast_1d(np.asarray(energies, dtype=float))
        grads = None if minus_grad is None else np.atleast_2d(np.asarray(minus_grad, dtype=float))
        if len(energies) != len(moments) or (grads is not None and grads.shape != moments.shape):
            raise ValueError(f"known: {len(moments)} configuration(s), {len(energies)} energies, -dE/dS of "
                             f"shape {None if grads is None else grads.shape}")
        rows = self.levels.to_indices(moments, snap=True)
        exact = np.all(np.abs(self.levels.to_moments(rows) - moments) < 1e-6, axis=1)
        keep = np.flatnonzero(exact & self.levels.is_allowed(rows))
        if len(keep) == 0:
            return
        rows, energies = rows[keep], energies[keep]
        first_up_rows = self.levels.first_up(rows)  # a row and its reversal share a key; -dE/dS flips
        if grads is not None:
            grads = np.where(np.all(first_up_rows == rows, axis=1)[:, None], 1.0, -1.0) * grads[keep]
        for n, row in enumerate(first_up_rows):
            key = row.tobytes()
            if key not in self.energy:
                self.energy[key], self.rows[key] = float(energies[n]), row
                if grads is not None:
                    self.minus_grad[key] = grads[n]
                self.n_known += 1
        if self.surrogate is not None:
            self.surrogate.add(first_up_rows, energies, grads)

    @property
    def exhausted(self) -> bool:
        return self.count >= self.budget

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Energies of valid rows (inf for rows beyond the budget); new rows in one model call."""
        rows = np.atleast_2d(rows)
        keys = self.levels.keys(rows)
        new: dict[bytes, np.ndarray] = {}
        for key, row in zip(keys, rows):
            if key not in self.energy and key not in new and self.count + len(new) < self.budget:
                new[key] = row
        if new:
            batch = np.array(list(new.values()), dtype=np.int8)
            if not self.levels.is_valid(batch).all():
                raise AssertionError("the search produced an invalid configuration")
            e, g = self.model.evaluate(self.levels.to_moments(batch), gradient=self.gradient)
            if self.surrogate is not None:
                self.surrogate.add(batch, e, g)
            for n, key in enumerate(new):
                self.energy[key], self.rows[key] = float(e[n]), batch[n]
                if g is not None:
                    self.minus_grad[key] = g[n]
        return np.array([self.energy.get(k, np.inf) for k in keys])

    def lowest(self, n: int) -> list[tuple[bytes, float]]:
        return sorted(self.energy.items(), key=lambda kv: kv[1])[:n]

    def best(self) -> bytes:
        return min(self.energy, key=self.energy.__getitem__)


class _Genetic:
    """One GA run over an _Evaluations cache; population rows are canonical level indices."""

    def __init__(self, evals: _Evaluations, rng: np.random.Generator, settings: SearchSettings) -> None:
        self.evals, self.levels, self.rng, self.s = evals, evals.levels, rng, settings
        self.surrogate = evals.surrogate
        self.graph = evals.model.neighbours if settings.domain_reversals else None
        self.size = settings.population

    def run(self, start) -> int:
        s = self.s
        warm = start is not None
        patience = s.warm_patience if warm else s.patience
        n_eval = max(2, int(round(s.warm_fraction * self.size))) if warm else self.size
        pop = self._initial(start)
        best = self.evals.best()
        stale, generation = 0, 0
        while stale < patience and generation < s.max_generations and not self.evals.exhausted:
            generation += 1
            children = self._screened(self._children(pop, s.oversample * self.size), pop, n_eval, warm)
            self.evals(children)
            pop = self._select(np.concatenate([pop, children]))
            if self.evals.energy[self.evals.best()] < self.evals.energy[best] - 1e-12:
                polished = self._polish(self.evals.best())
                pop = self._select(np.concatenate([pop, polished[None]]))
                best, stale = self.evals.best(), 0
            else:
                stale += 1
        self._polish(self.evals.best(), full=True)
        return generation

    def _initial(self, start) -> np.ndarray:
        levels = self.levels
        if start is None:
            rows = levels.random_indices(self.size, self.rng)
            self.evals(rows)
            return self._select(rows)
        seeds = levels.to_indices(start, snap=True)
        seeds = seeds[levels.is_allowed(seeds)]
        if len(seeds) == 0:
            raise ValueError("no start configuration lies within the levels and total-moment window")
        seeds = levels.first_up(seeds)
        self.evals(seeds)  # in order: with a small budget the first (the caller's start) are kept
        evaluated = [k for k in levels.keys(seeds) if k in self.evals.energy]
        best = min(evaluated, key=self.evals.energy.__getitem__)
        return self._select(np.concatenate([self._polish(best, full=True)[None], seeds]))

    def _select(self, rows: np.ndarray) -> np.ndarray:
        """(mu + lambda): the `size` lowest distinct evaluated rows, lowest first."""
        unique = {k: r for k, r in zip(self.levels.keys(rows), rows) if k in self.evals.energy}
        order = sorted(unique, key=self.evals.energy.__getitem__)[: self.size]
        return np.array([unique[k] for k in order], dtype=np.int8)

    def _tournament(self, n: int) -> int:
        return int(self.rng.integers(0, n, size=self.s.tournament_size).min())  # pop is sorted

    def _children(self, pop: np.ndarray, n_children: int) -> np.ndarray:
        """Offspring not evaluated before: tournament, uniform crossover, repair, mutation."""
        levels, rng, n = self.levels, self.rng, self.levels.n_magnetic
        seen: set[bytes] = set()
        children = []
        for _ in range(4 * n_children):
            if len(children) >= n_children:
                break
            child = pop[self._tournament(len(pop))].copy()
            if rng.random() < self.s.crossover_rate:
                other = pop[self._tournament(len(pop))]
                take = rng.random(n) < 0.5
                child[take] = other[take]
                if not levels.is_allowed(child)[0]:
                    child = self._repair(child)
            for _ in range(1 + rng.poisson(self.s.extra_mutations)):
                child = self._mutate(child)
            child = levels.first_up(child)[0]
            key = child.tobytes()
            if key not in self.evals.energy and key not in seen:
                seen.add(key)
                children.append(child)
        return np.array(children, dtype=np.int8).reshape(-1, n)

    def _mutate(self, row: np.ndarray) -> np.ndarray:
        """A random allowed single-ion move or, at cluster_rate, the reversal of a cluster: one coupled
        under the surrogate or a domain of the nearest-neighbour graph (in random order when both exist,
        the second where the first leaves the levels or window)."""
        reversals = [move for move, usable in ((self._cluster_flip, self.surrogate is not None),
                                               (self._domain_flip, self.graph is not None)) if usable]
        if reversals and self.rng.random() < self.s.cluster_rate:
            if len(reversals) > 1 and self.rng.integers(len(reversals)):
                reversals.reverse()
            for reverse in reversals:
                flipped = reverse(row)
                if flipped is not None:
                    return flipped
        moves = self.levels.single_moves(row)
        return moves[self.rng.integers(len(moves))] if len(moves) else row

    def _cluster_flip(self, row: np.ndarray) -> np.ndarray | None:
        """Reverse the connected component, around a random ion, of the graph |J_ij| > t (t a
        random fraction of the largest |J|): weakly coupled blocks such as layers, which
        single-ion moves cannot reorient."""
        J = np.abs(self.surrogate.coupling)
        adjacency = J > self.rng.choice([0.1, 0.25, 0.5]) * max(J.max(), 1e-300)
        cluster = np.zeros(len(J), dtype=bool)
        cluster[self.rng.integers(len(J))] = True
        while True:
            grown = cluster | adjacency[cluster].any(axis=0)
            if (grown == cluster).all():
                break
            cluster = grown
        return self._reversed(row, cluster)

    def _domain_flip(self, row: np.ndarray) -> np.ndarray | None:
        """Reverse a domain around a random ion on the nearest-neighbour graph: its connected ions of the
        same sign or, 30 % of the time, the ion and its neighbours whatever their signs; each bond kept at
        a rate drawn from 0.5, 0.8 and 1; ions at zero or that may not reverse (fixed signs) are left out. Walls
        between domains (a layer of one sign beside a mixed one) are what single-ion moves cross only one
        uphill step at a time. None where no ion can reverse or the result leaves the window."""
        rng, graph, n = self.rng, self.graph, self.levels.n_magnetic
        sign = np.sign(self.levels.to_moments(row)[0])
        reversible = (sign != 0) & (self.levels.flip_table[np.arange(n), row] >= 0)
        centre = int(rng.integers(n))
        kept = rng.choice([0.5, 0.8, 1.0])
        domain = np.zeros(n, dtype=bool)
        domain[centre] = True
        if rng.random() < 0.3:
            domain |= graph[centre] & (rng.random(n) < kept)
        else:
            frontier = [centre]
            while frontier:
                grown = graph[frontier.pop()] & (sign == sign[centre]) & ~domain & (rng.random(n) < kept)
                domain |= grown
                frontier.extend(np.flatnonzero(grown))
        domain &= reversible
        return self._reversed(row, domain) if domain.any() else None

    def _reversed(self, row: np.ndarray, ions: np.ndarray) -> np.ndarray | None:
        """row with the moments of the masked ions reversed, or None where that leaves the levels or window."""
        flipped = row.copy()
        flipped[ions] = self.levels.flip_table[np.flatnonzero(ions), row[ions]]
        ok = (flipped >= 0).all() and self.levels.is_allowed(flipped)[0]
        return flipped if ok else None

    def _repair(self, row: np.ndarray) -> np.ndarray:
        """Bring a row back into the total-moment window, changing as few ions as it can."""
        levels = self.levels
        for _ in range(levels.n_magnetic):
            moves = levels.single_moves(row)  # with a fixed total: rows inside the window
            if len(moves):
                return moves[self.rng.integers(len(moves))]
            m = levels.to_moments(row)[0]
            i = self.rng.integers(levels.n_magnetic)
            row = row.copy()
            row[i] = int(np.argmin(np.abs(m.sum() - m[i] + levels.values[i] - levels.total_moment)))
        raise RuntimeError("could not repair a configuration into the total-moment window")

    def _screened(self, candidates: np.ndarray, pop: np.ndarray, n_eval: int, warm: bool) -> np.ndarray:
        """At most n_eval rows to evaluate: after a free descent on the surrogate, those predicted
        to enter the population (to beat its best when warm) within screen_sigmas errors, and
        explore * n_eval explorers."""
        if self.surrogate is None or len(candidates) == 0:
            return candidates[:n_eval]
        descended = self.levels.first_up(self.surrogate.descend(candidates))
        rows = np.concatenate([descended, candidates])
        fresh = {k: r for k, r in zip(self.levels.keys(rows), rows) if k not in self.evals.energy}
        rows = np.array(list(fresh.values()), dtype=np.int8).reshape(-1, self.levels.n_magnetic)
        if len(rows) == 0:
            return rows
        predicted = self.surrogate.predict(rows)
        energies = [self.evals.energy[k] for k in self.levels.keys(pop)]
        if warm:  # near the old ground state: only what may beat the best, judged as moves are
            bar = min(energies) + self.s.screen_sigmas * self.surrogate.move_error
        else:
            bar = max(energies) + self.s.screen_sigmas * self.surrogate.error
        order = np.argsort(predicted, kind="stable")
        n_explore = max(1, int(self.s.explore * n_eval))
        promising = [i for i in order[: n_eval - n_explore] if predicted[i] < bar]
        rest = np.setdiff1d(order, promising)
        explorers = self.rng.choice(rest, size=min(n_explore, len(rest)), replace=False)
        return rows[np.concatenate([promising, explorers]).astype(int)]

    def _polish(self, key: bytes, full: bool = False) -> np.ndarray:
        """Greedy descent from a row over screened single-ion moves and (polish_exchanges) exchanges of two
        ions' moments, in batches.

        Each step evaluates the most promising moves until one improves; it stops at the first
        batch without improvement or, with full=True, once every move the screening cannot rule
        out (predicted rise below screen_sigmas errors of predicted moves) has been evaluated.
        """
        levels, evals = self.levels, self.evals
        row, energy = evals.rows[key], evals.energy[key]
        while not evals.exhausted:
            moves = levels.single_moves(row)
            if self.s.polish_exchanges and levels.total_moment is None:  # else single_moves holds them
                moves = np.concatenate([moves, levels.exchange_moves(row)])
            if len(moves) == 0:
                break
            if self.surrogate is not None:
                predicted = self.surrogate.predict(moves) - self.surrogate.predict(row)[0]
                keep = predicted < self.s.screen_sigmas * self.surrogate.move_error
            else:
                predicted = self._first_order(row, moves)
                keep = np.ones(len(moves), dtype=bool)
            order = np.argsort(predicted, kind="stable")
            order = order[keep[order]]
            candidates = levels.first_up(moves[order])
            energies, done = np.empty(0), 0
            while done < len(candidates) and not evals.exhausted:
                energies = np.concatenate([energies, evals(candidates[done: done + self.s.polish_batch])])
                done += self.s.polish_batch
                if energies.min() < energy or not full:
                    break
            if self.surrogate is not None and len(energies):
                ok = np.isfinite(energies)
                self.surrogate.log_moves((energies - energy)[ok], predicted[order][: len(energies)][ok])
            if len(energies) == 0 or energies.min() >= energy:
                break
            best = int(np.argmin(energies))
            row, energy = candidates[best], energies[best]
        return row

    def _first_order(self, row: np.ndarray, moves: np.ndarray) -> np.ndarray:
        """dE ~ -(-dE/dS) . dS from the spin force at row (random order without one)."""
        minus_grad = self.evals.minus_grad.get(row.tobytes())
        if minus_grad is None:
            return self.rng.random(len(moves))
        return -(self.levels.to_moments(moves) - self.levels.to_moments(row)) @ minus_grad
