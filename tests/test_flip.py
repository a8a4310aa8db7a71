"""Spin-flip symmetry: flip augmentation teaches a real deepmd-kit spin model that E(S) = E(-S)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import BIN, tiny_training_param, write_spin_system

from spingen.schema import SpinSettings
from spingen.stages.train import training_input, write_training_data
from spingen.tools.model_test import run as evaluate_models


def train_model(root, source, augment: bool):
    spin = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, augment)
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


@pytest.mark.slow
def test_augmentation_reduces_flip_asymmetry_on_held_out_frames(tmp_path):
    # DFT data rarely holds both signs of a state: train on spin-up moments only, as in real data
    source = write_spin_system(tmp_path / "train", n_frames=16, seed=1, levels=(1.0, 3.0))
    held_out = write_spin_system(tmp_path / "test", n_frames=8, seed=2, levels=(1.0, 3.0))
    asymmetry = {}
    for augment in (False, True):
        root = tmp_path / f"augment_{augment}"
        root.mkdir()
        (errors,) = evaluate_models([str(train_model(root, source, augment))], [str(held_out)])
        asymmetry[augment] = errors.flip_asymmetry
    print("flip asymmetry (meV/atom) without, with augmentation:", asymmetry[False], asymmetry[True])
    assert asymmetry[True] < asymmetry[False], asymmetry


def test_model_test_reports_clear_errors(tmp_path):
    from spingen.schema import InputError

    with pytest.raises(InputError, match=r"model file\(s\) not found"):
        evaluate_models([str(tmp_path / "nothing.pth")], [str(tmp_path)])
