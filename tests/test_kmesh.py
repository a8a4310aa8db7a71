"""A cell and its supercells: which k-point meshes fold onto each other, which GPAW grids are in their ratio,
and the check's warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spingen.labelers.kmesh import folds_onto, supercell_matrix

REPO = Path(__file__).resolve().parent.parent
CELL = np.diag([4.17, 4.17, 4.17])  # the 8-atom LiNiO2 cell
TRIPLE = np.diag([12.51, 4.17, 4.17])  # its 3x1x1 supercell


@pytest.mark.parametrize("small_mesh, big_mesh, folds", [
    ((2, 2, 2), (1, 2, 2), False),  # kspacing 0.8: k_a = 0, 1/2 against 0, 1/3, 2/3
    ((3, 3, 3), (1, 3, 3), True),  # Gamma-centred: the supercell's Gamma unfolds to 0, 1/3, 2/3
    ((4, 4, 4), (2, 4, 4), False),  # 0, 1/4, 1/2, 3/4 against 0, 1/6, 1/3, ...
    ((6, 2, 2), (2, 2, 2), True),
    ((3, 2, 2), (1, 3, 2), False),  # same number of k-points, other ones
])
def test_a_supercell_mesh_folds_onto_its_cell_only_when_it_samples_the_same_points(small_mesh, big_mesh, folds):
    assert folds_onto(CELL, small_mesh, TRIPLE, big_mesh) is folds


def test_supercells_are_recognised_through_strain_and_rotation_and_others_are_not():
    np.testing.assert_array_equal(supercell_matrix(CELL, TRIPLE * 1.02), np.diag([3, 1, 1]))  # 2 % strain
    rotated = np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]]) @ CELL  # a sqrt2 x sqrt2 supercell
    np.testing.assert_array_equal(supercell_matrix(CELL, rotated), [[1, 1, 0], [-1, 1, 0], [0, 0, 1]])
    assert folds_onto(CELL, (2, 2, 1), rotated, (1, 1, 1)) is False  # Gamma unfolds to (0, 0), (1/2, 1/2): 2 of 4
    assert folds_onto(CELL, (2, 2, 1), rotated, (2, 1, 1)) is False  # 2 x 2 points, but k.a1 = 1/4 among them
    assert supercell_matrix(CELL, CELL * 1.5) is None and folds_onto(CELL, (2, 2, 2), CELL * 1.5, (1, 1, 1)) is None


def test_check_warns_of_a_supercell_whose_mesh_does_not_fold_and_names_a_spacing_that_does(tmp_path, capsys):
    """The spin-loop example's 8-atom initial data at kspacing 0.8 are (2, 2, 2): its 2x2x1 explore cell at
    (1, 1, 2) folds onto them (no warning); a 3x1x1 cell at (1, 2, 2) does not."""
    import json

    from ase.io import read, write

    from spingen.cli import main

    example = REPO / "param_examples" / "linio2_spin_loop"
    machine = str(REPO / "machine_examples" / "local.json")
    assert main(["check", str(example / "param.json"), machine]) == 0
    assert "k-points" not in capsys.readouterr().out
    write(tmp_path / "POSCAR.3x1x1", read(example / "POSCAR").repeat((3, 1, 1)), format="vasp", direct=True)
    param = json.loads((example / "param.json").read_text())
    param.update(sys_configs=[[str(tmp_path / "POSCAR.3x1x1")]],
                 init_data_prefix=str((example / param["init_data_prefix"]).resolve()))
    (tmp_path / "param.json").write_text(json.dumps(param))
    assert main(["check", str(tmp_path / "param.json"), machine]) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if "k-points" in line)
    assert "'POSCAR.3x1x1' (24 atoms) at (1, 2, 2)" in warning and "'linio2' (8 atoms) at (2, 2, 2)" in warning
    assert "fp_gpaw/kspacing 0.73 would fold them" in warning  # (3, 3, 3) and (1, 3, 3)


def test_gpaw_grids_of_a_cell_and_its_supercell_give_one_energy_per_atom_only_in_their_ratio(tmp_path):
    """Real GPAW on B2 MgO (2 atoms) and its 2x1x1 supercell, k-meshes that fold ((2, 2, 2), (1, 2, 2)): GPAW's own
    grids at 300 eV (12 and 21 points along a) leave a grid error between them; fp_gpaw/h = a / 12 gives 12 and 24
    points and one energy per atom."""
    from ase.build import bulk

    from spingen.labelers import create_labeler
    from spingen.labelers.kmesh import density_grid
    from spingen.schema import GpawSettings, LabelSettings
    from spingen.tasks.label import run_label_task

    cell = bulk("MgO", "cesiumchloride", a=2.6)
    double = cell.repeat((2, 1, 1))
    assert density_grid(cell.cell[:], 300.0, None)[0] == 12 and density_grid(double.cell[:], 300.0, None)[0] == 21
    energy_gap = {}
    for h in (None, 2.6 / 12):
        gpaw = GpawSettings(300.0, None, 1.3, h, 0.1, 60, "PBE", {}, False, 4.0)
        labeler = create_labeler(LabelSettings("gpaw", ("Mg", "O"), (), "states", {}, None, 0.5, 1.0, 10_000, 1,
                                               gpaw=gpaw))
        per_atom = []
        for name, atoms in (("cell", cell), ("double", double)):
            task = tmp_path / f"{h}" / name
            task.mkdir(parents=True)
            labeler.write_inputs(task, atoms, np.zeros(len(atoms)), None)
            result = run_label_task(task)
            assert result["ok"]
            per_atom.append(result["energy"] / len(atoms))
        energy_gap[h] = 1000 * abs(per_atom[1] - per_atom[0])  # meV/atom
    assert energy_gap[None] > 0.3 and energy_gap[2.6 / 12] < 0.01, energy_gap


def test_check_warns_of_gpaw_grids_out_of_the_supercell_ratio_and_names_an_h_that_fits(tmp_path, capsys):
    """The demo without its fp_gpaw/h: GPAW's own grids for its 8-atom and 16-atom cells are not in ratio."""
    import json

    from spingen.cli import main

    example = REPO / "param_examples" / "linio2_demo"
    machine = str(REPO / "machine_examples" / "local.json")
    param = json.loads((example / "param.json").read_text())
    for group in param["sys_configs"]:
        group[:] = [str(example / f) for f in group]
    param["init_data_gen"]["configs"] = [str(example / f) for f in param["init_data_gen"]["configs"]]
    del param["fp_gpaw"]["h"]
    (tmp_path / "param.json").write_text(json.dumps(param))
    assert main(["check", str(tmp_path / "param.json"), machine]) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if "real-space grid" in line)
    assert "'POSCAR.2x1x1' (16 atoms) gets (35, 18, 18) points, not (2, 1, 1) times the (18, 18, 18)" in warning
    h = float(warning.split("fp_gpaw/h ")[1].split()[0])
    assert 4.17 / 18 <= h < 4.17 / 18 + 1e-4  # 18 and 36 points
    param["fp_gpaw"]["h"] = h
    (tmp_path / "param.json").write_text(json.dumps(param))
    assert main(["check", str(tmp_path / "param.json"), machine]) == 0
    assert "real-space grid" not in capsys.readouterr().out
