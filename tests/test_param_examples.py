"""The shipped param_examples pass `spingen check`; the VASP ones carry the paper's DFT+U settings.

Every folder of param_examples/ with an INCAR is a VASP (HPC) example: it is copied, given fake
POTCARs (a TITEL line naming the element, as real ones have) and checked against
machine_examples/slurm.json. The small local examples are checked against local.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from spingen.cli import main
from spingen.labelers import create_labeler
from spingen.labelers.vasp import parse_incar, species_runs
from spingen.schema import label_settings, load_param

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "param_examples"
SLURM = ROOT / "machine_examples" / "slurm.json"
LOCAL = ROOT / "machine_examples" / "local.json"
VASP_EXAMPLES = sorted(p.parent.name for p in EXAMPLES.glob("*/INCAR"))
PAPER_U = {"Co": 5.14, "Ni": 6.30, "Mn": 3.9}  # eV, PBE+U of the seed paper (cathode-physics notes)
PAPER_SYSTEMS = {  # folder: (formula, atoms)
    "licoo2": ("Co12Li12O24", 48),
    "linio2": ("Li12Ni12O24", 48),
    "limno2": ("Li12Mn12O24", 48),
    "lini0.5mn1.5o4": ("Li8Mn12Ni4O32", 56),
    "ncm111": ("Co9Li27Mn9Ni9O54", 108),
}


def fake_potcars(folder: Path, pp_files: dict[str, str]) -> Path:
    """One fake POTCAR per entry of fp_pp_files, its TITEL naming the file's folder (e.g. Li_sv)."""
    for element, name in pp_files.items():
        title = Path(name).parent.name or element
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"  PAW_PBE {title} 06Sep2000\n   TITEL  = PAW_PBE {title} 06Sep2000\n"
                        f" fake body of {element}\n End of Dataset\n")
    return folder


def copied_example(name: str, tmp_path: Path) -> Path:
    """The example copied to tmp_path, fp_pp_path pointing at fake POTCARs; the param.json path."""
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    path = folder / "param.json"
    raw = json.loads(path.read_text())
    raw["fp_pp_path"] = str(fake_potcars(tmp_path / "potpaw_PBE", raw["fp_pp_files"]))
    path.write_text(json.dumps(raw, indent=1))
    return path


def neighbour_counts(atoms, rcut: float) -> dict[str, int]:
    """Most neighbours of each element within rcut of any atom."""
    i, j = neighbor_list("ij", atoms, rcut)
    symbols = np.array(atoms.get_chemical_symbols())
    return {el: max(int(np.sum(symbols[j[i == k]] == el)) for k in range(len(atoms)))
            for el in sorted(set(symbols))}


def test_every_paper_system_has_a_vasp_example():
    assert set(PAPER_SYSTEMS) <= set(VASP_EXAMPLES)
    for name in VASP_EXAMPLES:
        for file in ("POSCAR", "param.json", "INCAR", "README.md"):
            assert (EXAMPLES / name / file).is_file(), f"{name}/{file}"


@pytest.mark.parametrize("name", VASP_EXAMPLES)
def test_vasp_example_passes_check(name, tmp_path, capsys):
    path = copied_example(name, tmp_path)
    param = load_param(path)
    assert main(["check", str(path), str(SLURM)]) == 0
    assert "OK: both files are valid" in capsys.readouterr().out

    folder = path.parent
    atoms = ase.io.read(folder / "POSCAR", format="vasp")
    symbols = atoms.get_chemical_symbols()
    runs = species_runs(symbols)
    species = [s for s, _ in runs]
    assert len(species) == len(set(species)), "POSCAR: each element must be one run (written with sort=True)"
    assert list(param.type_map) == species
    if name in PAPER_SYSTEMS:
        assert (atoms.get_chemical_formula(), len(atoms)) == PAPER_SYSTEMS[name]

    # spin: every transition metal of the cell is magnetic
    magnetic = [s for s in species if s in PAPER_U]
    assert list(param.spin.magnetic) == magnetic
    assert (param.spin.virtual_scale, param.spin.offset) == (0.3, 0.2)

    # DFT+U: the paper's U, in fp_ldau and in the template's LDAU lines (POSCAR species order)
    raw = param.raw
    assert {e: (v["L"], v["U"]) for e, v in raw["fp_ldau"].items()} == {e: (2, PAPER_U[e]) for e in magnetic}
    incar = parse_incar((folder / raw["fp_incar"]).read_text())
    assert incar["LDAU"].upper() == ".TRUE." and incar["LDAUTYPE"] == "2"
    assert [int(x) for x in incar["LDAUL"].split()] == [2 if s in PAPER_U else -1 for s in species]
    assert [float(x) for x in incar["LDAUU"].split()] == pytest.approx([PAPER_U.get(s, 0.0) for s in species])
    assert [float(x) for x in incar["LDAUJ"].split()] == [0.0] * len(species)
    assert float(incar["ENCUT"]) == 520 and float(incar["EDIFF"]) == pytest.approx(1e-6)
    assert (incar["ISMEAR"], float(incar["SIGMA"])) == ("0", 0.05)
    assert (incar["ISPIN"], incar["LMAXMIX"], incar["NSW"], incar["LORBIT"]) == ("2", "4", "0", "11")
    if raw.get("fp_kpoints") is None:
        assert raw["fp_kspacing"] == 0.25 and float(incar["KSPACING"]) == 0.25
    else:
        assert "KSPACING" not in incar and raw.get("fp_kspacing") is None

    # the labeler accepts the template and the POTCARs (TITEL vs element), and writes the paper's U
    labeler = create_labeler(label_settings(param))
    state = np.array(param.init_gen.spin_states[0][0])
    moments = np.zeros(len(atoms))
    moments[np.isin(symbols, magnetic)] = state
    labeler.write_inputs(tmp_path, atoms, moments, float(np.round(state.sum())))
    task = parse_incar((tmp_path / "INCAR").read_text())
    assert task["LDAUU"].split() == [f"{PAPER_U[s]:g}" if s in PAPER_U else "0" for s in species]
    assert int(task["NUPDOWN"]) == int(round(state.sum()))

    # paper-size se_e2_a; sel covers the real neighbours within rcut with ~20% to spare
    model = raw["default_training_param"]["model"]
    descriptor = model["descriptor"]
    assert descriptor["type"] == "se_e2_a" and list(descriptor["neuron"]) == [25, 50, 100]
    assert (descriptor["rcut"], descriptor["rcut_smth"], descriptor["axis_neuron"]) == (6.0, 0.5, 16)
    assert list(model["fitting_net"]["neuron"]) == [240, 240, 240]
    counts = neighbour_counts(atoms, descriptor["rcut"])
    sel = dict(zip(param.type_map, descriptor["sel"]))
    for element, n in counts.items():
        assert n < sel[element] <= math.ceil(1.25 * n) + 1, (element, n, sel[element])

    # exploration and labels as the brief: 4 models, 0.15/0.35 eV/A, a 300 -> 900 K ladder
    assert param.train.numb_models == 4
    assert (raw["model_devi_f_trust_lo"], raw["model_devi_f_trust_hi"]) == (0.15, 0.35)
    ensembles = [job["ensemble"] for job in param.model_devi_jobs]
    assert ensembles == sorted(ensembles, key=lambda e: e != "nvt") and set(ensembles) == {"nvt", "npt"}
    for ensemble in ("nvt", "npt"):  # each ladder climbs from 300 K to 900 K
        ladder = [job["temps"] for job in param.model_devi_jobs if job["ensemble"] == ensemble]
        assert [max(t) for t in ladder] == sorted(max(t) for t in ladder)
        assert min(ladder[0]) == 300 and max(ladder[-1]) == 900
    assert raw["fp_style"] == "vasp" and raw["fp_task_max"] == 50
    assert raw["fp_spin_init"] in ("states", "predicted")

    # complete without user data: a few spin states of the POSCAR's magnetic ions
    assert raw["init_data_sys"] == () and param.init_gen is not None
    (states,) = param.init_gen.spin_states
    assert 2 <= len(states) <= 4
    assert all(len(s) == int(np.isin(symbols, magnetic).sum()) for s in states)


@pytest.mark.parametrize("name", ["linio2_demo", "feo"])
def test_local_example_passes_check(name, tmp_path, capsys):
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    assert main(["check", str(folder / "param.json"), str(LOCAL)]) == 0
    out = capsys.readouterr().out
    assert "OK: both files are valid" in out
    assert {"linio2_demo": "moments auto (clustered from the initial data once it is made)",
            "feo": "moments auto, from init_data_sys: {'Fe': [1.397, 3.007]}"}[name] in out
    assert "k-points" not in out  # the demo's 16-atom 2x1x1 cell at (1, 2, 2) folds onto the 8-atom (2, 2, 2)
    assert "real-space grid" not in out  # fp_gpaw/h 0.2317: 36 x 18 x 18 points for it, 18^3 for the 8-atom cell
