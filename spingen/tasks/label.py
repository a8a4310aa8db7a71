"""`spingen label-task TASK_DIR`: run one GPAW DFT+U label task written by the gpaw labeler.

Reads TASK_DIR/gpaw_input.json, runs a PW-mode GPAW single point (energy, forces, stress,
per-atom moments) and writes TASK_DIR/result.json atomically. An SCF that does not converge within
maxiter (GPAW's KohnShamConvergenceError) is a failed frame: result.json says so with the reason
and the command exits 0, so dpdispatcher does not retry it. Any other error is a crashed task
(non-zero exit, no result.json). BLAS/OpenMP threads default to 1 (one process per core).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from spingen.tasks.lock import exclusive_task

# the file names the gpaw labeler writes and reads; no heavy import here, so that the thread
# variables below are set before numpy/BLAS load
INPUT_FILE = "gpaw_input.json"
RESULT_FILE = "result.json"
LOG_FILE = "gpaw.txt"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write data as JSON to path through a synced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run_label_task(task_dir: str | Path) -> dict:
    """Label the frame of one task directory, unless a copy of this job already did; returns result.json."""
    task_dir = Path(task_dir)
    with exclusive_task(task_dir):
        if (task_dir / RESULT_FILE).exists():
            return json.loads((task_dir / RESULT_FILE).read_text())
        return _label(task_dir)


def _label(task_dir: Path) -> dict:
    for variable in THREAD_VARIABLES:
        os.environ.setdefault(variable, "1")
    import numpy as np
    from ase import Atoms
    from ase.stress import voigt_6_to_full_3x3_stress
    from gpaw import GPAW, PW, FermiDirac, KohnShamConvergenceError
    from gpaw import __version__ as gpaw_version

    inp = json.loads((task_dir / INPUT_FILE).read_text())
    atoms = Atoms(inp["symbols"], positions=inp["positions"], cell=inp["cell"], pbc=inp["pbc"])
    atoms.set_initial_magnetic_moments(inp["initial_magmoms"])
    kwargs = {}
    if inp["convergence"]:
        kwargs["convergence"] = inp["convergence"]
    if inp.get("gpts"):
        kwargs["gpts"] = inp["gpts"]
    atoms.calc = GPAW(mode=PW(inp["ecut"]), xc=inp["xc"], kpts={"size": inp["kpts"], "gamma": True},
                      occupations=FermiDirac(inp["width"], fixmagmom=inp["fixmagmom"]), spinpol=True,
                      setups=inp["setups"] or "paw", maxiter=inp["maxiter"], txt=str(task_dir / LOG_FILE),
                      **kwargs)
    start = time.monotonic()
    result: dict = {"gpaw_version": gpaw_version, "maxiter": inp["maxiter"]}
    try:
        energy = atoms.get_potential_energy(force_consistent=True)  # free energy, consistent with forces
        forces = atoms.get_forces()
        virial = None
        if inp["stress"]:
            virial = -voigt_6_to_full_3x3_stress(atoms.get_stress()) * atoms.get_volume()
        moments = atoms.calc.get_magnetic_moments()
    except KohnShamConvergenceError:
        result.update(ok=False, reason=f"SCF not converged within maxiter = {inp['maxiter']} iterations "
                                       "(GPAW KohnShamConvergenceError)")
    else:
        result.update(
            ok=True, reason="", energy=float(energy),
            energy_extrapolated=float(atoms.get_potential_energy()),
            forces=np.asarray(forces).tolist(),
            virial=None if virial is None else np.asarray(virial).tolist(),
            moments=np.asarray(moments).tolist(),
            total_moment=float(atoms.calc.get_magnetic_moment()),
            iterations=int(atoms.calc.get_number_of_iterations()),
        )
    result["wall_s"] = round(time.monotonic() - start, 3)
    write_json_atomic(task_dir / RESULT_FILE, result)
    return result
