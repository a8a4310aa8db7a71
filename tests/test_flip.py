"""Spin-flip symmetry of real deepmd-kit spin models: flip augmentation teaches E(S) = E(-S), the
canonical encoding makes it exact."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import BIN, lini_frames, tiny_training_param, write_spin_system

from spingen.schema import SpinSettings
from spingen.spin.encoding import SpinEncoding
from spingen.stages.train import training_input, write_training_data
from spingen.tools.model_test import run as evaluate_models


def train_model(root, source, symmetry: str):
    spin = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, symmetry)
    write_training_data([source], root / "data", ["Li", "Ni", "O"], spin)
    task = root / "model"
    task.mkdir()
    param = tiny_training_param(steps=150)
    param["loss"].update(start_pref_e=1, limit_pref_e=1, start_pref_f=1, limit_pref_f=1)
    param["training"].update(disp_freq=50, save_freq=150)
    (task / "input.json").write_text(json.dumps(training_input(param, ["Li", "Ni", "O"], spin, ["../data/sys.000"], 3)))
    for command in ("train input.json", "freeze -o frozen_model.pth"):
        subprocess.run([str(BIN / "dp"), "--pt", *command.split()], cwd=task, check=True, capture_output=True)
    spin.encoding.save(task / "spin_encoding.json")
    return task / "frozen_model.pth"


def test_canonical_signs_are_odd_and_pick_one_of_each_pair():
    encoding = SpinEncoding(("Ni",), 0.3, 0.2, canonical=True)
    symbols = ["Li", "Ni", "Ni", "Ni", "O"]
    rows = np.array([[0, 1.6, 1.8, 1.7, 0],        # parallel: total > 0 -> kept
                     [0, -1.6, -1.8, -1.7, 0],     # its reversal -> flipped
                     [0.3, -1.7, 1.68, 0.0, 0],    # antiparallel, total -0.02 (DFT noise): first Ni beyond 0.5 up
                     [0, 0.2, -0.1, 0.0, 0],       # all small: the first nonzero Ni up
                     [0, 0.0, 0.0, 0.0, 0.4]])     # no Ni moment at all: kept
    assert encoding.gauge_signs(rows, symbols).tolist() == [1, -1, -1, 1, 1]
    rng = np.random.default_rng(0)
    random = rng.choice([-3.0, -1.6, 0.0, 1.6, 3.0], size=(200, 5)) + rng.normal(0, 0.05, (200, 5))
    signs = encoding.gauge_signs(random, symbols)
    assert np.all(encoding.gauge_signs(-random, symbols) == -signs)  # odd: S and -S share a representative
    np.testing.assert_array_equal(encoding.to_deepmd(random, symbols), encoding.to_deepmd(-random, symbols))
    plain = SpinEncoding(("Ni",), 0.3, 0.2)
    assert np.all(plain.gauge_signs(random, symbols) == 1)
    assert not np.allclose(plain.to_deepmd(random, symbols), plain.to_deepmd(-random, symbols))


@pytest.mark.slow
def test_augmentation_reduces_and_the_canonical_encoding_removes_flip_asymmetry(tmp_path):
    from spingen.deepmd_model import DeepmdSpinModel

    # DFT data rarely holds both signs of a state: train on spin-up moments only, as in real data
    source = write_spin_system(tmp_path / "train", n_frames=16, seed=1, levels=(1.0, 3.0))
    held_out = write_spin_system(tmp_path / "test", n_frames=8, seed=2, levels=(1.0, 3.0))
    asymmetry, models = {}, {}
    for symmetry in ("none", "augment", "canonical"):
        root = tmp_path / symmetry
        root.mkdir()
        models[symmetry] = train_model(root, source, symmetry)
        (errors,) = evaluate_models([str(models[symmetry])], [str(held_out)])
        asymmetry[symmetry] = errors.flip_asymmetry
    print("flip asymmetry (meV/atom) none, augment, canonical:", asymmetry)
    assert asymmetry["augment"] < asymmetry["none"], asymmetry
    assert asymmetry["canonical"] < 1e-9 < asymmetry["augment"], asymmetry
    assert SpinEncoding.beside(models["canonical"]).canonical
    # `spingen test` on geometries labeled in several states: how well the model ranks them
    states = write_spin_system(tmp_path / "states", n_frames=3, seed=4, levels=(1.0, 3.0),
                               states=[(1.0, 1.0), (1.0, -1.0), (3.0, 3.0)])
    (ranked,) = evaluate_models([str(models["canonical"])], [str(states)])
    dft, model = (e.reshape(3, 3) for e in ranked.energies)  # 3 geometries x 3 states, in the order written
    relative_error = (model - model.mean(1, keepdims=True)) - (dft - dft.mean(1, keepdims=True))
    assert ranked.ranking.state_gap_rmse == pytest.approx(np.sqrt(np.mean(relative_error ** 2)) * 1000)
    assert (ranked.ranking.lowest_state_right, ranked.ranking.geometries) == (
        int(np.sum(model.argmin(1) == dft.argmin(1))), 3)
    printed = subprocess.run([str(BIN / "spingen"), "test", str(models["canonical"]), "-s", str(states)],
                             check=True, capture_output=True, text=True).stdout
    assert "state gap rmse meV/atom" in printed and f"{ranked.ranking.state_gap_rmse:.2f}" in printed
    assert f"{ranked.ranking.lowest_state_right}/3" in printed
    # -dE/dS is odd under reversal (E even), through the evaluation that feeds the search
    atoms = lini_frames(1, 5)[0][0]
    model = DeepmdSpinModel.from_atoms(atoms, str(models["canonical"]), SpinEncoding.beside(models["canonical"]))
    states = np.array([[1.0, 3.0], [3.0, -1.0], [1.0, -1.0]])
    energies, minus_grad = model.evaluate(np.concatenate([states, -states]), gradient=True)
    np.testing.assert_allclose(energies[:3], energies[3:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(minus_grad[:3], -minus_grad[3:], rtol=0, atol=1e-8)
    assert np.abs(minus_grad).max() > 1e-6


def test_model_test_reports_clear_errors(tmp_path):
    from spingen.schema import InputError

    with pytest.raises(InputError, match=r"model file\(s\) not found"):
        evaluate_models([str(tmp_path / "nothing.pth")], [str(tmp_path)])


def test_state_ranking_compares_energies_within_each_geometry():
    from spingen.model_errors import geometry_groups, state_ranking

    coords = np.zeros((5, 2, 3))
    coords[2:4, 0, 0] = 0.5  # geometries: frames 0-1, 2-3, and 4 alone
    coords[4, 0, 0] = 1.0
    cells = np.tile(np.eye(3) * 4, (5, 1, 1))
    groups = geometry_groups(coords, cells)
    assert groups.tolist() == [0, 0, 1, 1, 2]
    other_cell = cells.copy()
    other_cell[1] *= 1.01  # same coordinates in another cell: another geometry
    assert len(set(geometry_groups(coords, other_cell)[:2])) == 2
    dft = np.array([0.0, 0.010, 5.0, 5.004, 7.0])
    # the model is off by a constant per geometry (does not matter) and swaps the second pair (does)
    model = np.array([0.3, 0.310, 4.0, 3.998, 0.0])
    ranking = state_ranking(dft, model, groups)
    assert (ranking.lowest_state_right, ranking.geometries) == (1, 2)
    assert ranking.state_gap_rmse == pytest.approx(np.sqrt((0 + 0 + 0.003 ** 2 * 2) / 4) * 1000)
    assert ranking.dft_next_state_gap_mean == pytest.approx((10 + 4) / 2)
    assert ranking.pick_excess_mean == pytest.approx((0 + 4) / 2)  # the swapped pair's pick is 4 meV/atom up
    assert state_ranking(dft[[0, 2, 4]], model[[0, 2, 4]], np.arange(3)) is None
