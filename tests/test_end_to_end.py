"""The whole loop, CI-sized: GPAW initial data, 2 iterations of train -> explore -> label, closing train.

4-atom NiO cells, tiny models, a handful of GPAW single points. `spingen run` is SIGKILL-ed once in
the middle of iteration 0; `spingen status` is read on the killed run, then the same command
resumes and finishes. Asserts the record, the data counts per iteration, the status and the plot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import BIN, make_machine, make_param, tiny_training_param, write_inputs

pytestmark = pytest.mark.slow


def nio_param(root):
    from ase import Atoms
    from ase.io import write

    a = 4.17
    nio = Atoms("Ni2O2", scaled_positions=[(0, 0, 0), (.5, .5, .5), (.25, .25, .25), (.75, .75, .75)],
                cell=[[a / 2, a / 2, a], [a / 2, a, a / 2], [a, a / 2, a / 2]], pbc=True)
    (root / "confs").mkdir(parents=True, exist_ok=True)
    write(root / "confs" / "NiO", nio, format="vasp")
    training = tiny_training_param(30)
    training["model"]["descriptor"]["sel"] = [8, 16]
    param = make_param(root, type_map=["Ni", "O"], init_data_sys=[], sys_configs=[["confs/NiO"]],
                       numb_models=2, default_training_param=training, training_init_model=True,
                       spin={"magnetic": ["Ni"], "virtual_scale": 0.3, "offset": 0.2, "moments": "auto"},
                       model_devi_jobs=[{"sys_idx": [0], "temps": [300], "nsteps": 20, "trj_freq": 5}] * 2,
                       model_devi_f_trust_lo=0.0, model_devi_f_trust_hi=100.0, fp_task_max=1, ratio_failed=1.0)
    param["init_data_gen"] = {"configs": ["confs/NiO"], "pert_numb": 2, "pert_atom": 0.03,
                              "spin_states": [[2, -2], [2, 2]]}
    return param


def machine():
    m = make_machine()
    for name, command in (("train", BIN / "dp"), ("model_devi", BIN / "spingen"), ("fp", BIN / "spingen")):
        section = m[name][0] if isinstance(m[name], list) else m[name]
        section["command"] = str(command)
        section["resources"].update(group_size=100, para_deg=2)
    return m


def status(work) -> list[dict]:
    out = subprocess.run([str(BIN / "spingen"), "status", str(work), "--json"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)["iterations"]


def test_whole_loop_killed_resumed_and_reported(tmp_path):
    param_path, machine_path = write_inputs(tmp_path, nio_param(tmp_path), machine())
    work = tmp_path / "work"
    command = [str(BIN / "spingen"), "run", str(param_path), str(machine_path), "-w", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = work / "record.spingen"
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None:
        if record.is_file() and "0 3" in record.read_text().splitlines():
            break
        time.sleep(0.2)
    assert first.poll() is None, "the run ended before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    # status of the killed run: iteration 0 stands at the step after the last recorded one
    killed = status(work)
    last = record.read_text().split()[-2:]
    assert killed[0]["step"] != "done" and last[0] == "0"
    assert killed[0]["models"] and len(killed[0]["models"]) == 2

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = record.read_text().split("\n")
    assert lines[-2] == "2 2", "ends with the closing train of iteration 2"
    assert len([ln for ln in lines if ln]) == len(set(ln for ln in lines if ln)), "no step recorded twice"

    # data: initial GPAW frames, then one labeled frame per iteration, raw moments stored
    from spingen.data.npy import load_system

    init = load_system(work / "init" / "iter.000000" / "02.fp" / "data.000")
    assert 3 <= init.get_nframes() <= 4
    ni_moments = init.data["spins"][:, :2, 2]
    assert np.all(np.abs(np.abs(ni_moments) - 1.7) < 0.4), ni_moments
    for iteration in (0, 1):
        labeled = load_system(work / f"iter.00000{iteration}" / "02.fp" / "data.000")
        assert labeled.get_nframes() == 1
    data = json.loads((work / "iter.000002" / "00.train" / "models.json").read_text())
    assert len(data) == 2
    log = (work / "spingen.log").read_text()
    assert "training data: 3 systems" in log  # init + the labels of iterations 0 and 1

    out = subprocess.run([str(BIN / "spingen"), "status", str(work), "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["init"]["step"] == "done"
    rows = status(work)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[0]["step"] == rows[1]["step"] == "done"
    for row in rows[:2]:
        assert row["explore_frames"] == 5 and row["candidate_pct"] == 100.0
        assert row["labeled"] == 1 and row["label_failed"] == 0
        assert row["ensemble_rmse_e_meV_atom"] is not None and row["ensemble_rmse_e_meV_atom"] > 0
        assert row["spin_agree_pct"] is not None
    table = subprocess.run([str(BIN / "spingen"), "status", str(work)], capture_output=True, text=True, check=True)
    assert "the run is finished (2 iterations)" in table.stdout

    plot = tmp_path / "report.png"
    subprocess.run([str(BIN / "spingen"), "plot", str(work), "-o", str(plot)], check=True, capture_output=True)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
