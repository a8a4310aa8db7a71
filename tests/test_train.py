"""Train stage: inputs for deepmd-kit, flip-augmented data, a real tiny ensemble through dpdispatcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, make_machine, make_param, tiny_training_param, write_inputs, write_spin_system

from spingen.schema import SpinSettings
from spingen.stages.train import missing_reversed_twins, read_lcurve, training_input, write_training_data

SPIN = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")


def test_training_input_spin_model():
    inp = training_input(tiny_training_param(), ["Li", "Ni", "O"], SPIN, ["../data/sys.000"], seed=7)
    assert inp["model"]["spin"] == {"use_spin": [False, True, False], "virtual_scale": [0.0, 0.3, 0.0]}
    assert inp["loss"]["type"] == "ener_spin"
    assert inp["loss"]["start_pref_fr"] == 10 and "start_pref_f" not in inp["loss"]
    assert inp["loss"]["start_pref_fm"] == 0 and inp["loss"]["limit_pref_fm"] == 0
    assert inp["model"]["descriptor"]["seed"] == 7 and inp["training"]["seed"] == 7
    assert inp["training"]["training_data"]["systems"] == ["../data/sys.000"]


@pytest.mark.parametrize("descriptor, doubled", [
    ({"type": "se_e2_a", "sel": [4, 4, 8]}, [4, 4, 8]),  # deepmd-kit widens it itself
    ({"type": "se_e3", "sel": [4, 4, 8]}, [4, 4, 8, 4, 4, 8]),
    ({"type": "dpa1", "sel": 16}, 32),
])
def test_training_input_counts_the_virtual_atoms_in_sel(descriptor, doubled):
    """A spin model's virtual atoms are neighbours too: sel is the real neighbours' count in param.json, doubled
    where deepmd-kit does not (every descriptor but se_e2_a); a pristine model keeps it."""
    from deepmd.utils.argcheck import normalize

    param = tiny_training_param()
    param["model"]["descriptor"] = {**descriptor, "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8]}
    inp = training_input(param, ["Li", "Ni", "O"], SPIN, ["d"], seed=1)
    assert inp["model"]["descriptor"]["sel"] == doubled
    normalize(inp)  # deepmd-kit's schema takes it
    pristine = SpinSettings(False, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")
    assert training_input(param, ["Li", "Ni", "O"], pristine, ["d"], seed=1)["model"]["descriptor"]["sel"] == descriptor["sel"]


def test_training_input_pristine_model():
    pristine = SpinSettings(False, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")
    inp = training_input(tiny_training_param(), ["Li", "Ni", "O"], pristine, ["d"], seed=1)
    assert "spin" not in inp["model"]
    assert inp["loss"]["type"] == "ener" and inp["loss"]["start_pref_f"] == 10
    assert not any("fm" in key for key in inp["loss"])


def test_training_init_data_ratio_sets_how_often_deepmd_draws_the_initial_data(tmp_path):
    from deepmd.pt.utils.dataloader import DpLoaderSet, get_sampler_from_params

    from spingen.loop import StageContext
    from spingen.schema import load_machine, load_param
    from spingen.stages.train import TrainStage

    param_path, machine_path = write_inputs(tmp_path, make_param(tmp_path, training_init_data_ratio=0.4))
    # initial data: init_data_sys (12 frames) and what init_data_gen labeled in WORKDIR/init (4 frames)
    write_spin_system(tmp_path / "init" / "iter.000000" / "02.fp" / "data.000", n_frames=4, seed=5)
    for index, frames in enumerate((2, 6)):  # iteration 0's labels
        write_spin_system(tmp_path / "iter.000000" / "02.fp" / f"data.{index:03d}", n_frames=frames, seed=index + 1)
    stage = TrainStage(load_param(param_path), load_machine(machine_path).train)
    for iteration in (0, 1):
        (tmp_path / f"iter.{iteration:06d}").mkdir(exist_ok=True)
        stage.make(StageContext(tmp_path, iteration))
    task = tmp_path / "iter.000001" / "00.train" / "000"
    inputs = [json.loads((tmp_path / f"iter.{i:06d}" / "00.train" / "000" / "input.json").read_text()) for i in (0, 1)]
    assert "auto_prob" not in inputs[0]["training"]["training_data"], "iteration 0 trains on the initial data alone"
    training = inputs[1]["training"]
    assert training["validation_data"]["auto_prob"] == training["training_data"]["auto_prob"]
    # deepmd-kit's own loader and sampler on the systems as written: 40 % to the 12 + 4 initial frames
    systems = [str((task / d).resolve()) for d in training["training_data"]["systems"]]
    loaders = DpLoaderSet(systems, 1, ["Li", "Ni", "O"], shuffle=False)
    assert [len(loader) for loader in loaders.dataloaders] == [12, 4, 2, 6]
    weights = get_sampler_from_params(loaders, training["training_data"]).weights.numpy()
    np.testing.assert_allclose(weights, [0.3, 0.1, 0.15, 0.45])


def test_flip_augmentation_adds_reversed_twins(tmp_path):
    from spingen.data.npy import load_system

    source = write_spin_system(tmp_path / "raw", n_frames=5)
    written = write_training_data([source], tmp_path / "out", ["Li", "Ni", "O"], SPIN)
    assert written == [("sys.000", 5, 5)]
    raw, out = load_system(source), load_system(tmp_path / "out" / "sys.000")
    assert out.get_nframes() == 10
    shift = SPIN.offset / SPIN.virtual_scale
    ni = np.array(raw.data["atom_types"]) == 1
    stored = raw.data["spins"][..., 2]
    encoded = out.data["spins"][..., 2]
    np.testing.assert_allclose(encoded[:5, ni], stored[:, ni] + shift)
    np.testing.assert_allclose(encoded[5:, ni], -stored[:, ni] + shift)
    assert np.all(encoded[:, ~ni] == 0)
    np.testing.assert_allclose(out.data["energies"][5:], out.data["energies"][:5])
    np.testing.assert_allclose(out.data["forces"][5:], out.data["forces"][:5])
    # the raw data on disk is untouched: the encoding lives only in training inputs
    np.testing.assert_allclose(load_system(source).data["spins"], raw.data["spins"])


def test_no_twin_added_when_data_already_holds_it():
    coords = np.zeros((2, 3, 3))
    energies = np.array([1.0, 1.0])
    moments = np.array([[0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
    assert missing_reversed_twins(coords, energies, moments).size == 0
    assert list(missing_reversed_twins(coords[:1], energies[:1], moments[:1])) == [0]
    assert missing_reversed_twins(coords[:1], energies[:1], np.zeros((1, 3))).size == 0


def test_labels_the_moments_cannot_tell_apart_are_left_out_of_training(tmp_path, caplog):
    """A geometry labeled twice with the same moments (within 0.1 uB, or reversed) but energies more than
    1 meV/atom apart: the higher label is left out of the training inputs (the model would see one input
    with two energies), with a warning; close energies, other moments and other geometries stay."""
    from spingen.data.npy import load_system
    from spingen.model_errors import hidden_state_frames

    coords = np.zeros((6, 4, 3))
    coords[4:, 0, 0] = 0.5  # frames 0-3: one geometry; 4-5: another
    cells = np.tile(np.eye(3) * 4, (6, 1, 1))
    magnetic = np.array([False, True, True, False])
    moments = np.array([[0, 1.70, 1.70, 0.3], [0, 1.72, 1.69, 0.9], [0, 1.70, -1.70, 0], [0, -1.75, -1.65, 0],
                        [0, 1.70, 1.70, 0], [0, 1.72, 1.69, 0]])
    energies = np.array([0.0, 0.068, 0.004, 0.002, 1.0, 1.002])  # eV for 4 atoms: frame 1 is 17 meV/atom up
    hidden, excess = hidden_state_frames(coords, cells, energies, moments, magnetic)
    assert hidden.tolist() == [1] and excess == pytest.approx([0.017])  # frame 3 (reversed) is 0.5 meV/atom up
    source = write_spin_system(tmp_path / "raw", n_frames=2, states=[(1.7, 1.7), (1.72, 1.69), (1.7, -1.7)])
    system = load_system(source)
    system.data["energies"][1] += 0.5  # the second label of geometry 0 lies far above its first
    system.to("deepmd/npy", str(tmp_path / "raw"))
    written = write_training_data([source], tmp_path / "out", ["Li", "Ni", "O"], SPIN)
    assert written == [("sys.000", 5, 5)]  # 6 labels, 1 left out; its reversed twin is not added either
    out = load_system(tmp_path / "out" / "sys.000")
    assert not np.isclose(out.data["energies"], system.data["energies"][1]).any()
    assert "1 label(s) left out of training" in caplog.text
    assert load_system(source).get_nframes() == 6  # the stored data keeps it


def test_flip_augmentation_off(tmp_path):
    source = write_spin_system(tmp_path / "raw", n_frames=4)
    off = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "none")
    assert write_training_data([source], tmp_path / "out", ["Li", "Ni", "O"], off) == [("sys.000", 4, 0)]


def test_canonical_flip_symmetry_writes_one_sign_of_each_frame_and_no_twins(tmp_path):
    from spingen.data.npy import load_system

    source = write_spin_system(tmp_path / "raw", n_frames=12)
    canonical = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "canonical")
    assert canonical.encoding.canonical
    assert write_training_data([source], tmp_path / "out", ["Li", "Ni", "O"], canonical) == [("sys.000", 12, 0)]
    raw, out = load_system(source), load_system(tmp_path / "out" / "sys.000")
    ni = np.array(raw.data["atom_types"]) == 1
    stored = raw.data["spins"][..., 2][:, ni]
    moments = out.data["spins"][..., 2][:, ni] - canonical.offset / canonical.virtual_scale
    signs = np.where(np.abs(stored.sum(axis=1)) > 0.5, np.sign(stored.sum(axis=1)), np.sign(stored[:, 0]))
    assert {-1.0, 1.0} <= set(signs), "the data holds both signs: some frames are reversed"
    np.testing.assert_allclose(moments, signs[:, None] * stored)
    np.testing.assert_allclose(out.data["energies"], raw.data["energies"])


def test_a_second_copy_of_a_training_job_waits_for_the_first(tmp_path):
    from spingen.stages.train import train_command
    from spingen.tasks.lock import exclusive_task

    fake_dp = tmp_path / "dp"
    fake_dp.write_text("#!/bin/sh\necho \"$@\" >> calls\n")
    fake_dp.chmod(0o755)
    with exclusive_task(tmp_path):  # the first copy is running
        second = subprocess.Popen(["bash", "-c", train_command(str(fake_dp))], cwd=tmp_path)
        time.sleep(1.0)
        assert second.poll() is None and not (tmp_path / "calls").exists(), "the second copy must wait"
    assert second.wait(timeout=30) == 0
    assert (tmp_path / "calls").read_text().splitlines() == ["--pt train input.json", "--pt freeze -o frozen_model.pth"]


def test_read_lcurve(tmp_path):
    lcurve = tmp_path / "lcurve.out"
    lcurve.write_text("#  step  rmse_val  rmse_trn  rmse_e_val  rmse_e_trn  rmse_fr_val  rmse_fr_trn  lr\n"
                      "0 1 1 0.5 0.5 2 2 1e-3\n20 0.3 0.2 0.01 0.02 0.4 0.5 1e-4\n")
    assert read_lcurve(lcurve) == {"rmse_val": 0.3, "rmse_trn": 0.2, "rmse_e_val": 0.01, "rmse_e_trn": 0.02,
                                   "rmse_fr_val": 0.4, "rmse_fr_trn": 0.5}


TRAIN_ONLY = """
import sys
from pathlib import Path
from spingen.loop import Loop, setup_logging
from spingen.schema import load_machine, load_param
from spingen.stages.train import TrainStage
param, machines = load_param(sys.argv[1]), load_machine(sys.argv[2])
setup_logging(Path.cwd())
Loop(Path.cwd(), [TrainStage(param, machines.train)], n_iterations=int(sys.argv[3])).run()
"""


def train_only(param: Path, machine: Path, n_iterations: int = 0) -> list[str]:
    """The loop with the train stage alone: iteration n_iterations is the closing train."""
    return [sys.executable, "-c", TRAIN_ONLY, str(param), str(machine), str(n_iterations)]


def check_models(workdir: Path, spin: bool) -> None:
    from deepmd.infer import DeepPot

    from spingen.data.npy import load_system

    train = workdir / "iter.000000" / "00.train"
    report = json.loads((train / "models.json").read_text())
    assert [r["model"] for r in report] == ["000/frozen_model.pth", "001/frozen_model.pth"]
    assert all(np.isfinite(r["rmse_e_val"]) and r["rmse_e_val"] > 0 for r in report)
    system = load_system(workdir / "data" / "init")
    coords = system.data["coords"][:3].reshape(3, -1)
    cells = system.data["cells"][:3].reshape(3, 9)
    energies = []
    for link in ("graph.000.pth", "graph.001.pth"):
        model = DeepPot(str(train / link))
        assert model.has_spin is spin
        if spin:
            result = model.eval(coords, cells, system.data["atom_types"], spin=system.data["spins"][:3].reshape(3, -1))
        else:
            result = model.eval(coords, cells, system.data["atom_types"])
        assert result[0].shape == (3, 1) and np.all(np.isfinite(result[0]))
        energies.append(result[0])
    assert not np.allclose(energies[0], energies[1]), "two seeds must give two different models"


def ranking_model_energies(workdir: Path) -> np.ndarray:
    """The first ensemble's energies (meV/atom) of data/states, 2 geometries x 3 states."""
    from spingen.model_errors import Ensemble, load_for

    ensemble = Ensemble(sorted((workdir / "iter.000000" / "00.train").glob("graph.*.pth")))
    system, symbols, atypes, moments = load_for(ensemble, workdir / "data" / "states")
    energies, _ = ensemble.energy_forces(system.data["coords"], system.data["cells"], atypes, symbols, moments)
    return energies.reshape(2, 3) / len(symbols) * 1000


@pytest.mark.slow
@pytest.mark.parametrize("spin", [True, False], ids=["spin", "pristine"])
def test_loop_trains_a_real_ensemble(tmp_path, spin):
    param = make_param(tmp_path)
    param["spin"]["enabled"] = spin
    # 2 geometries x 3 spin states beside the 12 single-state frames: the spin ensemble's ranking is reported
    write_spin_system(tmp_path / "data" / "states", n_frames=2, seed=9, states=[(1, 1), (1, -1), (3, 3)])
    param["init_data_sys"].append("data/states")
    param_path, machine_path = write_inputs(tmp_path, param)
    result = subprocess.run(train_only(param_path, machine_path), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    check_models(tmp_path, spin)
    assert (tmp_path / "record.spingen").read_text().split("\n")[:3] == ["0 0", "0 1", "0 2"]
    log = (tmp_path / "spingen.log").read_text()
    assert "iter 000000 step 01: run_train" in log
    assert ("18 frames (moments in canonical sign" if spin else "18 frames (no spin)") in log
    ranking_file = tmp_path / "iter.000000" / "00.train" / "state_ranking.json"
    assert ranking_file.is_file() is spin and ("training geometries labeled in several spin states" in log) is spin
    if spin:
        ranking = json.loads(ranking_file.read_text())
        assert (ranking["geometries"], ranking["frames"]) == (2, 6)
        assert ranking["state_gap_rmse"] > 0 and 0 <= ranking["lowest_state_right"] <= 2
        from spingen.data.npy import load_system

        states = load_system(tmp_path / "data" / "states")
        dft = states.data["energies"].reshape(2, 3) / 8 * 1000  # meV/atom, 2 geometries x 3 states
        next_gap = np.mean([np.diff(np.sort(row)[:2])[0] for row in dft])
        assert ranking["dft_next_state_gap_mean"] == pytest.approx(next_gap)
        picks = [row[int(np.argmin(model))] - row.min() for row, model in zip(dft, ranking_model_energies(tmp_path))]
        assert ranking["pick_excess_mean"] == pytest.approx(np.mean(picks), abs=1e-6)
        wrong = 2 - ranking["lowest_state_right"]
        assert (f"wrong spin state lowest on {wrong} of the 2" in log) is (wrong > 0)
    assert not (tmp_path / "spingen.lock").read_text().strip(), "the lock is released at exit"


def write_counting_dp(path: Path, log: Path) -> Path:
    """A `dp` that records each call (cwd and arguments) before running the real one."""
    path.write_text(f"#!/bin/sh\necho \"$(pwd) $*\" >> {log}\nexec {BIN / 'dp'} \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_sigkill_during_run_train_resumes_without_retraining(tmp_path):
    calls = tmp_path / "dp_calls.txt"
    param = make_param(tmp_path)
    param["default_training_param"]["training"]["numb_steps"] = 60
    param_path, machine_path = write_inputs(tmp_path, param, make_machine(str(write_counting_dp(tmp_path / "dp", calls))))
    proc = subprocess.Popen(train_only(param_path, machine_path), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "remote").rglob("frozen_model.pth")):
        time.sleep(0.2)
    assert list((tmp_path / "remote").rglob("frozen_model.pth")), "no model was frozen in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "record.spingen").read_text() == "0 0\n", "killed in run_train: only make_train recorded"
    frozen_before = {p.parent.name for p in (tmp_path / "remote").rglob("frozen_model.pth")}

    result = subprocess.run(train_only(param_path, machine_path), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "record.spingen").read_text().split("\n")[:3] == ["0 0", "0 1", "0 2"]
    trains = [line.split()[0] for line in calls.read_text().splitlines() if " train " in line]
    for task in frozen_before:
        assert sum(Path(d).name == task for d in trains) == 1, f"model {task} was trained again"
    check_models(tmp_path, spin=True)


def first_lcurve_rmse(path: Path) -> float:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return float(rows[0][1])


@pytest.mark.slow
def test_training_init_model_starts_from_the_previous_iteration(tmp_path):
    calls = tmp_path / "dp_calls.txt"
    param = make_param(tmp_path, training_init_model=True, training_reuse_numb_steps=30, training_reuse_start_lr=5e-4)
    param_path, machine_path = write_inputs(tmp_path, param, make_machine(str(write_counting_dp(tmp_path / "dp", calls))))
    result = subprocess.run(train_only(param_path, machine_path, 1), cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    first, second = (tmp_path / f"iter.00000{i}" / "00.train" for i in (0, 1))
    for task in ("000", "001"):
        assert (second / task / "init_model.pth").read_bytes() == (first / task / "frozen_model.pth").read_bytes()
        assert not (first / task / "init_model.pth").exists()
        inputs = [json.loads((d / task / "input.json").read_text()) for d in (first, second)]
        assert inputs[0]["training"]["numb_steps"] == param["default_training_param"]["training"]["numb_steps"]
        assert inputs[1]["training"]["numb_steps"] == 30 and inputs[1]["learning_rate"]["start_lr"] == 5e-4
        assert inputs[0]["learning_rate"]["start_lr"] != 5e-4
        # a model that starts trained starts with a smaller error than one from scratch
        assert first_lcurve_rmse(second / task / "lcurve.out") < first_lcurve_rmse(first / task / "lcurve.out")
    trains = [line for line in calls.read_text().splitlines() if " train " in line]
    assert sum("--init-frz-model init_model.pth" in line for line in trains) == 2 and len(trains) == 4


def test_a_task_that_always_fails_stops_the_run_naming_it(tmp_path):
    failing = tmp_path / "bad_dp"
    failing.write_text("#!/bin/sh\necho 'bad_dp: cannot read input.json' >&2\nexit 3\n")
    failing.chmod(0o755)
    machine = make_machine(str(failing))
    machine["train"]["machine"]["retry_count"] = 1
    param_path, machine_path = write_inputs(tmp_path, make_param(tmp_path, numb_models=1), machine)
    result = subprocess.run(train_only(param_path, machine_path), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert f"unfinished: {tmp_path}/iter.000000/00.train/000" in result.stderr
    assert "train.err: bad_dp: cannot read input.json" in result.stderr
    assert "run the same command again" in result.stderr
    assert (tmp_path / "record.spingen").read_text() == "0 0\n", "the record stays at make_train"
