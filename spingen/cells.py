"""Cell conventions that deepmd-kit and dpdata rely on."""

from __future__ import annotations

import numpy as np


def right_handed(atoms):
    """atoms itself, its cell made right-handed when it was not (a and b swapped: same crystal).

    deepmd-kit's neighbour search fails on a cell with a negative determinant (a negative image
    count) and dpdata's perturb asserts a right-handed cell; POSCARs written by hand often have one.
    Cartesian positions do not change.
    """
    if atoms.pbc.any():
        atoms.set_cell(right_handed_cells(atoms.cell[:][None])[0], scale_atoms=False)
    return atoms


def right_handed_cells(cells: np.ndarray) -> np.ndarray:
    """Cells (nframes, 3, 3) with every left-handed one made right-handed (a and b swapped: the same
    crystal, Cartesian coordinates unchanged); the rule of `right_handed` too. deepmd-kit evaluates a
    left-handed cell silently wrong (3.2, pt: -1.62 instead of -2.04 eV/atom for one LiNiO2 structure)."""
    cells = np.array(cells, dtype=float)
    left = np.linalg.det(cells) < 0
    cells[left] = cells[left][:, [1, 0, 2]]
    return cells
