"""Errors of a model or an ensemble on deepmd/npy data with spins, per system (`spingen test`, the stages).

Reports the energy RMSE (meV/atom), force RMSE (meV/A) and, for spin models, the flip asymmetry:
mean |E(-S) - E(S)| per atom (meV/atom). Collinear DFT+U energies do not change when every moment
is reversed; a model that has not learned it shows it here.

Where the data holds one geometry in several spin states (frames with the same cell and
coordinates), it also reports how well the model ranks them, which is what the spin search needs
and what a small energy RMSE does not promise: the RMSE of the energies relative to each
geometry's mean state energy (meV/atom) and on how many geometries the model's lowest labeled
state is DFT's lowest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spingen.cells import right_handed_cells
from spingen.errors import InputError

FRAMES_PER_CALL = 256
HIDDEN_MOMENT_TOL = 0.1  # uB: two labels of one geometry this close on every magnetic ion are one input to the model
HIDDEN_ENERGY_TOL = 0.001  # eV/atom: ... and the higher one is left out of training when this far above the lower


@dataclass
class StateRanking:
    """How a model ranks the spin states of the geometries labeled in several states."""
    state_gap_rmse: float  # meV/atom, energies relative to their geometry's mean state energy
    lowest_state_right: int  # geometries whose DFT-lowest state is also the model's lowest
    geometries: int
    dft_next_state_gap_mean: float  # meV/atom, DFT's gap between each geometry's two lowest states: what to resolve
    pick_excess_mean: float  # meV/atom, by DFT: the model's lowest state above DFT's lowest (0 where right), mean


@dataclass
class SystemErrors:
    name: str
    n_frames: int
    n_atoms: int
    rmse_e: float  # meV/atom
    rmse_f: float  # meV/A
    flip_asymmetry: float | None  # meV/atom
    ranking: StateRanking | None  # None: every geometry in one state
    energies: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (DFT, model) per atom, eV
    forces: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (DFT, model) components, eV/A


class Ensemble:
    """One or several frozen deepmd-kit models evaluated as their mean."""

    def __init__(self, paths: Sequence[str | Path], offset: float | None = None):
        from spingen.deepmd_model import load_models, resolve_encoding

        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise InputError(f"model file(s) not found: {missing}")
        self.models = load_models(paths)
        self.type_map = list(self.models[0].get_type_map())
        self.has_spin = bool(self.models[0].has_spin)
        self.encoding = None
        if self.has_spin:
            try:
                self.encoding = resolve_encoding(self.models, offset=offset, path=paths[0])
            except ValueError as err:
                raise InputError(f"'{paths[0]}' is a spin model: {err} (--offset)") from None

    def atom_types(self, symbols: Sequence[str], where: str) -> np.ndarray:
        from spingen.deepmd_model import atom_types

        try:
            return atom_types(self.type_map, symbols, f"data '{where}'")
        except ValueError as err:
            raise InputError(str(err)) from None

    def energy_forces(self, coords: np.ndarray, cells: np.ndarray, atypes: np.ndarray, symbols: Sequence[str],
                      moments: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Mean energy (nf,) and forces (nf, nat, 3) over the models, in chunks of frames."""
        from spingen.deepmd_model import evaluate_frames

        nf = len(coords)
        energies, forces = np.zeros(nf), np.zeros(coords.shape)
        for start in range(0, nf, FRAMES_PER_CALL):
            part = slice(start, start + FRAMES_PER_CALL)
            spins = moments[part] if self.has_spin else None
            for model in self.models:
                e, f, _, _ = evaluate_frames(model, coords[part], cells[part], atypes, spins, self.encoding, symbols)
                energies[part] += e / len(self.models)
                forces[part] += f / len(self.models)
        return energies, forces


def geometry_groups(coords: np.ndarray, cells: np.ndarray, decimals: int = 4) -> np.ndarray:
    """Group index of each frame: frames with the same cell and coordinates (to `decimals` A) are one geometry."""
    keys = [np.round(np.concatenate([c.ravel(), b.ravel()]), decimals).tobytes() for c, b in zip(coords, cells)]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return np.array([index[k] for k in keys], dtype=int)


def hidden_state_frames(coords: np.ndarray, cells: np.ndarray, energies: np.ndarray, moments: np.ndarray,
                        magnetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels the spin model cannot tell from a lower label of the same geometry: every magnetic ion's moment
    within HIDDEN_MOMENT_TOL of it (or of its reverse), the energy more than HIDDEN_ENERGY_TOL per atom above
    it. Returns their indices and how far (eV/atom) each lies above the lowest label it repeats."""
    natoms, groups = moments.shape[1], geometry_groups(coords, cells)
    hidden, excess = [], []
    if not np.any(magnetic):
        return np.array([], dtype=int), np.array([])
    for group in np.unique(groups):
        frames = np.flatnonzero(groups == group)
        kept: list[int] = []
        for i in frames[np.argsort(energies[frames], kind="stable")]:
            mine = moments[i, magnetic]
            same = [j for j in kept if min(np.abs(mine - moments[j, magnetic]).max(),
                                           np.abs(mine + moments[j, magnetic]).max()) <= HIDDEN_MOMENT_TOL]
            above = (energies[i] - energies[same[0]]) / natoms if same else 0.0
            if above > HIDDEN_ENERGY_TOL:
                hidden.append(i)
                excess.append(above)
            else:
                kept.append(i)
    order = np.argsort(hidden)
    return np.array(hidden, dtype=int)[order], np.array(excess)[order]


def system_hidden_frames(system, magnetic: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`hidden_state_frames` of a stored system (raw moments in its spins); magnetic: the magnetic elements."""
    data = system.data
    symbols = [data["atom_names"][t] for t in data["atom_types"]]
    return hidden_state_frames(data["coords"], data["cells"], data["energies"], data["spins"][..., 2],
                               np.isin(symbols, magnetic))


def state_ranking(e_dft: np.ndarray, e_model: np.ndarray, groups: np.ndarray) -> StateRanking | None:
    """The ranking of the states of the geometries (`groups`) labeled in several states, from energies
    per atom in eV; None when every geometry has one state."""
    deviations, next_gaps, excess, agree = [], [], [], 0
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            continue
        dft, model = e_dft[members], e_model[members]
        deviations.append((model - model.mean()) - (dft - dft.mean()))
        next_gaps.append(np.diff(np.sort(dft)[:2])[0])
        excess.append(dft[np.argmin(model)] - dft.min())
        agree += int(np.argmin(model) == np.argmin(dft))
    if not deviations:
        return None
    return StateRanking(float(np.sqrt(np.mean(np.concatenate(deviations) ** 2)) * 1000), agree, len(deviations),
                        float(np.mean(next_gaps) * 1000), float(np.mean(excess) * 1000))


def load_for(ensemble: Ensemble, path: Path):
    """A stored system as the ensemble evaluates it: (system, symbols, atom types, moments or None)."""
    from spingen.data.npy import load_system

    system = load_system(path, require_spins=ensemble.has_spin)
    system.data["cells"] = right_handed_cells(system.data["cells"])  # as the train stage writes them
    symbols = [system.data["atom_names"][t] for t in system.data["atom_types"]]
    moments = system.data["spins"][..., 2] if ensemble.has_spin else None
    return system, symbols, ensemble.atom_types(symbols, str(path)), moments


def state_ranking_on(models: Sequence[str | Path], systems: Sequence[Path]) -> dict | None:
    """How the ensemble of `models` ranks the spin states of the geometries of `systems` labeled in
    several states (state_ranking over all of them, and the frames it took), as JSON; None when no
    geometry is."""
    ensemble = Ensemble(models)
    e_dft, e_model, groups, next_group = [], [], [], 0
    for path in systems:
        system, symbols, atypes, moments = load_for(ensemble, Path(path))
        own = geometry_groups(system.data["coords"], system.data["cells"])
        kept = trained_labels(ensemble, system)
        several = np.flatnonzero(kept & (np.bincount(own[kept], minlength=own.max() + 1)[own] > 1))
        if not several.size:
            continue
        energies, _ = ensemble.energy_forces(system.data["coords"][several], system.data["cells"][several], atypes,
                                             symbols, None if moments is None else moments[several])
        e_dft.append(system.data["energies"][several] / len(symbols))
        e_model.append(energies / len(symbols))
        groups.append(own[several] + next_group)  # group numbers unique across systems
        next_group += int(own.max()) + 1
    if not groups:
        return None
    ranking = state_ranking(np.concatenate(e_dft), np.concatenate(e_model), np.concatenate(groups))
    return {**asdict(ranking), "frames": int(sum(len(g) for g in groups))}


def trained_labels(ensemble: Ensemble, system) -> np.ndarray:
    """Mask of the frames the train stage trains on (not `hidden_state_frames`): the ones to rank."""
    kept = np.ones(system.get_nframes(), dtype=bool)
    if ensemble.has_spin:
        kept[system_hidden_frames(system, ensemble.encoding.magnetic)[0]] = False
    return kept


def errors_of_system(ensemble: Ensemble, path: Path) -> SystemErrors:
    system, symbols, atypes, moments = load_for(ensemble, path)
    coords, cells = system.data["coords"], system.data["cells"]
    energies, forces = ensemble.energy_forces(coords, cells, atypes, symbols, moments)
    natoms = len(symbols)
    kept = trained_labels(ensemble, system)  # the labels a model can rank
    e_dft = system.data["energies"] / natoms
    f_dft = system.data["forces"]
    flip = None
    if ensemble.has_spin:
        flipped, _ = ensemble.energy_forces(coords, cells, atypes, symbols, -moments)
        flip = float(np.mean(np.abs(flipped - energies)) / natoms * 1000)
    return SystemErrors(
        name=str(path), n_frames=len(coords), n_atoms=natoms,
        rmse_e=float(np.sqrt(np.mean((energies / natoms - e_dft) ** 2)) * 1000),
        rmse_f=float(np.sqrt(np.mean((forces - f_dft) ** 2)) * 1000),
        flip_asymmetry=flip, ranking=state_ranking(e_dft[kept], energies[kept] / natoms, geometry_groups(coords, cells)[kept]),
        energies=(e_dft, energies / natoms), forces=(f_dft.ravel(), forces.ravel()))


def summary(models: Sequence[str | Path], systems: Sequence[Path], max_parity_points: int = 3000,
            seed: int = 0) -> dict:
    """Errors of the ensemble of `models` on `systems` as plain JSON: overall and per system, with
    DFT-vs-model parity data (every energy per atom; force components subsampled)."""
    ensemble = Ensemble(models)
    results = [errors_of_system(ensemble, Path(s)) for s in systems]
    e_dft = np.concatenate([r.energies[0] for r in results])
    e_model = np.concatenate([r.energies[1] for r in results])
    f_dft = np.concatenate([r.forces[0] for r in results])
    f_model = np.concatenate([r.forces[1] for r in results])
    keep = np.sort(np.random.default_rng(seed).permutation(len(f_dft))[:max_parity_points])
    return {
        "models": [Path(m).name for m in models],
        "n_frames": int(len(e_dft)),
        "rmse_e": float(np.sqrt(np.mean((e_model - e_dft) ** 2)) * 1000),
        "rmse_f": float(np.sqrt(np.mean((f_model - f_dft) ** 2)) * 1000),
        "max_f_error": float(np.max(np.abs(f_model - f_dft)) * 1000),
        "systems": [{"name": Path(r.name).name, "n_frames": r.n_frames, "rmse_e": r.rmse_e, "rmse_f": r.rmse_f,
                     "flip_asymmetry": r.flip_asymmetry,
                     "state_ranking": None if r.ranking is None else asdict(r.ranking)} for r in results],
        "parity": {"e_dft": e_dft.tolist(), "e_model": e_model.tolist(),
                   "f_dft": f_dft[keep].tolist(), "f_model": f_model[keep].tolist()},
    }
