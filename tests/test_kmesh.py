"""k-point meshes of a cell and its supercells: which fold onto each other, and the check's warning."""

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
