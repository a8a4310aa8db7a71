"""How a labeler discretizes a cell, and whether a cell and its supercell are discretized alike: Gamma-centred
k-point meshes that sample the same k-points, GPAW real-space grids in the supercell's ratio.

A cell and its supercell give the same energy per atom for the same structure only when the
supercell's mesh, unfolded into the small cell's Brillouin zone, is the small cell's mesh. A
spacing rule (VASP's KSPACING, fp_gpaw/kspacing) does not ensure it: at 0.8 /A the 8-atom LiNiO2
cell gets (2, 2, 2) and its 3x1x1 supercell (1, 2, 2), which samples k_a = 0, 1/3, 2/3 of the
small cell where it samples 0 and 1/2; measured with GPAW, 60 meV/atom apart
(docs/benchmarks/spin_loop.md). Labels of the two cells then disagree by a k-point error that no
model can fit. GPAW's real-space grid is the same kind of choice: its own (from ecut, rounded to an
efficient FFT size) gives that cell 18^3 points and its 2x2x1 supercell 35 x 35 x 18 at 300 eV, 3.8
meV/atom apart for the same structure (FM and AFM alike to 0.07 meV/atom); on 36 x 36 x 18 the two
agree to 1e-9 eV/atom.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

SUPERCELL_TOLERANCE = 0.1  # |M - round(M)| of a strained or perturbed supercell matrix


def kpoint_mesh(cell: np.ndarray, pbc: Sequence[bool], kspacing: float) -> tuple[int, int, int]:
    """VASP's KSPACING rule: k_i = max(1, ceil(|b_i| / kspacing)), |b_i| with the 2*pi; 1 if not periodic."""
    from ase.cell import Cell

    reciprocal = 2.0 * np.pi * np.linalg.norm(Cell(cell).reciprocal(), axis=1)
    return tuple(int(max(1, np.ceil(b / kspacing - 1e-9))) if p else 1 for b, p in zip(reciprocal, pbc))


def supercell_matrix(small: np.ndarray, big: np.ndarray) -> np.ndarray | None:
    """The integer M with big = M @ small (rows are lattice vectors), or None when there is none
    (within SUPERCELL_TOLERANCE: perturbed cells count)."""
    matrix = np.asarray(big, dtype=float) @ np.linalg.inv(np.asarray(small, dtype=float))
    rounded = np.rint(matrix)
    if np.abs(matrix - rounded).max() > SUPERCELL_TOLERANCE or abs(np.linalg.det(rounded)) < 0.5:
        return None
    return rounded.astype(int)


def _mesh_points(mesh: Sequence[int]) -> np.ndarray:
    """The fractional k-points of a Gamma-centred mesh, in [0, 1)."""
    return np.array(list(itertools.product(*[np.arange(n) / n for n in mesh])))


def _as_set(points: np.ndarray) -> set[tuple[float, ...]]:
    wrapped = np.round(np.mod(np.round(points, 8), 1.0), 6) % 1.0
    return {tuple(p) for p in wrapped}


def folds_onto(small: np.ndarray, small_mesh: Sequence[int], big: np.ndarray, big_mesh: Sequence[int]
               ) -> bool | None:
    """Whether big's mesh unfolded into small's Brillouin zone is small's mesh (the same k-points, the
    same weights); None when big is not a supercell of small."""
    matrix = supercell_matrix(small, big)
    if matrix is None:
        return None
    n_cells = int(round(abs(np.linalg.det(matrix))))
    if np.prod(small_mesh) != np.prod(big_mesh) * n_cells:
        return False
    # fractional coordinates: k . big lattice = f_big, k . small lattice = f_small = f_big @ inv(M).T
    to_small = np.linalg.inv(matrix).T
    reach = np.abs(matrix).sum(axis=0)  # enough of big's reciprocal lattice to cover small's zone
    shifts = np.array(list(itertools.product(*[range(int(r)) for r in reach])), dtype=float)
    unfolded = (_mesh_points(big_mesh)[:, None, :] + shifts[None, :, :]).reshape(-1, 3) @ to_small
    return _as_set(unfolded) == _as_set(_mesh_points(small_mesh))


def density_grid(cell: np.ndarray, ecut: float, h: float | None) -> tuple[int, int, int]:
    """Points of GPAW's real-space grid along each lattice vector: ceil(|a_i| / h), or, when h is None,
    GPAW's own choice from the cutoff ecut (eV)."""
    if h is not None:
        return tuple(int(max(1, np.ceil(length / h - 1e-6))) for length in np.linalg.norm(cell, axis=1))
    from ase.units import Bohr
    from gpaw import PW
    from gpaw.utilities.gpts import get_number_of_grid_points

    return tuple(int(n) for n in get_number_of_grid_points(np.asarray(cell, dtype=float) / Bohr, mode=PW(ecut)))
