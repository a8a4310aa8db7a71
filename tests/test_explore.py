"""Explore stage: spin-minimized MD with a real tiny deepmd-kit ensemble, deviations, selection."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, lini_frames, make_machine, make_param, tiny_training_param, write_inputs, write_spin_system

from spingen.schema import MD_ENSEMBLES, SpinSettings
from spingen.stages.explore import classify, read_model_devi, sample_candidates, write_candidates
from spingen.tasks.explore import DEVI_COLUMNS, SPIN_NOT_COMPUTED, ExploreTaskSettings

TYPE_MAP = ["Li", "Ni", "O"]
SPIN = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")
MAGNITUDES = {"Ni": [1.0, 3.0]}


# ---------------------------------------------------------------- fixtures: a tiny real ensemble
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread before deepmd-kit is first imported (module fixtures run before conftest's
    function-scoped OMP_NUM_THREADS): idle OpenMP threads spinning on a shared 2-core machine make
    every evaluation tens of times slower."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("OMP_NUM_THREADS", "DP_INTRA_OP_PARALLELISM_THREADS", "DP_INTER_OP_PARALLELISM_THREADS"):
            mp.setenv(name, "1")
        yield


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, one_thread) -> list[Path]:
    """Two tiny spin models (seeds 1, 2) trained concurrently on the LiNiO2-like data."""
    from spingen.stages.train import training_input, write_training_data

    root = tmp_path_factory.mktemp("models")
    write_training_data([write_spin_system(root / "raw", n_frames=12)], root / "data", TYPE_MAP, SPIN)
    tasks = []
    for k in range(2):
        task = root / f"{k:03d}"
        task.mkdir()
        param = tiny_training_param(steps=20)
        param["model"]["descriptor"]["sel"] = [16, 16, 32]  # no truncated neighbour list: a smooth energy
        inp = training_input(param, TYPE_MAP, SPIN, ["../data/sys.000"], seed=k + 1)
        (task / "input.json").write_text(json.dumps(inp))
        SPIN.encoding.save(task / "spin_encoding.json")
        tasks.append(task)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ("train input.json", "freeze -o frozen_model.pth"):
        procs = [subprocess.Popen([str(BIN / "dp"), "--pt", *command.split()], cwd=t, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for t in tasks]
        for proc in procs:
            assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    return [t / "frozen_model.pth" for t in tasks]


@pytest.fixture(scope="module")
def dps(model_paths, one_thread):
    from deepmd.infer import DeepPot

    return [DeepPot(str(p)) for p in model_paths]


def cell16(seed: int = 5):
    """16 atoms (4 Ni): the 8-atom LiNiO2-like cell doubled along x, rattled."""
    atoms = lini_frames(1, 3)[0][0].repeat((2, 1, 1))
    atoms.rattle(0.05, seed=seed)
    return atoms


def encoded_spin(moments: np.ndarray, symbols) -> np.ndarray:
    """deepmd spin input written out by hand: (0, 0, S + d/eta) on Ni, zero elsewhere."""
    moments = np.atleast_2d(moments)
    spin = np.zeros(moments.shape + (3,))
    ni = np.array([s == "Ni" for s in symbols])
    spin[:, ni, 2] = moments[:, ni] + SPIN.offset / SPIN.virtual_scale
    return spin.reshape(len(moments), -1)


def predict(dps, atoms_list, moments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energies (M, nf), forces (M, nf, natoms, 3), virials (M, nf, 9) straight from DeepPot.eval."""
    import torch

    symbols = atoms_list[0].get_chemical_symbols()
    atype = [TYPE_MAP.index(s) for s in symbols]
    coords = np.array([a.positions.ravel() for a in atoms_list])
    cells = np.array([a.cell.array.ravel() for a in atoms_list])
    with torch.jit.optimized_execution(False):  # TorchScript's profiling runs take minutes on busy CPUs
        out = [dp.eval(coords, cells, atype, spin=encoded_spin(np.asarray(moments), symbols)) for dp in dps]
    return (np.array([o[0].reshape(-1) for o in out]), np.array([o[1] for o in out]),
            np.array([o[2].reshape(len(coords), 9) for o in out]))


# ---------------------------------------------------------------- the calculator
@pytest.mark.parametrize("search", [{}, {"enumerate_limit": 0}], ids=["enumeration", "genetic"])
def test_calculator_spins_are_the_ground_state(dps, search):
    from spingen.md import SpinModelCalculator

    atoms = cell16()
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive="mean", search=search, seed=3)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert calc.last_search.method == ("genetic" if search else "enumeration")
    # brute force over every configuration with the first Ni up (one of each reversed pair)
    ni = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "Ni"]
    levels = (-3.0, -1.0, 1.0, 3.0)
    configs = [(a,) + rest for a in (1.0, 3.0) for rest in itertools.product(levels, repeat=len(ni) - 1)]
    moments = np.zeros((len(configs), len(atoms)))
    moments[:, ni] = configs
    energies = predict(dps, [atoms] * len(configs), moments)[0].mean(axis=0)
    best = int(np.argmin(energies))
    np.testing.assert_allclose(atoms.get_magnetic_moments(), moments[best])
    assert energy == pytest.approx(energies[best], abs=1e-8)
    assert calc.excited_magmoms().shape == (len(atoms), 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cold_search_is_descended_from_over_every_competitor(dps, seed):
    """A cold start reports no moments a single- or two-ion change lowers: with the certificate, every
    competitor of the search's result is evaluated at its geometry and a lower one descended to, no second
    search even with search_every 1 (here the search is cut to 4 evaluations, so its own best is not such a
    minimum: without the certificate it is left as found, the same search)."""
    from spingen.md import SpinModelCalculator
    from spingen.spin.certificate import SAME_ENERGY

    held = {}
    for certify in (None, {"search_every": 1}):  # (the cold step itself does not count towards search_every)
        atoms = cell16(seed=seed)
        calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive="mean", seed=seed,
                                   search={"enumerate_limit": 0, "max_evaluations": 4}, certify=certify)
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        pool = calc.competitors(calc.moments)
        full = np.zeros((len(pool), len(atoms)))
        full[:, calc.levels.magnetic_indices] = pool
        lowest = predict(dps, [atoms] * len(pool), full)[0].mean(axis=0).min()
        held[certify is None] = (energy, lowest, calc.n_descents, calc.lowest_here, calc.n_searches)
    searched_energy, searched_lowest, *_ = held[True]
    assert searched_lowest < searched_energy - SAME_ENERGY  # the search's best is not such a minimum here
    energy, lowest, descents, lowest_here, searches = held[False]
    assert lowest >= energy - SAME_ENERGY and lowest_here and searches == 1
    assert descents > 0 and energy < searched_energy - SAME_ENERGY


def test_a_cold_start_whose_runs_disagree_is_reported(dps, caplog):
    """A cold search of several runs that end in different states warns that the start may
    not be the ground state and names what to give (each run cut to 2 evaluations here); one whose runs agree
    does not."""
    from spingen.md import SpinModelCalculator

    warnings = []
    for search in ({"enumerate_limit": 0, "cold_runs": 3, "population": 2, "max_evaluations": 6},
                   {"enumerate_limit": 0, "cold_runs": 3}):
        atoms = cell16(seed=4)
        atoms.calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, search=search, seed=1)
        caplog.clear()
        with caplog.at_level("WARNING", logger="spingen"):
            atoms.get_potential_energy()
        result = atoms.calc.last_search
        warnings.append([r.getMessage() for r in caplog.records if "cold spin search" in r.getMessage()])
        assert result.n_runs == 3 and (result.runs_at_best < 2) == bool(warnings[-1])
    assert warnings[0] and "initial_magmoms" in warnings[0][0] and "max_cold_runs" in warnings[0][0]
    assert "cold_runs above 3" in warnings[0][0]
    assert not warnings[1]


def test_a_search_step_hands_its_own_evaluation_to_the_search(dps):
    """Re-optimizing steps evaluate the current moments once (energy, forces, -dE/dS), the search
    takes that for free, and the step evaluates again only if the moments moved."""
    from spingen.deepmd_model import DeepmdSpinModel
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=9)
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive="mean", spin_opt_freq=1,
                               search={"enumerate_limit": 0, "max_evaluations": 6}, seed=1, certify=None)
    atoms.calc = calc
    atoms.get_potential_energy()
    for _ in range(3):
        atoms.positions[0, 0] += 0.002
        before, n_eval = calc.moments.copy(), calc.n_evaluations
        energy = atoms.get_potential_energy()
        moved = not np.array_equal(before, calc.moments)
        assert calc.n_evaluations == n_eval + 1 + moved
        e, _, _ = predict(dps, [atoms], calc.full_moments()[None])
        assert energy == pytest.approx(e.mean(), abs=1e-8)
        model = DeepmdSpinModel(dps, atoms.positions, atoms.cell.array, atoms.get_chemical_symbols(), SPIN.encoding)
        _, minus_grad = model.evaluate(calc.moments, gradient=True)
        np.testing.assert_allclose(calc.minus_spin_grad, minus_grad[0], rtol=1e-6, atol=1e-9)
    assert calc.n_searches == 4 and all(calc._fast_verdicts.values()) and len(calc._fast_verdicts) == 2


def test_standalone_schedule_counts_geometries(dps):
    """Without an MD driver, spin_opt_freq counts geometries, whatever a search step evaluates."""
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=12)
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=2, seed=4,
                               certify=None)  # every re-optimizing geometry searches
    atoms.calc = calc
    for _ in range(5):
        atoms.positions[1, 1] += 0.01
        atoms.get_potential_energy()
    assert calc.n_calculations == 5 and calc.n_searches == 3  # geometries 0 (cold), 2 and 4


def test_ensemble_predictions_reuse_the_driving_models_evaluation(dps):
    """With one driving model, an explore frame's ensemble prediction takes the driving model's from the step's own
    evaluation and evaluates only the other members: the same as every member evaluated afresh."""
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=12)
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=1, spin_opt_freq=1, seed=4)
    atoms.calc = calc
    atoms.get_potential_energy()
    predict, asked = calc.predict, []
    calc.predict = lambda a, models: asked.append(list(models)) or predict(a, models)
    energies, forces, virials = calc.ensemble_predictions(atoms)
    assert asked == [[dps[0]]]  # the driving member (1) was not evaluated again
    fresh = predict(atoms, calc.models)
    for got, want in zip((energies, forces, virials, calc.member_minus_spin_grad), fresh):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert np.ptp(energies) > 0  # two different members, in their order


def all_configurations(atoms) -> tuple[list[tuple], np.ndarray]:
    """Every configuration of cell16's 4 Ni (first Ni up) and the full moment rows."""
    ni = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "Ni"]
    configs = [(a,) + rest for a in (1.0, 3.0) for rest in itertools.product((-3.0, -1.0, 1.0, 3.0), repeat=3)]
    moments = np.zeros((len(configs), len(atoms)))
    moments[:, ni] = configs
    return configs, moments


def test_a_competitor_the_model_cannot_evaluate_hides_no_lower_one(dps, monkeypatch):
    """Where the driving model returns NaN for one competitor of the held moments, the calculator still moves to
    the lowest finite one below them (before, the NaN hid every lower competitor)."""
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=4)
    configs, moments = all_configurations(atoms)
    energies = predict(dps[:1], [atoms] * len(configs), moments)[0][0]
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=1)
    atoms.calc = calc
    atoms.get_potential_energy()  # the cold search; then the moments are set to the highest state
    calc.moments = moments[int(np.argmax(energies)), atoms.symbols == "Ni"]  # many competitors lie below it
    atoms.positions[0] += 1e-4
    evaluate, poisoned = calc._energies, []

    def first_batch_with_a_nan(model, states):
        found = evaluate(model, states)
        if not poisoned:  # the first batch: every competitor of the start; its lowest is made NaN
            poisoned.append(states[int(np.argmin(found))].copy())
            found = np.where(np.arange(len(found)) == np.argmin(found), np.nan, found)
        return found

    monkeypatch.setattr(calc, "_energies", first_batch_with_a_nan)
    energy = atoms.get_potential_energy()
    assert poisoned and energy < energies.max() - 1e-3  # it moved downhill


@pytest.mark.parametrize("exchanges", [False, True])
def test_default_spin_md_holds_the_exhaustive_minimum_at_every_step(dps, exchanges):
    """Default settings (certificate on): along a short 900 K trajectory the moments the calculator
    holds are the exhaustive minimum of the driving model at every step, with no search after the
    cold one (the competitors find the change of the ground state on the way). The same with the
    exchanges as two-ion competitors instead of every pair, their gaps following their anchors."""
    from spingen.md import DEFAULT_CERTIFICATE, SpinModelCalculator, run_md
    from spingen.spin.certificate import PAIRED

    atoms = cell16(seed=4)
    certify = {"pair_limit": 0, "exchange_limit": 100} if exchanges else DEFAULT_CERTIFICATE
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=1, seed=2,
                               certify=certify)
    held = []
    run_md(atoms, calc, "nvt", 900, nsteps=12, dt_fs=2.0, trj_freq=1, seed=4,
           observers=[lambda step, a: held.append((a.positions.copy(), a.get_magnetic_moments().copy()))])
    configs, moments = all_configurations(atoms)
    for positions, magmoms in held:
        frame = atoms.copy()
        frame.positions = positions
        energies = predict(dps[:1], [frame] * len(configs), moments)[0][0]
        best = int(np.argmin(energies))
        np.testing.assert_allclose(magmoms, moments[best])  # both first-up: the first Ni points up
    assert len(held) == 13 and calc.n_searches == 1  # the cold one
    assert calc.n_descents >= 1  # the ground state changed on the way, found by the competitors
    if exchanges:  # their couplings measured and their prediction error with them
        assert np.isfinite(calc.certificate.step_errors[PAIRED]) and PAIRED in calc.certificate.kinds
        return
    # each step certified or checked in batches (while a kind's error is unmeasured, its probes first)
    assert 12 <= calc.n_certified + calc.n_references
    assert calc.n_reference_evaluations < 12 * len(calc.competitors(calc.moments)) / 2, calc.n_reference_evaluations


def recording_energy_models(calc) -> list[tuple[list, int]]:
    """Patch calc.energy_model to record (models, configurations evaluated) of every model it makes."""
    made, energy_model = [], calc.energy_model

    def recording(atoms, models=None):
        model = energy_model(atoms, models)
        record = [list(models or calc.drive_models), 0]
        made.append(record)
        evaluate = model.evaluate

        def counted(moments, *args, **kwargs):
            record[1] += len(moments)
            return evaluate(moments, *args, **kwargs)

        model.evaluate = counted
        return model

    calc.energy_model = recording
    return made


def member_frames(atoms, calc, members, member, nsteps: int) -> list[tuple]:
    """NVT MD at 900 K with a spin-disagreement frame every 2 steps: per frame (geometry, driving moments, the
    members' states, configurations `member` evaluated)."""
    from spingen.md import run_md
    from spingen.tasks.explore import spin_disagreement

    made = recording_energy_models(calc)
    frames = []

    def frame(step, a):
        made.clear()
        states = spin_disagreement(calc, a, members)[2]
        frames.append((a.copy(), calc.moments.copy(), states, sum(n for models, n in made if models == [member])))

    run_md(atoms, calc, "nvt", 900, nsteps=nsteps, dt_fs=2.0, trj_freq=2, seed=4, observers=[frame])
    return frames


def test_members_check_the_driving_states_and_go_downhill_only_when_they_disagree(dps):
    """Spin disagreement: the driving model that re-optimized here is not evaluated again; a member that
    finds a competitor of the driving moments lower goes downhill from it and ends on its own exhaustive
    ground state here, at a fraction of the enumeration."""
    from spingen.md import SpinModelCalculator
    from spingen.tasks.explore import spin_disagreement

    atoms = cell16(seed=11)
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, search={"enumerate_limit": 0},
                               seed=2)
    atoms.calc = calc
    atoms.get_potential_energy()
    made = recording_energy_models(calc)
    assert calc.lowest_here  # the cold search ran at this geometry
    value, energy_devi, states = spin_disagreement(calc, atoms)
    configs, moments = all_configurations(atoms)
    # member 0 drives, its moments are its own: it evaluates only the other member's state (energy deviation;
    # its energy at its own state is the MD step's)
    assert made[0][1] == len(np.unique(states, axis=0)) - 1 == 1 and made[1][1] < len(configs)
    energies = predict(dps, [atoms] * len(configs), moments)[0]  # (2 members, 128)
    minima = [np.array(configs[int(np.argmin(e))]) for e in energies]
    np.testing.assert_allclose(calc.moments, minima[0])  # the driving model's ground state
    np.testing.assert_allclose(states[0], minima[0])
    assert not np.allclose(minima[0], minima[1])  # these two untrained members disagree
    np.testing.assert_allclose(states[1], minima[1])  # member 1 went downhill to its own minimum
    assert value == pytest.approx(np.mean(minima[0] != minima[1]))
    reference = tuple(calc.moments)
    above = [[e[configs.index(tuple(m))] - e[configs.index(reference)] for m in minima] for e in energies]
    assert energy_devi == pytest.approx(np.max(np.std(above, axis=0)) / len(atoms), rel=1e-5)
    calc.spin_opt_freq = 0  # moments held, not re-optimized: every member checks them
    atoms.positions += 0.01
    atoms.get_potential_energy()
    assert not calc.lowest_here
    made.clear()
    spin_disagreement(calc, atoms)
    assert [models for models, n in made if n] == [[dps[0]], [dps[1]]]


@pytest.mark.parametrize("exchanges", [False, True])
def test_member_states_follow_the_trajectory_certified_frame_to_frame(dps, exchanges):
    """An explore task's members keep their own states from frame to frame: at every frame of a 900 K
    trajectory each member's state is below every competitor under that member (none missed by its
    certificate) and not above the driving moments, and after the first frame a member evaluates fewer
    configurations than one check of every competitor. The same states with the exchanges as the two-ion
    competitors, their gaps following their anchors under each member."""
    from spingen.md import DEFAULT_CERTIFICATE, SpinModelCalculator
    from spingen.spin.certificate import PAIRED
    from spingen.tasks.explore import MemberStates

    atoms = cell16(seed=4)
    certify = {"pair_limit": 0, "exchange_limit": 100} if exchanges else DEFAULT_CERTIFICATE
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=1, seed=2,
                               certify=certify)
    members = MemberStates(calc)
    frames = member_frames(atoms, calc, members, dps[1], nsteps=12)
    pool_size = len(calc.competitors(calc.moments))
    full = np.zeros(len(atoms))
    for geometry, driving, states, _ in frames:
        for k, state in enumerate(states):
            rivals = np.concatenate([[state, driving], calc.competitors(state)])
            full_rows = np.repeat(full[None], len(rivals), axis=0)
            full_rows[:, geometry.symbols == "Ni"] = rivals
            energies = predict(dps[k:k + 1], [geometry] * len(rivals), full_rows)[0][0]
            assert energies[0] <= energies[1:].min() + 1e-5, (k, energies[0] - energies[1:].min())
    evaluated = [n for *_, n in frames]
    assert len(frames) == 7 and evaluated[0] >= pool_size
    assert np.isfinite(members.certificates[1].step_errors[PAIRED]) == exchanges  # couplings measured, then checked
    if not exchanges:  # (4 Ni: as many anchors as exchanges, so no saving to assert there)
        assert np.mean(evaluated[1:]) < pool_size, evaluated


def test_members_without_a_certificate_check_every_competitor_at_every_frame(dps):
    """certify None: a member checks every competitor of its start at every frame (no remembered state resumed)."""
    from spingen.md import SpinModelCalculator
    from spingen.tasks.explore import MemberStates

    atoms = cell16(seed=4)
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=1, seed=2,
                               certify=None)
    members = MemberStates(calc)
    evaluated = [n for *_, n in member_frames(atoms, calc, members, dps[1], nsteps=6)]
    assert len(evaluated) == 4 and min(evaluated) >= len(calc.competitors(members.held[1]))


def test_a_member_in_a_local_minimum_returns_to_a_lower_state_it_visited(dps, monkeypatch):
    """A member whose own state of the frame before is a local minimum of its landscape stays there while the
    driving moments lie above it; a lower state it visited at the frames before is checked at every frame and
    taken where it lies below both; and it descends from the driving moments where those lie below its
    minimum. Member 1's landscape is a two-basin one (below) under single-ion moves (pair_limit 0)."""
    from spingen.md import SpinModelCalculator
    from spingen.spin.model import EnergyModel
    from spingen.tasks.explore import MemberStates

    up, local = np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, -1.0, -1.0])

    class TwoBasins(EnergyModel):
        """E = -(up.s)^2 - (local.s)^2 / 2 + sum_i (|S_i| - 1)^2, s the signs: lowest at `up`; `local` lies
        below every single-ion move from it."""

        models, fast_ok = (), ()  # no deepmd-kit fixed-geometry path checks (keep_fast_verdicts)

        def calculate(self, moments, gradient):
            signs = np.sign(moments)
            energies = -(signs @ up) ** 2 - 0.5 * (signs @ local) ** 2 + ((np.abs(moments) - 1) ** 2).sum(axis=1)
            return energies, (-2 * (np.abs(moments) - 1) * signs if gradient else None)

    atoms = cell16(seed=4)
    driving = np.array([1.0, 1.0, 1.0, -1.0])  # one single-ion move from `up`; above `local` in TwoBasins
    start = np.zeros(len(atoms))
    start[atoms.symbols == "Ni"] = driving
    calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive=0, spin_opt_freq=0, moments=start,
                               certify={"pair_limit": 0, "exchange_limit": 0})
    atoms.calc = calc
    atoms.get_potential_energy()
    member_model, energy_model = TwoBasins(4), calc.energy_model
    monkeypatch.setattr(calc, "energy_model", lambda a, models=None:
                        member_model if models == [dps[1]] else energy_model(a, models))
    members = MemberStates(calc)

    def member_state(own, visited=(), drive=driving):
        members.held[1], members.visited = own.copy(), {1: [np.array(v) for v in visited]}  # the frames before
        members.certificates.pop(1, None)
        calc.moments = drive
        at_driving = [calc.energy_model(atoms, [dp]).evaluate(drive[None], gradient=True) for dp in dps]
        state = members.states(atoms, np.array([e[0] for e, _ in at_driving]),
                               np.array([g[0] for _, g in at_driving]))[1]
        cert = members.certificates[1]
        assert cert.holds_for(members.held[1]) and np.array_equal(members.held[1], state)
        assert cert.clock == 1  # a fresh certificate: one geometry, on every path
        return state

    def energy(state):
        return member_model.evaluate(state[None])[0][0]

    assert energy(local) < energy(driving)
    np.testing.assert_array_equal(member_state(driving), up)  # from the driving moments alone
    np.testing.assert_array_equal(member_state(local), local)  # the driving moments lie above its minimum
    np.testing.assert_array_equal(member_state(local, visited=[driving, up]), up)  # a lower state visited before
    assert any(np.array_equal(v, up) for v in members.visited[1]) and len(members.visited[1]) <= 8
    higher = np.array([1.0, -1.0, 1.0, -1.0])
    assert energy(higher) > energy(local)
    np.testing.assert_array_equal(member_state(local, visited=[higher]), local)  # one above is not taken
    np.testing.assert_array_equal(member_state(local, drive=up), up)  # driving moments below its minimum


def test_symmetrized_calculator_is_exactly_reversal_symmetric(dps):
    """model_devi_spin_symmetrize: E_sym(S) = (E(S) + E(-S)) / 2, its forces and -dE/dS, for
    models whose own energies are not symmetric."""
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=12)
    start = np.zeros(len(atoms))
    start[atoms.symbols == "Ni"] = [3.0, -1.0, 1.0, -3.0]
    out = {}
    for sign in (1.0, -1.0):
        calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive="mean", spin_opt_freq=0,
                                   moments=sign * start, symmetrize=True, fix_global_sign=False)
        atoms.calc = calc
        out[sign] = (atoms.get_potential_energy(), atoms.get_forces(), calc.minus_spin_grad.copy())
    energies, forces, _ = predict(dps, [atoms, atoms], [start, -start])  # plain models, (M, 2)
    assert np.abs(energies[:, 0] - energies[:, 1]).max() > 1e-4  # the models alone are not symmetric
    assert out[1.0][0] == pytest.approx(out[-1.0][0], abs=1e-9)
    assert out[1.0][0] == pytest.approx(energies.mean(), abs=1e-6)
    np.testing.assert_allclose(out[1.0][1], out[-1.0][1], atol=1e-9)
    np.testing.assert_allclose(out[1.0][1], forces.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(out[1.0][2], -out[-1.0][2], atol=1e-9)  # -dE_sym/dS is odd in S


def test_canonical_encoding_makes_the_calculator_reversal_symmetric_at_one_evaluation(dps):
    """spin/flip_symmetry "canonical": S and -S are one input to the models, so energy and forces are
    equal, -dE/dS is reversed, and each evaluation is one model call (not two as symmetrized)."""
    from dataclasses import replace

    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=12)
    start = np.zeros(len(atoms))
    start[atoms.symbols == "Ni"] = [3.0, -1.0, 1.0, 1.0]
    out = {}
    for sign in (1.0, -1.0):
        calc = SpinModelCalculator(dps, MAGNITUDES, encoding=replace(SPIN.encoding, canonical=True), drive="mean",
                                   spin_opt_freq=0, moments=sign * start, fix_global_sign=False)
        atoms.calc = calc
        out[sign] = (atoms.get_potential_energy(), atoms.get_forces(), calc.minus_spin_grad.copy())
        np.testing.assert_array_equal(calc.results["magmoms"], sign * start)  # the user sees the real moments
    energies = predict(dps, [atoms, atoms], [start, -start])[0]
    assert out[1.0][0] == pytest.approx(energies[:, 0].mean(), abs=1e-6)  # total +4 > 0: S is its representative
    assert out[1.0][0] == pytest.approx(out[-1.0][0], abs=1e-9)
    np.testing.assert_allclose(out[1.0][1], out[-1.0][1], atol=1e-9)
    np.testing.assert_allclose(out[1.0][2], -out[-1.0][2], atol=1e-9)


def test_forces_and_stress_finite_difference_at_fixed_spins(dps):
    from spingen.md import SpinModelCalculator

    atoms = cell16(seed=8)
    start = np.zeros(len(atoms))
    start[atoms.symbols == "Ni"] = [3.0, -1.0, 1.0, -3.0]
    atoms.calc = SpinModelCalculator(dps, MAGNITUDES, encoding=SPIN.encoding, drive="mean", spin_opt_freq=0,
                                     moments=start)
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    np.testing.assert_allclose(atoms.get_magnetic_moments(), start)
    assert atoms.calc.n_searches == 0
    h = 1e-4
    for index, axis in ((0, 0), (3, 2), (5, 1)):  # Li, Ni, O
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[index, axis] += sign * h
            energies.append(moved.get_potential_energy())
        assert -(energies[0] - energies[1]) / (2 * h) == pytest.approx(forces[index, axis], abs=1e-5)
    for i, j in ((0, 0), (1, 2)):  # symmetric strains: the model is not rotation invariant (spins along z)
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / 2
            strain[j, i] += sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain.T, scale_atoms=True)
            strained.calc = atoms.calc
            energies.append(strained.get_potential_energy())
        assert (energies[0] - energies[1]) / (2 * h) / atoms.get_volume() == pytest.approx(stress[i, j], abs=1e-6)
    np.testing.assert_allclose(atoms.get_magnetic_moments(), start)  # spin_opt_freq 0 never searched


def test_every_ensemble_runs_and_reports_frames():
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from spingen.md import INTEGRATORS, run_md

    assert set(INTEGRATORS) == set(MD_ENSEMBLES)
    for ensemble in MD_ENSEMBLES:
        atoms = bulk("Cu", cubic=True).repeat((2, 2, 2))
        steps = []
        run_md(atoms, EMT(), ensemble, 300, pressure=1.0, nsteps=6, dt_fs=1.0, trj_freq=3,
               observers=[lambda step, a: steps.append(step)], seed=1)
        assert steps == [0, 3, 6], ensemble
        assert np.all(np.isfinite(atoms.positions))


# ---------------------------------------------------------------- one explore task
def write_task(task_dir: Path, model_paths, nsteps=6, trj_freq=2, spin_devi_freq=2, drive=0) -> Path:
    import ase.io

    task_dir.mkdir(parents=True)
    ase.io.write(task_dir / "conf.extxyz", lini_frames(1, 3)[0][0], format="extxyz")
    ExploreTaskSettings(
        models=tuple(os.path.relpath(p, task_dir) for p in model_paths), magnetic=("Ni",),
        virtual_scale=SPIN.virtual_scale, offset=SPIN.offset, magnitudes={"Ni": (1.0, 3.0)}, drive=drive,
        ensemble="nvt", temperature=600.0, pressure=None, nsteps=nsteps, dt_ps=0.001, trj_freq=trj_freq,
        taut_ps=0.1, taup_ps=0.5, compressibility=1e-6, spin_opt_freq=1, spin_devi_freq=spin_devi_freq, seed=11,
        spin_search={"population": 8}).save(task_dir / "task.json")
    return task_dir


def test_nvt_task_deviations_equal_an_independent_recomputation(tmp_path, model_paths, dps):
    import ase.io
    from deepmd.infer.model_devi import calc_model_devi_e, calc_model_devi_f, calc_model_devi_v

    from spingen.tasks.explore import run

    task = write_task(tmp_path / "task", model_paths)
    assert run(task, models=dps) == 0
    assert (task / "finished").is_file()
    frames = ase.io.read(task / "traj.extxyz", index=":")
    rows = read_model_devi(task / "model_devi.out")
    header = (task / "model_devi.out").read_text().splitlines()[0]
    assert header.lstrip("#").split() == list(DEVI_COLUMNS)
    assert [f.info["step"] for f in frames] == [0, 2, 4, 6] and list(rows[:, 0]) == [0, 2, 4, 6]
    for frame, row in zip(frames, rows):
        moments = frame.get_initial_magnetic_moments()
        assert set(np.abs(moments[frame.symbols == "Ni"])) <= {1.0, 3.0}
        e, f, v = predict(dps, [frame], moments[None])
        natoms = len(frame)
        expected = [*calc_model_devi_v(v / natoms), *calc_model_devi_f(f), calc_model_devi_e(e[..., None] / natoms)]
        np.testing.assert_allclose(row[1:8], np.ravel(expected), rtol=2e-6, atol=1e-12)
        assert frame.arrays["excited_magmoms"].shape == (natoms, 4)
        assert frame.info["model_energy"] == pytest.approx(e[0, 0], abs=1e-6)  # model 0 drives
    spin = rows[:, DEVI_COLUMNS.index("spin_disagree")]
    assert list(spin[1::2]) == [SPIN_NOT_COMPUTED] * 2  # spin_devi_freq 2: frames 0 and 2 only
    assert np.all((spin[::2] >= 0) & (spin[::2] <= 1))

    # a second copy of the same job (resubmitted while the first ran) leaves the outputs as they are
    outputs = {name: (task / name).read_bytes() for name in ("traj.extxyz", "model_devi.out")}
    assert run(task, models=dps) == 0
    assert {name: (task / name).read_bytes() for name in outputs} == outputs


def test_candidates_get_the_lowest_state_of_each_sector_under_the_driving_model(tmp_path, model_paths, dps):
    import ase.io

    from spingen.spin import MomentLevels
    from spingen.spin.search import sector_windows
    from spingen.tasks.explore import run, sector_states

    task = write_task(tmp_path / "task.000.000000", model_paths, nsteps=2)
    assert run(task, models=dps) == 0
    rows = read_model_devi(task / "model_devi.out")
    out = tmp_path / "candidates.000.extxyz"
    write_candidates(tmp_path, out, [(task.name, int(row[0]), row) for row in rows], sectors=2)
    frames = ase.io.read(out, index=":")
    assert len(frames) == 2 and len(list(task.glob("sectors.*.npy"))) == 2  # kept for a rerun of the post

    def check(frame, sectors):
        ni = frame.symbols == "Ni"
        start = frame.get_initial_magnetic_moments()
        windows = sector_windows(MomentLevels({"Ni": (1.0, 3.0)}, list(frame.symbols)), start[ni], 2)
        assert sectors.shape == (len(frame), len(windows)) and len(windows) >= 1
        assert np.all(sectors[~ni] == 0) and set(np.abs(sectors[ni]).ravel()) <= {1.0, 3.0}
        for (lo, hi), total in zip(windows, np.abs(sectors[ni].sum(axis=0))):
            assert lo - 1e-9 <= total <= hi + 1e-9  # each in its own sector, none in the start's
        return predict(dps[:1], [frame] * sectors.shape[1], sectors.T)[0][0], predict(dps[:1], [frame], start[None])[0][0, 0]

    for frame in frames:
        e_sectors, e_ground = check(frame, frame.arrays["sector_magmoms"].reshape(len(frame), -1))  # 1 column: 1-D
        assert np.all(e_sectors >= e_ground - 1e-6)  # model 0 drives: its ground state is below every sector's
    # the sectors are built around the frame's own moments, not a search's: a parallel start gets other sectors
    parallel = frames[0].copy()
    parallel.set_initial_magnetic_moments(np.where(parallel.symbols == "Ni", 3.0, 0.0))
    parallel.info["step"] = 99
    (states,) = sector_states(task, [parallel], 2, models=dps)
    check(parallel, states)
    assert not np.allclose(np.abs(states[parallel.symbols == "Ni"].sum(axis=0)), 6.0)


class NaNAfter:
    """A DeepPot whose eval returns NaN energies and forces after `calls` calls (not a DeepPot itself, so the MD
    step goes through its eval)."""

    def __init__(self, dp, calls: int):
        self._dp, self._left = dp, calls

    def __getattr__(self, name):
        return getattr(self._dp, name)

    def eval(self, *args, **kwargs):
        out = list(self._dp.eval(*args, **kwargs))
        self._left -= 1
        if self._left < 0:
            out[0], out[1] = np.full_like(out[0], np.nan), np.full_like(out[1], np.nan)
        return tuple(out)


def test_nan_from_the_model_is_written_and_counted_failed(tmp_path, model_paths, dps):
    from spingen.tasks.explore import run

    task = write_task(tmp_path / "task", model_paths, nsteps=20, trj_freq=2, spin_devi_freq=0)
    assert run(task, models=[NaNAfter(dps[0], 8), dps[1]]) == 0
    assert (task / "finished").is_file()
    rows = read_model_devi(task / "model_devi.out")
    assert np.all(np.isnan(rows[-1, 1:])) and rows[-1, 0] <= 20  # the driving model's NaN ends the MD
    finite = np.all(np.isfinite(rows[:, 1:]), axis=1)
    first_bad = int(np.argmin(finite))
    assert first_bad >= 1 and finite[:first_bad].all()  # frames before the blow-up are intact
    labels = classify(rows, 0.05, 0.3, 0.2, 0)
    assert all(label == "failed" for label in labels[first_bad:])  # a row with NaN anywhere is failed


# ---------------------------------------------------------------- selection
def test_selection_of_a_hand_made_model_devi(tmp_path):
    nan, inf = float("nan"), float("inf")
    table = [  # step, v(3), max_devi_f, min_f, avg_f, devi_e, spin_disagree, spin_devi_e
        (0, 0.1, 0.0, 0.1, 0.40, 0, 0, 0.01, 0.5, 0.1),  # skipped (step < 10), even though it would fail
        (10, 0.1, 0.0, 0.1, 0.01, 0, 0, 0.01, -1, -1),  # accurate
        (20, 0.1, 0.0, 0.1, 0.05, 0, 0, 0.01, -1, -1),  # candidate: f == lo
        (30, 0.1, 0.0, 0.1, 0.29, 0, 0, 0.01, 0.0, 0.0),  # candidate
        (40, 0.1, 0.0, 0.1, 0.30, 0, 0, 0.01, 0.0, 0.0),  # failed: f == hi
        (50, 0.1, 0.0, 0.1, 0.01, 0, 0, 0.01, 0.25, 0.01),  # candidate by spin disagreement only
        (60, 0.1, 0.0, 0.1, 0.01, 0, 0, 0.01, 0.2, 0.01),  # accurate: spin == trust is not above it
        (65, 0.1, 0.0, 0.1, 0.01, 0, 0, 0.01, 0.5, 0.001),  # accurate: members agree on the states' energies
        (70, nan, nan, nan, nan, nan, nan, nan, nan, nan),  # failed: NaN row
        (80, 0.1, 0.0, 0.1, 0.01, 0, 0, inf, -1, -1),  # failed: inf in devi_e
        (90, 0.1, 0.0, 0.1, 0.01, 0, 0, 0.01, nan, nan),  # failed: the spin search met NaN
    ]
    path = tmp_path / "model_devi.out"
    path.write_text("# " + " ".join(DEVI_COLUMNS) + "\n" + "".join(" ".join(str(v) for v in r) + "\n" for r in table))
    rows = read_model_devi(path)
    assert classify(rows, lo=0.05, hi=0.3, spin_trust=0.2, skip=10, spin_e_trust=0.002) == [
        None, "accurate", "candidate", "candidate", "failed", "candidate", "accurate", "accurate", "failed", "failed",
        "failed"]
    assert classify(rows, lo=0.05, hi=0.3, spin_trust=0.2, skip=10)[7] == "candidate"  # no energy level


def test_virial_trust_levels_follow_dpgen_rule():
    table = np.array([  # step, max/min/avg_devi_v, max/min/avg_devi_f, devi_e, spin_disagree, spin_devi_e
        (0, 0.10, 0, 0, 0.01, 0, 0, 0.01, -1, -1),  # candidate by virial only
        (1, 0.25, 0, 0, 0.01, 0, 0, 0.01, -1, -1),  # failed by virial
        (2, 0.25, 0, 0, 0.10, 0, 0, 0.01, -1, -1),  # candidate by force, although the virial is beyond hi
        (3, 0.10, 0, 0, 0.40, 0, 0, 0.01, -1, -1),  # candidate by virial, although the force is beyond hi
        (4, 0.01, 0, 0, 0.40, 0, 0, 0.01, 0.9, 0.05),  # failed: spin disagreement does not rescue a failed force
        (5, 0.01, 0, 0, 0.01, 0, 0, 0.01, -1, -1),  # accurate
    ])
    assert classify(table, 0.05, 0.3, 0.2, 0, v_lo=0.05, v_hi=0.2) == [
        "candidate", "failed", "candidate", "candidate", "failed", "accurate"]
    assert classify(table, 0.05, 0.3, 0.2, 0) == [  # no virial levels: forces (and spins) alone
        "accurate", "accurate", "candidate", "failed", "failed", "accurate"]


def test_sampling_is_seeded_and_both_caps_hold():
    candidates = {0: [f"a{i}" for i in range(30)], 1: [f"b{i}" for i in range(5)], 2: ["c0"]}
    first = sample_candidates(candidates, task_max=10, task_max_total=None, task_min=1, seed=42)
    assert first == sample_candidates(candidates, task_max=10, task_max_total=None, task_min=1, seed=42)
    assert first != sample_candidates(candidates, task_max=10, task_max_total=None, task_min=1, seed=43)
    assert [len(first[s]) for s in (0, 1, 2)] == [10, 5, 1]
    assert set(first[0]) <= set(candidates[0]) and len(set(first[0])) == 10
    capped = sample_candidates(candidates, task_max=10, task_max_total=8, task_min=1, seed=42)
    assert sum(len(v) for v in capped.values()) == 8
    assert [len(capped[s]) for s in (0, 1, 2)] == [4, 3, 1]  # taken in turn from each system
    assert all(capped[s] == first[s][: len(capped[s])] for s in capped)
    assert sample_candidates(candidates, task_max=10, task_max_total=None, task_min=2, seed=42)[2] == []


def test_spin_only_candidates_get_their_reserved_share_of_the_picks():
    """ceil(share x task_max) picks go first to the spin-only candidates (as many as there are), the rest are drawn
    from all; share 0, or no spin-only candidate, is the uniform pick, draw for draw."""
    candidates = {0: [f"f{i}" for i in range(40)] + ["s0", "s1", "s2"], 1: [f"g{i}" for i in range(6)] + ["t0"]}
    flags = {system: [c[0] in "st" for c in items] for system, items in candidates.items()}
    uniform = sample_candidates(candidates, task_max=4, task_max_total=None, task_min=1, seed=7)
    assert sample_candidates(candidates, 4, None, 1, 7, flags, 0.0) == uniform
    assert sample_candidates(candidates, 4, None, 1, 7, {0: [False] * 43, 1: [False] * 7}, 0.5) == uniform
    for seed in range(20):
        half = sample_candidates(candidates, 4, None, 1, seed, flags, 0.5)
        assert [sum(c[0] in "st" for c in half[s]) >= n for s, n in ((0, 2), (1, 1))] == [True, True]
        assert all(len(half[s]) == len(set(half[s])) == 4 for s in (0, 1))
        one = sample_candidates(candidates, 1, None, 1, seed, flags, 0.5)
        assert one[0][0].startswith("s") and one[1] == ["t0"]
        every = sample_candidates(candidates, 5, None, 1, seed, flags, 1.0)
        assert {"s0", "s1", "s2"} <= set(every[0]) and "t0" in every[1]
    assert sum(sample_candidates(candidates, 1, None, 1, seed)[0][0].startswith("s") for seed in range(20)) < 10
    many = {0: [f"f{i}" for i in range(30)] + [f"s{i}" for i in range(10)]}
    order = [many[0][i] for i in np.random.default_rng([0, 0]).permutation(40)]
    spins = [c for c in order if c[0] == "s"]
    picks = sample_candidates(many, 25, None, 1, 0, {0: [c[0] == "s" for c in many[0]]}, 0.28)[0]
    assert set(spins[:7]) <= set(picks) and sorted(picks) == sorted(spins[:7] + [c for c in order if c not in
                                                                                 spins[:7]][:18])  # 7, not ceil(7.000001)
    for k in range(1, 26):  # spread: a capped prefix keeps its share
        assert sum(c[0] == "s" for c in picks[:k]) >= min(7, math.ceil(round(0.28 * k, 9)))
    capped = sample_candidates(candidates, 4, 4, 1, 3, flags, 0.5)  # two systems, two picks each under the cap
    assert [sum(c[0] in "st" for c in capped[s]) for s in (0, 1)] == [1, 1]


def test_post_counts_and_labels_the_spin_only_candidates(tmp_path):
    """post on finished tasks: the spin-only rows (spin disagreement, forces below lo) are counted, the reserved
    pick goes to one of them, and selection.json and the candidates file say so."""
    import ase.io

    from spingen.loop import StageContext
    from spingen.schema import load_machine, load_param
    from spingen.stages.explore import ExploreStage

    param_path, machine_path = write_inputs(tmp_path, make_param(tmp_path, fp_task_max=2))
    stage_dir = tmp_path / "iter.000000" / "01.model_devi"
    rows = [[step, 0, 0, 0, 0.1, 0, 0, 0.01, -1, -1] for step in range(6)]  # force candidates
    rows += [[step, 0, 0, 0, 0.01, 0, 0, 0.01, 0.5, 0.01] for step in (6, 7)]  # spin-only candidates
    rows += [[8, 0, 0, 0, 0.01, 0, 0, 0.01, 0.0, 0.0], [9, 0, 0, 0, 0.9, 0, 0, 0.01, -1, -1]]  # accurate, failed
    for k, task_rows in enumerate((rows[:5], rows[5:])):
        task = stage_dir / f"task.000.{k:06d}"
        task.mkdir(parents=True)
        np.savetxt(task / "model_devi.out", task_rows, header=" ".join(DEVI_COLUMNS))
        frames = []
        for row in task_rows:
            atoms = cell16(int(row[0]))
            atoms.info["step"] = int(row[0])
            frames.append(atoms)
        ase.io.write(task / "traj.extxyz", frames, format="extxyz")
        (task / "finished").touch()
    for share, spin_picked in ((0.5, 1), (1.0, 2)):
        param = make_param(tmp_path, fp_task_max=2, fp_spin_only_share=share)
        param_path.write_text(json.dumps(param))
        ExploreStage(load_param(param_path), load_machine(machine_path).model_devi).post(StageContext(tmp_path, 0))
        counts = json.loads((stage_dir / "selection.json").read_text())["systems"]["000"]
        assert (counts["candidate"], counts["spin_only"], counts["accurate"], counts["failed"]) == (8, 2, 1, 1)
        assert (counts["selected"], counts["spin_only_selected"]) == (2, spin_picked)
        picked = ase.io.read(stage_dir / "candidates.000.extxyz", index=":")
        assert sum(frame.info["spin_disagree"] > 0 for frame in picked) == spin_picked


# ---------------------------------------------------------------- the stage through dpdispatcher
DRIVER = """
import logging, sys
from pathlib import Path
from spingen.loop import StageContext, setup_logging
from spingen.schema import load_machine, load_param
from spingen.stages.explore import ExploreStage
root = Path(sys.argv[1])
setup_logging(root)
stage = ExploreStage(load_param(root / "param.json"), load_machine(root / "machine.json").model_devi)
getattr(stage, sys.argv[2])(StageContext(root, 0))
"""


def write_counting_spingen(path: Path, log: Path) -> Path:
    path.write_text(f"#!/bin/sh\necho \"$(pwd)\" >> {log}\nexec {BIN / 'spingen'} \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_stage_runs_through_dpdispatcher_and_resumes_after_a_kill(tmp_path, model_paths):
    import ase.io

    calls = tmp_path / "calls.txt"
    param = make_param(tmp_path, model_devi_f_trust_lo=0.0, fp_task_max=3)
    param["model_devi_jobs"] = [{"sys_idx": [0], "temps": [300, 900], "nsteps": 4, "trj_freq": 2,
                                 "spin_devi_freq": 2}]
    param["model_devi_spin_search"] = {"population": 8}
    write_inputs(tmp_path, param, make_machine(str(write_counting_spingen(tmp_path / "spingen", calls))))
    train = tmp_path / "iter.000000" / "00.train"
    train.mkdir(parents=True)
    for k, model in enumerate(model_paths):
        (train / f"graph.{k:03d}.pth").symlink_to(model)
    stage_dir = tmp_path / "iter.000000" / "01.model_devi"
    stage_dir.mkdir()
    driver = [sys.executable, "-c", DRIVER, str(tmp_path)]
    subprocess.run(driver + ["make"], cwd=tmp_path, check=True, capture_output=True)
    tasks = sorted(p.name for p in stage_dir.glob("task.*"))
    assert tasks == ["task.000.000000", "task.000.000001"]
    assert json.loads((stage_dir / "task.000.000001" / "task.json").read_text())["temperature"] == 900.0

    proc = subprocess.Popen(driver + ["run"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "remote").rglob("finished")):
        time.sleep(0.2)
    finished_before = {p.parent.name for p in (tmp_path / "remote").rglob("finished")}
    assert finished_before, "no task finished in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    result = subprocess.run(driver + ["run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [Path(line).name for line in calls.read_text().splitlines()]
    for task in finished_before:
        assert runs.count(task) == 1, f"finished task {task} ran again: {runs}"
    assert all((stage_dir / t / "finished").is_file() for t in tasks)

    result = subprocess.run(driver + ["run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "2 already finished" in (tmp_path / "spingen.log").read_text()
    assert len(calls.read_text().splitlines()) == len(runs), "a finished stage submits nothing"

    subprocess.run(driver + ["post"], cwd=tmp_path, check=True, capture_output=True)
    selection = json.loads((stage_dir / "selection.json").read_text())
    counts = selection["systems"]["000"]
    assert counts["total"] == 6 and counts["accurate"] + counts["candidate"] + counts["failed"] == 6
    candidates = ase.io.read(stage_dir / "candidates.000.extxyz", index=":")
    assert len(candidates) == counts["selected"] == min(3, counts["candidate"])
    assert min(2, counts["spin_only"]) <= counts["spin_only_selected"] <= min(3, counts["spin_only"])  # share 0.5
    for frame in candidates:
        traj = {f.info["step"]: f for f in ase.io.read(stage_dir / frame.info["task"] / "traj.extxyz", index=":")}
        source = traj[frame.info["step"]]
        np.testing.assert_allclose(frame.positions, source.positions)
        np.testing.assert_allclose(frame.get_initial_magnetic_moments(), source.get_initial_magnetic_moments())
        assert frame.arrays["excited_magmoms"].shape == (len(frame), 4)
        assert isinstance(frame.info["max_devi_f"], float) and isinstance(frame.info["task"], str)
    assert "system 000 candidate :" in (tmp_path / "spingen.log").read_text()
    # post again (as after a crash in post): the recorded seed picks the same frames
    before = (stage_dir / "candidates.000.extxyz").read_text()
    subprocess.run(driver + ["post"], cwd=tmp_path, check=True, capture_output=True)
    assert (stage_dir / "candidates.000.extxyz").read_text() == before


@pytest.mark.parametrize("change, key", [
    ({"model_devi_driver": "median"}, "model_devi_driver"),
    ({"model_devi_v_trust_lo": 0.3, "model_devi_v_trust_hi": 0.1}, "model_devi_v_trust_lo"),
    ({"model_devi_spin_trust": 1.5}, "model_devi_spin_trust"),
    ({"model_devi_spin_e_trust": -0.01}, "model_devi_spin_e_trust"),
    ({"fp_task_max_total": 0}, "fp_task_max_total"),
    ({"fp_spin_only_share": 1.5}, "fp_spin_only_share"),
    ({"model_devi_spin_search": {"cold_runs": 0}}, "model_devi_spin_search/cold_runs"),
    ({"model_devi_spin_search": {"max_cold_runs": 0}}, "model_devi_spin_search/max_cold_runs"),
    ({"model_devi_spin_search": {"population": 1}}, "model_devi_spin_search/population"),
    ({"model_devi_spin_certify": {"margin": -0.1}}, "model_devi_spin_certify"),
    ({"model_devi_spin_certify": {"max_age": 0}}, "model_devi_spin_certify"),
    ({"model_devi_spin_certify": {"max_age": 30, "backstop_age": 25}}, "model_devi_spin_certify"),
    ({"model_devi_spin_certify": {"probes": -1}}, "model_devi_spin_certify"),
    ({"model_devi_jobs": [{"sys_idx": [0], "temps": [300], "nsteps": 10, "ensemble": "npt"}]}, "press"),
    ({"model_devi_jobs": [{"sys_idx": [0], "temps": [300], "nsteps": 10, "trj_freq": 0}]}, "trj_freq"),
    ({"fp_spin_init": "sectors", "fp_spin_sectors": 0}, "fp_spin_sectors"),
])
def test_explore_settings_name_the_bad_key(tmp_path, change, key):
    from spingen.schema import InputError, explore_settings, load_param

    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, **change))
    with pytest.raises(InputError, match=key):
        explore_settings(load_param(param_path))


def test_explore_settings_defaults(tmp_path):
    from spingen.schema import explore_settings, load_param

    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, model_devi_spin_search={"max_evaluations": 8}))
    settings = explore_settings(load_param(param_path))
    assert settings.driver == "first" and settings.task_max_total is None and settings.skip == 0
    assert settings.spin_only_share == 0.5
    assert settings.spin_search == {"max_evaluations": 8}  # unset keys: the search's own defaults
    assert settings.certify == {"margin": 0.002, "max_age": 20, "backstop_age": None, "probes": 4, "search_every": 500,
                                "pair_limit": 300, "exchange_limit": 500, "remembered_states": 8}
    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, model_devi_spin_certify={"enable": False}))
    assert explore_settings(load_param(param_path)).certify is None
    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, model_devi_spin_search={"domain_reversals": False,
                                                                                       "cold_runs": 1}))
    assert explore_settings(load_param(param_path)).spin_search == {"domain_reversals": False, "cold_runs": 1}


def test_magnitudes_inferred_from_training_data(tmp_path):
    from spingen.data.levels import magnitudes_from_data

    systems = [write_spin_system(tmp_path / "a", n_frames=4, seed=1),
               write_spin_system(tmp_path / "b", n_frames=4, seed=2, levels=(0.0, 2.0, -2.0))]
    assert magnitudes_from_data(systems, ["Ni"]) == {"Ni": [0.0, 1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="no moments of \\['Co'\\]"):
        magnitudes_from_data(systems, ["Ni", "Co"])


def test_a_level_seen_in_one_frame_is_refused_on_real_licoo2_data(tmp_path):
    """Real GPAW LiCoO2 data (Co 0 and ~3.1 uB, 55 frames) plus ONE frame whose first Co holds 1.46 uB,
    as a stray SCF leaves behind: auto levels show each level's support and refuse the rare one."""
    import shutil

    from spingen.data.levels import magnitudes_from_data, supported_magnitudes

    data = tmp_path / "licoo2"
    shutil.copytree(Path(__file__).resolve().parent.parent / "benchmarks/paper/data/licoo2", data)
    sets = data / "set.000"
    arrays = {f.stem: np.load(f) for f in sets.glob("*.npy")}
    spin = arrays["spin"].reshape(len(arrays["energy"]), -1, 3)
    types = np.loadtxt(data / "type.raw", dtype=int)
    co = int(np.flatnonzero(types == (data / "type_map.raw").read_text().split().index("Co"))[0])
    stray = spin[:1].copy()
    stray[0, co, 2] = 1.46
    for name, values in arrays.items():
        added = stray.reshape(1, -1) if name == "spin" else values[:1]
        np.save(sets / f"{name}.npy", np.concatenate([values, added]))

    assert 1.46 in magnitudes_from_data([data], ["Co"])["Co"]  # plain clustering keeps it
    levels = supported_magnitudes([data], ["Co"], min_support=3)
    assert levels.kept == {"Co": [0.0, 3.132]} and levels.refused == {"Co": [1.46]}
    assert levels.support["Co"][1.46] == 1 and levels.support["Co"][0.0] >= 20
    assert "1.46 (1 frame, refused)" in levels.describe()
    assert supported_magnitudes([data], ["Co"], min_support=1).refused == {}


def test_pristine_param_is_refused_before_anything_runs(tmp_path, capsys):
    from spingen.cli import main

    param = make_param(tmp_path)
    param["spin"]["enabled"] = False
    param_path, machine_path = write_inputs(tmp_path, param)
    assert main(["check", str(param_path), str(machine_path)]) == 2
    assert "'spin/enabled' is false: spingen explores with spin models only" in capsys.readouterr().err
    assert main(["run", str(param_path), str(machine_path), "-w", str(tmp_path / "work")]) == 2
    assert not list((tmp_path / "work").glob("iter.*")), "nothing was made"
