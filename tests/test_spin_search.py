"""Moment levels, energy models and the ground-state search of spingen.spin (numpy only, fast)."""

import itertools

import numpy as np
import pytest

from spingen.spin import (
    AnalyticSpinModel,
    EnergyModel,
    Exchange,
    MomentLevels,
    SearchSettings,
    SymmetrizedModel,
    infer_magnitudes,
    search_ground_state,
    triangular_layers,
)
from spingen.spin.search import _Evaluations, _Genetic, sector_ground_states, sector_windows

SYMBOLS8 = ["Ni", "Co", "Mn", "Ni", "Co", "Mn", "Ni", "Co"]
MAGS8 = {"Ni": [1, 3], "Co": [1, 4], "Mn": [3, 4]}  # 4 signed states per ion
ONSITE8 = {"Ni": {1: 0.0, 3: 0.45}, "Co": {1: 0.0, 4: 0.7}, "Mn": {3: 0.0, 4: 0.25}}
EXCHANGE = [Exchange(0.025, 0.5), Exchange(-0.004, 1.5, r_ref=5.0, cutoff=7.0)]


def model8(seed: int, biquadratic: float = 5e-4, symbols=SYMBOLS8) -> AnalyticSpinModel:
    """An 8-ion layered cell, randomly strained and displaced, with frustrated exchange."""
    rng = np.random.default_rng(seed)
    pos, cell = triangular_layers(2, 2, 2)
    strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
    pos = pos @ strain + rng.normal(0, 0.15, pos.shape)
    bq = Exchange(biquadratic, 0.5) if biquadratic else None
    return AnalyticSpinModel(pos, cell @ strain, symbols, ONSITE8, EXCHANGE, biquadratic=bq)


SYMBOLS27 = [["Ni", "Co", "Mn"][(i + j + k) % 3] for k in range(3) for j in range(3) for i in range(3)]


def model27() -> AnalyticSpinModel:
    """A 27-ion NCM-like cell: three 3x3 triangular layers, unstrained, with the 8-ion cell's on-site and exchange."""
    pos, cell = triangular_layers(3, 3, 3)
    return AnalyticSpinModel(pos, cell, SYMBOLS27, ONSITE8, EXCHANGE)


def all_rows(levels: MomentLevels) -> np.ndarray:
    return np.array(list(itertools.product(*[range(n) for n in levels.n_values])), dtype=np.int8)


def brute_force(model: EnergyModel, levels: MomentLevels) -> float:
    """Minimum over every allowed configuration, both global signs, evaluated directly."""
    rows = all_rows(levels)
    rows = rows[levels.is_allowed(rows)]
    return float(model.calculate(levels.to_moments(rows), False)[0].min())


class Recording(EnergyModel):
    """Wraps a model and keeps every configuration it was asked to evaluate, and whether with -dE/dS."""

    def __init__(self, inner: EnergyModel) -> None:
        super().__init__(inner.n_magnetic)
        self.inner, self.seen, self.gradients = inner, [], []

    def calculate(self, moments, gradient):
        self.seen.append(moments.copy())
        self.gradients.append(gradient)
        return self.inner.calculate(moments, gradient)

    @property
    def neighbours(self) -> np.ndarray | None:
        return self.inner.neighbours

    @property
    def all_seen(self) -> np.ndarray:
        return np.concatenate(self.seen)


# -- levels ------------------------------------------------------------------------------------
def test_signed_values_and_counts():
    levels = MomentLevels({"Co": [0, 1, 4, 5]}, ["Li", "Co", "O", "Co", "Co"], fix_global_sign=False)
    assert levels.magnetic_indices.tolist() == [1, 3, 4]
    assert levels.values[0].tolist() == [-5, -4, -1, 0, 1, 4, 5]
    assert levels.n_configurations == 7**3
    fixed = MomentLevels({"Co": [0, 1, 4, 5]}, ["Li", "Co", "O", "Co", "Co"])
    assert fixed.n_configurations == (7**3 - 1) // 2 + 1  # all-zero is its own reversal
    rows = np.concatenate(list(fixed.iter_indices(chunk_size=10)))
    assert len(rows) == fixed.n_configurations == len(set(fixed.keys(rows)))
    assert fixed.is_valid(rows).all()


@pytest.mark.parametrize("total, signs, fix", [(None, {}, True), (2.0, {}, True), (0.0, {}, True),
                                               (0.0, {1: -1}, True), (1.0, {3: 1}, False)])
def test_counts_and_enumeration_match_brute_force(total, signs, fix):
    symbols = ["Ni", "Co", "Mn", "Co", "Ni"]
    mags = {"Ni": [0, 1, 3], "Co": [0, 1.5], "Mn": [2, 4]}
    levels = MomentLevels(mags, symbols, total_moment=total, fixed_signs=signs, fix_global_sign=fix)
    rows = all_rows(levels)
    m = levels.to_moments(rows)
    ok = levels.is_allowed(rows)
    if total is not None:
        assert np.allclose(m[ok].sum(axis=1), total)
    for atom, sign in signs.items():
        assert (sign * m[ok, list(levels.magnetic_indices).index(atom)] >= 0).all()
    expected = set()
    allowed = {r.tobytes() for r in rows[ok]}
    for r, mm in zip(rows[ok], m[ok]):  # independent canonical rule
        nz = mm[mm != 0]
        flip = levels.to_indices(-mm, snap=True)[0] if np.isin(-mm, levels.table).all() else None
        flip_ok = flip is not None and np.allclose(levels.to_moments(flip)[0], -mm) and flip.tobytes() in allowed
        if not fix or not flip_ok or nz.size == 0 or nz[0] > 0:
            expected.add(r.tobytes())
    enumerated = np.concatenate(list(levels.iter_indices(chunk_size=7)))
    assert levels.n_configurations == len(expected)
    assert set(levels.keys(enumerated)) == expected and len(enumerated) == len(expected)


def test_first_up_and_random_sampling():
    levels = MomentLevels(MAGS8, SYMBOLS8)
    rng = np.random.default_rng(3)
    free = all_rows(levels)[rng.choice(4**8, 200, replace=False)]
    canon = levels.first_up(free)
    assert levels.is_valid(canon).all()
    flipped = levels.flip_table[np.arange(8), free]
    assert np.array_equal(levels.first_up(flipped), canon)
    m = levels.to_moments(canon)
    assert (m[:, 0] > 0).all()  # no zero level: the first ion carries the sign
    constrained = MomentLevels(MAGS8, SYMBOLS8, total_moment=2.0)
    sample = constrained.random_indices(300, rng)
    assert constrained.is_valid(sample).all()
    assert np.allclose(constrained.to_moments(sample).sum(axis=1), 2.0)


def test_conversions_and_bad_input():
    levels = MomentLevels(MAGS8, SYMBOLS8)
    m = np.array([[1, -4, 3, 1, 1, -4, -3, 4]], dtype=float)
    assert np.array_equal(levels.to_moments(levels.to_indices(m)), m)
    assert np.array_equal(levels.to_moments(levels.to_indices(m + 0.3, snap=True)), m)
    with pytest.raises(ValueError, match=r"atom 1 \(Co\)"):
        levels.to_indices([[1, 2, 3, 1, 1, 4, 3, 4]])
    with pytest.raises(ValueError, match="Co"):
        MomentLevels({"Co": [-1, 2]}, ["Co"])
    with pytest.raises(ValueError, match="Ni.*repeat"):
        MomentLevels({"Ni": [1, 1.0]}, ["Ni"])
    with pytest.raises(ValueError, match=r"atom 2 \(O\).*not a magnetic ion"):
        MomentLevels(MAGS8, ["Ni", "Co", "O"], fixed_signs={2: 1})
    with pytest.raises(ValueError, match=r"atom 0.*\+1 or -1"):
        MomentLevels(MAGS8, ["Ni"], fixed_signs={0: 2})
    with pytest.raises(ValueError, match="no atom"):
        MomentLevels(MAGS8, ["Li", "O"])
    with pytest.raises(ValueError, match="total moment"):
        MomentLevels({"Ni": [1, 3]}, ["Ni", "Ni"], total_moment=1.0)
    with pytest.raises(ValueError, match=r"atom 0 \(Ni\).*outside"):
        levels.to_moments([[4, 0, 0, 0, 0, 0, 0, 0]])


def test_infer_magnitudes():
    observed = {"Ni": [0.02, -0.05, 0.98, -1.03, 1.01, 2.95, -3.05],
                "Mn": [3.9, 4.05, -2.95, 3.02, 1.85, 1.6]}
    levels = infer_magnitudes(observed, tol=0.2)
    assert levels["Ni"] == [0.0, pytest.approx(1.007, abs=1e-3), pytest.approx(3.0, abs=1e-3)]
    assert levels["Mn"] == [pytest.approx(1.6), pytest.approx(1.85), pytest.approx(2.985),
                            pytest.approx(3.975)]
    assert len(infer_magnitudes(observed, tol=0.3)["Mn"]) == 3  # 1.6 and 1.85 merge
    with pytest.raises(ValueError, match="tol"):
        infer_magnitudes(observed, tol=0)
    with pytest.raises(ValueError, match="Co"):
        infer_magnitudes({"Co": []})
    with pytest.raises(ValueError, match="Fe.*NaN"):
        infer_magnitudes({"Fe": [1.0, np.nan]})


# -- models ------------------------------------------------------------------------------------
def test_analytic_model_gradient_flip_and_counting():
    model = model8(0, biquadratic=1e-3)
    rng = np.random.default_rng(1)
    S = rng.uniform(-4.5, 4.5, (5, 8))
    e, g = model.evaluate(S, gradient=True)
    h = 1e-6
    fd = np.array([(model.calculate(S + h * np.eye(8)[i], False)[0]
                    - model.calculate(S - h * np.eye(8)[i], False)[0]) / (2 * h) for i in range(8)]).T
    assert np.allclose(-fd, g, atol=1e-6)
    assert np.allclose(model.evaluate(-S)[0], e)
    assert model.n_evaluations == 10 and model.n_calls == 2
    with pytest.raises(ValueError, match=r"\(nconf, 8\)"):
        model.evaluate(np.zeros((2, 7)))
    with pytest.raises(ValueError, match=r"\(Ni, Co\)"):
        pos, cell = triangular_layers(2, 1, 1)
        AnalyticSpinModel(pos, cell, ["Ni", "Co"], ONSITE8, {("Ni", "Ni"): Exchange(0.01)})


def test_27_ion_cell_builds_and_evaluates():
    model = model27()
    assert model.n_magnetic == 27
    nn = np.sort(model.distances, axis=1)[:, 1:7]
    assert np.allclose(nn, 2.85)  # six in-plane neighbours at a
    assert model.evaluate(np.ones((3, 27)))[0].shape == (3,)


def test_cold_search_effort_grows_with_the_ions():
    """Population and cold patience default to max(16, n) and max(15, n) for a cold search: the first generation
    of a 27-ion search is 27 configurations, of an 8-ion search 16; an explicit population wins."""
    for model, syms, kwargs, first in [(model27(), SYMBOLS27, {}, 27),
                                       (model8(3), SYMBOLS8, {}, 16),
                                       (model8(3), SYMBOLS8, {"population": 20}, 20)]:
        rec = Recording(model)
        search_ground_state(rec, MomentLevels(MAGS8, syms), seed=0, enumerate_limit=0, max_generations=1, **kwargs)
        assert len(rec.seen[0]) == first
    ncm27, levels27 = model27(), MomentLevels(MAGS8, SYMBOLS27)
    assert search_ground_state(ncm27, levels27, seed=0, cold_runs=1).n_generations >= 27  # cold patience 27
    rec = Recording(ncm27)  # a warm search keeps generations of warm_fraction x 16 (and polish batches of 8)
    search_ground_state(rec, levels27, seed=0, start=np.ones(27), max_generations=3)
    assert max(len(batch) for batch in rec.seen) <= 8


def test_large_cold_searches_keep_the_best_of_independent_runs():
    """Above 16 magnetic ions a cold search runs 3 independent GAs and keeps the lowest, then one more at a time
    until two runs reach the lowest state or max_cold_runs (8) ran: the same runs as that many cold_runs; its
    first run draws what a single run draws, its cost is the sum, its lowest states the distinct lowest of all
    runs; on these short runs the extra runs find a lower state from some seeds, and some seeds' first 3 runs
    disagree. Warm and budgeted searches run once."""
    model, levels = model27(), MomentLevels(MAGS8, SYMBOLS27)
    short = {"patience": 3, "population": 16}
    gains, n_runs = [], []
    for seed in range(4):
        single, rec = Recording(model), Recording(model)
        one = search_ground_state(single, levels, seed=seed, cold_runs=1, **short)
        best = search_ground_state(rec, levels, seed=seed, **short)
        assert all(np.array_equal(a, b) for a, b in zip(single.seen, rec.seen[: len(single.seen)]))
        assert best.n_evaluations == sum(len(batch) for batch in rec.seen) > 2 * one.n_evaluations
        energies = [e for _, e in best.lowest]
        assert energies == sorted(energies) and energies[0] == best.best_energy <= one.best_energy
        assert len({np.asarray(m).tobytes() for m, _ in best.lowest}) == len(best.lowest) == 5
        gains.append(one.best_energy - best.best_energy)
        explicit = search_ground_state(model, levels, seed=seed, cold_runs=best.n_runs, **short)
        assert (explicit.best_energy, explicit.n_evaluations) == (best.best_energy, best.n_evaluations)
        assert 3 <= best.n_runs <= 8 and one.n_runs == 1
        assert len(best.run_energies) == best.n_runs and min(best.run_energies) == best.best_energy
        assert best.runs_at_best == sum(e <= best.best_energy + 1e-6 for e in best.run_energies) >= 1
        assert best.runs_at_best >= 2 or best.n_runs == 8
        if best.n_runs > 3:  # the run before the last left the lowest state reached once
            assert search_ground_state(model, levels, seed=seed, cold_runs=best.n_runs - 1, **short).runs_at_best == 1
        capped = search_ground_state(model, levels, seed=seed, max_cold_runs=3, **short)
        assert capped.n_runs == 3 and capped.run_energies == best.run_energies[:3]
        assert one.run_energies == () and one.runs_at_best == 1
        n_runs.append(best.n_runs)
    assert max(gains) > 1e-3 and min(n_runs) == 3 < max(n_runs)
    start = np.ones(27)
    warm = [search_ground_state(model, levels, seed=0, start=start, cold_runs=k, **short).n_evaluations for k in (1, 3)]
    assert warm[0] == warm[1]
    budgeted, rec = Recording(model), Recording(model)  # the budget is shared out: each run gets its part
    split = search_ground_state(budgeted, levels, seed=0, max_evaluations=300, cold_runs=3, **short)
    first = search_ground_state(rec, levels, seed=0, max_evaluations=100, cold_runs=1, **short)
    assert split.n_evaluations <= 300 and all(np.array_equal(a, b) for a, b in zip(rec.seen, budgeted.seen))
    assert split.n_evaluations > first.n_evaluations
    assert search_ground_state(model, levels, seed=0, max_evaluations=300, **short).n_runs == 1
    assert search_ground_state(model, levels, seed=3, max_cold_runs=2, **short).n_runs == 2  # fewer than 3 allowed
    assert search_ground_state(model, levels, seed=3, cold_runs=4, max_cold_runs=8, **short).n_runs == 4  # exactly
    small = search_ground_state(model8(3), MomentLevels(MAGS8, SYMBOLS8), seed=0, enumerate_limit=0, **short)
    assert small.n_evaluations == search_ground_state(model8(3), MomentLevels(MAGS8, SYMBOLS8), seed=0,
                                                      enumerate_limit=0, cold_runs=1, **short).n_evaluations
    for name in ("cold_runs", "max_cold_runs"):
        with pytest.raises(ValueError, match=name):
            SearchSettings(**{name: 0})


def test_domain_reversals_follow_the_nearest_neighbour_graph():
    """The model's nearest-neighbour graph is its first shell (six in-plane ions at a in triangular layers); a
    domain reversal flips a connected set of it: ions of one sign, or an ion and some of its neighbours."""
    model, levels = model27(), MomentLevels(MAGS8, SYMBOLS27)
    graph = model.neighbours
    assert graph.sum(axis=1).tolist() == [6] * 27 and (graph == graph.T).all() and not graph.diagonal().any()
    assert np.array_equal(graph, (model.distances > 0) & (model.distances < 3.0))
    assert SymmetrizedModel(model).neighbours is graph
    rng = np.random.default_rng(0)
    ga = _Genetic(_Evaluations(model, levels, False, None, None), rng, SearchSettings(population=16))
    sizes = []
    for row in levels.random_indices(40, rng):
        flipped = ga._domain_flip(row)
        ions = np.flatnonzero(flipped != row)
        before, after = levels.to_moments(row)[0][ions], levels.to_moments(flipped)[0][ions]
        assert len(ions) >= 1 and np.allclose(after, -before)
        reached = {ions[0]}
        for _ in ions:
            reached |= {j for i in reached for j in ions if graph[i, j]}
        assert reached == set(ions)  # connected
        one_sign = len(set(np.sign(before))) == 1
        assert one_sign or any(graph[i, np.setdiff1d(ions, i)].all() for i in ions)  # else an ion and neighbours
        sizes.append(len(ions))
    assert max(sizes) >= 4
    pinned = MomentLevels({"Ni": [0, 1], "Co": [0, 1], "Mn": [0, 3]}, SYMBOLS27, fixed_signs={0: 1, 1: 1})
    ga = _Genetic(_Evaluations(model, pinned, False, None, None), rng, SearchSettings(population=16))
    for row in pinned.random_indices(40, rng):
        flipped = ga._domain_flip(row)
        if flipped is None:  # only where no reversible ion was drawn
            continue
        changed = np.flatnonzero(flipped != row)
        assert len(changed) and not {0, 1} & set(changed) and (pinned.to_moments(row)[0][changed] != 0).all()
    without = _Genetic(_Evaluations(model, levels, False, None, None), rng,
                       SearchSettings(population=16, domain_reversals=False))
    assert without.graph is None


def test_the_polish_exchanges_two_ions_moments_out_of_a_single_ion_minimum():
    """Fields on the ions and a stiff total moment: every single-ion move from the start rises, so only an
    exchange of two ions' moments (total kept) leads down. The polish descends over exchanges to the
    lowest arrangement, and stays at the start without them."""
    h = np.array([0.3, 0.2, 0.1, -0.1, -0.2, -0.3])

    class FieldsStiffTotal(EnergyModel):
        def calculate(self, moments, gradient):
            total = moments.sum(axis=1)
            minus_grad = -(h[None, :] + 2 * total[:, None]) if gradient else None
            return moments @ h + total**2, minus_grad

    model = FieldsStiffTotal(6)
    levels = MomentLevels({"Ni": [1.0]}, ["Ni"] * 6, fix_global_sign=False)
    start = levels.to_indices(np.array([1.0, -1, 1, -1, 1, -1]))[0]
    start_energy = model.evaluate(levels.to_moments(start))[0][0]
    assert np.all(model.evaluate(levels.to_moments(levels.single_moves(start)))[0] > start_energy)
    for exchanges, lowest in ((True, -h[:3].sum() + h[3:].sum()), (False, start_energy)):
        evals = _Evaluations(model, levels, False, None, None)
        evals(start[None])
        ga = _Genetic(evals, np.random.default_rng(0), SearchSettings(population=2, polish_exchanges=exchanges))
        polished = ga._polish(start.tobytes(), full=True)
        assert model.evaluate(levels.to_moments(polished))[0][0] == pytest.approx(lowest)


def test_symmetrized_model():
    class Lopsided(EnergyModel):
        def calculate(self, moments, gradient):
            w = np.arange(1.0, self.n_magnetic + 1)
            e = moments @ w + 0.1 * (moments**2).sum(axis=1)
            return e, (-(w + 0.2 * moments) if gradient else None)

    inner = Lopsided(4)
    sym = SymmetrizedModel(inner)
    S = np.random.default_rng(2).normal(size=(3, 4))
    e, g = sym.evaluate(S, gradient=True)
    assert np.allclose(e, sym.evaluate(-S)[0]) and not np.allclose(inner.evaluate(S)[0], inner.evaluate(-S)[0])
    assert np.allclose(g, -0.2 * S)
    assert sym.n_evaluations == 6 and inner.n_evaluations == 12 + 6 and inner.n_calls == 2 + 2


# -- search ------------------------------------------------------------------------------------
def test_enumeration_is_exact_and_halved_by_the_global_sign():
    model = model8(1)
    exact = brute_force(model, MomentLevels(MAGS8, SYMBOLS8, fix_global_sign=False))
    counts = {}
    for fix in (True, False):
        levels = MomentLevels(MAGS8, SYMBOLS8, fix_global_sign=fix)
        rec = Recording(model)
        result = search_ground_state(rec, levels, enumerate_limit=10**6, chunk_size=5000)
        assert result.method == "enumeration"
        assert result.best_energy == pytest.approx(exact, abs=1e-12)
        energies = [e for _, e in result.lowest]
        assert energies == sorted(energies) and len(result.lowest) == 5
        assert len({levels.to_indices(m)[0].tobytes() for m, _ in result.lowest}) == 5
        counts[fix] = rec.n_evaluations
        assert result.n_evaluations == rec.n_evaluations == levels.n_configurations
        assert max(len(s) for s in rec.seen) <= 5000
    assert counts == {True: 4**8 // 2, False: 4**8}


@pytest.mark.parametrize("geometry, seed", [(2, 0), (3, 1), (4, 2), (5, 3)])
def test_genetic_search_finds_the_exhaustive_ground_state(geometry, seed):
    model = model8(geometry)
    levels = MomentLevels(MAGS8, SYMBOLS8)
    rec = Recording(model)
    result = search_ground_state(rec, levels, seed=seed, enumerate_limit=0)
    assert result.method == "genetic"
    assert result.best_energy == pytest.approx(brute_force(model, levels), abs=1e-9)
    assert result.n_evaluations < 0.05 * 4**8
    seen = rec.all_seen
    assert levels.is_valid(levels.to_indices(seen)).all()  # first moment > 0 everywhere
    assert len(set(levels.keys(levels.to_indices(seen)))) == len(seen) == result.n_evaluations
    assert model.evaluate(result.best_moments)[0][0] == pytest.approx(result.best_energy)


def test_search_is_reproducible_and_budgeted():
    model, levels = model8(6), MomentLevels(MAGS8, SYMBOLS8)
    a = search_ground_state(model, levels, seed=7, enumerate_limit=0)
    b = search_ground_state(model, levels, seed=7, enumerate_limit=0)
    assert (a.best_energy, a.n_evaluations) == (b.best_energy, b.n_evaluations)
    assert np.array_equal(a.best_moments, b.best_moments)
    rec = Recording(model)
    capped = search_ground_state(rec, levels, seed=7, enumerate_limit=0, max_evaluations=40)
    assert capped.n_evaluations == rec.n_evaluations <= 40


def test_known_evaluations_are_used_for_free():
    """The MD step's own energy and -dE/dS at the current moments: the search does not pay for them."""
    model, levels = model8(9), MomentLevels(MAGS8, SYMBOLS8)
    prior = search_ground_state(model, levels, seed=0, enumerate_limit=0)
    start = -prior.lowest[1][0]  # a reversed row: its canonical twin and reversed -dE/dS are used
    e, g = model.evaluate(start, gradient=True)
    plain = search_ground_state(model8(9), levels, seed=3, enumerate_limit=0, prior=prior, start=start)
    rec = Recording(model8(9))
    free = search_ground_state(rec, levels, seed=3, enumerate_limit=0, prior=prior, start=start,
                               known=(start, e, g))
    assert free.best_energy == pytest.approx(plain.best_energy, abs=1e-12)
    assert free.n_evaluations == plain.n_evaluations - 1 == rec.n_evaluations
    seen = rec.all_seen
    assert not any(np.allclose(row, start) or np.allclose(row, -start) for row in seen)
    off_levels = search_ground_state(model8(9), levels, seed=3, enumerate_limit=0, prior=prior, start=start,
                                     known=(start + 0.3, e, g))  # not a configuration of the levels: ignored
    assert off_levels.n_evaluations == plain.n_evaluations
    with pytest.raises(ValueError, match="known: 1 configuration"):
        search_ground_state(model, levels, enumerate_limit=0, start=start, known=(start, [1.0, 2.0], None))


@pytest.mark.parametrize("budget", [1, 3])
def test_a_budget_below_the_warm_seeds_keeps_the_start(budget):
    """The explore stage's cheap setting: a prior with 5 lowest states plus the start exceed the budget."""
    model, levels = model8(8), MomentLevels(MAGS8, SYMBOLS8)
    prior = search_ground_state(model, levels, seed=0, enumerate_limit=0)
    start = prior.lowest[-1][0]  # not the best: the budget must spend its first evaluation here
    rec = Recording(model8(8))
    warm = search_ground_state(rec, levels, seed=1, enumerate_limit=0, prior=prior, start=start,
                               max_evaluations=budget, use_gradient=False)
    assert warm.n_evaluations == rec.n_evaluations == budget
    assert np.allclose(rec.all_seen[0], levels.to_moments(levels.first_up(levels.to_indices(start)))[0])
    assert warm.best_energy <= model.evaluate(start)[0][0] + 1e-12


def test_warm_start_from_the_ground_state_is_cheap():
    model, levels = model8(7), MomentLevels(MAGS8, SYMBOLS8)
    cold = search_ground_state(model, levels, seed=0, enumerate_limit=0)
    assert cold.best_energy == pytest.approx(brute_force(model, levels), abs=1e-9)
    warm = search_ground_state(model, levels, seed=1, enumerate_limit=0, start=cold.best_moments)
    assert warm.best_energy == pytest.approx(cold.best_energy, abs=1e-12)
    s = SearchSettings()  # the start, its 24 neighbours and exchanges, warm_patience small generations of 16
    exchanges = len(levels.exchange_moves(levels.to_indices(cold.best_moments)[0]))
    assert warm.n_evaluations <= 1 + 24 + exchanges + s.warm_patience * round(s.warm_fraction * 16)
    again = search_ground_state(model8(7), levels, seed=2, enumerate_limit=0, prior=cold)
    assert again.best_energy == pytest.approx(cold.best_energy, abs=1e-12)
    assert again.n_evaluations <= 0.25 * cold.n_evaluations  # the prior's surrogate screens


@pytest.mark.parametrize("enumerate_limit", [0, 10**6])
def test_fixed_total_moment_and_signs_are_honoured(enumerate_limit):
    model = model8(8)
    pins = {1: -1, 4: 1}  # atom index -> sign
    levels = MomentLevels(MAGS8, SYMBOLS8, total_moment=2.0, fixed_signs=pins)
    rec = Recording(model)
    result = search_ground_state(rec, levels, seed=0, enumerate_limit=enumerate_limit)
    seen = rec.all_seen
    assert np.allclose(seen.sum(axis=1), 2.0)
    assert (seen[:, 1] < 0).all() and (seen[:, 4] > 0).all()
    assert result.best_energy == pytest.approx(brute_force(model, levels), abs=1e-9)
    assert len(set(levels.keys(levels.to_indices(seen)))) == len(seen)


def test_first_order_screening_without_surrogate():
    model, levels = model8(9), MomentLevels(MAGS8, SYMBOLS8)
    result = search_ground_state(model, levels, seed=0, enumerate_limit=0, use_surrogate=False,
                                 patience=40, population=32)
    assert result.surrogate is None
    assert result.best_energy == pytest.approx(brute_force(model, levels), abs=1e-9)


def test_spin_forces_are_asked_for_only_where_they_order_the_moves():
    """By default a search with a surrogate evaluates energies only (spin forces cost 2.5x with deepmd-kit and
    did not help trained models); without a surrogate, or with use_gradient=True, it asks for them in every
    call. Each finds the minimum here."""
    asked = {}
    for case, kwargs in {"default": {}, "use_gradient": {"use_gradient": True},
                         "no surrogate": {"use_surrogate": False, "population": 32, "patience": 40}}.items():
        model, levels = model8(4), MomentLevels(MAGS8, SYMBOLS8)
        rec = Recording(model)
        result = search_ground_state(rec, levels, seed=0, enumerate_limit=0, **kwargs)
        asked[case] = rec.gradients
        assert result.best_energy == pytest.approx(brute_force(model, levels), abs=1e-9)
    assert asked["default"] and not any(asked["default"])
    assert asked["use_gradient"] and all(asked["use_gradient"])
    assert asked["no surrogate"] and all(asked["no surrogate"])


def test_settings_are_checked():
    model, levels = model8(0), MomentLevels(MAGS8, SYMBOLS8)
    with pytest.raises(ValueError, match="population"):
        search_ground_state(model, levels, population=1)
    with pytest.raises(TypeError):
        search_ground_state(model, levels, populaton=8)
    with pytest.raises(ValueError, match="explore"):
        SearchSettings(explore=1.5)
    with pytest.raises(ValueError, match="magnetic ions"):
        search_ground_state(model, MomentLevels(MAGS8, SYMBOLS8[:7]))


@pytest.mark.parametrize("enumerate_limit", [0, 10**6])
def test_sector_ground_states_are_the_lowest_of_each_total_moment_window(enumerate_limit):
    pos, cell = triangular_layers(2, 2, 2)
    symbols = ["Ni"] * 8
    model = AnalyticSpinModel(pos, cell, symbols, {"Ni": {1.671: 0.0, 1.86: 0.01}},
                              [Exchange(-0.02, 0.5), Exchange(0.01, 1.5, r_ref=5.0, cutoff=7.0)])
    levels = MomentLevels({"Ni": [1.671, 1.86]}, symbols)
    ground = search_ground_state(model, levels, seed=0).best_moments  # in-plane AFM, total 0
    windows = sector_windows(levels, ground, max_sectors=4)
    centres = 2 * 1.671 * np.arange(1, 5)  # 1..4 ions of the minority turned up
    assert len(windows) == 4 and all(lo <= c + 1.671 and hi >= c - 1.671 for (lo, hi), c in zip(windows, centres))
    states = sector_ground_states(model, levels, ground, max_sectors=4, enumerate_limit=enumerate_limit)
    assert len(states) == 4
    for (moments, energy), (lo, hi) in zip(states, windows):
        window = levels.within_total((lo + hi) / 2, (hi - lo) / 2)
        assert lo - 1e-9 <= moments.sum() <= hi + 1e-9  # in its sector, not the ground state's
        assert energy == pytest.approx(brute_force(model, window), abs=1e-9)  # the whole window, brute force
        assert energy == pytest.approx(model.evaluate(moments[None])[0][0], abs=1e-12)
    assert np.allclose(np.abs(states[-1][0]), np.abs(states[-1][0][0]))  # the farthest sector: all parallel


def test_sector_windows_cover_every_reachable_total_and_keep_the_nearest_and_farthest():
    levels = MomentLevels({"Ni": [2.0]}, ["Ni"] * 12)
    ferro = np.full(12, 2.0)  # totals 24, 20, ..., 0: one bin each
    assert sector_windows(levels, ferro, max_sectors=3) == [(0.0, 0.0), (12.0, 12.0), (20.0, 20.0)]
    assert sector_windows(levels, ferro, max_sectors=0) == []
    assert sector_windows(MomentLevels({"Ni": [0.0, 2.0]}, ["Ni"] * 4), np.zeros(4), 4) == []
    # mixed magnitudes: Ni (1, 3) and Mn 3, ground total 1 (m = 5/3): every reachable total lies in a bin
    mixed = MomentLevels({"Ni": [1.0, 3.0], "Mn": [3.0]}, ["Ni", "Ni", "Mn"])
    ground = np.array([1.0, -1.0, 3.0])
    windows = sector_windows(mixed, ground, max_sectors=10)
    covered = [t for t in np.unique(np.abs(mixed.reachable_totals())) if any(lo <= t <= hi for lo, hi in windows)]
    own_bin = [t for t in np.unique(np.abs(mixed.reachable_totals())) if abs(t - 3.0) < 5 / 3]
    assert sorted(covered + own_bin) == sorted(np.unique(np.abs(mixed.reachable_totals())).tolist())
    assert windows[-1][1] == 9.0  # all parallel at high spin
    # pinned signs: no reversal symmetry, the totals keep their sign
    pinned = MomentLevels({"Ni": [2.0]}, ["Ni"] * 4, fixed_signs={0: -1, 1: -1})
    assert sector_windows(pinned, np.array([-2.0, -2.0, 2.0, 2.0]), 4) == [(-8.0, -8.0), (-4.0, -4.0)]  # of -8, -4, 0
