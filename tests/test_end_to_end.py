"""The whole loop, CI-sized: GPAW initial data, 2 iterations of train -> explore -> label, closing train.

4-atom NiO cells, tiny models, a handful of GPAW single points. `spingen run` is SIGKILL-ed again
and again: in the middle of the initial GPAW labels, within a poll (0.1 s) of every step boundary
of iteration 0 (so inside the make and post steps and at the start of the run steps) and in the
middle of run_train, run_model_devi and run_fp; `spingen status` is read on a killed run; each time
the same command resumes. Asserts that no finished task ran again, that no frame was lost or stored
twice, then the record, the data counts per iteration, the status and the plot.
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


def recorded(work, name="record.spingen") -> set[str]:
    path = work / name
    return set(path.read_text().split("\n")) if path.is_file() else set()


def running(work, pattern: str, done: str, step: str) -> bool:
    """A task of the main loop's step `step` (e.g. "0 4") is going: a file matching `pattern` in
    dpdispatcher's remote folders without its `done` sibling, and the step is not recorded."""
    return step not in recorded(work) and any(not (path.parent / done).exists()
                                              for path in glob_now(work / "remote", pattern))


def glob_now(root, pattern: str) -> list:
    """root.glob(pattern), empty where dpdispatcher removes a folder during the walk."""
    try:
        return list(root.glob(pattern))
    except OSError:
        return []


def kill_plan():
    """(what, condition(work)) in the order they come: a boundary kill right after each step of
    iteration 0 is recorded, mid-run kills while its run steps have tasks going."""
    plan = [("init run_fp, mid-run", lambda w: not recorded(w) and any(glob_now(w, "init/remote/*/task.*/gpaw.txt")))]
    mid = {0: ("run_train, mid-run", "*/0*/lcurve.out", "frozen_model.pth", "0 1"),
           3: ("run_model_devi, mid-run", "*/task.*/explore.log", "finished", "0 4"),
           6: ("run_fp, mid-run", "*/task.*/gpaw.txt", "result.json", "0 7")}
    for step in range(9):
        plan.append((f"boundary after 0 {step}", lambda w, s=step: f"0 {s}" in recorded(w)))
        if step in mid:
            what, pattern, done, undone = mid[step]
            plan.append((what, lambda w, p=pattern, d=done, u=undone: running(w, p, d, u)))
    return plan


def finished_outputs(work) -> dict[str, int]:
    """mtime of every output of a finished task in the stage folders (written once the task's job
    is downloaded; a task run again would write it again)."""
    found = {}
    for pattern in ("iter.*/00.train/*/frozen_model.pth", "iter.*/01.model_devi/task.*/finished",
                    "iter.*/02.fp/task.*/result.json", "init/iter.*/02.fp/task.*/result.json"):
        for path in work.glob(pattern):
            found[str(path)] = path.stat().st_mtime_ns
    return found


def test_whole_loop_killed_everywhere_resumed_and_reported(tmp_path):
    param_path, machine_path = write_inputs(tmp_path, nio_param(tmp_path), machine())
    work = tmp_path / "work"
    record = work / "record.spingen"
    command = [str(BIN / "spingen"), "run", str(param_path), str(machine_path), "-w", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    landed, finished_before, killed_status = [], {}, None
    for what, condition in kill_plan():
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None and not condition(work):
            time.sleep(0.1)
        assert run.poll() is None, f"the run ended before the kill '{what}': {run.stderr.read().decode()[-2000:]}"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        landed.append((what, sorted(recorded(work) - {""})[-1:] or ["init"]))
        finished_before.update(finished_outputs(work))
        if what == "boundary after 0 3":
            killed_status = status(work)
    mid_runs = [what for what, _ in landed if "mid-run" in what]
    assert len(landed) == 13 and len(mid_runs) == 4, landed

    # status of a killed run: iteration 0 stands at the step after the last recorded one
    assert killed_status[0]["step"] != "done"
    assert killed_status[0]["models"] and len(killed_status[0]["models"]) == 2

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = record.read_text().split("\n")
    assert lines[-2] == "2 2", "ends with the closing train of iteration 2"
    assert len([ln for ln in lines if ln]) == len(set(ln for ln in lines if ln)), "no step recorded twice"
    rerun = {path for path, mtime in finished_before.items()
             if not os.path.exists(path) or os.stat(path).st_mtime_ns != mtime}
    assert not rerun, f"finished tasks ran again: {sorted(rerun)}"
    assert any(p.endswith("frozen_model.pth") for p in finished_before)
    assert any(p.endswith("result.json") for p in finished_before)

    # data: initial GPAW frames, then one labeled frame per iteration, raw moments stored
    from spingen.data.npy import frame_hashes, load_system

    init = load_system(work / "init" / "iter.000000" / "02.fp" / "data.000")
    assert 3 <= init.get_nframes() <= 4
    ni_moments = init.data["spins"][:, :2, 2]
    assert np.all(np.abs(np.abs(ni_moments) - 1.7) < 0.4), ni_moments
    hashes = [frame_hashes(init)]
    for iteration in (0, 1):
        labeled = load_system(work / f"iter.00000{iteration}" / "02.fp" / "data.000")
        assert labeled.get_nframes() == 1
        hashes.append(frame_hashes(labeled))
    every = [h for group in hashes for h in group]
    assert len(every) == len(set(every)), "a frame was stored twice"
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
