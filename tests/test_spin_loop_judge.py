"""The spin-loop benchmark's held-out DFT judge (benchmarks/spin_loop/judge): its format, and that
`spingen test` ranks its spin states.

The judge is real GPAW DFT+U of the 32-atom, 8-Ni LiNiO2 cell (2x2x1) that the loop explores, each
geometry labeled in several spin states; the benchmark compares every iteration's ensemble with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, tiny_training_param

from spingen.cli import main
from spingen.data.npy import load_system
from spingen.model_errors import geometry_groups

JUDGE = Path(__file__).resolve().parent.parent / "benchmarks" / "spin_loop" / "judge"


def test_judge_holds_each_geometry_in_several_spin_states():
    """The 8 stored geometries each in the DFT spin states of states.json whose runs converged (same cell and
    coordinates, different sign patterns, different energies): all four on every geometry; labels.json accounts for
    every planned run and for every stored frame."""
    system = load_system(JUDGE / "data", require_spins=True)
    d = system.data
    assert d["atom_names"] == ["Li", "Ni", "O"] and np.bincount(d["atom_types"]).tolist() == [8, 8, 16]
    groups = geometry_groups(d["coords"], d["cells"])
    assert len(np.unique(groups)) == 8
    ni = np.asarray(d["atom_types"]) == 1
    for g in np.unique(groups):
        frames = np.flatnonzero(groups == g)
        assert len(frames) >= 4, f"geometry {g}: {len(frames)} states"
        assert np.ptp(d["coords"][frames], axis=0).max() < 1e-6 and np.ptp(d["cells"][frames], axis=0).max() < 1e-6
        patterns = {tuple(np.sign(np.round(d["spins"][f, ni, 2], 1)) * np.sign(d["spins"][f, ni, 2][0]))
                    for f in frames}
        assert len(patterns) == len(frames), f"geometry {g}: every state its own sign pattern"
        assert np.ptp(d["energies"][frames]) > 0.01  # eV per cell: the states are not one SCF solution
    states = json.loads((JUDGE / "states.json").read_text())
    labels = json.loads((JUDGE / "labels.json").read_text())
    assert len(states) >= 4 and len(labels) == 8 * len(states)
    converged = np.bincount([i // len(states) for i, entry in enumerate(labels) if entry["ok"]], minlength=8)
    assert sorted(np.bincount(groups)) == sorted(converged)
    assert np.all(np.bincount(groups) == len(states))


@pytest.mark.slow
def test_spingen_test_ranks_the_judge(tmp_path, capsys):
    """A tiny spin model (trained on the judge itself: this checks the format, not the physics) is
    ranked by `spingen test` on every geometry of the judge."""
    import subprocess

    from spingen.schema import SpinSettings
    from spingen.spin.encoding import SIDECAR
    from spingen.stages.train import training_input, write_training_data

    type_map = ["Li", "Ni", "O"]
    spin = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "canonical")
    written = write_training_data([JUDGE / "data"], tmp_path / "data", type_map, spin)
    inp = training_input(tiny_training_param(20), type_map, spin, [f"data/{name}" for name, _, _ in written], 1)
    (tmp_path / "input.json").write_text(json.dumps(inp))
    for command in (["train", "input.json"], ["freeze", "-o", "model.pth"]):
        subprocess.run([str(BIN / "dp"), "--pt", *command], cwd=tmp_path, check=True, capture_output=True)
    spin.encoding.save(tmp_path / SIDECAR)
    assert main(["test", str(tmp_path / "model.pth"), "-s", str(JUDGE / "data")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    right, geometries = map(int, row[-2].split("/"))
    groups = geometry_groups(*(load_system(JUDGE / "data").data[k] for k in ("coords", "cells")))
    assert geometries == len(np.unique(groups)) and 0 <= right <= geometries
    assert float(row[-3]) > 0  # state gap RMSE, meV/atom
    excess = float(row[-1])  # how far above DFT's lowest its picks lie, meV/atom (0 where every pick is right)
    assert excess >= 0 and (right < geometries or excess == 0)
