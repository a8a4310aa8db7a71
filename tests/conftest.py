"""Shared fixtures: small real data sets, tiny deepmd-kit settings, a local machine.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spingen.data.npy import write_frames

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch):
    """dpdispatcher records submissions under $HOME/.dpdispatcher: keep tests apart."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def lini_frames(n_frames: int, seed: int, levels=(1.0, -1.0, 3.0, -3.0)):
    """Perturbed Li2Ni2O4 cells (8 atoms) with Morse energies/forces plus a spin-state energy."""
    from ase.build import bulk
    from ase.calculators.morse import MorsePotential

    rng = np.random.default_rng(seed)
    base = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    symbols = base.get_chemical_symbols()
    symbols[0], symbols[2] = "Li", "Li"
    base.set_chemical_symbols(symbols)
    frames = []
    for _ in range(n_frames):
        atoms = base.copy()
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = MorsePotential(epsilon=0.3, r0=2.1, rho0=4.0)
        ni = [i for i, s in enumerate(symbols) if s == "Ni"]
        moments = np.zeros(len(atoms))
        moments[ni] = rng.choice(levels, size=len(ni))
        frames.append((atoms, atoms.get_potential_energy() + spin_energy(moments[ni]), atoms.get_forces(), moments))
    return frames


def spin_energy(ni_moments: np.ndarray) -> float:
    """The spin-state energy of lini_frames (eV): a level term and a Ni-Ni exchange term."""
    return float(0.4 * np.sum(np.abs(ni_moments) - 1.0) + 0.05 * ni_moments[0] * ni_moments[1])


def write_spin_system(path: Path, n_frames: int = 12, seed: int = 0, levels=(1.0, -1.0, 3.0, -3.0),
                      states: list[tuple[float, float]] | None = None) -> Path:
    """A deepmd/npy system with raw moments in spin.npy, as spingen stores data. With `states` (Ni
    moment pairs): each of the n_frames geometries labeled in every one of those states."""
    frames = lini_frames(n_frames, seed, levels)
    if states:
        relabeled = []
        for atoms, energy, forces, moments in frames:
            ni = [i for i, symbol in enumerate(atoms.get_chemical_symbols()) if symbol == "Ni"]
            for state in states:
                new = np.zeros_like(moments)
                new[ni] = state
                relabeled.append((atoms, energy - spin_energy(moments[ni]) + spin_energy(new[ni]), forces, new))
        frames = relabeled
    write_frames(path, frames, ["Li", "Ni", "O"])
    return path


def tiny_training_param(steps: int = 20) -> dict:
    return {
        "model": {
            "descriptor": {"type": "se_e2_a", "sel": [8, 8, 16], "rcut_smth": 0.5, "rcut": 4.0,
                           "neuron": [4, 8], "axis_neuron": 4},
            "fitting_net": {"neuron": [16, 16]},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 0.0001, "decay_steps": 10},
        "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 10, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"numb_steps": steps, "disp_freq": 10, "save_freq": 10,
                     "training_data": {"batch_size": 1}},
    }


def write_poscar(path: Path) -> Path:
    from ase.io import write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, lini_frames(1, 99)[0][0], format="vasp")
    return path


def make_param(root: Path, **overrides) -> dict:
    """A complete, valid param.json dict for a gpaw run on the tiny LiNiO2-like data."""
    if not (root / "data" / "init").exists():
        write_spin_system(root / "data" / "init")
        write_poscar(root / "confs" / "POSCAR")
    param = {
        "type_map": ["Li", "Ni", "O"],
        "init_data_sys": ["data/init"],
        "sys_configs": [["confs/POSCAR"]],
        "numb_models": 2,
        "default_training_param": tiny_training_param(),
        "spin": {"magnetic": ["Ni"], "virtual_scale": 0.3, "offset": 0.2, "moments": {"Ni": [1, 3]}},
        "model_devi_jobs": [{"sys_idx": [0], "temps": [300], "nsteps": 10, "trj_freq": 5}],
        "model_devi_f_trust_lo": 0.05,
        "model_devi_f_trust_hi": 0.3,
        "fp_style": "gpaw",
        "fp_task_max": 4,
        "fp_ldau": {"Ni": {"L": 2, "U": 6.3, "J": 0}},
    }
    param.update(overrides)
    return param


def make_machine(command: str | None = None) -> dict:
    section = {
        "command": command or str(BIN / "dp"),
        "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": "./",
                    "remote_root": "remote"},
        "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1},
        "check_interval": 1,
    }
    return {"api_version": "1.0", "train": section, "model_devi": dict(section), "fp": [dict(section)]}


def write_inputs(root: Path, param: dict | None = None, machine: dict | None = None) -> tuple[Path, Path]:
    param_path, machine_path = root / "param.json", root / "machine.json"
    param_path.write_text(json.dumps(param if param is not None else make_param(root), indent=1))
    machine_path.write_text(json.dumps(machine if machine is not None else make_machine(), indent=1))
    return param_path, machine_path
