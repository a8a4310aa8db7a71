"""Bad input: one clear message naming the key or file, before anything is written or submitted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from conftest import make_machine, make_param, write_inputs, write_poscar

from spingen.cli import main
from spingen.schema import InputError, load_machine, load_param


def set_key(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    for key in keys[:-1]:
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    if value is DELETE:
        del tree[keys[-1]]
    else:
        tree[keys[-1]] = value


DELETE = object()

PARAM_CASES = [
    ("unknown key with suggestion", "numb_model", 4, "undefined key `numb_model` is not allowed in strict mode. Did you mean: numb_models?"),
    ("wrong type", "numb_models", "four", "key `numb_models` gets wrong value type"),
    ("missing required key", "type_map", DELETE, "key `type_map` is required"),
    ("missing init data", "init_data_sys", ["data/nowhere"], "key 'init_data_sys': 'data/nowhere' not found"),
    ("empty sys_configs glob", "sys_configs", [["confs/*.vasp"]], "key 'sys_configs[0]': the globs ['confs/*.vasp'] match no file"),
    ("type_map vs data", "type_map", ["Li", "Ni", "F"], "elements ['O'] are not in type_map ['Li', 'Ni', 'F']"),
    ("magnetic element not in type_map", "spin/magnetic", ["Fe"], "key 'spin/magnetic': element 'Fe' is not in type_map"),
    ("moments for a non-magnetic element", "spin/moments", {"Ni": [1, 3], "O": [0]}, "key 'spin/moments/O': 'O' is not in spin/magnetic"),
    ("moments missing an element", "spin/moments", {}, "key 'spin/moments': no magnitudes for ['Ni']"),
    ("negative magnitude", "spin/moments", {"Ni": [-1]}, "key 'spin/moments/Ni': expected a non-empty list of magnitudes >= 0"),
    ("moments not auto", "spin/moments", "guess", "key 'spin/moments': expected a mapping element -> magnitudes or \"auto\""),
    ("eta/d overlap", "spin/offset", 0.3, "put the virtual atom within 0.05 A of its ion"),
    ("eta not positive", "spin/virtual_scale", 0.0, "key 'spin/virtual_scale': expected a positive eta"),
    ("no magnetic element", "spin/magnetic", [], "key 'spin/magnetic': expected at least one magnetic element"),
    ("unknown spin key", "spin/virtual_sacle", 0.3, "Did you mean: virtual_scale?"),
    ("unknown flip symmetry", "spin/flip_symmetry", "twins", "key 'spin/flip_symmetry': expected one of ['augment', 'canonical', 'none'], got \"twins\""),
    ("trust lo > hi", "model_devi_f_trust_lo", 0.5, "'model_devi_f_trust_lo' (0.5) > 'model_devi_f_trust_hi' (0.3)"),
    ("no model_devi_jobs", "model_devi_jobs", [], "key 'model_devi_jobs': expected at least one job (iteration 0)"),
    ("sys_idx out of range", "model_devi_jobs/0/sys_idx", [3], "key 'model_devi_jobs[0]/sys_idx': index 3 is not in 0..0"),
    ("bad ensemble", "model_devi_jobs/0/ensemble", "nve-ish", "key 'model_devi_jobs[0]/ensemble': expected one of"),
    ("missing nsteps", "model_devi_jobs/0/nsteps", DELETE, "key `nsteps` is required"),
    ("bad fp_style", "fp_style", "cp2k", "fp_style"),
    ("bad fp_spin_init", "fp_spin_init", "guess", "key 'fp_spin_init': expected one of ['predicted', 'random', 'states', 'members', 'sectors']"),
    ("fp_ldau for unknown element", "fp_ldau", {"Fe": {"L": 2, "U": 4}}, "key 'fp_ldau/Fe': 'Fe' is not in type_map"),
    ("mass_map length", "mass_map", [6.9, 58.7], "key 'mass_map': expected \"auto\" or 3 masses"),
    ("unknown element", "type_map", ["Li", "Ni", "O", "Xx"], "unknown element symbols ['Xx']"),
    ("duplicate type", "type_map", ["Li", "Ni", "Ni"], "key 'type_map': expected distinct element symbols"),
    ("trust level wrong type", "model_devi_f_trust_hi", "high", "key `model_devi_f_trust_hi` gets wrong value type"),
    ("empty init_data_sys", "init_data_sys", [], "key 'init_data_sys': expected at least one deepmd/npy system"),
    ("DP-GEN's model_devi_engine", "model_devi_engine", "lammps", "key 'model_devi_engine' is DP-GEN's: spingen has "
     "one exploration engine (ASE MD with spin search); remove model_devi_engine"),
    ("unknown sys_format", "sys_format", "lammps/lmp", "key 'sys_format': 'lammps/lmp' is not a structure format ASE reads"),
    ("NaN trust level", "model_devi_f_trust_lo", float("nan"), "key 'model_devi_f_trust_lo': NaN is not a value"),
    ("negative trust level", "model_devi_f_trust_lo", -0.1, "key 'model_devi_f_trust_lo': expected a deviation >= 0, got -0.1"),
    ("fp_task_min > fp_task_max", "fp_task_min", 5, "keys 'fp_task_min' (5) > 'fp_task_max' (4): expected fp_task_min <= fp_task_max"),
    ("no ensemble", "numb_models", 1, "key 'numb_models': expected at least 2 models, got 1"),
    ("no model", "numb_models", 0, "key 'numb_models': expected at least 2 models, got 0"),
    ("reuse steps without init model", "training_reuse_numb_steps", 500, "keys 'training_reuse_numb_steps'/"
     "'training_reuse_start_lr' apply to a model that starts from its predecessor: set training_init_model true"),
    ("init data ratio of 1", "training_init_data_ratio", 1.0, "key 'training_init_data_ratio': expected a share "
     "between 0 and 1 (exclusive), got 1.0"),
    ("no reuse steps", "training_reuse_numb_steps", 0, "key 'training_reuse_numb_steps': expected at least 1 "
     "training step, got 0"),
    ("skip beyond every frame", "model_devi_skip", 20, "key 'model_devi_skip' (20): model_devi_jobs[0] writes its last "
     "frame at step 10 (nsteps 10, trj_freq 5)"),
    ("time step of 2 ps", "model_devi_dt", 2.0, "key 'model_devi_dt': 2.0 ps is no MD time step: the unit is ps, as in DP-GEN"),
    ("negative temperature", "model_devi_jobs/0/temps", [300, -300], "key 'model_devi_jobs[0]/temps': expected numbers "
     "(K, >= 0), got [300, -300]"),
    ("string temperature", "model_devi_jobs/0/temps", ["300 K"], "key 'model_devi_jobs[0]/temps': expected numbers (K, >= 0), "
     "got ['300 K']"),
    ("empty sys_idx", "model_devi_jobs/0/sys_idx", [], "key 'model_devi_jobs[0]/sys_idx': expected at least one index"),
    ("virtual atom beyond rcut", "spin/moments", {"Ni": [1, 15]}, "keys 'spin/moments/Ni' and 'default_training_param/model/"
     "descriptor/rcut': a moment of 15 uB puts the virtual atom eta*S + d = 4.7 A from its ion, beyond rcut 4 A"),
    ("U < J", "fp_ldau", {"Ni": {"L": 2, "U": 1, "J": 2}}, "key 'fp_ldau/Ni': U (1) < J (2): Dudarev's DFT+U"),
    ("unknown GPAW xc", "fp_gpaw", {"xc": "PBE96"}, "key 'fp_gpaw/xc': 'PBE96' is no exchange-correlation functional "
     "GPAW knows (one of LDA, PW91, PBE"),
    ("GPAW xc in lower case", "fp_gpaw", {"xc": "pbe"}, "key 'fp_gpaw/xc': 'pbe' is no exchange-correlation functional "
     "GPAW knows; did you mean PBE?"),
    ("empty training param", "default_training_param", {}, "key 'default_training_param': deepmd-kit refuses the "
     "input.json the train stage writes from it: [at location `model/descriptor`] key `type` is required"),
    ("misspelt descriptor", "default_training_param/model/descriptor/type", "se_e2a", "key 'default_training_param': "
     "deepmd-kit refuses the input.json the train stage writes from it: [at location `model/descriptor`] get invalid "
     "choice `se_e2a` for flag key `type`.Did you mean: se_e2_a?"),
    ("sel of the wrong length", "default_training_param/model/descriptor/sel", [8, 8], "key 'default_training_param/"
     "model/descriptor/sel': expected one neighbour count per type_map entry (3: Li Ni O), got [8, 8]"),
    ("no training step", "default_training_param/training/numb_steps", 0, "key 'default_training_param/training/"
     "numb_steps': expected at least 1 training step, got 0"),
]


def assert_refused(capsys, root: Path, args: list[str], message: str, file: Path) -> str:
    """`spingen ARGS` stops with one message naming the file, before anything is written or submitted."""
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and str(file) in err, "one message naming the file"
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing written, nothing submitted"
    return err


@pytest.mark.parametrize("key,value,message", [c[1:] for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_param(tmp_path, capsys, key, value, message):
    param = make_param(tmp_path)
    set_key(param, key, value)
    param_path, machine_path = write_inputs(tmp_path, param)
    assert_refused(capsys, tmp_path, ["run", str(param_path), str(machine_path)], message, param_path)


@pytest.mark.parametrize("key,value,message", [
    ("auto_prob", "prob_uniform", "keys 'training_init_data_ratio' and 'default_training_param/training/training_data/"
     "auto_prob' both set how often each system is drawn: keep one"),
    ("batch_size", "filter:20", "key 'training_init_data_ratio' needs every system the train stage lists to be trained "
     "on, in that order"),
])
def test_the_init_data_ratio_refuses_what_would_draw_other_systems(tmp_path, capsys, key, value, message):
    param = make_param(tmp_path, training_init_data_ratio=0.5)
    param["default_training_param"]["training"]["training_data"][key] = value
    param_path, machine_path = write_inputs(tmp_path, param)
    assert_refused(capsys, tmp_path, ["run", str(param_path), str(machine_path)], message, param_path)


def poscar_with(path: Path, species: str, counts: str) -> Path:
    """A VASP 5 POSCAR of 8 atoms (written as Li Ni O, 2 2 4) whose species and counts lines are replaced."""
    write_poscar(path)
    atoms = ase.io.read(path, format="vasp")
    ase.io.write(path, atoms, format="vasp", sort=True)
    lines = path.read_text().splitlines()
    lines[5], lines[6] = species, counts
    path.write_text("\n".join(lines) + "\n")
    return path


STRUCTURE_CASES = [  # what sys_configs points to: a folder, a file and its text, or a POSCAR's species/counts
    ("a directory", "dir", None, "is a directory; expected a structure file (vasp)"),
    ("a text file", "notes.txt", "temperature ramp 300 -> 900 K\n", "notes.txt' as vasp (RuntimeError"),
    ("an element not in type_map", "POSCAR", ("Li Ni Fe", "2 2 4"), "elements ['Fe'] are not in type_map ['Li', 'Ni', 'O']"),
    ("counts vs species line", "POSCAR", ("Li Ni O", "2 2"), "its species line names 3 element(s) (Li Ni O) but its "
     "counts line has 2 number(s) (2 2)"),
    ("counts vs coordinates", "POSCAR", ("Li Ni O", "2 2 3"), "its counts (2 2 3) add up to 7 atoms but 8 coordinate "
     "lines follow"),
    ("no magnetic ion", "POSCAR", ("Li O", "4 4"), "holds no magnetic ion of spin/magnetic ['Ni'] to explore"),
]


@pytest.mark.parametrize("name,content,message", [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
def test_bad_structure_to_explore(tmp_path, capsys, name, content, message):
    """Every sys_configs file is opened at load time, not at the first explore step hours later."""
    param = make_param(tmp_path, sys_configs=[[f"mine/{name}"]])
    target = tmp_path / "mine" / name
    target.parent.mkdir()
    if content is None:
        target.mkdir()
    elif isinstance(content, str):
        target.write_text(content)
    else:
        poscar_with(target, *content)
    param_path, machine_path = write_inputs(tmp_path, param)
    err = assert_refused(capsys, tmp_path, ["check", str(param_path), str(machine_path)], message, param_path)
    assert "key 'sys_configs[0]': " in err and str(target) in err


def test_dpgen_sys_format_is_read_as_ase_vasp(tmp_path, capsys):
    param = make_param(tmp_path, sys_format="vasp/poscar")
    param["init_data_gen"] = {"configs": ["confs/POSCAR"], "pert_numb": 1, "spin_states": [[1, 1]]}
    param_path, machine_path = write_inputs(tmp_path, param)
    assert load_param(param_path).raw["sys_format"] == "vasp"
    assert main(["check", str(param_path), str(machine_path)]) == 0


def test_swapped_arguments_are_named(tmp_path, capsys):
    param_path, machine_path = write_inputs(tmp_path)
    assert_refused(capsys, tmp_path, ["check", str(machine_path), str(param_path)], "machine.json: this is a "
                   "machine.json (keys ['fp', 'model_devi', 'train']), not a param.json: give PARAM first, then MACHINE "
                   "(swapped?)", machine_path)
    with pytest.raises(InputError, match=r"param.json: this is a param.json \(key 'type_map'\), not a machine.json"):
        load_machine(param_path)


def test_vasp_style_needs_its_files(tmp_path):
    param = make_param(tmp_path, fp_style="vasp", fp_pp_path="pp", fp_pp_files=["Li", "Ni"], fp_incar="INCAR")
    with pytest.raises(InputError, match=r"key 'fp_pp_files': expected 3 POTCARs"):
        load_param(write_inputs(tmp_path, param)[0])
    param["fp_pp_files"] = {"Li": "POTCAR.Li", "Ni": "POTCAR.Ni", "O": "POTCAR.O"}
    with pytest.raises(InputError, match=r"POTCAR 'POTCAR.Li' not found"):
        load_param(write_inputs(tmp_path, param)[0])
    (tmp_path / "pp").mkdir()
    for name in param["fp_pp_files"].values():
        (tmp_path / "pp" / name).write_text("PAW\n")
    with pytest.raises(InputError, match=r"key 'fp_incar': file 'INCAR' not found"):
        load_param(write_inputs(tmp_path, param)[0])
    (tmp_path / "INCAR").write_text("ENCUT = 520\n")
    assert load_param(write_inputs(tmp_path, param)[0]).raw["fp_style"] == "vasp"


def test_data_without_spins_is_refused_for_spin_models(tmp_path):
    param = make_param(tmp_path)
    (tmp_path / "data" / "init" / "set.000" / "spin.npy").unlink()
    with pytest.raises(InputError, match=r"no spin.npy in its sets"):
        load_param(write_inputs(tmp_path, param)[0])
    param["spin"]["enabled"] = False
    assert load_param(write_inputs(tmp_path, param)[0]).spin.enabled is False


def test_auto_moments_check_overlap_against_the_data(tmp_path):
    param = make_param(tmp_path)
    param["spin"]["moments"] = "auto"
    spin_file = tmp_path / "data" / "init" / "set.000" / "spin.npy"
    spins = np.load(spin_file)
    spins[0, 14] = -0.66  # atom 4 (a Ni), z component: 0.3 * -0.66 + 0.2 = 0.002 A
    np.save(spin_file, spins)
    with pytest.raises(InputError, match=r"Ni moment\(s\) \[-0.66\] uB put the virtual atom"):
        load_param(write_inputs(tmp_path, param)[0])


MACHINE_CASES = [
    ("bad batch_type", "train/machine/batch_type", "Slurmm", "Slurmm"),
    ("typo in resources", "train/resources/queu_name", "debug", "Did you mean: queue_name?"),
    ("missing section", "fp", DELETE, "key `fp` is required"),
    ("missing command", "model_devi/command", DELETE, "key `command` is required"),
    ("wrong type", "train/resources/cpu_per_node", "two", "key `cpu_per_node` gets wrong value type"),
    ("list of two", "fp", [{}, {}], "key 'fp': expected a dict or a list of one dict, got a list of 2"),
    ("missing machine block", "model_devi/machine", DELETE, "key 'model_devi/machine' is missing: each section needs "
     "command, machine"),
    ("empty command", "train/command", " ", "key 'train/command' is empty"),
    ("negative group_size", "train/resources/group_size", -1, "key 'train/resources/group_size': expected the "
     "tasks per job, >= 1 (0: every task in one job), got -1"),
    ("local command found nowhere", "train/command", "dp_nowhere --pt", "key 'train/command': 'dp_nowhere' is not on "
     "PATH (nor in"),
    ("local command path missing", "fp/command", "/nowhere/bin/spingen", "key 'fp/command': '/nowhere/bin/spingen' is "
     "not an executable file"),
    ("pre-1.0 top-level keys", "train_machine", {"machine_type": "slurm"}, "this is DP-GEN's pre-1.0 machine format "
     "(key 'train_machine'); api_version 1.0 is expected"),
    ("pre-1.0 machine_type", "train/machine/machine_type", "slurm", "this is DP-GEN's pre-1.0 machine format (key "
     "'train/machine/machine_type'); api_version 1.0 is expected"),
    ("pre-1.0 api_version", "api_version", "0.9", "pre-1.0 machine format (key 'api_version')"),
]


@pytest.mark.parametrize("key,value,message", [c[1:] for c in MACHINE_CASES], ids=[c[0] for c in MACHINE_CASES])
def test_bad_machine(tmp_path, capsys, key, value, message):
    machine = make_machine()
    machine["fp"] = machine["fp"][0] if key.startswith("fp/") else machine["fp"]
    set_key(machine, key, value)
    param_path, machine_path = write_inputs(tmp_path, machine=machine)
    assert_refused(capsys, tmp_path, ["check", str(param_path), str(machine_path)], message, machine_path)


def test_pre_1_0_machine_points_to_the_conversion(tmp_path):
    machine = {"train_machine": {"machine_type": "slurm", "hostname": "hpc", "work_path": "/scratch"},
               "train_resources": {"numb_node": 1}, "deepmd_path": "/opt/deepmd", "model_devi_machine": {}}
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(machine))
    with pytest.raises(InputError) as err:
        load_machine(path)
    assert "https://docs.deepmodeling.com/projects/dpgen/en/latest/run/example-of-machine.html" in str(err.value)


def test_local_command_beside_this_python_is_used(tmp_path, monkeypatch, capsys):
    """`.venv/bin/spingen run` without the venv on PATH: local tasks run the venv's dp and spingen."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    machine = make_machine("dp")
    machine["model_devi"]["command"] = "OMP_NUM_THREADS=1 spingen"
    param_path, machine_path = write_inputs(tmp_path, machine=machine)
    machines = load_machine(machine_path)
    bin_dir = Path(sys.executable).parent
    assert machines.train.command == str(bin_dir / "dp")
    assert machines.model_devi.command == f"OMP_NUM_THREADS=1 {bin_dir / 'spingen'}"
    assert main(["check", str(param_path), str(machine_path)]) == 0
    assert f"Shell/LocalContext: {bin_dir / 'dp'}" in capsys.readouterr().out


def test_check_writes_no_dpdispatcher_log(tmp_path):
    """dpdispatcher's logger makes dpdispatcher.log in the current folder at import: not in `check`."""
    param_path, machine_path = write_inputs(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    result = subprocess.run([sys.executable, "-m", "spingen", "check", str(param_path), str(machine_path)], cwd=here,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(here.iterdir()) == []


def test_dpgen_machine_file_works_unchanged(tmp_path):
    """A DP-GEN machine.json (sections as one-element lists, no spingen keys) loads as is."""
    section = {"command": "dp", "machine": {"batch_type": "Slurm", "context_type": "SSHContext",
                                            "local_root": "./", "remote_root": "/scratch/u/work",
                                            "remote_profile": {"hostname": "hpc", "username": "u"}},
               "resources": {"number_node": 1, "cpu_per_node": 4, "gpu_per_node": 1, "queue_name": "gpu",
                             "group_size": 1, "custom_flags": ["#SBATCH --time=2:00:00"]}}
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({"api_version": "1.0", "deepmd_version": "2.2.7", "train": [section],
                                "model_devi": [section], "fp": [section]}))
    machines = load_machine(path)
    assert machines.fp.machine["batch_type"] == "Slurm" and machines.train.check_interval == 30


def test_invalid_json_names_the_line(tmp_path):
    param_path, machine_path = write_inputs(tmp_path)
    param_path.write_text('{"type_map": ["Li",]}')
    with pytest.raises(InputError, match=r"param.json: not valid JSON \(line 1, column 20"):
        load_param(param_path)
    with pytest.raises(InputError, match=r"machine file '.*nothere.json' not found"):
        load_machine(tmp_path / "nothere.json")


def test_check_prints_a_summary(tmp_path, capsys):
    param_path, machine_path = write_inputs(tmp_path)
    assert main(["check", str(param_path), str(machine_path)]) == 0
    out = capsys.readouterr().out
    assert "magnetic Ni; eta 0.3 A/uB, d 0.2 A" in out and "nothing was submitted" in out
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["confs", "data", "machine.json", "param.json"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "machine_examples").glob("*.json")),
                         ids=lambda p: p.name)
def test_machine_examples_load(path):
    machines = load_machine(path)
    assert machines.train.command and machines.fp.resources["number_node"] == 1
