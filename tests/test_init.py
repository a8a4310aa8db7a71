"""Initial data made by spingen: init_data_gen keys, the perturb stage, and a real GPAW `spingen init`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BIN, make_machine, make_param, write_inputs

from spingen.cli import main
from spingen.schema import InputError, auto_spin_states, load_param


def gen_param(root, **gen):
    param = make_param(root, init_data_sys=[])
    param["init_data_gen"] = {"configs": ["confs/POSCAR"], "pert_numb": 3, "spin_states": [[1, 1], [1, -1]], **gen}
    return param


def test_auto_spin_states_are_ferro_and_antiferro_per_level_without_repeats():
    states = auto_spin_states(["Ni", "Ni", "Co"], {"Ni": (1.0, 3.0), "Co": (0.0,)})
    assert states == ((1.0, 1.0, 0.0), (1.0, -1.0, 0.0), (3.0, 3.0, 0.0), (3.0, -3.0, 0.0))
    assert auto_spin_states(["Co", "Co"], {"Co": (0.0,)}) == ((0.0, 0.0),)


@pytest.mark.parametrize("gen, message", [
    ({"spin_states": [[1, 1, 1]]}, "init_data_gen/spin_states'[0]: expected 2 moments (uB), one per magnetic ion"),
    ({"spin_states": []}, "init_data_gen/spin_states': expected at least one state"),
    ({"configs": ["nothing*"]}, "init_data_gen/configs': the globs ['nothing*'] match no file"),
    ({"pert_numb": 0}, "init_data_gen/pert_numb': expected at least 1"),
    ({"pert_atom": -0.1}, "init_data_gen/pert_atom': expected a value >= 0"),
])
def test_bad_init_data_gen(tmp_path, gen, message):
    param_path, _ = write_inputs(tmp_path, gen_param(tmp_path, **gen))
    with pytest.raises(InputError) as err:
        load_param(param_path)
    assert message in str(err.value)


def test_auto_states_need_explicit_levels_and_empty_init_data_needs_gen(tmp_path):
    param = gen_param(tmp_path, spin_states="auto")
    param["spin"]["moments"] = "auto"
    param_path, _ = write_inputs(tmp_path, param)
    with pytest.raises(InputError, match="spin/moments is \"auto\" too"):
        load_param(param_path)
    param_path, _ = write_inputs(tmp_path, make_param(tmp_path, init_data_sys=[]))
    with pytest.raises(InputError, match="'init_data_sys': expected at least one deepmd/npy system"):
        load_param(param_path)


def test_perturb_stage_writes_every_geometry_in_every_state_reproducibly(tmp_path):
    import ase.io

    from spingen.layout import INIT_DIR
    from spingen.loop import StageContext
    from spingen.stages.init import PerturbStage

    param_path, _ = write_inputs(tmp_path, gen_param(tmp_path, pert_numb=3))
    param = load_param(param_path)
    frames = []
    for run in range(2):
        ctx = StageContext(tmp_path / f"w{run}" / INIT_DIR, 0)
        stage = PerturbStage(param)
        stage.path(ctx).mkdir(parents=True)
        stage.make(ctx)
        frames.append(ase.io.read(stage.path(ctx) / "candidates.000.extxyz", index=":"))
    first, again = frames
    assert len(first) == 3 * 2
    for a, b in zip(first, again):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell[:], b.cell[:])
    base = ase.io.read(tmp_path / "confs" / "POSCAR")
    ni = [i for i, s in enumerate(base.get_chemical_symbols()) if s == "Ni"]
    geometries = {tuple(np.round(f.positions.ravel(), 6)) for f in first}
    assert len(geometries) == 3 and not np.allclose(first[0].positions, base.positions)
    for frame, state in zip(first, [[1, 1], [1, -1]] * 3):
        assert frame.arrays["initial_magmoms"][ni].tolist() == state
        assert frame.info["nupdown"] == sum(state)
        assert np.count_nonzero(frame.arrays["initial_magmoms"]) == 2


@pytest.mark.slow
def test_spingen_init_labels_both_states_with_gpaw(tmp_path):
    """The real thing: 1 geometry x 2 states of a 4-atom NiO cell, GPAW through dpdispatcher."""
    from ase import Atoms
    from ase.io import write

    a = 4.17
    nio = Atoms("Ni2O2", scaled_positions=[(0, 0, 0), (.5, .5, .5), (.25, .25, .25), (.75, .75, .75)],
                cell=[[a / 2, a / 2, a], [a / 2, a, a / 2], [a, a / 2, a / 2]], pbc=True)
    (tmp_path / "confs").mkdir()
    write(tmp_path / "confs" / "NiO", nio, format="vasp")
    param = gen_param(tmp_path, configs=["confs/NiO"], pert_numb=1, spin_states=[[2, 2], [2, -2]], pert_atom=0.02)
    param["type_map"] = ["Ni", "O"]
    param["sys_configs"] = [["confs/NiO"]]
    param["spin"]["moments"] = "auto"
    param["default_training_param"]["model"]["descriptor"]["sel"] = [8, 16]
    param["fp_ldau"] = {"Ni": {"L": 2, "U": 6.3, "J": 0}}
    param_path, machine_path = write_inputs(tmp_path, param, make_machine(str(BIN / "spingen")))
    work = tmp_path / "work"
    assert main(["init", str(param_path), str(machine_path), "-w", str(work)]) == 0
    fp = work / "init" / "iter.000000" / "02.fp"
    labels = json.loads((fp / "labels.json").read_text())
    assert [entry["ok"] for entry in labels] == [True, True]
    ferro, antiferro = (np.array(entry["moments"]) for entry in labels)
    assert ferro[0] * ferro[1] > 0 and antiferro[0] * antiferro[1] < 0
    assert abs(labels[0]["energy"] - labels[1]["energy"]) > 0.05  # FM and AFM NiO differ by ~0.3 eV
    spins = np.load(fp / "data.000" / "set.000" / "spin.npy").reshape(2, 4, 3)[..., 2]
    assert np.allclose(spins[:, :2], [ferro[:2], antiferro[:2]], atol=1e-3)  # raw DFT moments stored
    # the train stage sees the new data; a second init changes nothing
    from spingen.layout import init_data_systems

    assert init_data_systems(work) == [fp / "data.000"]
    record = (work / "init" / "record.spingen").read_text()
    assert main(["init", str(param_path), str(machine_path), "-w", str(work)]) == 0
    assert (work / "init" / "record.spingen").read_text() == record
