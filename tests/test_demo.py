"""`make demo`'s example where spin matters: >= 4 Ni explored, and a short version of it runs.

The short version is the shipped param_examples/linio2_demo with CI-sized numbers (one perturbed
geometry, 20 training steps, one 10-step MD, every frame a candidate, a lower GPAW cutoff): a real
loop whose spin search has 4 Ni, whose candidates carry excited states and whose labels
(fp_spin_init "states") are made in more than one spin state of a geometry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pytest
from conftest import BIN, make_machine

from spingen.schema import load_param

DEMO = Path(__file__).resolve().parent.parent / "param_examples" / "linio2_demo"


def magnetic_ions(param) -> int:
    (configs,) = param.sys_configs
    atoms = ase.io.read(configs[0])
    return sum(s in param.spin.magnetic for s in atoms.get_chemical_symbols())


def test_demo_explores_at_least_four_magnetic_ions_with_multi_state_labels():
    param = load_param(DEMO / "param.json")
    assert magnetic_ions(param) >= 4
    assert param.raw["fp_spin_init"] == "states" and param.raw["model_devi_spin_e_trust"] > 0


@pytest.mark.slow
def test_short_demo_runs_a_spin_search_on_four_ni_and_labels_several_states(tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    raw = json.loads((folder / "param.json").read_text())
    raw["init_data_gen"].update(pert_numb=1, spin_states=[[1, 1], [1, -1]])
    raw["numb_models"] = 2
    raw["default_training_param"]["training"].update(numb_steps=20, disp_freq=10, save_freq=20)
    raw["model_devi_jobs"] = [{"sys_idx": [0], "temps": [300], "nsteps": 10, "trj_freq": 5}]
    raw.update(model_devi_f_trust_lo=0.0, model_devi_f_trust_hi=100.0, fp_task_max=1, ratio_failed=1.0)
    raw["init_data_gen"]["ratio_failed"] = 1.0
    raw["fp_gpaw"].update(ecut=200, maxiter=40)
    (folder / "param.json").write_text(json.dumps(raw))
    machine = make_machine()
    for name, command in (("train", BIN / "dp"), ("model_devi", BIN / "spingen"), ("fp", BIN / "spingen")):
        section = machine[name][0] if isinstance(machine[name], list) else machine[name]
        section["command"] = str(command)
        section["resources"].update(group_size=100, para_deg=2)
    (folder / "machine.json").write_text(json.dumps(machine))
    work = tmp_path / "work"
    subprocess.run([str(BIN / "spingen"), "run", str(folder / "param.json"), str(folder / "machine.json"), "-w",
                    str(work)], check=True, capture_output=True, text=True, timeout=900)

    candidates = ase.io.read(work / "iter.000000/01.model_devi/candidates.000.extxyz", index=":")
    assert candidates, "every frame is a candidate at these trust levels"
    ni = [i for i, s in enumerate(candidates[0].get_chemical_symbols()) if s == "Ni"]
    assert len(ni) == 4
    excited = np.asarray(candidates[0].arrays["excited_magmoms"]).reshape(len(candidates[0]), -1)
    assert excited.shape[1] == 1 and np.count_nonzero(excited[ni]) == 4  # n_lowest 2: one excited state
    labels = json.loads((work / "iter.000000/02.fp/labels.json").read_text())
    assert sorted({entry["state"] for entry in labels}) == [0, 1]  # ground and excited state of one frame
    status = json.loads(subprocess.run([str(BIN / "spingen"), "status", str(work), "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    first = status["iterations"][0]
    assert first["labeled"] + first["label_failed"] == 2 and first["ranking_geometries"] == 1
