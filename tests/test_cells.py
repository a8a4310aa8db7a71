"""Left-handed cells never reach deepmd-kit: the train stage writes them right-handed (same crystal)."""

from __future__ import annotations

import numpy as np
from conftest import write_spin_system

from spingen.cells import right_handed_cells
from spingen.data.npy import load_system
from spingen.schema import SpinSettings
from spingen.stages.train import write_training_data

SPIN = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "none")


def test_right_handed_cells_swaps_a_and_b_of_left_handed_frames_only():
    right = np.diag([4.0, 5.0, 6.0])
    left = right[[1, 0, 2]]
    fixed = right_handed_cells(np.array([right, left]))
    assert np.all(np.linalg.det(fixed) > 0)
    assert np.array_equal(fixed[0], right) and np.array_equal(fixed[1], right)


def test_training_data_of_a_left_handed_system_is_written_right_handed(tmp_path):
    raw = write_spin_system(tmp_path / "raw", n_frames=3)
    system = load_system(raw)
    system.data["cells"] = system.data["cells"][:, [1, 0, 2]]  # the same crystal, left-handed
    assert np.all(np.linalg.det(system.data["cells"]) < 0)
    system.to("deepmd/npy", str(tmp_path / "left"))
    write_training_data([tmp_path / "left"], tmp_path / "data", ["Li", "Ni", "O"], SPIN)
    written = load_system(tmp_path / "data" / "sys.000")
    assert np.all(np.linalg.det(written.data["cells"]) > 0)
    assert np.allclose(written.data["coords"], system.data["coords"])


def test_right_handed_atoms_follow_the_same_rule():
    from ase import Atoms

    from spingen.cells import right_handed

    left = Atoms("LiO", positions=[[0, 0, 0], [1.0, 0.5, 0.2]], cell=np.diag([4.0, 5.0, 6.0])[[1, 0, 2]], pbc=True)
    positions = left.positions.copy()
    assert np.linalg.det(right_handed(left).cell[:]) > 0
    assert np.allclose(left.positions, positions)
    right = Atoms("LiO", positions=positions, cell=np.diag([4.0, 5.0, 6.0]), pbc=True)
    assert np.array_equal(right_handed(right).cell[:], np.diag([4.0, 5.0, 6.0]))
