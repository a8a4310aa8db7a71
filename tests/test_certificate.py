"""The ground-state certificate of spin-minimized MD (spingen.spin.certificate; numpy only, fast)."""

from functools import partial

import numpy as np
import pytest

from spingen.spin import AnalyticSpinModel, Exchange, MomentLevels, search_ground_state, triangular_layers
from spingen.spin.certificate import (
    COUPLED,
    CROSSED,
    EVALUATED,
    FOLLOWED,
    MAGNITUDES,
    OTHER_SECTOR,
    PAIRED,
    REVERSALS,
    SCALED,
    SEVERAL_REVERSED,
    UNTOUCHED,
    CertificateSettings,
    GroundStateCertificate,
    competitors,
    n_pair_moves,
    pair_moves,
    state_key,
)

SYMBOLS8 = ["Ni", "Co", "Mn", "Ni", "Co", "Mn", "Ni", "Co"]
MAGS8 = {"Ni": [1, 3], "Co": [1, 4], "Mn": [3, 4]}
ONSITE8 = {"Ni": {1: 0.0, 3: 0.45}, "Co": {1: 0.0, 4: 0.7}, "Mn": {3: 0.0, 4: 0.25}}
EXCHANGE = [Exchange(0.025, 0.5), Exchange(-0.004, 1.5, r_ref=5.0, cutoff=7.0)]


def trajectory(n_steps: int, seed: int, amplitude: float = 0.1):
    """Analytic models (on-site + distance-dependent exchange) along a smooth random path of the ions."""
    rng = np.random.default_rng(seed)
    pos, cell = triangular_layers(2, 2, 2)
    modes = rng.normal(0, amplitude, (3,) + pos.shape)
    for t in range(n_steps):
        phase = 2 * np.pi * t / n_steps
        moved = pos + modes[0] * np.sin(phase) + modes[1] * np.sin(2 * phase) + modes[2] * (1 - np.cos(phase))
        yield AnalyticSpinModel(moved, cell, SYMBOLS8, ONSITE8, EXCHANGE)


def fields_and_pairs(rng: np.random.Generator, n: int, scale: float):
    """The landscape E = -sum h_i S_i + sum_{i<j} J_ij S_i S_j (J drawn from rng, of this scale): energy(states,
    field) and minus_grad(state, field)."""
    coupling = np.triu(rng.normal(0, scale, (n, n)), 1)

    def energy(states, field):
        states = np.atleast_2d(states)
        return -(states @ field) + np.einsum("ni,ij,nj->n", states, coupling, states)

    def minus_grad(state, field):
        return field - (coupling + coupling.T) @ state

    return energy, minus_grad


def single_moves(levels: MomentLevels, moments: np.ndarray) -> np.ndarray:
    return levels.to_moments(levels.single_moves(levels.to_indices(moments)[0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_certified_step_has_no_single_ion_move_within_the_margin(seed):
    """Along a trajectory whose ground state changes, every step the certificate settles without an
    evaluation has every single-ion move above the held moments by more than the margin (the
    prediction from the change of -dE/dS is exact for on-site + pair energies), and the competitors
    it names find every single-ion move that turns lower."""
    levels = MomentLevels(MAGS8, SYMBOLS8)
    margin = 0.005
    cert = GroundStateCertificate(levels, CertificateSettings(margin=margin, max_age=25, search_every=10**6))
    moments, lowest = None, []
    certified = checked = changes = 0
    for model in trajectory(300, seed):
        if moments is None:
            result = search_ground_state(model, levels, enumerate_limit=10**6)
            moments, lowest = result.best_moments, [m for m, _ in result.lowest]
            continue
        energy, minus_grad = (x[0] for x in model.evaluate(moments, gradient=True))
        singles = model.evaluate(single_moves(levels, moments))[0]
        if cert.holds_for(moments):
            indices = cert.to_check(minus_grad)
            if not len(indices):
                certified += 1
                assert singles.min() - energy > margin - 1e-9
                continue
            pool, pool_energies = cert.check(indices, energy, minus_grad, lambda states: model.evaluate(states)[0])
        else:
            indices, pool = None, competitors(levels, moments, lowest)
            pool_energies = model.evaluate(pool)[0]
        checked += len(pool)
        if pool_energies.min() < energy:
            result = search_ground_state(model, levels, enumerate_limit=10**6)
            changes += 1
            moments, lowest = result.best_moments, [m for m, _ in result.lowest]
            cert.moments = None  # the next step evaluates the competitors of the new moments
            continue
        assert singles.min() >= energy - 1e-12  # no single-ion move lower went unnoticed
        if indices is None:
            cert.set_reference(moments, energy, minus_grad, pool, pool_energies)
    assert certified >= 10 and changes >= 5, (certified, changes)
    assert checked < 0.5 * 299 * (len(single_moves(levels, moments)) + len(lowest))  # far fewer than all, every step


def test_a_single_ion_move_that_turns_lower_is_named():
    """Constructed case: a field on one ion, grown between two geometries, makes reversing it lower by
    three margins; the certificate names that competitor and only it."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni", "Ni", "Ni"])
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01))
    moments = np.array([1.0, 1.0, 1.0])
    pool = competitors(levels, moments)  # each single ion reversed (the orientation nearest S0)
    assert len(pool) == 3

    def energy(state, field):  # E = -sum h_i S_i; -dE/dS = h
        return -(np.atleast_2d(state) @ field)

    field = np.array([0.2, 0.2, 0.2])
    cert.set_reference(moments, energy(moments, field)[0], field, pool, energy(pool, field))
    assert len(cert.to_check(field)) == 3  # no error measured yet: the first prediction is checked whole
    cert.update(np.arange(3), energy(moments, field)[0], field, energy(pool, field))  # exact: error 0
    np.testing.assert_array_equal(cert.step_errors, [np.nan, 0.0, np.nan, np.nan, np.nan])  # reversals: exact
    assert cert.follow[REVERSALS]  # following -dE/dS is exact in a field: kept
    assert cert.holds_for(moments) and len(cert.to_check(field)) == 0
    turned = np.array([0.2, 0.2, -0.015])  # reversing ion 2 now lowers E by 0.03 = 3 margins
    assert energy(pool, turned).min() - energy(moments, turned)[0] == pytest.approx(-0.03)
    named = cert.to_check(turned)
    np.testing.assert_array_equal(pool[named], [[1.0, 1.0, -1.0]])
    assert not cert.holds_for(np.array([1.0, 1.0, -1.0]))  # other moments than the reference: evaluate all


def test_an_unmeasured_kind_is_probed_first_and_its_error_sizes_the_rest():
    """Before a kind's prediction error is measured, only its probes are evaluated (the nearest and the most
    changed): the error measured on them names the rest within the allowance, and `check` goes on until
    none is left or one is lower."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni"] * 6)
    moments = np.ones(6)
    pool = competitors(levels, moments)  # ion i reversed, i = 0..5 (the orientation nearest S0)
    reversed_ion = {tuple(row): int(np.argmin(row)) for row in pool}
    reference = np.array([0.01, 0.02, 0.03, 0.2, 0.3, 0.4])
    later = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.05])  # -dE/dS: ion 5's predicted gap moves 0.4 -> 0.5

    def certificate(probes):
        cert = GroundStateCertificate(levels, CertificateSettings(margin=0.001, probes=probes))
        cert.set_reference(moments, 0.0, np.zeros(6), pool, reference[[reversed_ion[tuple(r)] for r in pool]])
        return cert

    def evaluate(actual):
        return lambda states: np.array([actual[reversed_ion[tuple(row)]] for row in states])

    assert len(certificate(0).to_check(later)) == 6  # probes 0: every one until measured
    cert = certificate(1)
    probes = cert.to_check(later)
    assert sorted(reversed_ion[tuple(r)] for r in pool[probes]) == [0, 5]  # the nearest and the most moved
    actual = np.array([0.0, 0.02, 0.03, 0.2, 0.3, 0.5])  # ion 0 erred by 0.01: allowance 0.001 + 2 x 0.01
    evaluated, energies = cert.check(probes, 0.0, later, evaluate(actual))
    assert [reversed_ion[tuple(r)] for r in evaluated] == [0, 5, 1]  # ion 1 (0.02) within it, ion 2 (0.03) not
    np.testing.assert_allclose(energies, [0.0, 0.5, 0.02])
    assert cert.step_errors[REVERSALS] == pytest.approx(0.01) and not len(cert.still_to_check(later))
    cert = certificate(0)  # probes 0: every one named at once, one batch (the rule before probes)
    assert len(cert.check(cert.to_check(later), 0.0, later, evaluate(actual))[0]) == 6
    cert = certificate(1)  # a held energy that is not finite: one batch, no loop
    assert len(cert.check(cert.to_check(later), -np.inf, later, evaluate(actual))[0]) == 2
    lower = actual - [0, 0.025, 0, 0, 0, 0]  # ion 1 turned lower than S0: check stops there
    cert = certificate(1)
    evaluated, energies = cert.check(cert.to_check(later), 0.0, later, evaluate(lower))
    assert [reversed_ion[tuple(r)] for r in evaluated] == [0, 5, 1] and energies[-1] == pytest.approx(-0.005)


def test_references_age_and_learn_their_error():
    levels = MomentLevels({"Ni": [1.0]}, ["Ni", "Ni"])
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, max_age=3, backstop_age=3, safety=1.0))
    moments = np.array([1.0, 1.0])
    pool = competitors(levels, moments)
    cert.set_reference(moments, 0.0, np.zeros(2), pool, np.array([1.0, 1.0]))
    cert.step_errors[:] = 0.0  # as if measured
    assert [len(cert.to_check(np.zeros(2))) for _ in range(4)] == [0, 0, 0, 2]  # backstop_age 3
    # evaluated gaps 0.35 lower than predicted after 4 geometries: 0.0875 eV of error per geometry from now on
    cert.update(np.arange(2), 0.0, np.zeros(2), np.array([0.65, 0.65]))
    assert cert.step_errors[REVERSALS] == pytest.approx(0.0875) and list(cert.ages) == [0, 0]
    cert.settings = CertificateSettings(margin=0.0, max_age=100, backstop_age=100, safety=1.0)
    named = [len(cert.to_check(np.zeros(2))) for _ in range(9)]
    assert named == [0] * 7 + [2] * 2  # the allowance 0.0875 x age passes the 0.65 gap at age 8


def test_old_references_are_sized_by_the_error_measured_at_their_age():
    """Beyond max_age a competitor is evaluated until its kind's error at such ages is measured; then only
    where that error (per step, times the age) reaches its gap, and every one older than backstop_age."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni", "Ni", "Ni"])
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, max_age=4, backstop_age=12, safety=1.0))
    moments = np.ones(3)
    pool = competitors(levels, moments)  # each single ion reversed
    cert.set_reference(moments, 0.0, np.zeros(3), pool, np.array([0.1, 0.5, 0.9]))
    cert.step_errors[:] = 0.001  # as if measured at young ages: 1 meV per geometry
    assert [len(cert.to_check(np.zeros(3))) for _ in range(5)] == [0, 0, 0, 0, 3]  # age 5: unmeasured there
    # evaluated at age 5, 0.09 off the prediction: 18 meV per geometry at such ages, far above the young 1 meV
    cert.update(np.arange(3), 0.0, np.zeros(3), np.array([0.19, 0.59, 0.99]))
    assert cert.old_way_errors[REVERSALS, 0] == pytest.approx(0.018)
    assert cert.step_errors[REVERSALS] == pytest.approx(0.018)  # the running maximum of every age
    cert.update(np.array([0]), 0.0, np.zeros(3), np.array([0.19]))  # a young batch: the old error stays, undecayed
    assert cert.old_way_errors[REVERSALS, 0] == pytest.approx(0.018)
    cert.step_errors[:] = 0.001  # the young error forgotten again
    named = [cert.to_check(np.zeros(3)) for _ in range(13)]
    # ages 1-4: 1 meV per geometry; from 5 the allowance is 0.018 x age: it reaches the 0.19 gap at age 11,
    # the others not before the backstop (age 13)
    assert [list(n) for n in named] == [[]] * 10 + [[0]] * 2 + [[0, 1, 2]]
    unsized = GroundStateCertificate(levels, CertificateSettings(margin=0.0, max_age=4, backstop_age=4, safety=1.0))
    unsized.set_reference(moments, 0.0, np.zeros(3), pool, np.array([0.2, 0.6, 1.0]))
    unsized.step_errors[:] = 0.001
    unsized.old_way_errors[:] = 0.001  # measured, but backstop_age = max_age: every one at max_age, as before
    assert [len(unsized.to_check(np.zeros(3))) for _ in range(5)] == [0, 0, 0, 0, 3]


def test_a_reversal_gap_the_slope_does_not_follow_is_kept_once_measured_better():
    """Constructed case: the on-site curve between +1 and -1 bends with the geometry (E = sum_i g0 (1 - S_i)/2
    + b (S_i^2 - 1)): -dE/dS at S0 changes with b, the reversal gaps stay g0. Both ways are measured; keeping
    the gap is exact, following is not, so the certificate keeps, and certifies where following would name
    every reversal."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni", "Ni", "Ni"])
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01))
    moments = np.array([1.0, 1.0, 1.0])
    pool = competitors(levels, moments)  # each single ion reversed
    g0 = 0.1

    def energy(states, b):
        states = np.atleast_2d(states)
        return np.sum(g0 * (1 - states) / 2 + b * (states**2 - 1), axis=1)

    def minus_grad(b):
        return np.full(3, g0 / 2 - 2 * b * 1.0)

    cert.set_reference(moments, energy(moments, 0.0)[0], minus_grad(0.0), pool, energy(pool, 0.0))
    assert cert.follow[REVERSALS]  # nothing measured: following
    named = cert.to_check(minus_grad(0.01))
    cert.update(named, energy(moments, 0.01)[0], minus_grad(0.01), energy(pool[named], 0.01))
    assert cert.way_errors[REVERSALS, 0] == pytest.approx(0.04) and cert.way_errors[REVERSALS, 1] == 0.0
    assert not cert.follow[REVERSALS] and cert.step_errors[REVERSALS] == 0.0
    b = 0.05
    np.testing.assert_allclose(energy(pool, b) - energy(moments, b)[0], g0)  # truly g0 above
    assert np.all(cert.predicted_gaps(minus_grad(b), follow_reversals=True) < 0)  # following: all "lower"
    assert not len(cert.to_check(minus_grad(b)))  # keeping: certified


def test_certificate_settings_are_checked():
    for bad in ({"margin": -1.0}, {"max_age": 0}, {"search_every": 0}, {"safety": float("nan")},
                {"exchange_limit": -1}, {"max_age": 30, "backstop_age": 20}):
        with pytest.raises(ValueError):
            CertificateSettings(**bad)


def test_pair_moves_change_exactly_two_ions_and_join_the_competitors_below_the_limit():
    levels = MomentLevels(MAGS8, SYMBOLS8)
    row = levels.to_indices(levels.to_moments(np.zeros((1, 8), dtype=np.int8)))[0]
    pairs = pair_moves(levels, row)
    assert len(pairs) == n_pair_moves(levels) == 28 * 9
    assert np.all(np.sum(pairs != row, axis=1) == 2) and len(np.unique(pairs, axis=0)) == len(pairs)
    moments = levels.to_moments(row)[0]
    assert len(competitors(levels, moments)) == 24
    assert len(competitors(levels, moments, pair_limit=252)) == 24 + 252
    assert len(competitors(levels, moments, pair_limit=251)) == 24


def test_exchange_moves_swap_two_moments_of_one_element_and_join_the_competitors_beyond_the_pair_limit():
    """An exchange swaps the moments of two ions that allow the same values (one element, no pinned sign):
    the total moment is kept; beyond pair_limit the exchanges are the two-ion competitors, up to
    exchange_limit of them."""
    levels = MomentLevels(MAGS8, SYMBOLS8, fixed_signs={6: 1})  # Ni 0 and 3 alike; Ni 6 pinned up
    row = levels.to_indices(np.array([[1, -1, 3, -3, 4, -4, 3, 1]], dtype=float))[0]
    exchanges = levels.exchange_moves(row)
    alike = [(0, 3), (1, 4), (1, 7), (4, 7), (2, 5)]  # pairs of the same values that differ in this row
    assert len(exchanges) == len(alike) and len(np.unique(exchanges, axis=0)) == len(alike)
    moments, exchanged = levels.to_moments(row)[0], levels.to_moments(exchanges)
    for moves in exchanged:
        i, j = np.flatnonzero(moves != moments)
        assert (i, j) in alike and moves[i] == moments[j] and moves[j] == moments[i]
    np.testing.assert_allclose(exchanged.sum(axis=1), moments.sum())
    singles = len(competitors(levels, moments))
    assert len(competitors(levels, moments, pair_limit=0, exchange_limit=5)) == singles + 5
    assert len(competitors(levels, moments, pair_limit=0, exchange_limit=4)) == singles  # too many
    everything = competitors(levels, moments, pair_limit=n_pair_moves(levels), exchange_limit=5)
    assert len(everything) == singles + len(pair_moves(levels, row))  # the pairs hold the exchanges


def test_an_exchange_follows_its_anchors_and_keeps_its_coupling():
    """Beyond pair_limit the exchanges are two-ion competitors: each takes the gaps of its two anchors (S0
    with one of its ions changed) evaluated at the new geometry plus its coupling measured at its reference.
    Exact in an on-site + pair landscape whose fields move and couplings stay: after large field changes the
    predicted exchange gaps are the true ones, and the exchange turned lower is named."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni"] * 6)
    settings = CertificateSettings(margin=0.01, pair_limit=0, exchange_limit=100)
    cert = GroundStateCertificate(levels, settings)
    rng = np.random.default_rng(7)
    energy, minus_grad = fields_and_pairs(rng, 6, 0.02)

    moments = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    pool = competitors(levels, moments, pair_limit=0, exchange_limit=100)
    exchanges = np.flatnonzero(np.sum(pool != moments, axis=1) == 2)
    assert len(pool) == 6 + 9 and len(exchanges) == 9
    anchors, anchor_of = cert.anchors_of(moments, pool)
    assert len(anchors) == 6 and np.all(anchor_of[exchanges] >= 0) and np.all(np.delete(anchor_of, exchanges, 0) < 0)
    field = np.array([0.3, 0.3, 0.3, -0.3, -0.3, -0.3])
    e0 = energy(moments, field)[0]
    cert.set_reference(moments, e0, minus_grad(moments, field), pool, energy(pool, field),
                       lambda states: energy(states, field) - e0)
    assert np.all(cert.kinds[exchanges] == PAIRED) and np.all(np.isfinite(cert.couplings[exchanges]))
    assert np.isnan(cert.step_errors[PAIRED])
    # the fields of ions 0 and 3 turn: their exchange is now far lower, the others stay above
    moved = field + rng.normal(0, 0.04, 6)
    moved[[0, 3]] = [-0.03, 0.03]
    e1, g1 = energy(moments, moved)[0], minus_grad(moments, moved)
    gaps = energy(pool, moved) - e1
    turned = [k for k in exchanges if set(np.flatnonzero(pool[k] != moments)) == {0, 3}]
    assert gaps[turned[0]] < -0.03 and np.sort(gaps[exchanges])[1] > 0.05
    first = cert.to_check(g1, lambda states: energy(states, moved) - e1)
    np.testing.assert_allclose(cert.predicted_gaps(g1)[exchanges], gaps[exchanges], atol=1e-12)
    assert np.abs(cert.gaps[exchanges] - gaps[exchanges]).max() > 0.1  # keeping the gaps would err by far more
    evaluated, found = cert.check(first, e1, g1, lambda states: energy(states, moved))
    assert cert.step_errors[PAIRED] == pytest.approx(0.0, abs=1e-12)
    named = {tuple(c) for c in evaluated} & {tuple(pool[k]) for k in exchanges}
    assert tuple(pool[turned[0]]) in named


def test_an_exchange_of_a_moved_ion_takes_its_pairs_coupling_scaled_to_its_changes():
    """After a move, an exchange of a moved ion with another takes the coupling measured for the exchange of
    the same two ions before the move, scaled by the product of the ions' changes (SCALED): exact for bilinear
    couplings, so its predicted gap (fresh anchors plus the scaled coupling) is the true one and the error
    measured on it is zero; an exchange of two ions the move left alone keeps its coupling (COUPLED)."""
    levels = MomentLevels({"Ni": [1.0, 3.0]}, ["Ni"] * 6)
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01, pair_limit=0, exchange_limit=100))
    rng = np.random.default_rng(11)
    landscape, slope = fields_and_pairs(rng, 6, 0.02)
    field = rng.normal(0, 0.1, 6)
    energy, minus_grad = partial(landscape, field=field), partial(slope, field=field)

    moments = np.array([3.0, 1.0, 3.0, -1.0, -3.0, -1.0])
    pool = competitors(levels, moments, pair_limit=0, exchange_limit=100)
    cert.set_reference(moments, energy(moments)[0], minus_grad(moments), pool, energy(pool),
                       lambda states: energy(states) - energy(moments)[0])
    target = moments.copy()
    target[0] = 1.0  # ion 0 changes its magnitude
    new_pool = competitors(levels, target, pair_limit=0, exchange_limit=100)
    e1 = energy(target)[0]
    named = cert.move_to(target, new_pool, minus_grad(moments), minus_grad(target), symmetric=False,
                         anchor_gaps=lambda states: energy(states) - e1)
    scaled, coupled = cert.carried == SCALED, cert.carried == COUPLED
    touching = np.abs(new_pool[:, 0] - target[0]) > 1e-9
    assert scaled.any() and np.all(touching[scaled]) and coupled.any() and not np.any(touching[coupled])
    exact = energy(new_pool) - e1
    predicted = cert.predicted_gaps(minus_grad(target))
    np.testing.assert_allclose(predicted[scaled | coupled], exact[scaled | coupled], atol=1e-12)
    assert set(np.flatnonzero(scaled)) <= set(named)  # not measured yet
    cert.update(named, e1, minus_grad(target), exact[named] + e1)
    assert cert.scaled_error == pytest.approx(0.0, abs=1e-12)


def test_a_move_sizes_a_gap_it_carries_on_anchors_evaluated_before():
    """A PAIRED competitor of S0 whose anchors were last evaluated geometries ago predicts a gap the move carries
    to S1's same state: its anchors' age is added to that gap's allowance, so the exchange that turned lower
    meanwhile (its anchors far from any competitor named, never re-evaluated) is named at the move."""
    levels = MomentLevels({"Ni": [1.0, 3.0]}, ["Ni"] * 8)
    rng = np.random.default_rng(5)
    energy, minus_grad = fields_and_pairs(rng, 8, 0.004)

    moments = np.array([1.0, -3.0, 1.0, 3.0, -1.0, 3.0, -1.0, -3.0])
    field = np.array([0.1, -0.1, 0.1, 0.3, -0.3, 0.3, -0.3, -0.3])
    pool = competitors(levels, moments, pair_limit=0, exchange_limit=1000)
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01, pair_limit=0, exchange_limit=1000))
    e = energy(moments, field)[0]
    cert.set_reference(moments, e, minus_grad(moments, field), pool, energy(pool, field),
                       lambda states: energy(states, field) - e)
    for _ in range(10):  # ions 1 and 2 drift towards exchanging
        field = field + np.where(np.arange(8) == 1, 0.001, 0.0) - np.where(np.arange(8) == 2, 0.001, 0.0)
        e, g = energy(moments, field)[0], minus_grad(moments, field)
        named = cert.to_check(g, lambda states, f=field, e=e: energy(states, f) - e)
        cert.check(named, e, g, lambda states, f=field: energy(states, f))
    cert.step_errors[SEVERAL_REVERSED] = 1e-4  # as measured: following -dE/dS is exact here
    target = moments.copy()
    target[[0, 1]] = moments[[1, 0]]  # S1: ions 0 and 1 exchanged, evaluated here as a check would
    cert.update(np.flatnonzero(np.all(pool == target, axis=1)), e, g, energy(target, field))
    turned = moments.copy()
    turned[[1, 2]] = moments[[2, 1]]  # an exchange of S0 and of S1 alike
    new_pool = competitors(levels, target, pair_limit=0, exchange_limit=1000)
    e1 = energy(target, field)[0]
    assert energy(turned, field)[0] < e1 - 0.04
    named = cert.move_to(target, new_pool, g, minus_grad(target, field), symmetric=False,
                         anchor_gaps=lambda states: energy(states, field) - e1)
    assert np.flatnonzero(np.all(new_pool == turned, axis=1))[0] in named


def test_a_move_carries_the_gaps_over_exactly_in_a_pair_landscape():
    """After a move to a lower competitor, the new moments' competitors take their gaps from the old
    moments' single- and two-ion gaps without an evaluation: exactly, for on-site + pair energies (the
    analytic model), in either global orientation, after single- and two-ion moves. Before a move
    error is measured every state of more than two changed ions is named for evaluation, after it
    only those within the margin; without two-ion gaps, the states that need them are named."""
    levels = MomentLevels(MAGS8, SYMBOLS8)
    model = next(trajectory(1, 0))
    start = levels.to_moments(np.zeros((1, 8), dtype=np.int8))[0]

    def reference(moments, pair_limit=300):
        energy, minus_grad = (x[0] for x in model.evaluate(moments, gradient=True))
        return energy, minus_grad, competitors(levels, moments, pair_limit=pair_limit)

    def first_up(state):
        return levels.to_moments(levels.first_up(levels.to_indices(state)))[0]

    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, pair_limit=300))
    energy, minus_grad, pool = reference(start)
    cert.set_reference(start, energy, minus_grad, pool, model.evaluate(pool)[0])
    cert.step_errors[:] = 0.0
    moments = start
    for ions_moved in (1, 2, 2):
        changed = np.sum(pool != moments, axis=1)
        moments = first_up(pool[np.flatnonzero(changed == ions_moved)[5]])
        new_energy, new_grad, new_pool = reference(moments)
        first = cert.move_error is None
        named = cert.move_to(moments, new_pool, minus_grad, new_grad, symmetric=True)
        exact = model.evaluate(new_pool)[0] - new_energy
        assert np.isfinite(cert.gaps).all()
        np.testing.assert_allclose(cert.gaps, exact, atol=1e-9)
        if first:
            assert np.isinf(cert.slack).any()  # states of three or more changed ions, not measured yet
        np.testing.assert_array_equal(named, np.flatnonzero(np.isinf(cert.slack) | (cert.gaps <= 1e-9)))
        cert.update(named, new_energy, new_grad, exact[named] + new_energy)
        assert cert.move_error == pytest.approx(0.0, abs=1e-9) and cert.slack.max() < 1e-9
        energy, minus_grad, pool = new_energy, new_grad, new_pool


@pytest.mark.parametrize("coupled,gauged", [(False, False), (True, False), (False, True)])
def test_a_move_keeps_the_gap_of_a_change_it_left_alone_and_measures_their_coupling(coupled, gauged):
    """Beyond pair_limit (single-ion moves and exchanges only) S0's gaps cannot expand a new competitor that
    changes ions beside the moved one: it keeps S0's gap for the same change (an exchange of two other
    ions, a single-ion move of another ion). A change with a reversed ion keeps it as it is (UNTOUCHED):
    exact without couplings; with them the coupling is the error, named for evaluation until measured, then
    measured apart from the expansion's error and added to the allowance of the gaps so carried at the next
    move. A change of magnitudes only follows the move's change of -dE/dS on its ions (FOLLOWED): exact with
    the bilinear couplings here too, its error measured apart. Under a gauge (a canonical-sign model) only
    within the held moments' sector."""
    levels = MomentLevels({"Ni": [1.0, 3.0]}, ["Ni"] * 8)
    pos, cell = triangular_layers(2, 2, 2)
    model = AnalyticSpinModel(pos, cell, ["Ni"] * 8, {"Ni": {1.0: 0.0, 3.0: 0.3}}, EXCHANGE if coupled else [])

    def reference(moments):
        energy, minus_grad = (x[0] for x in model.evaluate(moments, gradient=True))
        return energy, minus_grad, competitors(levels, moments, pair_limit=0, exchange_limit=1000)

    def gauge(states):
        return np.where(np.round(states.sum(axis=1), 9) >= 0, 1.0, -1.0)

    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, pair_limit=0, exchange_limit=1000),
                                  gauge=gauge if gauged else None)
    moments = levels.to_moments(np.array([[3, 1, 2, 3, 0, 1, 2, 3]], dtype=np.int8))[0]  # total 6: one sector
    energy, minus_grad, pool = reference(moments)
    cert.set_reference(moments, energy, minus_grad, pool, model.evaluate(pool)[0])
    cert.step_errors[:] = 0.0
    for move in (0, 5):
        before = moments
        moments = pool[move]
        new_energy, new_grad, new_pool = reference(moments)
        measured = {how: getattr(cert, name) for how, name in ((UNTOUCHED, "untouched_error"),
                                                               (FOLLOWED, "followed_error"))}
        named = cert.move_to(moments, new_pool, minus_grad, new_grad, symmetric=True)
        moved_ions = np.abs(moments - before) > 1e-9
        touched = np.any((np.abs(new_pool - moments) > 1e-9) & moved_ions, axis=1)
        untouched = np.isin(cert.carried, [UNTOUCHED, FOLLOWED])
        assert untouched.sum() > len(new_pool) // 3 and not np.any(untouched & touched)
        followed = cert.carried == FOLLOWED
        changed = np.abs(new_pool - moments) > 1e-9
        same_sign = np.all(~changed | (np.sign(new_pool) == np.sign(moments)), axis=1)
        assert followed.any() and np.array_equal(followed, untouched & same_sign)
        if gauged:
            assert np.all(gauge(new_pool[untouched]) == gauge(moments[None])[0])
        exact = model.evaluate(new_pool)[0] - new_energy
        np.testing.assert_allclose(cert.gaps[followed], exact[followed], atol=1e-9)
        if not coupled:
            np.testing.assert_allclose(cert.gaps[untouched], exact[untouched], atol=1e-9)
        checked = np.zeros(len(new_pool), dtype=bool)
        checked[named] = True
        for how in (UNTOUCHED, FOLLOWED):
            carried = cert.carried == how
            if measured[how] is None:
                assert set(np.flatnonzero(carried)) <= set(named)
            else:
                assert np.all(cert.slack[carried] >= measured[how] - 1e-12)
        if measured[UNTOUCHED] is not None:
            np.testing.assert_array_equal(named, np.flatnonzero(~(cert.gaps > cert.slack)))
        assert np.any(untouched & ~followed & checked)
        errors = {how: np.abs(cert.gaps - exact)[(cert.carried == how) & checked].max() for how in measured}
        cert.update(named, new_energy, new_grad, exact[named] + new_energy)
        assert (errors[UNTOUCHED] > 1e-3) == coupled
        # both moves at one geometry (no tick): the kept error is not decayed between them
        assert cert.untouched_error == pytest.approx(max(errors[UNTOUCHED], measured[UNTOUCHED] or 0.0), abs=1e-12)
        assert cert.followed_error == pytest.approx(0.0, abs=1e-9)
        assert np.all(cert.carried[named] == EVALUATED) and cert.move_error is None  # no expansion here
        energy, minus_grad, pool = new_energy, new_grad, new_pool


@pytest.mark.parametrize("coupled", [False, True])
def test_a_change_left_alone_into_the_other_gauge_sector_keeps_its_gap_with_its_own_error(coupled):
    """Near zero total moment a canonical-sign model's competitors lie in both gauge sectors. After a move
    within S0's sector, a change of ions the move left alone that crosses into the other sector keeps S0's gap
    for the same change: exact in a reversal-symmetric on-site landscape, its coupling to the move the error
    otherwise, named for evaluation until measured and measured apart (CROSSED) from the in-sector error."""
    levels = MomentLevels({"Ni": [1.0, 3.0]}, ["Ni"] * 8)
    pos, cell = triangular_layers(2, 2, 2)
    model = AnalyticSpinModel(pos, cell, ["Ni"] * 8, {"Ni": {1.0: 0.0, 3.0: 0.3}}, EXCHANGE if coupled else [])

    def gauge(states):
        return np.where(np.round(states.sum(axis=1), 9) >= 0, 1.0, -1.0)

    def reference(moments):
        energy, minus_grad = (x[0] for x in model.evaluate(moments, gradient=True))
        return energy, minus_grad, competitors(levels, moments, pair_limit=0, exchange_limit=1000)

    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, pair_limit=0, exchange_limit=1000),
                                  gauge=gauge)
    moments = levels.to_moments(np.array([[3, 2, 2, 3, 0, 2, 1, 0]], dtype=np.int8))[0]  # total +2
    energy, minus_grad, pool = reference(moments)
    cert.set_reference(moments, energy, minus_grad, pool, model.evaluate(pool)[0])
    cert.step_errors[:] = 0.0
    exchanges = np.flatnonzero(np.sum(np.abs(pool - moments) > 1e-9, axis=1) == 2)
    target = pool[exchanges[np.argmax(np.abs(pool[exchanges] - moments).sum(axis=1))]]  # a sign exchange
    new_energy, new_grad, new_pool = reference(target)
    named = cert.move_to(target, new_pool, minus_grad, new_grad, symmetric=True)
    crossed = cert.carried == CROSSED
    assert crossed.sum() >= 4 and np.all(gauge(new_pool[crossed]) != gauge(target[None])[0])
    assert set(np.flatnonzero(crossed)) <= set(named)  # their error is not measured yet
    exact = model.evaluate(new_pool)[0] - new_energy
    if not coupled:
        np.testing.assert_allclose(cert.gaps[crossed], exact[crossed], atol=1e-9)
    untouched = cert.carried == UNTOUCHED
    errors = np.abs(cert.gaps - exact)
    cert.update(named, new_energy, new_grad, exact[named] + new_energy)
    assert cert.crossed_error == pytest.approx(errors[crossed].max(), abs=1e-12)
    assert (cert.crossed_error > 1e-3) == coupled
    assert cert.untouched_error == pytest.approx(errors[untouched & np.isin(np.arange(len(exact)), named)].max(),
                                                 abs=1e-12)


def test_a_competitor_in_another_gauge_sector_keeps_its_gap_and_its_own_error():
    """Canonical-sign models evaluate each state in its gauge (total moment up): across the sign the
    energy is not smooth in the moments, so -dE/dS at S0 predicts only the gaps of S0's sector; the
    others keep their reference gap and are checked until their own error was measured."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni", "Ni", "Ni"])
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01, pair_limit=300),
                                  gauge=lambda states: np.sign(states.sum(axis=1)))
    moments = np.array([1.0, 1.0, 1.0])
    pool = competitors(levels, moments, pair_limit=300)
    assert len(pool) == 3 + 3  # three single reversals (total +1) and three pairs (total -1)
    cross = cert.sectors(pool) < 0
    assert cross.sum() == 3 and np.all(np.sum(pool != moments, axis=1)[cross] == 2)
    field = np.array([0.2, 0.2, 0.2])
    cert.set_reference(moments, 0.0, field, pool, np.full(len(pool), 0.5))
    np.testing.assert_array_equal(cert.kinds == OTHER_SECTOR, cross)
    moved_field = np.array([0.3, 0.25, 0.1])
    predicted = cert.predicted_gaps(moved_field)
    np.testing.assert_allclose(predicted[cross], 0.5)  # kept
    assert np.all(predicted[~cross] != 0.5)  # followed the change of -dE/dS
    cert.step_errors[[MAGNITUDES, REVERSALS]] = 0.0
    np.testing.assert_array_equal(cert.to_check(field), np.flatnonzero(cross))  # their error is not measured yet
    cert.update(np.flatnonzero(cross), 0.0, field, np.full(3, 0.5))
    assert cert.step_errors[OTHER_SECTOR] == 0.0 and not len(cert.to_check(field))


def test_magnitude_changes_and_reversals_keep_their_own_error():
    """A competitor that only changes magnitudes is predicted far better by -dE/dS than one that reverses
    an ion (measured: 0.2 vs 9-14 meV per MD step at 900 K): each kind is allowed its own measured error,
    so a close magnitude change is not evaluated for the reversals' error."""
    levels = MomentLevels({"Ni": [1.0, 1.2]}, ["Ni", "Ni"])

    def gauge(states):  # the canonical sign: the total moment's, else the first ion's
        total = np.round(states.sum(axis=1), 9)
        return np.where(total != 0, np.sign(total), np.sign(states[:, 0]))

    settings = CertificateSettings(margin=0.001, safety=1.0, pair_limit=300, probes=0)  # 0: all at the first check
    cert = GroundStateCertificate(levels, settings, gauge=gauge)
    moments = np.array([1.0, 1.0])
    pool = competitors(levels, moments, pair_limit=300)
    cert.set_reference(moments, 0.0, np.zeros(2), pool, np.full(len(pool), 0.02))
    magnitudes = np.all(pool > 0, axis=1)  # (1.2, 1), (1, 1.2), (1.2, 1.2)
    np.testing.assert_array_equal(cert.kinds == MAGNITUDES, magnitudes)
    np.testing.assert_array_equal(cert.kinds == OTHER_SECTOR, gauge(pool) < 0)
    assert set(cert.kinds) == {MAGNITUDES, REVERSALS, SEVERAL_REVERSED, OTHER_SECTOR}
    np.testing.assert_array_equal(cert.to_check(np.zeros(2)), np.arange(len(pool)))  # nothing measured yet
    cert.update(np.arange(len(pool)), 0.0, np.zeros(2), np.where(magnitudes, 0.0205, 0.05))
    assert cert.step_errors[MAGNITUDES] == pytest.approx(0.0005)  # |0.02 - 0.0205| over one geometry
    assert cert.step_errors[REVERSALS] == pytest.approx(0.03) == cert.step_errors[OTHER_SECTOR]
    assert cert.step_errors[SEVERAL_REVERSED] == pytest.approx(0.03)
    # one geometry on: magnitudes at 20.5 meV allowed 1 + 0.5, the others at 50 meV allowed 1 + 30
    assert not len(cert.to_check(np.zeros(2)))  # (one error for all would have named the magnitudes: 31 > 20.5)
    np.testing.assert_array_equal(cert.to_check(np.zeros(2)), np.flatnonzero(~magnitudes))  # 1 + 60 > 50


def test_a_return_to_a_state_left_recalls_its_references():
    """Moments that go A -> B -> A across the gauge sector: back at A, the competitors that B's gaps cannot
    speak for (the other sector) take A's remembered references, aged by the geometries since, so fewer
    are evaluated than without the memory; every one left unevaluated is above A by more than its
    allowance at the new geometry (the prediction is exact for single-ion moves of the analytic model)."""
    symbols = ["Ni"] * 8
    levels = MomentLevels({"Ni": [1.0]}, symbols)
    pos, cell = triangular_layers(2, 2, 2)
    rng = np.random.default_rng(3)
    shifts = [rng.normal(0, 0.01, pos.shape) * k for k in range(3)]
    models = [AnalyticSpinModel(pos + s, cell, symbols, {"Ni": {1.0: 0.0}}, EXCHANGE) for s in shifts]

    def gauge(states):
        return np.where(np.round(states.sum(axis=1), 9) >= 0, 1.0, -1.0)

    a = search_ground_state(models[0], levels, enumerate_limit=10**6).best_moments  # A: the ground state
    pool = competitors(levels, a, pair_limit=300)
    across = pool[gauge(pool) != gauge(a[None])[0]]
    b = across[np.argmin(models[0].evaluate(across)[0])]  # B: its lowest competitor in the other sector

    def walk(remembered):
        cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, pair_limit=300,
                                                                  remembered_states=remembered), gauge=gauge)
        energy, grad = (x[0] for x in models[0].evaluate(a, gradient=True))
        pool = competitors(levels, a, pair_limit=300)
        cert.set_reference(a, energy, grad, pool, models[0].evaluate(pool)[0])
        cert.step_errors[:] = 0.002  # eV per geometry, as if measured
        named = None
        for model, (before, after) in zip(models[1:], [(a, b), (b, a)]):
            cert.tick()
            grad_before = model.evaluate(before, gradient=True)[1][0]
            energy, grad = (x[0] for x in model.evaluate(after, gradient=True))
            named = cert.move_to(after, competitors(levels, after, pair_limit=300), grad_before, grad, symmetric=True)
            cert.update(named, energy, grad, model.evaluate(cert.competitors[named])[0])
        return cert, named, energy

    _, named_without, _ = walk(0)
    cert, named, energy = walk(8)
    assert len(named) < len(named_without) and set(named) <= set(named_without)
    left = np.setdiff1d(np.arange(len(cert.competitors)), named)
    exact = models[2].evaluate(cert.competitors[left])[0] - energy
    assert np.all(exact > 0) and np.any(cert.ages[left] == 2)  # recalled: referenced two geometries ago


def test_a_resumed_state_takes_its_remembered_references_alone():
    """A caller that jumps back to a state it held two geometries before (an explore member returning to a
    state it visited) resumes it: its competitors take their remembered references, aged by the geometries
    since, one it never had none (named); every competitor left unnamed is above it by more than its allowance
    at the new geometry. A state never held is not resumed, and the held one stays."""
    symbols = ["Ni"] * 8
    levels = MomentLevels({"Ni": [1.0]}, symbols)
    pos, cell = triangular_layers(2, 2, 2)
    rng = np.random.default_rng(5)
    models = [AnalyticSpinModel(pos + rng.normal(0, 0.01, pos.shape) * k, cell, symbols, {"Ni": {1.0: 0.0}},
                                EXCHANGE) for k in range(3)]
    a = search_ground_state(models[0], levels, enumerate_limit=10**6).best_moments
    b = competitors(levels, a)[0]
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0))
    for model, state in zip(models[:2], (a, b)):  # A held at geometry 0, B at geometry 1
        if state is b:
            cert.tick()
        energy, grad = (x[0] for x in model.evaluate(state, gradient=True))
        pool = competitors(levels, state)
        cert.set_reference(state, energy, grad, pool, model.evaluate(pool)[0])
        cert.step_errors[:] = 0.002  # eV per geometry, as if measured
    never = -a.copy()
    never[:2] = never[1::-1] * -1
    assert not cert.resume(never, competitors(levels, never)) and cert.holds_for(b)
    unknown = np.where(np.arange(8) < 3, -a, a)  # three ions reversed: no competitor of A's reference
    pool = np.concatenate([competitors(levels, a), unknown[None]])
    assert cert.resume(a, pool) and cert.holds_for(a)
    energy, grad = (x[0] for x in models[2].evaluate(a, gradient=True))
    named = cert.to_check(grad)
    assert np.all(cert.ages[:-1] == 2) and np.isnan(cert.gaps[-1]) and len(pool) - 1 in named
    assert len(named) < len(pool)
    left = np.setdiff1d(np.arange(len(pool)), named)
    assert np.all(models[2].evaluate(pool[left])[0] - energy > 0)


def test_a_resumed_state_is_not_forgotten_and_skips_gaps_carried_with_a_coupling():
    """With room for one remembered state, resuming it after holding another still recalls its references (the
    state left takes the room afterwards); a remembered gap carried with a pair's coupling (COUPLED) is not taken
    back without that coupling (no gap: named)."""
    symbols = ["Ni"] * 8
    levels = MomentLevels({"Ni": [1.0]}, symbols)
    pos, cell = triangular_layers(2, 2, 2)
    model = AnalyticSpinModel(pos, cell, symbols, {"Ni": {1.0: 0.0}}, EXCHANGE)
    a = search_ground_state(model, levels, enumerate_limit=10**6).best_moments
    b = competitors(levels, a)[0]
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.0, remembered_states=1))
    for state in (a, b):
        energy, grad = (x[0] for x in model.evaluate(state, gradient=True))
        pool = competitors(levels, state)
        cert.set_reference(state, energy, grad, pool, model.evaluate(pool)[0])
        if state is a:
            cert.carried[0] = COUPLED  # as if a move had carried this gap with a pair's coupling
    pool = competitors(levels, a)
    assert cert.resume(a, pool)
    assert np.isnan(cert.gaps[0]) and np.all(np.isfinite(cert.gaps[1:]))
    assert list(cert.memory) == [state_key(b)]


def test_a_certificate_absorbs_the_errors_another_one_measured():
    """Two certificates of one model along one trajectory (an explore member's two descents): the kept one
    takes the larger error of each kind and way, and the way the larger errors favour."""
    levels = MomentLevels({"Ni": [1.0, 3.0]}, ["Ni"] * 3)
    kept, other = GroundStateCertificate(levels), GroundStateCertificate(levels)
    kept.way_errors[MAGNITUDES] = [0.002, 0.003]  # following measured better for magnitude changes
    other.way_errors[MAGNITUDES] = [0.005, 0.001]  # keeping, by the other's larger error
    other.way_errors[REVERSALS] = [0.004, 0.006]  # a kind only the other measured
    other.move_error = 0.007
    other.old_way_errors[REVERSALS] = [0.01, 0.02]  # measured on references older than max_age
    kept.absorb_errors(other)
    np.testing.assert_allclose(kept.old_way_errors[REVERSALS], [0.01, 0.02])
    assert kept._old_step_errors()[REVERSALS] == 0.01  # the kind's way: following
    np.testing.assert_allclose(kept.way_errors[MAGNITUDES], [0.005, 0.003])
    assert not kept.follow[MAGNITUDES] and kept.step_errors[MAGNITUDES] == 0.003
    assert kept.follow[REVERSALS] and kept.step_errors[REVERSALS] == 0.004
    assert np.isnan(kept.step_errors[OTHER_SECTOR]) and kept.move_error == 0.007


def test_anchors_are_evaluated_only_for_the_exchanges_their_age_brings_within_reach():
    """An anchor evaluated at an earlier geometry keeps its gap, sized by the measured change of anchors' gaps
    per geometry x its age (inf until that change is measured): a step evaluates only the anchors of the
    competitors the allowance names. Every exchange left on older anchors is truly above S0 by more than the
    margin, and the exchange whose field turns has its anchors evaluated and is named."""
    levels = MomentLevels({"Ni": [1.0]}, ["Ni"] * 8)
    cert = GroundStateCertificate(levels, CertificateSettings(margin=0.01, pair_limit=0, exchange_limit=100))
    rng = np.random.default_rng(5)
    energy, minus_grad = fields_and_pairs(rng, 8, 0.004)

    moments = np.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    pool = competitors(levels, moments, pair_limit=0, exchange_limit=100)
    exchanges = np.sum(pool != moments, axis=1) == 2
    field = np.array([0.04, 0.3, 0.35, 0.4, -0.04, -0.3, -0.35, -0.4])
    asked = []

    def anchor_gaps(field):
        def gaps(states):
            asked.append(len(states))
            return energy(states, field) - energy(moments, field)[0]
        return gaps

    cert.set_reference(moments, energy(moments, field)[0], minus_grad(moments, field), pool, energy(pool, field),
                       anchor_gaps(field))
    assert asked == [len(cert.anchors)] and cert.anchor_error is None
    turned = np.flatnonzero(exchanges & np.all(pool[:, [0, 4]] != moments[[0, 4]], axis=1))
    for step in range(1, 20):
        asked.clear()
        field = field + rng.normal(0, 0.002, 8)
        field[[0, 4]] += [-0.005, 0.005]  # the exchange of ions 0 and 4 nears, then turns lower
        e, g = energy(moments, field)[0], minus_grad(moments, field)
        named = cert.to_check(g, anchor_gaps(field))
        evaluated, found = cert.check(named, e, g, lambda states: energy(states, field))
        fresh = cert.anchor_clocks == cert.clock
        on_older = exchanges & np.any(~fresh[cert.anchor_of], axis=1)
        if energy(pool[turned], field)[0] < e:  # S0 is left: the turned exchange named on fresh anchors
            assert fresh[cert.anchor_of[turned]].all() and found.min() < e
            assert any(np.array_equal(row, pool[turned[0]]) for row in evaluated)
            break
        assert np.all(found >= e) and np.all(energy(pool[on_older], field) - e > cert.settings.margin)
        if step == 1:
            assert cert.anchor_error > 0  # measured on the anchors of the competitors named (probes first)
        else:
            assert sum(asked) < len(cert.anchors) and on_older.any()
    assert step > 2
