"""Initial data made by spingen (WORKDIR/init): perturbed structures labeled in several spin states.

A one-iteration run of its own in WORKDIR/init (own record, lock and backups), made of two stages:
00.perturb writes `candidates.SSS.extxyz`, for structure SSS of init_data_gen/configs, pert_numb
perturbed copies (dpdata's perturb, seeded) times every spin state, each frame with its start
moments (`initial_magmoms`) and, with fixed_total, its total moment (info `nupdown`); then the
label stage (02.fp) labels them as it labels any candidate. The train stage adds the labeled
`init/iter.000000/02.fp/data.SSS` to init_data_sys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spingen.cells import right_handed
from spingen.layout import CANDIDATES_FILE, PERTURB_DIR
from spingen.loop import Stage, StageContext
from spingen.schema import InitGenSettings, Param

log = logging.getLogger("spingen")


def perturbed_frames(path: Path, fmt: str, gen: InitGenSettings, system: int) -> list:
    """pert_numb perturbed copies (ase.Atoms) of the first frame of a structure file, seeded per system.

    dpdata rotates each copy so that its cell is lower triangular (a along x).
    """
    import dpdata
    from ase.io import read

    atoms = right_handed(read(path, format=fmt))
    structure = dpdata.System(atoms, fmt="ase/structure")
    saved = np.random.get_state()  # dpdata perturbs with numpy's global generator
    np.random.seed([gen.seed, system])
    try:
        perturbed = structure.perturb(gen.pert_numb, gen.pert_box, gen.pert_atom, "uniform")
    finally:
        np.random.set_state(saved)
    frames = []
    for index in range(gen.pert_numb):
        frame = atoms.copy()
        frame.set_cell(perturbed["cells"][index], scale_atoms=False)
        frame.set_positions(perturbed["coords"][index])
        frame.info = {"config": str(path), "perturbation": index}
        frames.append(frame)
    return frames


class PerturbStage(Stage):
    """make: the candidates of the initial data; nothing to dispatch or collect."""

    name = "perturb"
    dirname = PERTURB_DIR

    def __init__(self, param: Param):
        self.param = param
        self.gen = param.init_gen

    def make(self, ctx: StageContext) -> None:
        import ase.io

        magnetic = set(self.param.spin.magnetic)
        for system, (path, states) in enumerate(zip(self.gen.configs, self.gen.spin_states)):
            frames = []
            for atoms in perturbed_frames(path, self.param.sys_format, self.gen, system):
                ions = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s in magnetic]
                for state_index, state in enumerate(states):
                    frame = atoms.copy()
                    moments = np.zeros(len(frame))
                    moments[ions] = state
                    frame.arrays["initial_magmoms"] = moments
                    frame.info["spin_state"] = state_index
                    if self.gen.fixed_total:
                        frame.info["nupdown"] = float(sum(state))
                    frames.append(frame)
            ase.io.write(self.path(ctx) / CANDIDATES_FILE.format(system), frames, format="extxyz")
            log.info("init system %03d: %s, %d perturbed copies x %d spin state(s) = %d frame(s)", system, path,
                     self.gen.pert_numb, len(states), len(frames))

    def run(self, ctx: StageContext) -> None:
        """Nothing runs: perturbing is instant."""

    def post(self, ctx: StageContext) -> None:
        """Nothing to collect: the label stage reads the candidates."""
