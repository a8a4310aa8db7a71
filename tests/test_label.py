"""Label stage: VASP inputs, a fake vasp_std through dpdispatcher, real GPAW DFT+U runs, kill and resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from conftest import BIN, make_machine, make_param, write_inputs

from spingen.data.npy import frame_hashes, load_system
from spingen.labelers import create_labeler
from spingen.labelers.vasp import compress, parse_incar
from spingen.loop import StageContext
from spingen.schema import (
    InputError,
    LabelSettings,
    MachineSection,
    VaspSettings,
    explore_settings,
    label_settings,
    load_machine,
    load_param,
)
from spingen.stages.label import LabelStage, TotalMomentRule, moment_violation

HERE = Path(__file__).parent
VASP = HERE / "data" / "vasp"
FEO = VASP / "OUTCAR.FeO_ldau_relax_vasp535"
KSNO = VASP / "OUTCAR.K4Sn4O6_ispin2_vasp541"
MIXED_TYPES = ["Li", "Ni", "Co", "Mn", "O"]
LDAU = {"Ni": {"L": 2, "U": 6.3, "J": 0}, "Co": {"L": 2, "U": 5.14, "J": 0}, "Mn": {"L": 2, "U": 3.9, "J": 0}}
TEMPLATE = ("ENCUT = 520\nEDIFF = 1e-6 ! tight\nISMEAR = 0; SIGMA = 0.05\nMAGMOM = 10*1\n"
            "LDAU = .TRUE.\nLDAUL = 2 -1\nNELM = 120\n")


# ---------------------------------------------------------------- helpers
def fake_potcars(folder: Path, elements) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for el in elements:
        (folder / f"POTCAR.{el}").write_text(f"  PAW_PBE {el} 06Sep2000\n   TITEL  = PAW_PBE {el} 06Sep2000\n"
                                             f" fake body of {el}\n End of Dataset\n")
    return {el: f"POTCAR.{el}" for el in elements}


def vasp_param(root: Path, spin_init: str, **extra) -> Path:
    pp = fake_potcars(root / "pp", MIXED_TYPES)
    (root / "INCAR.tmpl").write_text(TEMPLATE)
    param = make_param(root, type_map=MIXED_TYPES, fp_style="vasp", fp_pp_path="pp", fp_pp_files=pp,
                       fp_incar="INCAR.tmpl", fp_ldau=LDAU, fp_spin_init=spin_init,
                       spin={"magnetic": ["Ni", "Co", "Mn"], "moments": {"Ni": [0, 1], "Co": [0, 1], "Mn": [3, 4]}},
                       **extra)
    param_path, _ = write_inputs(root, param)
    return param_path


def local_machine(command: str, tmp_path: Path) -> MachineSection:
    return MachineSection(command, {"batch_type": "Shell", "context_type": "LocalContext", "local_root": "./",
                                    "remote_root": str(tmp_path / "remote")},
                          {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1}, 1)


def write_candidates(workdir: Path, system: int, frames, iteration: int = 0) -> Path:
    path = workdir / f"iter.{iteration:06d}" / "01.model_devi" / f"candidates.{system:03d}.extxyz"
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")
    return path


def candidate(atoms: Atoms, predicted, excited=None, step: int = 0) -> Atoms:
    atoms = atoms.copy()
    atoms.arrays["initial_magmoms"] = np.asarray(predicted, dtype=float)
    if excited is not None:
        atoms.arrays["excited_magmoms"] = np.asarray(excited, dtype=float)
    atoms.info.update(task="task.000.000000", step=step, max_devi_f=0.2)
    return atoms


def mixed_frame() -> Atoms:
    symbols = ["O", "Ni", "Li", "Co", "O", "Mn", "Li", "O", "Ni", "O"]
    rng = np.random.default_rng(3)
    return Atoms(symbols, positions=rng.uniform(0, 6, (10, 3)), cell=np.diag([6.0, 6.1, 6.2]), pbc=True)


def make_stage(workdir: Path, stage: LabelStage, iteration: int = 0) -> StageContext:
    ctx = StageContext(workdir, iteration)
    stage.path(ctx).mkdir(parents=True)
    stage.make(ctx)
    return ctx


def incar_of(task: Path) -> dict[str, str]:
    return parse_incar((task / "INCAR").read_text())


# ---------------------------------------------------------------- VASP inputs
def test_vasp_inputs_follow_poscar_species_order(tmp_path):
    param = load_param(vasp_param(tmp_path, "states", fp_kspacing=0.25))
    stage = LabelStage(param, local_machine("vasp_std", tmp_path))
    # predicted Ni +1/-1, Co 0, Mn 3 (original atom order); excited: both Ni up, and the reversed ground state
    predicted = [0, 1, 0, 0, 0, 3, 0, 0, -1, 0]
    up = [0, 1, 0, 0, 0, 3, 0, 0, 1, 0]
    excited = np.array([up, np.negative(predicted)]).T
    no_co = mixed_frame()
    no_co.symbols[3] = "Ni"
    write_candidates(tmp_path, 0, [candidate(mixed_frame(), predicted, excited), candidate(no_co, predicted)])
    ctx = make_stage(tmp_path, stage)
    tasks = sorted(stage.path(ctx).glob("task.*"))
    # frame 0: the ground state and one distinct excited state (the reversed one is the same state)
    assert [t.name for t in tasks] == ["task.000.000000", "task.000.000001", "task.000.000002"]
    poscar = (tasks[0] / "POSCAR").read_text().splitlines()
    assert poscar[5].split() == ["Li", "Ni", "Co", "Mn", "O"] and poscar[6].split() == ["2", "2", "1", "1", "4"]
    titles = re.findall(r"TITEL\s*=\s*PAW_PBE (\w+)", (tasks[0] / "POTCAR").read_text())
    assert titles == ["Li", "Ni", "Co", "Mn", "O"]
    incar = incar_of(tasks[0])
    assert incar["LDAUL"] == "-1 2 2 2 -1" and incar["LDAUU"] == "0 6.3 5.14 3.9 0" and incar["LDAUJ"] == "0 0 0 0 0"
    assert incar["LDAU"] == ".TRUE." and incar["LDAUTYPE"] == "2" and incar["LMAXMIX"] == "4"
    assert incar["ISPIN"] == "2" and incar["LORBIT"] == "11" and incar["ENCUT"] == "520" and incar["SIGMA"] == "0.05"
    assert incar["KSPACING"] == "0.25" and incar["KGAMMA"] == ".TRUE." and not (tasks[0] / "KPOINTS").exists()
    assert incar["MAGMOM"] == "2*0 1 -1 0 3 4*0" and incar["NUPDOWN"] == "3"  # sorted: Li Li Ni Ni Co Mn O*4
    assert incar_of(tasks[1])["MAGMOM"] == "2*0 2*1 0 3 4*0" and incar_of(tasks[1])["NUPDOWN"] == "5"
    # frame 1 has no Co: the LDAU arrays and POTCAR follow its own species
    assert (tasks[2] / "POSCAR").read_text().splitlines()[5].split() == ["Li", "Ni", "Mn", "O"]
    assert incar_of(tasks[2])["LDAUL"] == "-1 2 2 -1" and incar_of(tasks[2])["LDAUU"] == "0 6.3 3.9 0"
    assert re.findall(r"TITEL\s*=\s*PAW_PBE (\w+)", (tasks[2] / "POTCAR").read_text()) == ["Li", "Ni", "Mn", "O"]
    # the POSCAR is the sorted frame, same geometry
    written = ase.io.read(tasks[0] / "POSCAR", format="vasp")
    frame = mixed_frame()
    order = [2, 6, 1, 8, 3, 5, 0, 4, 7, 9]
    np.testing.assert_allclose(written.positions, frame.positions[order], atol=1e-8)


def test_sectors_label_each_searched_sector_at_its_own_fixed_total(tmp_path):
    param = load_param(vasp_param(tmp_path, "sectors", fp_spin_sectors=2))
    assert explore_settings(param).sectors == 2
    stage = LabelStage(param, local_machine("vasp_std", tmp_path))
    predicted = [0, 1, 0, 0, 0, 3, 0, 0, 1, 0]  # Ni +1 +1, Mn 3: total 5
    one_down = [0, 1, 0, 0, 0, 3, 0, 0, -1, 0]
    mn_down = [0, 1, 0, 0, 0, -3, 0, 0, 1, 0]
    frame = candidate(mixed_frame(), predicted, excited=np.array([one_down]).T)  # not labeled under sectors
    frame.arrays["sector_magmoms"] = np.array([mn_down, one_down]).T
    write_candidates(tmp_path, 0, [frame])
    ctx = make_stage(tmp_path, stage)
    tasks = sorted(stage.path(ctx).glob("task.*"))
    assert [incar_of(t)["NUPDOWN"] for t in tasks] == ["5", "-1", "3"]
    assert [incar_of(t)["MAGMOM"] for t in tasks] == ["2*0 2*1 0 3 4*0", "2*0 2*1 0 -3 4*0", "2*0 1 -1 0 3 4*0"]
    # without sector states (all moments 0), the frame is labeled as under `predicted`: one task, total free
    plain = tmp_path / "plain"
    plain.mkdir()
    write_candidates(plain, 0, [candidate(mixed_frame(), predicted)])
    ctx = make_stage(plain, LabelStage(param, local_machine("vasp_std", plain)))
    (task,) = stage.path(ctx).glob("task.*")
    assert "NUPDOWN" not in incar_of(task) and incar_of(task)["MAGMOM"] == "2*0 2*1 0 3 4*0"


def test_total_moment_rule_fitted_on_earlier_labels():
    # LiNiO2 in GPAW: two Ni at +1.67 uB (sphere moments) make a total of 2; antiparallel ones 0
    entries = [{"ok": True, "total_moment": 2.0, "moment_sums": {"Ni": 3.36}},
               {"ok": True, "total_moment": 2.0, "moment_sums": {"Ni": -3.30 + 6.66}},
               {"ok": True, "total_moment": 0.0, "moment_sums": {"Ni": 0.01}},
               {"ok": False, "reason": "SCF not converged"},
               {"ok": True, "total_moment": None, "moment_sums": {"Ni": 3.4}}]  # a code without a total
    rule = TotalMomentRule.fit(entries, ["Ni", "Co"])
    assert rule.scales["Ni"] == pytest.approx(2.0 / 3.36, rel=0.02) and rule.scales["Co"] == 1.0
    assert rule.total(["Li", "Ni", "Ni", "O"], [0.0, 1.67, 1.67, 0.0]) == 2.0  # the plain sum rounds to 3
    assert rule.total(["Ni", "Ni", "Co"], [1.67, -1.67, 2.6]) == 3.0  # Co keeps the plain sum
    # antiparallel frames only say nothing about the scale: plain rounded sums
    assert TotalMomentRule.fit(entries[2:], ["Ni"]).scales == {"Ni": 1.0}
    assert TotalMomentRule.fit([], ["Ni"]).total(["Ni", "Ni"], [1.67, 1.67]) == 3.0


def test_members_strategy_labels_each_disputed_state_with_the_fitted_total(tmp_path):
    param = load_param(vasp_param(tmp_path, "members"))
    stage = LabelStage(param, local_machine("vasp_std", tmp_path))
    earlier = tmp_path / "iter.000000" / "02.fp"
    earlier.mkdir(parents=True)
    (earlier / "labels.json").write_text(json.dumps(
        [{"task": "task.000.000000", "ok": True, "total_moment": 2.0, "moment_sums": {"Ni": 3.4, "Mn": 0.0}}]))
    predicted = [0, 1.7, 0, 0, 0, 3, 0, 0, 1.7, 0]
    flipped = [0, 1.7, 0, 0, 0, 3, 0, 0, -1.7, 0]
    # four members: two agree with the ensemble, one has the other state, one that state reversed
    members = np.array([predicted, predicted, flipped, np.negative(flipped)]).T
    frame = candidate(mixed_frame(), predicted, np.array([[0, 1.7, 0, 0, 0, 4, 0, 0, 1.7, 0]]).T)
    frame.arrays["member_magmoms"] = members
    write_candidates(tmp_path, 0, [frame, candidate(mixed_frame(), predicted)], iteration=1)
    ctx = make_stage(tmp_path, stage, iteration=1)
    tasks = sorted(stage.path(ctx).glob("task.*"))
    assert [t.name for t in tasks] == ["task.000.000000", "task.000.000001", "task.000.000002"]
    # Ni sums x 2/3.4 (fitted), Mn 3 x 1 (no label informs Mn): 3.4 * 0.588 + 3 = 5; antiparallel Ni: 3
    assert incar_of(tasks[0])["NUPDOWN"] == "5" and incar_of(tasks[1])["NUPDOWN"] == "3"
    assert incar_of(tasks[1])["MAGMOM"] == "2*0 1.7 -1.7 0 3 4*0"  # sorted: Li Li Ni Ni Co Mn O*4
    states = [int(ase.io.read(t / "frame.extxyz").info["state"]) for t in tasks]
    assert states == [0, 1, 0]  # the excited state of the search is not a member's: not labeled
    assert "NUPDOWN" not in incar_of(tasks[2])  # no dispute on the second frame: total free, as `predicted`


@pytest.mark.parametrize("mode", ["predicted", "random"])
def test_vasp_spin_init_predicted_and_random(tmp_path, mode):
    param = load_param(vasp_param(tmp_path, mode, fp_kpoints=[2, 2, 1]))
    stage = LabelStage(param, local_machine("vasp_std", tmp_path))
    excited = np.zeros((10, 2))
    write_candidates(tmp_path, 0, [candidate(mixed_frame(), [0, 1, 0, 0, 0, 3, 0, 0, -1, 0], excited)])
    ctx = make_stage(tmp_path, stage)
    (task,) = stage.path(ctx).glob("task.*")  # excited states are labeled only in `states` mode
    incar = incar_of(task)
    assert "NUPDOWN" not in incar
    if mode == "predicted":
        assert incar["MAGMOM"] == "2*0 1 -1 0 3 4*0"
    else:
        assert "MAGMOM" not in incar  # the template's MAGMOM = 10*1 is dropped too
    assert (task / "KPOINTS").read_text().splitlines()[2:4] == ["Gamma", "2 2 1"]
    assert "KSPACING" not in incar and "KPOINTS" in stage.labeler.forward_files()


def test_potcar_list_in_type_map_order_and_wrong_order(tmp_path):
    param_path = vasp_param(tmp_path, "predicted")
    raw = json.loads(param_path.read_text())
    raw["fp_pp_files"] = [f"POTCAR.{el}" for el in MIXED_TYPES]
    param_path.write_text(json.dumps(raw))
    settings = label_settings(load_param(param_path))
    assert list(settings.vasp.pp_files) == MIXED_TYPES
    raw["fp_pp_files"] = [f"POTCAR.{el}" for el in ["Li", "Co", "Ni", "Mn", "O"]]  # DP-GEN's classic mistake
    param_path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="the POTCAR for Ni .* is for Co"):
        create_labeler(label_settings(load_param(param_path)))


def test_compress_magmom():
    assert compress([0, 0, 0, 1.5, -1.5, -1.5, 0.00001]) == "3*0 1.5 2*-1.5 0"
    assert compress([1.23456]) == "1.2346"


@pytest.mark.parametrize("key,value,message", [
    ("fp_ldau", {"Ni": {"L": 5, "U": 6.3}}, "key 'fp_ldau/Ni'/L: expected an angular momentum 0..3"),
    ("fp_ldau", {"Ni": {"L": 2, "U": -1}}, "key 'fp_ldau/Ni'/U: expected a number >= 0"),
    ("fp_ldau", {"Ni": {"L": 2}}, "key 'fp_ldau/Ni': expected {\"L\": int"),
    ("fp_gpaw", {"ecut": -300.0}, "key 'fp_gpaw/ecut': expected a positive number"),
    ("fp_gpaw", {"h": 0.0}, "key 'fp_gpaw/h': expected a positive number, got 0.0"),
    ("fp_gpaw", {"kpts": [2, 2]}, "key 'fp_gpaw/kpts': expected three integers >= 1"),
    ("fp_gpaw", {"maxiter": 0}, "key 'fp_gpaw/maxiter': expected at least 1"),
    ("fp_gpaw", {"maxiter": 50, "retry_maxiter": 50},
     "key 'fp_gpaw/retry_maxiter': expected more SCF iterations than maxiter (50), got 50"),
    ("ratio_failed", 1.5, "key 'ratio_failed': expected a fraction in [0, 1]"),
    ("fp_moment_tolerance", 0.0, "key 'fp_moment_tolerance': expected a positive tolerance"),
])
def test_bad_label_settings(tmp_path, key, value, message):
    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, **{key: value}))
    with pytest.raises(InputError, match=re.escape(message)):
        label_settings(load_param(param_path))


def test_unknown_gpaw_key_and_nsw(tmp_path):
    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, fp_gpaw={"ecutt": 300.0}))
    with pytest.raises(InputError, match="Did you mean: ecut"):
        load_param(param_path)
    param_path = vasp_param(tmp_path / "v", "predicted")
    (tmp_path / "v" / "INCAR.tmpl").write_text("NSW = 50\nIBRION = 2\n")
    with pytest.raises(InputError, match="NSW = 50; labels are single points"):
        create_labeler(label_settings(load_param(param_path)))


def test_moment_levels_check():
    levels = {"Ni": (0.0, 1.0, 3.0)}
    assert moment_violation(["Ni", "O"], np.array([-1.3, 0.4]), levels, 0.5) is None
    reason = moment_violation(["Ni", "Ni", "O"], np.array([2.0, 1.8, 0.0]), levels, 0.5)
    assert reason.startswith("moment +2.00 uB of atom 0 (Ni) is 1.00 uB from the allowed magnitudes [0.0, 1.0, 3.0]")
    assert moment_violation(["Ni"], np.array([2.0]), None, 0.5) is None  # spin/moments "auto"


def test_gpaw_inputs_random_start_and_kspacing(tmp_path):
    from ase.build import bulk

    from spingen.labelers.kmesh import kpoint_mesh

    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, fp_spin_init="random"))
    stage = LabelStage(load_param(param_path), local_machine("spingen", tmp_path))
    lini = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    lini.symbols[[0, 2]] = "Li"
    write_candidates(tmp_path, 0, [candidate(lini, np.zeros(8))])
    ctx = make_stage(tmp_path, stage)
    (task,) = stage.path(ctx).glob("task.*")
    inp = json.loads((task / "gpaw_input.json").read_text())
    assert inp["kpts"] == [2, 2, 2] and not inp["fixmagmom"] and inp["random_start"]  # default kspacing 1.0
    moments = np.array(inp["initial_magmoms"])
    ni = np.array(inp["symbols"]) == "Ni"
    assert np.all(moments[~ni] == 0) and np.all(np.abs(moments[ni]) > 0) and np.all(np.abs(moments) <= 4.0)
    again = tmp_path / "again"
    again.mkdir()
    stage.labeler.write_inputs(again, ase.io.read(task / "frame.extxyz"), None, None)
    assert json.loads((again / "gpaw_input.json").read_text())["initial_magmoms"] == inp["initial_magmoms"]
    assert stage.labeler.command("/x/bin/spingen") == ("OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 "
                                                       "/x/bin/spingen label-task .")
    assert kpoint_mesh(bulk("NiO", "rocksalt", a=4.17).cell, [True] * 3, 1.0) == (3, 3, 3)
    assert kpoint_mesh(lini.cell, [True, True, False], 0.25) == (7, 7, 1)


# ---------------------------------------------------------------- fake VASP through dpdispatcher
FAKE_VASP = r'''
import json, re, sys, time, zlib
from pathlib import Path
cfg = json.loads(Path(sys.argv[1]).read_text())
Path(cfg["started_dir"], Path.cwd().name + ".started").touch()
time.sleep(cfg.get("sleep", 0))
species = Path("POSCAR").read_text().splitlines()[5].split()
incar = dict(l.split("=", 1) for l in Path("INCAR").read_text().splitlines() if "=" in l and not l.startswith("#"))
incar = {k.strip(): v.strip() for k, v in incar.items()}
text = Path(cfg["outcars"][" ".join(species) + "|" + incar.get("NUPDOWN", "-")]).read_text()
if cfg.get("energy_from_magmom"):  # distinct labels for distinct starts of one geometry
    shift = (zlib.crc32(incar.get("MAGMOM", "").encode()) % 1000) * 1e-4
    text = re.sub(r"(free  energy   TOTEN  =\s+)(-?\d+\.\d+)", lambda m: f"{m.group(1)}{float(m.group(2)) - shift:.8f}", text)
if cfg.get("turn_to_poscar"):  # the cell was turned (dpdata's perturb): turn the output's vectors with it
    import numpy as np
    lines = Path("POSCAR").read_text().splitlines()
    target = np.array([l.split()[:3] for l in lines[2:5]], float) * float(lines[1])
    lattice = r"(direct lattice vectors.*\n)((?:.*\n){3})"
    source = np.array([l.split()[:3] for l in re.findall(lattice, text)[-1][1].splitlines()], float)
    turn = np.linalg.solve(source, target)
    def rows(block, width):
        values = np.array([l.split()[:width] for l in block.splitlines()], float).reshape(-1, width // 3, 3)
        return "".join(" ".join(f"{v:14.8f}" for v in row) + "\n" for row in (values @ turn).reshape(-1, width))
    text = re.sub(lattice, lambda m: m.group(1) + rows(m.group(2), 6), text)
    table = r"(POSITION +TOTAL-FORCE.*\n -+\n)((?:(?! -).*\n)+)"
    text = re.sub(table, lambda m: m.group(1) + rows(m.group(2), 6), text)
task = Path.cwd().name
if task in cfg.get("truncated", []):  # the job died while writing: cut inside the first SCF
    text = text[:30000]
if task not in cfg.get("silent", []):  # killed before writing anything
    Path("OUTCAR").write_text(text)
    Path("vasprun.xml").write_text("<?xml version='1.0'?>\n<modeling></modeling>\n")
if len(list(Path(cfg["started_dir"]).iterdir())) >= cfg.get("fill_when_started", 1 << 30):
    with open(cfg["ballast"], "wb") as ballast:  # the disk fills up as the last job ends
        try:
            while True:
                ballast.write(bytes(65536))
                ballast.flush()
        except OSError:
            pass
'''


def fake_vasp(tmp_path: Path, outcars: dict, **cfg) -> str:
    script, config = tmp_path / "fake_vasp.py", tmp_path / "fake_vasp.json"
    (tmp_path / "started").mkdir(exist_ok=True)
    script.write_text(FAKE_VASP)
    config.write_text(json.dumps({"outcars": {k: str(v) for k, v in outcars.items()},
                                  "started_dir": str(tmp_path / "started"), **cfg}))
    return f"{sys.executable} {script} {config}"


def outcar_atoms(path: Path) -> Atoms:
    atoms = ase.io.read(path, format="vasp-out", index=-1)
    return Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)


def with_nelm(src: Path, dst: Path, nelm: int) -> Path:
    text = re.sub(r"(NELM\s*=\s*)\d+", lambda m: f"{m.group(1)}{nelm}", src.read_text(), count=1)
    dst.write_text(text)
    return dst


def vasp_settings(tmp_path: Path, type_map, spin_init: str, ratio_failed: float = 0.05, levels=None) -> LabelSettings:
    pp = fake_potcars(tmp_path / "pp", type_map)
    (tmp_path / "INCAR.tmpl").write_text("ENCUT = 520\nNELM = 100\n")
    vasp = VaspSettings({el: tmp_path / "pp" / f for el, f in pp.items()}, "ENCUT = 520\n", tmp_path / "INCAR.tmpl",
                        None, None)
    return LabelSettings("vasp", tuple(type_map), ("Fe",), spin_init, {}, levels, 0.5, ratio_failed, 10, 1, vasp=vasp)


def test_fake_vasp_make_run_collect(tmp_path):
    """FeO (2 states: the ground state converges, the excited one hits NELM) and K4Sn4O6, via real dpdispatcher."""
    type_map = ["Fe", "K", "Sn", "O"]
    feo, ksno = outcar_atoms(FEO), outcar_atoms(KSNO)
    unconverged = with_nelm(FEO, tmp_path / "OUTCAR.FeO_nelm6", 6)  # the last step took 6 electronic steps
    command = fake_vasp(tmp_path, {"Fe O|4": FEO, "Fe O|2": unconverged, "K Sn O|0": KSNO})
    write_candidates(tmp_path, 0, [candidate(feo, [3.0, 1.4, 0, 0], np.array([[3.0, -1.4, 0, 0]]).T)])
    write_candidates(tmp_path, 1, [candidate(ksno, np.zeros(14), np.zeros((14, 1)))])
    write_candidates(tmp_path, 2, [])  # explore found nothing for system 2
    settings = vasp_settings(tmp_path, type_map, "states", levels={"Fe": (1.4, 3.0)})
    stage = LabelStage(None, local_machine(command, tmp_path), settings)
    ctx = make_stage(tmp_path, stage)
    path = stage.path(ctx)
    assert stage.task_dirs(ctx) == ["task.000.000000", "task.000.000001", "task.001.000000"]
    assert incar_of(path / "task.000.000001")["NUPDOWN"] == "2"
    stage.run(ctx)
    with pytest.raises(RuntimeError) as err:
        stage.post(ctx)
    message = str(err.value)
    assert "1 of 3 label tasks failed (33.3 % > ratio_failed 5.0 %)" in message
    assert re.search(r"task\.000\.000001: OUTCAR: SCF not converged: 6 electronic steps = NELM 6", message)
    assert message.count("task.") == 1  # one line per failed task, nothing else
    # converged frames are kept, with the reference figures of tests/data/vasp/README.md
    fe = load_system(path / "data.000")
    assert fe.get_nframes() == 1 and fe.data["energies"][0] == pytest.approx(-28.21851457)
    np.testing.assert_allclose(fe.data["spins"][0, :, 2], [3.007, 1.397, -0.189, -0.189])
    assert fe.data["atom_names"] == type_map and "virials" in fe.data
    k = load_system(path / "data.001")
    assert k.data["energies"][0] == pytest.approx(-67.72457099)
    np.testing.assert_allclose(k.data["forces"][0, 0], [-0.061885, 0.059448, 0.060051])
    assert not (path / "data.002").exists()
    report = {e["task"]: e for e in json.loads((path / "labels.json").read_text())}
    assert report["task.000.000001"]["ok"] is False and report["task.000.000000"]["state"] == 0
    # the OUTCAR's total moment and the per-element sums the total-moment rule is fitted on
    assert report["task.000.000000"]["total_moment"] == pytest.approx(4.0)
    assert report["task.000.000000"]["moment_sums"] == {"Fe": pytest.approx(3.007 + 1.397)}
    # a tolerant ratio lets the run go on; collecting again adds nothing (no duplicate frames)
    lenient = LabelStage(None, stage.machine, vasp_settings(tmp_path, type_map, "states", 0.5, {"Fe": (1.4, 3.0)}))
    lenient.post(ctx)
    assert load_system(path / "data.000").get_nframes() == 1
    # moments far from the allowed levels exclude the frame
    strict = LabelStage(None, stage.machine, vasp_settings(tmp_path, type_map, "states", 1.0, {"Fe": (4.0, 5.0)}))
    atoms, result = strict.collect(path / "task.000.000000")
    assert not result.ok and "atom 1 (Fe) is 2.60 uB from the allowed magnitudes [4.0, 5.0]" in result.reason


def test_truncated_and_missing_outputs_are_excluded_counted_and_reported(tmp_path, caplog):
    """Jobs killed while writing (OUTCAR cut inside an SCF) or before (no OUTCAR), through the stage."""
    ksno = outcar_atoms(KSNO)
    write_candidates(tmp_path, 0, [candidate(ksno, np.eye(14)[4 + i] * (i + 1)) for i in range(4)])
    command = fake_vasp(tmp_path, {"K Sn O|-": KSNO}, energy_from_magmom=True,
                        truncated=["task.000.000001"], silent=["task.000.000002"])
    stage = LabelStage(None, local_machine(command, tmp_path), vasp_settings(tmp_path, ["K", "Sn", "O"],
                                                                             "predicted", ratio_failed=0.5))
    ctx = make_stage(tmp_path, stage)
    stage.run(ctx)
    with caplog.at_level("INFO", logger="spingen"):
        stage.post(ctx)
    path = stage.path(ctx)
    report = {e["task"]: e for e in json.loads((path / "labels.json").read_text())}
    assert [report[t]["ok"] for t in sorted(report)] == [True, False, False, True]
    assert "OUTCAR ends before VASP's closing timing block" in report["task.000.000001"]["reason"]
    assert report["task.000.000002"]["reason"].startswith("not finished: VASP wrote no OUTCAR")
    # both are unfinished: a resumed run_fp would run them again
    assert stage.labeler.is_finished(path / "task.000.000000") and not stage.labeler.is_finished(
        path / "task.000.000001")
    assert load_system(path / "data.000").get_nframes() == 2
    assert "fp: failed tasks: 2 in 4   50.00 %" in caplog.text
    assert "fp system 000: 2 converged, 2 failed in 4 task(s); +2 frame(s) in data.000" in caplog.text
    strict = LabelStage(None, stage.machine, vasp_settings(tmp_path, ["K", "Sn", "O"], "predicted", 0.25))
    with pytest.raises(RuntimeError, match=r"2 of 4 label tasks failed \(50.0 % > ratio_failed 25.0 %\)"):
        strict.post(ctx)
    assert load_system(path / "data.000").get_nframes() == 2, "collecting again adds nothing"


# ---------------------------------------------------------------- kill and resume
DRIVER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import test_label
test_label.drive(sys.argv[2], sys.argv[3])
'''


def drive(workdir: str, command: str) -> None:
    """The label stage under the real loop (make, run, post of iteration 0), as `spingen run` runs it."""
    from spingen.loop import Loop, setup_logging

    workdir = Path(workdir)
    setup_logging(workdir)
    settings = vasp_settings(workdir, ["K", "Sn", "O"], "predicted")
    os.chdir(workdir)
    Loop(workdir, [LabelStage(None, local_machine(command, workdir), settings)], 1, closing_stages=0).run()


def test_kill_during_run_then_resume(tmp_path):
    ksno = outcar_atoms(KSNO)
    starts = [np.eye(14)[4 + i] * (i + 1) for i in range(4)]  # four different starts on Sn: four labels
    write_candidates(tmp_path, 0, [candidate(ksno, m) for m in starts])
    command = fake_vasp(tmp_path, {"K Sn O|-": KSNO}, sleep=3, energy_from_magmom=True)
    driver = [sys.executable, "-c", DRIVER, str(HERE), str(tmp_path), command]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    first = subprocess.Popen(driver, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "started").glob("*.started")):
        assert first.poll() is None and time.monotonic() < deadline, "the run did not start its tasks"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    fp = tmp_path / "iter.000000" / "02.fp"
    assert (tmp_path / "record.spingen").read_text().split("\n")[-2] == "0 0"  # killed during run_fp
    assert not (fp / "data.000").exists()
    second = subprocess.run(driver, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "record.spingen").read_text().split("\n")[-2] == "0 2"
    system = load_system(fp / "data.000")
    hashes = frame_hashes(system)
    assert system.get_nframes() == 4 and len(set(hashes)) == 4
    assert len(set(np.round(system.data["energies"], 6))) == 4
    # a finished stage is not recomputed: a rerun with other resources submits nothing
    stage = LabelStage(None, local_machine("false", tmp_path), vasp_settings(tmp_path, ["K", "Sn", "O"], "predicted"))
    ctx = StageContext(tmp_path, 0)
    stage.run(ctx)
    stage.post(ctx)
    assert frame_hashes(load_system(fp / "data.000")) == hashes


def fill(path: Path) -> None:
    """Take every free byte of path's file system with one file."""
    with open(path, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def drive_into_a_broken_disk(workdir: str, command: str, fault: str) -> None:
    """drive(), with the file system filled or made read-only at the start of the label stage's post."""
    from spingen.loop import Loop, setup_logging

    class BrokenDiskAtPost(LabelStage):
        def post(self, ctx):
            if fault == "full":
                fill(Path(workdir) / "ballast")
            else:  # the stage folder becomes a read-only bind mount of itself
                folder = str(self.path(ctx))
                subprocess.run(["mount", "--bind", folder, folder], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
            super().post(ctx)

    workdir = Path(workdir)
    setup_logging(workdir)
    settings = vasp_settings(workdir, ["K", "Sn", "O"], "predicted")
    os.chdir(workdir)
    Loop(workdir, [BrokenDiskAtPost(None, local_machine(command, workdir), settings)], 1, closing_stages=0).run()


@pytest.fixture
def small_file_system(tmp_path):
    """A 32 MiB tmpfs at tmp_path/work (needs root, as the cluster tests do)."""
    work = tmp_path / "work"
    work.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(work)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full test: {mounted.stderr.strip()}")
    yield work
    subprocess.run(["umount", "-l", str(work)], check=True)


@pytest.mark.parametrize("fault, error", [("full", "No space left on device"),
                                          ("read-only", "Read-only file system")])
def test_broken_disk_at_data_collection_keeps_the_results_and_resumes(small_file_system, fault, error):
    work = small_file_system
    ksno = outcar_atoms(KSNO)
    write_candidates(work, 0, [candidate(ksno, np.eye(14)[4 + i] * (i + 1)) for i in range(3)])
    command = fake_vasp(work, {"K Sn O|-": KSNO}, energy_from_magmom=True)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    broken_driver = DRIVER.replace("test_label.drive(sys.argv[2], sys.argv[3])",
                                   "test_label.drive_into_a_broken_disk(*sys.argv[2:5])")
    broken = subprocess.run([sys.executable, "-c", broken_driver, str(HERE), str(work), command, fault], env=env,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and error in broken.stderr, broken.stderr[-2000:]
    fp = work / "iter.000000" / "02.fp"
    assert (work / "record.spingen").read_text().split("\n")[-2] == "0 1", "post_fp is not recorded"
    assert not (fp / "data.000").exists()
    assert [p.name for p in fp.iterdir() if p.name.startswith(".")] == [], "no temporary folder left"
    assert len(list(fp.glob("task.*/OUTCAR"))) == 3, "the labels already run are kept"
    started = {p.name: p.stat().st_mtime_ns for p in (work / "started").iterdir()}
    if fault == "full":
        (work / "ballast").unlink()
    else:
        assert subprocess.run(["touch", str(fp / "probe")], capture_output=True).returncode != 0
        subprocess.run(["umount", str(fp)], check=True)
    again = subprocess.run([sys.executable, "-c", DRIVER, str(HERE), str(work), command], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "record.spingen").read_text().split("\n")[-2] == "0 2"
    system = load_system(fp / "data.000")
    assert system.get_nframes() == 3 and len(set(frame_hashes(system))) == 3
    assert {p.name: p.stat().st_mtime_ns for p in (work / "started").iterdir()} == started, "no label task ran again"


def test_disk_filled_by_the_last_job_through_the_spingen_command(small_file_system, tmp_path):
    """`spingen init` (fake VASP) whose last job fills the disk: one message, run_fp not recorded, resumed
    after freeing space without running a job again."""
    work = small_file_system / "run"
    feo = outcar_atoms(FEO)
    ase.io.write(tmp_path / "POSCAR", feo, format="vasp")
    pp = fake_potcars(tmp_path / "pp", ["Fe", "O"])
    (tmp_path / "INCAR.tmpl").write_text("ENCUT = 520\nNELM = 100\n")
    training = make_param(tmp_path)["default_training_param"]
    training["model"]["descriptor"]["sel"] = [8, 16]
    param = make_param(tmp_path, type_map=["Fe", "O"], init_data_sys=[], sys_configs=[["POSCAR"]],
                       default_training_param=training, fp_style="vasp", fp_pp_path="pp", fp_pp_files=pp,
                       fp_incar="INCAR.tmpl", fp_ldau={"Fe": {"L": 2, "U": 4.0, "J": 0}},
                       spin={"magnetic": ["Fe"], "moments": {"Fe": [1.4, 3.0]}},
                       init_data_gen={"configs": ["POSCAR"], "pert_numb": 1, "pert_atom": 0, "pert_box": 0,
                                      "spin_states": [[3, 3], [3, -3]]})
    command = fake_vasp(tmp_path, {"Fe O|6": FEO, "Fe O|0": FEO}, energy_from_magmom=True, turn_to_poscar=True,
                        fill_when_started=2,
                        ballast=str(small_file_system / "ballast"))
    machine = make_machine(command)
    machine["fp"][0]["resources"].update(group_size=2, para_deg=1)  # one job, its two tasks in turn
    param_path, machine_path = write_inputs(tmp_path, param, machine)
    spingen = [str(BIN / "spingen"), "init", str(param_path), str(machine_path), "-w", str(work)]
    full = subprocess.run(spingen, capture_output=True, text=True, timeout=120)
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert re.match(r"spingen: stopped: No space left on device \(.+\); nothing recorded for the unfinished step: "
                    r"free the space or fix the permission and run the same command again$", last), last
    fp = work / "init" / "iter.000000" / "02.fp"
    assert (work / "init" / "record.spingen").read_text().split("\n")[-2] == "0 3", "make_fp done, run_fp not"
    assert not (fp / "data.000").exists()
    started = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "started").iterdir()}
    (small_file_system / "ballast").unlink()
    again = subprocess.run(spingen, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split() == [str(fp / "data.000")]
    assert load_system(fp / "data.000").get_nframes() == 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "started").iterdir()} == started, "no job ran again"


def test_spin_agreement_counts_the_states_dft_kept():
    """A ground state DFT kept (up to a global flip), an excited state DFT relaxed away from (one Ni
    reversed), and a label with no start moments (not counted)."""
    from spingen.labelers import LabelResult
    from spingen.stages.label import spin_agreement

    def label(state, start, dft, energy=-1.0, candidate=0):
        atoms = Atoms("LiNi2O", positions=np.zeros((4, 3)))
        if start is not None:
            atoms.arrays["initial_magmoms"] = np.array(start, dtype=float)
        atoms.info.update(state=state, system=0, source="candidates.000.extxyz", candidate=candidate)
        return atoms, LabelResult(True, energy=energy, forces=np.zeros((4, 3)), moments=np.array(dft, dtype=float))

    labeled = [label(0, [0, 1.7, -1.7, 0], [0.0, -1.65, 1.72, 0.1]),
               label(1, [0, 1.7, 1.7, 0], [0.0, 1.66, -1.7, 0.0], energy=-1.02),
               label(0, None, [0.0, 1.6, 1.6, 0.0], candidate=1)]
    agreement = spin_agreement(labeled, ["Ni"], tolerance=0.5)
    assert agreement == {"ions": 2, "agree": 2, "fraction": 1.0, "states": 2, "states_kept": 1,
                         "candidates_in_states": 1, "predicted_lowest": 0, "predicted_excess_meV_atom": pytest.approx(5.0)}
    assert spin_agreement(labeled[2:], ["Ni"], 0.5) is None
    # a second candidate whose predicted state DFT puts lowest; one labeled in its predicted state alone
    labeled += [label(0, [0, 1.7, 1.7, 0], [0.0, 1.7, 1.7, 0.0], -2.0, 2), label(1, [0, 1.7, -1.7, 0],
                [0.0, 1.7, -1.7, 0.0], -1.96, 2), label(0, [0, 1.7, 1.7, 0], [0.0, 1.7, 1.7, 0.0], -3.0, 3)]
    agreement = spin_agreement(labeled, ["Ni"], tolerance=0.5)
    assert (agreement["candidates_in_states"], agreement["predicted_lowest"]) == (2, 1)
    assert agreement["predicted_excess_meV_atom"] == pytest.approx(2.5)


# ---------------------------------------------------------------- real GPAW
# only these tests need GPAW; the fake-VASP and kill/resume tests above run without it
needs_gpaw = pytest.mark.skipif(importlib.util.find_spec("gpaw") is None,
                                reason="GPAW is not installed: run scripts/install_gpaw.sh")


def nio_cell() -> Atoms:
    from ase.build import bulk

    return bulk("NiO", "rocksalt", a=4.17)


def gpaw_stage(root: Path, context: str = "LocalContext", **overrides) -> LabelStage:
    param = make_param(root, spin={"magnetic": ["Ni"], "moments": {"Ni": [0, 1.8]}}, fp_spin_init="states",
                       fp_gpaw={"ecut": 300.0, "kpts": [2, 2, 2], **overrides})
    machine = make_machine(str(BIN / "spingen"))
    machine["fp"][0]["machine"]["context_type"] = context
    param_path, machine_path = write_inputs(root, param, machine)
    return LabelStage(load_param(param_path), load_machine(machine_path).fp)


@needs_gpaw
@pytest.mark.slow
def test_gpaw_states_converge_to_different_moments_and_energies(tmp_path):
    stage = gpaw_stage(tmp_path)
    write_candidates(tmp_path, 0, [candidate(nio_cell(), [1.8, 0.0], np.array([[0.0, 0.0]]).T)])
    ctx = make_stage(tmp_path, stage)
    path = stage.path(ctx)
    inputs = [json.loads((path / t / "gpaw_input.json").read_text()) for t in stage.task_dirs(ctx)]
    assert [i["total_moment"] for i in inputs] == [2.0, 0.0] and all(i["fixmagmom"] for i in inputs)
    assert sum(inputs[0]["initial_magmoms"]) == pytest.approx(2.0) and inputs[0]["setups"] == {"Ni": ":d,6.3"}
    stage.run(ctx)  # `spingen label-task` through dpdispatcher
    stage.post(ctx)
    system = load_system(path / "data.000")
    assert system.get_nframes() == 2
    moments, energies = system.data["spins"][:, 0, 2], system.data["energies"]
    assert moments[0] == pytest.approx(1.75, abs=0.2) and abs(moments[1]) < 0.05  # Ni moment: high vs zero
    assert energies[1] - energies[0] > 0.3  # the non-magnetic state is higher in energy
    assert np.abs(system.data["forces"]).max() < 1e-3  # rocksalt: forces vanish by symmetry
    assert system.data["virials"].shape == (2, 3, 3)
    result = json.loads((path / "task.000.000000" / "result.json").read_text())
    assert result["ok"] and result["total_moment"] == pytest.approx(2.0, abs=1e-4)


@needs_gpaw
def test_a_second_copy_of_a_label_job_waits_for_the_first_and_keeps_its_result(tmp_path):
    from spingen.tasks.lock import LOCK_FILE, exclusive_task

    stage = gpaw_stage(tmp_path)
    write_candidates(tmp_path, 0, [candidate(nio_cell(), [1.8, 0.0])])
    task = stage.path(make_stage(tmp_path, stage)) / "task.000.000000"
    first = {"ok": False, "reason": "written by the first copy"}
    with exclusive_task(task):  # the first copy is running
        second = subprocess.Popen([str(BIN / "spingen"), "label-task", str(task)], stdout=subprocess.PIPE, text=True)
        lock = str(task / LOCK_FILE)
        deadline = time.time() + 60
        while time.time() < deadline and not any(os.path.realpath(fd) == lock
                                                 for fd in Path(f"/proc/{second.pid}/fd").glob("*")):
            time.sleep(0.05)
        time.sleep(0.5)
        assert second.poll() is None, "the second copy must wait for the lock"
        (task / "result.json").write_text(json.dumps(first))
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and "label-task: failed: written by the first copy" in out
    assert json.loads((task / "result.json").read_text()) == first


@needs_gpaw
@pytest.mark.slow
def test_gpaw_unconverged_is_a_failed_frame(tmp_path):
    stage = gpaw_stage(tmp_path, maxiter=2)
    write_candidates(tmp_path, 0, [candidate(nio_cell(), [1.8, 0.0])])
    ctx = make_stage(tmp_path, stage)
    task = stage.path(ctx) / "task.000.000000"
    done = subprocess.run([str(BIN / "spingen"), "label-task", str(task)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0 and "label-task: failed: SCF not converged" in done.stdout
    stage.run(ctx)  # finished (failed) tasks are not run again
    with pytest.raises(RuntimeError, match=r"1 of 1 label tasks failed .*\n  task\.000\.000000: SCF not converged "
                                           r"within maxiter = 2 iterations \(GPAW KohnShamConvergenceError\)$"):
        stage.post(ctx)
    assert not (stage.path(ctx) / "data.000").exists()


@needs_gpaw
@pytest.mark.slow
def test_an_unconverged_gpaw_scf_runs_once_more_with_retry_maxiter(tmp_path):
    """fp_gpaw/retry_maxiter: a frame whose SCF stopped at maxiter runs again from the start with more
    iterations, through dpdispatcher in the same run step; the first attempt's result and log are kept."""
    stage = gpaw_stage(tmp_path, maxiter=2, retry_maxiter=80)
    write_candidates(tmp_path, 0, [candidate(nio_cell(), [1.8, 0.0])])
    ctx = make_stage(tmp_path, stage)
    task = stage.path(ctx) / "task.000.000000"
    stage.run(ctx)
    first = json.loads((task / "result.maxiter2.json").read_text())
    assert not first["ok"] and "within maxiter = 2 iterations" in first["reason"]
    assert (task / "gpaw.maxiter2.txt").is_file()
    result = json.loads((task / "result.json").read_text())
    assert result["ok"] and result["maxiter"] == 80 and 2 < result["iterations"] <= 80
    assert not stage.labeler.retry(task)  # converged: never again
    stage.post(ctx)
    assert load_system(stage.path(ctx) / "data.000").get_nframes() == 1
    entry, = json.loads((stage.path(ctx) / "labels.json").read_text())
    assert entry["ok"] and entry["earlier_attempts"] == [first["reason"]]


@needs_gpaw
def test_no_scf_retry_where_dpdispatcher_keeps_the_finished_tags(tmp_path, caplog):
    """LazyLocalContext runs in the task folders and keeps dpdispatcher's finished tags: a second submission
    would be taken as done, so the stage says it does not retry and leaves the failed result in place."""
    stage = gpaw_stage(tmp_path, context="LazyLocalContext", maxiter=2, retry_maxiter=80)
    write_candidates(tmp_path, 0, [candidate(nio_cell(), [1.8, 0.0])])
    ctx = make_stage(tmp_path, stage)
    task = stage.path(ctx) / "task.000.000000"
    with caplog.at_level(logging.WARNING, logger="spingen"):
        stage.run(ctx)
    assert "no SCF retry with LazyLocalContext" in caplog.text
    assert not json.loads((task / "result.json").read_text())["ok"] and not (task / "result.maxiter2.json").exists()

