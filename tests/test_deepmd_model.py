"""DeepmdSpinModel and `spingen spin-search` against a real tiny deepmd-kit spin model."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from ase.neighborlist import neighbor_list
from conftest import BIN, lini_frames, tiny_training_param, write_poscar, write_spin_system

from spingen.cli import main
from spingen.schema import SpinSettings
from spingen.spin import MomentLevels, SpinEncoding, search_ground_state
from spingen.stages.train import training_input, write_training_data

SPIN = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")
ENCODING = SPIN.encoding
TYPE_MAP = ["Li", "Ni", "O"]
NI = [4, 6]  # the Ni atoms of conftest's Li2Ni2O4 cell

pytestmark = pytest.mark.slow  # trains a real deepmd-kit model (module fixture, ~20-30 s)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two frozen spin models of one tiny training run (checkpoints at steps 10 and 20)."""
    from deepmd.pt.entrypoints.main import freeze

    root = tmp_path_factory.mktemp("deepmd_spin")
    raw = write_spin_system(root / "raw", n_frames=12)
    write_training_data([raw], root / "data", TYPE_MAP, SPIN)
    inp = training_input(tiny_training_param(20), TYPE_MAP, SPIN, ["data/sys.000"], seed=3)
    (root / "input.json").write_text(json.dumps(inp))
    done = subprocess.run([str(BIN / "dp"), "--pt", "train", "input.json"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = []
    for step in (20, 10):
        freeze(model=str(root / f"model.ckpt-{step}.pt"), output=str(root / f"frozen_{step}.pth"))
        paths.append(root / f"frozen_{step}.pth")
    return paths


@pytest.fixture(scope="module")
def deeppots(models):
    from deepmd.infer import DeepPot

    return [DeepPot(str(p)) for p in models]


@pytest.fixture(scope="module")
def atoms():
    return lini_frames(1, 5)[0][0]


def bind(dp, atoms, **kwargs):
    from spingen.deepmd_model import DeepmdSpinModel

    return DeepmdSpinModel.from_atoms(atoms, dp, ENCODING, **kwargs)


def reference(dp, model, atoms, moments):
    """Frame-by-frame DeepPot.eval: energies and force_mag_z of the magnetic ions."""
    energies, grads = [], []
    for row in moments:
        spin = model.spin_vectors(row[None])
        e, _, _, fm, _ = dp.eval(atoms.positions.reshape(1, -1), atoms.cell.array.reshape(1, 9), model.atom_types,
                                 spin=spin)
        energies.append(e.item())
        grads.append(fm[0, model.magnetic_indices, 2])
    return np.array(energies), np.array(grads)


def random_moments(n, seed=0):
    return np.random.default_rng(seed).choice([-3.0, -1.0, 1.0, 3.0], size=(n, 2))


def test_batched_and_chunked_match_deeppot_frame_by_frame(deeppots, atoms):
    dp = deeppots[0]
    moments = random_moments(7)
    model = bind(dp, atoms)
    assert list(model.magnetic_indices) == NI and model.magnetic_symbols == ("Ni", "Ni")
    assert model.batch_size == 1024 // (2 * len(atoms))  # about 1024 atoms (real and virtual) per call
    e_ref, g_ref = reference(dp, model, atoms, moments)
    assert np.ptp(e_ref) > 1e-4, "the moments must change the energy for this test to mean anything"
    e, g = model.evaluate(moments, gradient=True)
    np.testing.assert_allclose(e, e_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-10)
    assert model.n_calls == 1 and model.n_evaluations == 7

    energy_only, none = model.evaluate(moments)
    assert none is None and model.path == "fixed-geometry"
    np.testing.assert_allclose(energy_only, e_ref, rtol=0, atol=1e-10)
    # the virtual atoms' own energies are excluded by the spin model: only the real atoms are centres
    assert model._fixed[0].nlist.shape[1] == len(atoms)

    chunked = bind(dp, atoms, batch_size=3)
    e3, g3 = chunked.evaluate(moments, gradient=True)
    np.testing.assert_allclose(e3, e_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g3, g_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(chunked.evaluate(moments)[0], e_ref, rtol=0, atol=1e-10)
    one_by_one = np.array([chunked.evaluate(row)[0][0] for row in moments])
    np.testing.assert_allclose(one_by_one, e_ref, rtol=0, atol=1e-10)

    plain = bind(dp, atoms, fast=False)
    e_plain, g_plain = plain.evaluate(moments, gradient=True)
    np.testing.assert_allclose(e_plain, e_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g_plain, g_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(plain.evaluate(moments)[0], e_ref, rtol=0, atol=1e-10)
    assert plain.path == "DeepPot.eval"


def test_fixed_geometry_path_rebuilds_for_larger_moments_and_works_without_pbc(deeppots, atoms):
    dp = deeppots[0]
    model = bind(dp, atoms)
    small = np.array([[0.5, -0.5]])
    large = np.array([[5.0, -4.0], [-6.0, 2.0]])
    for moments in (small, large):  # the second batch reaches beyond the cached neighbour candidates
        e_ref, g_ref = reference(dp, model, atoms, moments)
        e, g = model.evaluate(moments, gradient=True)
        np.testing.assert_allclose(e, e_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-10)
    assert model.path == "fixed-geometry"

    cluster = atoms.copy()
    cluster.pbc = False
    free = bind(dp, cluster)
    assert free.cell is None
    moments = random_moments(4, seed=2)
    e_ref = []
    for row in moments:
        out = dp.eval(cluster.positions.reshape(1, -1), None, free.atom_types, spin=free.spin_vectors(row[None]))
        e_ref.append(out[0].item())
    np.testing.assert_allclose(free.evaluate(moments)[0], e_ref, rtol=0, atol=1e-10)
    assert free.path == "fixed-geometry"


@pytest.mark.parametrize("periodic", [True, False])
def test_candidate_neighbours_serve_later_geometries_until_an_atom_moves_half_the_skin(deeppots, atoms, periodic):
    """The models of later geometries of one trajectory share their candidate neighbours (candidate_neighbours):
    built NEIGHBOUR_SKIN wider, kept while no atom has moved half of it from where they were built, rebuilt past
    that or for a moment reaching further; the energies and -dE/dS are DeepPot.eval's at every geometry."""
    from spingen.deepmd_model import NEIGHBOUR_SKIN

    dp = deeppots[0]
    shared = {}
    start = atoms.copy()
    start.pbc = periodic
    direction = np.random.default_rng(4).normal(size=(len(start), 3))
    direction /= np.linalg.norm(direction, axis=1).max()  # the largest displacement is the step's length
    moments = random_moments(3, seed=5)
    kept = []
    for length, scale in ((0.0, 1.0), (0.2, 1.0), (0.45, 1.0), (0.55, 1.0), (0.55, 1.6)):  # x NEIGHBOUR_SKIN
        geometry = start.copy()
        geometry.positions += length * NEIGHBOUR_SKIN * direction
        model = bind(dp, geometry, candidate_neighbours=shared)
        e, g = model.evaluate(scale * moments, gradient=True)
        cell = geometry.cell.array.reshape(1, 9) if periodic else None
        for row, energy, minus_grad in zip(scale * moments, e, g):
            out = dp.eval(geometry.positions.reshape(1, -1), cell, model.atom_types, spin=model.spin_vectors(row[None]))
            np.testing.assert_allclose(energy, out[0].item(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(minus_grad, out[3][0, model.magnetic_indices, 2], rtol=0, atol=1e-10)
        assert model.path == "fixed-geometry" and len(shared) == 1
        kept.append(next(iter(shared.values())))
    # kept at 0.2 and 0.45 of the skin; rebuilt past half the skin, and for moments reaching further
    assert kept[1] is kept[0] and kept[2] is kept[0] and kept[3] is not kept[2] and kept[4] is not kept[3]


@pytest.mark.parametrize("frames_per_call", [None, 1])
def test_frames_through_the_models_own_forward_match_deeppot_eval(deeppots, atoms, monkeypatch, frames_per_call):
    """evaluate_frames (every MD step and ensemble prediction) calls the spin model's forward itself: the same
    energies, forces, virials and -dE/dS as DeepPot.eval, periodic and not, several frames in one call or (a batch
    of BATCH_ATOMS atoms holding one frame) one call per frame."""
    from spingen import deepmd_model
    from spingen.deepmd_model import _pt_model, evaluate_frames

    dp = deeppots[0]
    assert _pt_model(dp) is not None  # the direct forward is the path taken for these models
    assert _pt_model(type("Wrapper", (), {"deep_eval": dp.deep_eval})()) is None  # not a DeepPot: its own eval
    if frames_per_call:
        monkeypatch.setattr(deepmd_model, "BATCH_ATOMS", 2 * len(atoms) * frames_per_call)
    rng = np.random.default_rng(4)
    symbols = atoms.get_chemical_symbols()
    types = bind(dp, atoms).atom_types
    coords = np.stack([atoms.positions + rng.normal(0.0, 0.05, atoms.positions.shape) for _ in range(3)])
    moments = np.zeros((3, len(atoms)))
    moments[:, NI] = [[1.2, -0.8], [-1.1, -1.3], [0.4, 1.5]]
    for cells in (np.tile(atoms.cell.array, (3, 1, 1)), None):
        e, f, v, minus_grad = evaluate_frames(dp, coords, cells, types, moments, ENCODING, symbols)
        spin = ENCODING.to_deepmd(moments, symbols).reshape(3, -1)
        e_ref, f_ref, v_ref, fm_ref = dp.eval(coords.reshape(3, -1), None if cells is None else cells.reshape(3, 9),
                                              types, spin=spin)[:4]
        assert np.ptp(e_ref) > 1e-6 and np.abs(v_ref).max() > 1e-6  # the frames differ; the virial is not zero
        np.testing.assert_allclose(e, e_ref.reshape(3), rtol=0, atol=1e-10)
        np.testing.assert_allclose(f, f_ref.reshape(f.shape), rtol=0, atol=1e-10)
        np.testing.assert_allclose(v, v_ref.reshape(3, 9), rtol=0, atol=1e-10)
        gauge = ENCODING.gauge_signs(moments, symbols)[:, None]
        np.testing.assert_allclose(minus_grad, gauge * fm_ref.reshape(3, len(atoms), 3)[..., 2], rtol=0, atol=1e-10)


def test_one_typed_neighbour_list_serves_every_configuration_of_the_displacements_seen(deeppots, atoms):
    """The neighbour list is split by type once per range of virtual displacements, not sorted per batch:
    reversing a moment (same reach, displacement on the other side) widens the range and the list
    follows; every energy and -dE/dS stays DeepPot.eval's (with the list, only the neighbour section of the
    moving virtual atoms is embedded per batch). Where more neighbours of a type could come within
    rcut than the model's sel (the tiny model's sel on the dense cell), format_nlist sorts per batch."""
    dp = deeppots[0]
    wide = atoms.copy()
    wide.set_cell(atoms.cell * 1.4, scale_atoms=True)  # few enough neighbours for the tiny model's sel
    for structure, typed in ((atoms, False), (wide, True)):
        model = bind(dp, structure)
        for moments in (np.array([[1.5, 1.5]]), np.array([[-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]])):
            e_ref, g_ref = reference(dp, model, structure, moments)
            e, g = model.evaluate(moments, gradient=True)
            np.testing.assert_allclose(e, e_ref, rtol=0, atol=1e-10)
            np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-10)
            fixed = model._fixed[0]
            assert (fixed.typed_nlist is not None) == typed
            # with the typed list, se_e2_a embeds only the Ni_spin section per batch: the others were summed once
            assert (fixed.split.sums is not None) == typed and [kind for _, _, kind in fixed.split.moving] == [4]
        assert fixed.moves[0].min() < 0 < fixed.moves[1].max()  # both sides of the ions seen
    assert model.path == "fixed-geometry"
    fixed.sorted_nlist = True  # the wide cell, as if its descriptor needed the distance order: formatted per batch
    fixed._fix_nlist()
    assert fixed.typed_nlist is None


def test_a_batch_near_the_held_moments_re_evaluates_only_the_centres_it_changes(deeppots, atoms):
    """After the held moments' evaluation with their gradient, a batch of their one- and two-ion changes
    re-evaluates only the atoms whose neighbours hold a moved virtual atom (the neighbour list sorted per
    batch on the dense cell, split by type once on the wide one); every energy stays DeepPot.eval's. A frame
    that changes most atoms takes the whole cell and, with others far from the held moments in the same
    batch, becomes a second base that those near it follow. On the wide cell (split se_e2_a) a frame embeds only
    the neighbour slots that hold a virtual atom it moved, added to the base's neighbour sums."""
    import torch

    dp = deeppots[0]
    dense = atoms.repeat((3, 1, 1))
    wide = dense.copy()
    wide.set_cell(dense.cell * 1.4, scale_atoms=True)
    rng = np.random.default_rng(4)
    for structure, typed in ((dense, False), (wide, True)):
        model = bind(dp, structure)
        n = model.n_magnetic
        held = rng.choice([-3.0, -1.0, 1.0, 3.0], size=n)
        changes = np.repeat(held[None], 2 * n + 1, axis=0)
        changes[np.arange(n), np.arange(n)] *= -1  # each ion reversed
        changes[n + np.arange(n), np.arange(n)] = np.where(np.abs(held) > 2, 1.0, 3.0) * np.sign(held)  # magnitudes
        changes[-1, :2] *= -1  # a pair
        model.evaluate(held[None], gradient=True)
        e = model.evaluate(changes)[0]
        np.testing.assert_allclose(e, reference(dp, model, structure, changes)[0], rtol=0, atol=1e-10)
        fixed = model._fixed[0]
        assert fixed.local and (fixed.typed_nlist is not None) == typed
        spin = model.spin_vectors(changes).reshape(len(changes), -1, 3)
        assert len(fixed.bases) == 1 and fixed._nearest(spin[:n])[1].all()  # the single-ion changes: local path
        np.testing.assert_allclose(fixed._changed_centres(spin[:n], fixed.bases[0]), e[:n], rtol=0, atol=1e-10)
        if typed:  # split se_e2_a: only the slots of moved virtual atoms embedded, added to the base's neighbour sums
            assert fixed.bases[0].sums is not None and fixed.split.uniform and fixed.split.typed_fitting
            changed = fixed._changed(spin, fixed.bases[0].spin)
            order = np.argsort(~changed, axis=1, kind="stable")[:, :int(changed.sum(axis=1).max())]
            valid = np.take_along_axis(changed, order, axis=1)
            with torch.no_grad():
                moved = fixed._moved_neighbour_energies(spin, fixed.bases[0], order, valid).numpy()
                every_slot = fixed._atomic_energies(torch.tensor(spin), order, valid)[0].numpy()
            assert np.abs(np.where(valid, moved - fixed.bases[0].atomic[order], 0)).max() > 1e-3  # they do change
            np.testing.assert_allclose(np.where(valid, moved, 0), np.where(valid, every_slot, 0), rtol=0, atol=1e-12)
        flipped = -changes[: n + 1]  # the held moments and their single-ion changes, every ion reversed
        assert not fixed._nearest(model.spin_vectors(flipped).reshape(n + 1, -1, 3))[1].any()
        mixed = np.concatenate([flipped[:1], changes[:2], flipped[1:]])  # one call: each frame its own way
        np.testing.assert_allclose(model.evaluate(mixed)[0], reference(dp, model, structure, mixed)[0],
                                   rtol=0, atol=1e-10)
        # the first far frame (every ion reversed) became another base; on the wide cell its single-ion changes
        # follow it (on the dense one the reversed moments' reach took most centres: two more bases)
        assert len(fixed.bases) == 2 if typed else len(fixed.bases) > 2
        assert fixed._nearest(model.spin_vectors(flipped[1:]).reshape(n, -1, 3))[1].all()



def test_moved_slots_follow_deeppot_across_rcut_and_repeated_images(deeppots):
    """A cell shorter than rcut along the chain (each centre sees the same virtual atom through several images)
    and moments whose changes carry virtual atoms across rcut: the near-base batch that embeds only the moved
    slots gives DeepPot.eval's energies."""
    from ase import Atoms

    dp = deeppots[0]
    chain = Atoms("NiOLiNiO", positions=[(0, 0, 0), (1.6, 0.4, 0.3), (0.3, 4.5, 4.5), (1.5, 4.6, 2.2), (0.1, 7.0, 1.0)],
                  cell=np.diag([3.2, 9.0, 9.0]), pbc=True)
    chain.rattle(0.05, seed=0)
    model = bind(dp, chain)
    held = np.array([3.0, -1.0])
    changes = np.array([[-3.0, -1.0], [1.0, -1.0], [3.0, 3.0], [3.0, 1.0], [-1.0, 1.0], [-3.0, 3.0]])
    model.evaluate(held[None], gradient=True)
    fixed = model._fixed[0]
    spin = model.spin_vectors(changes).reshape(len(changes), -1, 3)
    base = fixed.bases[0]
    assert base.sums is not None and fixed._split_path() and fixed.split.uniform and fixed._nearest(spin[:4])[1].all()
    natoms = len(chain)
    rows = fixed.typed_nlist[0].numpy()
    owners = fixed.mapping[0].numpy()[np.where(rows >= 0, rows, 0)] - natoms
    virtual = (rows >= 0) & (owners >= 0)
    assert any(len(set(row[keep])) < keep.sum() for row, keep in zip(owners, virtual))  # one atom, several images
    centres = fixed.ext_ref[0].numpy()[:natoms]
    place = fixed.ext_ref[0].numpy()[np.where(rows >= 0, rows, 0)]
    scale = fixed.signed_scale[np.where(virtual, owners, 0)][..., None]
    within = [np.linalg.norm(place + s[np.where(virtual, owners, 0)] * scale - centres[:, None], axis=-1) <= fixed.rcut
              for s in np.concatenate([base.spin[None], spin])]
    assert any(np.any(virtual & (now != within[0])) for now in within[1:])  # a moved virtual atom crosses rcut
    np.testing.assert_allclose(fixed._changed_centres(spin, base), reference(dp, model, chain, changes)[0],
                               rtol=0, atol=1e-10)

def test_sector_energies_see_the_moments_with_the_sign_asked_for(deeppots, atoms):
    """A canonical-sign model's energies in a gauge sector: sign x moments as the plain encoding sees them,
    the same as ``evaluate`` for the configurations of that sector; the plain model has one sector."""
    from dataclasses import replace

    from spingen.deepmd_model import DeepmdSpinModel

    plain = bind(deeppots[0], atoms)
    canonical = DeepmdSpinModel.from_atoms(atoms, deeppots[0], replace(ENCODING, canonical=True))
    moments = random_moments(6, seed=4)
    own = canonical.encoding.gauge_signs(canonical.full_moments(moments), canonical.symbols)
    assert set(own) == {-1.0, 1.0}
    for sign in (1.0, -1.0):
        np.testing.assert_allclose(canonical.sector_energies(moments, sign), plain.evaluate(sign * moments)[0],
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(plain.sector_energies(moments, sign), plain.evaluate(moments)[0], rtol=0, atol=1e-10)
        here = own == sign
        np.testing.assert_allclose(canonical.sector_energies(moments[here], sign),
                                   canonical.evaluate(moments[here])[0], rtol=0, atol=1e-10)


def test_minus_dE_dS_is_a_finite_difference_of_the_energy(deeppots, atoms):
    model = bind(deeppots[0], atoms)
    moments = np.array([[3.0, -1.0], [1.0, 1.0]])
    _, minus_grad = model.evaluate(moments, gradient=True)
    h = 1e-4
    for i in range(2):
        step = np.zeros(2)
        step[i] = h
        e_plus, _ = model.evaluate(moments + step)
        e_minus, _ = model.evaluate(moments - step)
        np.testing.assert_allclose(-(e_plus - e_minus) / (2 * h), minus_grad[:, i], rtol=1e-4, atol=1e-7)


def test_ensemble_is_the_mean_of_its_members(models, deeppots, atoms):
    moments = random_moments(5, seed=1)
    ensemble = bind(list(models), atoms)  # paths are loaded
    assert ensemble.n_models == 2
    singles = [bind(dp, atoms).evaluate(moments, gradient=True) for dp in deeppots]
    e, g = ensemble.evaluate(moments, gradient=True)
    assert not np.allclose(singles[0][0], singles[1][0]), "two checkpoints must be two different models"
    np.testing.assert_allclose(e, (singles[0][0] + singles[1][0]) / 2, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g, (singles[0][1] + singles[1][1]) / 2, rtol=0, atol=1e-10)
    members, member_grads = ensemble.evaluate_members(moments, gradient=True)
    assert members.shape == (2, 5) and member_grads.shape == (2, 5, 2)
    np.testing.assert_allclose(members[1], singles[1][0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ensemble.evaluate(moments)[0], e, rtol=0, atol=1e-10)


def test_search_matches_brute_force(deeppots, atoms):
    model = bind(deeppots, atoms)
    levels = MomentLevels({"Ni": [1, 3]}, atoms.get_chemical_symbols())
    assert np.array_equal(levels.magnetic_indices, model.magnetic_indices) and levels.n_configurations == 8
    larger = atoms.repeat((2, 2, 1))  # the nearest-neighbour graph, against ase's neighbour list
    ni = larger[[s == "Ni" for s in larger.get_chemical_symbols()]]
    first, second, distance = neighbor_list("ijd", ni, 6.0)
    expected = np.zeros((len(ni), len(ni)), dtype=bool)
    nearest = [distance[first == i].min() for i in range(len(ni))]  # each Ni's shortest Ni-Ni distance
    close = distance < 1.2 * np.median(nearest)
    expected[first[close], second[close]] = True
    assert np.array_equal(bind(deeppots, larger).neighbours, expected) and expected.any() and not expected.all()
    every = np.concatenate(list(levels.iter_moments()))
    energies, _ = model.evaluate(every)
    best = every[np.argmin(energies)]
    for kwargs in ({}, {"enumerate_limit": 1, "seed": 4}):  # enumeration, then the GA
        result = search_ground_state(model, levels, **kwargs)
        np.testing.assert_array_equal(result.best_moments, best)
        assert result.best_energy == pytest.approx(energies.min(), abs=1e-10)
        assert result.n_evaluations <= 8


def test_bad_bindings_are_refused(deeppots, atoms):
    from spingen.deepmd_model import DeepmdSpinModel

    co = atoms.copy()
    co.symbols[4] = "Co"
    with pytest.raises(ValueError, match=r"\['Co'\] of the structure are not in the model's type_map"):
        DeepmdSpinModel.from_atoms(co, deeppots[0], ENCODING)
    with pytest.raises(ValueError, match="Li is not magnetic"):
        bind(deeppots[0], atoms, magnetic=[0, 1])
    with pytest.raises(ValueError, match="has no spin for Li"):
        DeepmdSpinModel.from_atoms(atoms, deeppots[0], SpinEncoding(("Li", "Ni"), 0.3, 0.2), magnetic=[0])
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        bind("nothere.pth", atoms)
    mask = np.zeros(len(atoms), dtype=bool)
    mask[6] = True
    assert list(bind(deeppots[0], atoms, magnetic=mask).magnetic_indices) == [6]


def expand_magmom(line: str) -> list[float]:
    values = []
    for word in line.split("=", 1)[1].split("#")[0].split():
        n, _, v = word.rpartition("*")
        values += [float(v)] * (int(n) if n else 1)
    return values


def test_magmom_line():
    from spingen.labelers.vasp import compress
    from spingen.tools.spin_search import parse_moments

    assert compress([0, 0, 1, -1, 0, 0, 0, 0]) == "2*0 1 -1 4*0"
    assert compress([1.85, 1.85, -0.5, 1e-12]) == "2*1.85 -0.5 0"
    assert expand_magmom("MAGMOM = " + compress([0, 3, 3, -1.5])) == [0, 3, 3, -1.5]
    assert parse_moments(["Ni=1,3", "Co=0,1,4,5"]) == {"Ni": [1.0, 3.0], "Co": [0.0, 1.0, 4.0, 5.0]}


def test_cli_spin_search(models, deeppots, tmp_path, capsys):
    from ase.io import read

    poscar = write_poscar(tmp_path / "POSCAR")
    out = tmp_path / "magmom.txt"
    code = main(["spin-search", *map(str, models), str(poscar), "--moments", "Ni=1,3", "--offset", "0.2",
                 "--k", "3", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "eta 0.3 A/uB" in printed, "eta is read from the model"
    assert "8 evaluations of 8 configurations" in printed and "lowest 3 distinct states" in printed

    atoms = read(poscar)
    model = bind(deeppots, atoms)
    levels = MomentLevels({"Ni": [1, 3]}, atoms.get_chemical_symbols())
    every = np.concatenate(list(levels.iter_moments()))
    energies, _ = model.evaluate(every)
    best = every[np.argmin(energies)]
    assert f"ground state energy {energies.min():.6f} eV" in printed
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("MAGMOM = ") and lines[1].startswith("# state 2")
    magmom = expand_magmom(lines[0])
    assert len(magmom) == len(atoms)
    expected = np.zeros(len(atoms))
    expected[NI] = best
    np.testing.assert_array_equal(magmom, expected)


def test_cli_spin_search_symmetrized(models, deeppots, tmp_path, capsys):
    from ase.io import read

    poscar = write_poscar(tmp_path / "POSCAR")
    assert main(["spin-search", str(models[0]), str(poscar), "--moments", "Ni=1,3", "--offset", "0.2",
                 "--symmetrize"]) == 0
    printed = capsys.readouterr().out
    atoms = read(poscar)
    model = bind(deeppots[:1], atoms)
    every = np.concatenate(list(MomentLevels({"Ni": [1, 3]}, atoms.get_chemical_symbols()).iter_moments()))
    plain = model.evaluate(every)[0]
    symmetric = 0.5 * (plain + model.evaluate(-every)[0])
    assert np.abs(plain - symmetric).max() > 1e-5  # the model alone is not reversal symmetric
    assert f"ground state energy {symmetric.min():.6f} eV" in printed and "E_sym" in printed


@pytest.mark.parametrize("args,message", [
    (["--moments", "Ni=1,3"], "--offset is required"),
    (["--moments", "Co=1,3", "--offset", "0.2"], "['Co'] are not in the model's type_map"),
    (["--moments", "Ni=1,x", "--offset", "0.2"], "must be numbers"),
    (["--moments", "Ni=1,3", "--offset", "0.2", "--magnetic", "0"], "--magnetic: atoms [0]"),
])
def test_cli_spin_search_errors(models, tmp_path, capsys, args, message):
    poscar = write_poscar(tmp_path / "POSCAR")
    assert main(["spin-search", str(models[0]), str(poscar), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_spin_search_missing_files(models, tmp_path, capsys):
    assert main(["spin-search", str(models[0]), str(tmp_path / "POSCAR"), "--moments", "Ni=1", "--offset", "0.2"]) == 2
    assert f"structure file '{tmp_path / 'POSCAR'}' does not exist" in capsys.readouterr().err
    poscar = write_poscar(tmp_path / "POSCAR")
    assert main(["spin-search", "missing.pth", str(poscar), "--moments", "Ni=1", "--offset", "0.2"]) == 2
    assert "model file 'missing.pth' does not exist" in capsys.readouterr().err
