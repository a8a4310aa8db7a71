"""Bad input: one clear message naming the key or file, before anything is written or submitted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_machine, make_param, write_inputs

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
    ("bad fp_spin_init", "fp_spin_init", "guess", "key 'fp_spin_init': expected one of ['predicted', 'random', 'states', 'members']"),
    ("fp_ldau for unknown element", "fp_ldau", {"Fe": {"L": 2, "U": 4}}, "key 'fp_ldau/Fe': 'Fe' is not in type_map"),
    ("mass_map length", "mass_map", [6.9, 58.7], "key 'mass_map': expected \"auto\" or 3 masses"),
    ("unknown element", "type_map", ["Li", "Ni", "O", "Xx"], "unknown element symbols ['Xx']"),
    ("duplicate type", "type_map", ["Li", "Ni", "Ni"], "key 'type_map': expected distinct element symbols"),
    ("trust level wrong type", "model_devi_f_trust_hi", "high", "key `model_devi_f_trust_hi` gets wrong value type"),
    ("empty init_data_sys", "init_data_sys", [], "key 'init_data_sys': expected at least one deepmd/npy system"),
]


@pytest.mark.parametrize("key,value,message", [c[1:] for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_param(tmp_path, capsys, key, value, message):
    param = make_param(tmp_path)
    set_key(param, key, value)
    param_path, machine_path = write_inputs(tmp_path, param)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(param_path), str(machine_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and str(param_path) in err, "one message naming the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written, nothing submitted"


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
]


@pytest.mark.parametrize("key,value,message", [c[1:] for c in MACHINE_CASES], ids=[c[0] for c in MACHINE_CASES])
def test_bad_machine(tmp_path, capsys, key, value, message):
    machine = make_machine()
    machine["fp"] = machine["fp"][0] if key.startswith("fp/") else machine["fp"]
    set_key(machine, key, value)
    param_path, machine_path = write_inputs(tmp_path, machine=machine)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check", str(param_path), str(machine_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(machine_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


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
