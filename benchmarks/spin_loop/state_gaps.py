"""Per kind of spin state on the held-out judge: the ensemble's gap error and its members' spread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_loop/state_gaps.py MODEL.pth [MODEL.pth ...]

Each judge geometry holds its states in one order (FM low spin, in-plane AFM, one Ni layer reversed,
a reversed nearest pair; make_judge.py). For each state kind it prints, over the 8 geometries, the
ensemble's gap to FM minus DFT's (mean and RMS, meV/atom) and the standard deviation of that gap over
the members (how far the ensemble's disagreement could point at the error); then each kind's error per
geometry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from spingen.model_errors import Ensemble, geometry_groups, load_for, state_ranking

JUDGE = Path(__file__).resolve().parent / "judge" / "data"
KINDS = ("FM", "in-plane AFM", "layer reversed", "reversed pair")


def judge_frames(coords: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Frame indices (geometries, states) of the judge, each geometry's states in KINDS order."""
    groups = geometry_groups(coords, cells)
    return np.array([np.flatnonzero(groups == g) for g in np.unique(groups)])


def judged(models: list[Path], geometries: slice | list[int] = slice(None)) -> dict:
    """The ensemble of `models` on the judge's `geometries`: energy RMSE, state gap RMSE and lowest state
    right (as `spingen test`), and each kind's mean gap error to FM (meV/atom)."""
    ensemble = Ensemble(models)
    system, symbols, atypes, moments = load_for(ensemble, JUDGE)
    energies = ensemble.energy_forces(system.data["coords"], system.data["cells"], atypes, symbols, moments)[0]
    model, dft = energies / len(symbols), system.data["energies"] / len(symbols)
    frames = judge_frames(system.data["coords"], system.data["cells"])[geometries]
    picked = frames.ravel()
    ranking = state_ranking(dft[picked], model[picked],
                            geometry_groups(system.data["coords"][picked], system.data["cells"][picked]))
    errors = 1000 * ((model[frames] - model[frames[:, :1]]) - (dft[frames] - dft[frames[:, :1]]))[:, 1:]
    return {"e_rmse": 1000 * float(np.sqrt(np.mean((model[picked] - dft[picked]) ** 2))),
            "gap_rmse": ranking.state_gap_rmse, "right": ranking.lowest_state_right,
            "geometries": ranking.geometries,
            "kinds": {kind: float(errors[:, k].mean()) for k, kind in enumerate(KINDS[1:frames.shape[1]])}}


def main(models: list[str]) -> int:
    members = [Ensemble([m]) for m in models]
    system, symbols, atypes, moments = load_for(members[0], JUDGE)
    coords, cells = system.data["coords"], system.data["cells"]
    per_atom = 1000 / len(symbols)
    energies = np.array([m.energy_forces(coords, cells, atypes, symbols, moments)[0] for m in members]) * per_atom
    dft = system.data["energies"] * per_atom
    frames = judge_frames(coords, cells)
    model_gaps = energies[:, frames] - energies[:, frames[:, :1]]  # (members, geometries, states)
    errors = model_gaps.mean(axis=0) - (dft[frames] - dft[frames[:, :1]])
    spread = model_gaps.std(axis=0)
    print(f"{'state':<16} {'gap error mean':>15} {'gap error rms':>14} {'members spread':>15}  (meV/atom)")
    for k, kind in enumerate(KINDS[:frames.shape[1]]):
        print(f"{kind:<16} {errors[:, k].mean():>15.1f} {np.sqrt(np.mean(errors[:, k] ** 2)):>14.1f} "
              f"{spread[:, k].mean():>15.1f}")
    print("per geometry (gap error, meV/atom):")
    for k, kind in enumerate(KINDS[1:frames.shape[1]], start=1):
        print(f"{kind:<16} " + " ".join(f"{e:+6.1f}" for e in errors[:, k]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1:]))
