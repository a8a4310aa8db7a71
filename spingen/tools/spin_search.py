"""`spingen spin-search`: the lowest-energy collinear moments of one structure under trained spin model(s).

For a user who has frozen deepmd-kit spin model(s) and a POSCAR/extxyz: reads the structure with
ase, builds the moment levels from --moments, runs ``search_ground_state`` through
``DeepmdSpinModel`` (ensemble mean if several models), prints the ground state, the k lowest
distinct states, and MAGMOM lines for VASP (to -o or stdout).

eta (A/uB) is the model's virtual_scale, read from the model unless --eta is given. The offset d
(A) and the sign convention (spin/flip_symmetry "canonical") are not stored in a deepmd-kit model:
they are read from the spin_encoding.json that spingen's train stage puts beside each model;
without one, --offset is required (spin.offset of the param.json the model was trained with).
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from spingen.cells import right_handed
from spingen.errors import InputError
from spingen.labelers.vasp import compress


def parse_moments(items: Sequence[str]) -> dict[str, list[float]]:
    """['Ni=1,3', 'Co=0,1,4,5'] -> {'Ni': [1.0, 3.0], 'Co': [0.0, 1.0, 4.0, 5.0]}."""
    out: dict[str, list[float]] = {}
    for item in items:
        element, sep, values = item.partition("=")
        element = element.strip()
        if not sep or not element or not values.strip():
            raise InputError(f"--moments: '{item}' is not ELEMENT=m1,m2,... (e.g. Ni=1,3)")
        try:
            mags = [abs(float(v)) for v in values.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--moments: '{item}': the magnitudes must be numbers (uB)") from None
        if element in out:
            raise InputError(f"--moments: {element} is given twice")
        out[element] = mags
    return out


def _fmt(value: float) -> str:
    v = round(float(value), 4) + 0.0
    if v == 0:
        return "0"
    text = f"{v:.6g}"
    return text if ("." in text or "e" in text) else text + ".0"


def read_structure(path: str):
    from ase.io import read

    p = Path(path)
    if not p.is_file():
        raise InputError(f"structure file '{path}' does not exist")
    try:
        atoms = read(str(p))
    except Exception as err:  # noqa: BLE001 - ase raises many kinds
        raise InputError(f"cannot read structure '{path}' with ase: {err}") from None
    if isinstance(atoms, list):
        atoms = atoms[-1]
    return right_handed(atoms)


def check_model_files(models: Sequence[str]) -> None:
    """Every path is a frozen deepmd-kit model file, or InputError naming it."""
    from deepmd.backend.backend import Backend

    for path in models:
        if not Path(path).is_file():
            raise InputError(f"model file '{path}' does not exist")
        try:
            Backend.detect_backend_by_model(str(path))
            loadable = Path(path).suffix not in (".pth", ".pt") or zipfile.is_zipfile(path)  # torch writes zips
        except ValueError:  # a suffix no deepmd-kit backend reads
            loadable = False
        if not loadable:
            raise InputError(f"model file '{path}' is not a frozen deepmd-kit model (spingen's are the .pth zip "
                             "archives of `dp --pt freeze`, e.g. iter.000000/00.train/graph.000.pth)")


def load_encoding(models: Sequence[str], structure: str, symbols: list[str], magnitudes: dict[str, list[float]],
                  eta: float | None, offset: float | None):
    """(DeepPots, SpinEncoding) of the models, after checking that they know the structure's elements
    and have a spin for every element of --moments."""
    from spingen.deepmd_model import load_models, model_spin_settings, resolve_encoding

    dps = load_models(list(models))
    type_map = list(dps[0].get_type_map())
    not_in_model = sorted(set(symbols) - set(type_map))
    if not_in_model:
        raise InputError(f"elements {not_in_model} of '{structure}' are not in the model's type_map {type_map}")
    unknown = sorted(set(magnitudes) - set(type_map))
    if unknown:
        raise InputError(f"--moments: elements {unknown} are not in the model's type_map {type_map}")
    absent = sorted(set(magnitudes) - set(symbols))
    if absent:
        raise InputError(f"--moments: elements {absent} do not occur in '{structure}'")
    spin_scales = model_spin_settings(dps[0])
    if spin_scales:
        no_spin = sorted(set(magnitudes) - set(spin_scales))
        if no_spin:
            raise InputError(f"--moments: the model has no spin for {no_spin} (spin elements: {sorted(spin_scales)})")
    if eta is not None and any(abs(s - eta) > 1e-9 for s in spin_scales.values()):
        print(f"warning: --eta {eta} differs from the model's virtual_scale {spin_scales}", file=sys.stderr)
    try:
        return dps, resolve_encoding(dps, offset=offset, virtual_scale=eta, path=models[0])
    except ValueError as err:
        flag = "--offset" if "offset" in str(err) else "--eta"
        raise InputError(f"{flag} is required: {err}") from None


def searched_ions(symbols: list[str], magnitudes: dict[str, list[float]], magnetic: Sequence[int] | None) -> list[int]:
    """Indices of the ions whose moments are searched: --magnetic, else every ion of an element in --moments."""
    if not magnetic:
        return [i for i, s in enumerate(symbols) if s in magnitudes]
    sel = sorted(set(int(i) for i in magnetic))
    bad = [i for i in sel if not 0 <= i < len(symbols) or symbols[i] not in magnitudes]
    if bad:
        raise InputError(f"--magnetic: atoms {bad} are out of range or not of an element in --moments "
                         f"{sorted(magnitudes)}")
    return sel


def run(models: Sequence[str], structure: str, moments: Sequence[str], *, magnetic: Sequence[int] | None = None,
        eta: float | None = None, offset: float | None = None, nupdown: float | None = None, k: int = 5,
        seed: int = 0, output: str | None = None, batch_size: int | None = None, max_evaluations: int | None = None,
        cold_runs: int | None = None, symmetrize: bool = False, out: TextIO | None = None) -> int:
    """The tool itself; returns the exit code. Bad input raises InputError."""
    out = out or sys.stdout
    magnitudes = parse_moments(moments)
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}")
    if max_evaluations is not None and max_evaluations < 1:
        raise InputError(f"--max-evaluations must be >= 1, got {max_evaluations}")
    if cold_runs is not None and cold_runs < 1:
        raise InputError(f"--cold-runs must be >= 1, got {cold_runs}")
    check_model_files(models)
    atoms = read_structure(structure)
    symbols = atoms.get_chemical_symbols()
    dps, encoding = load_encoding(models, structure, symbols, magnitudes, eta, offset)
    sel = searched_ions(symbols, magnitudes, magnetic)

    from spingen.deepmd_model import DeepmdSpinModel
    from spingen.spin import MomentLevels, SymmetrizedModel, search_ground_state

    searched_symbols = [s if i in set(sel) else f"{s}:fixed" for i, s in enumerate(symbols)]
    background = np.asarray(atoms.get_initial_magnetic_moments(), dtype=float).reshape(len(symbols))
    try:
        levels = MomentLevels(magnitudes, searched_symbols, total_moment=nupdown)
        model = DeepmdSpinModel(dps, atoms.positions, atoms.cell.array if atoms.pbc.any() else None, symbols,
                                encoding, np.array(sel, dtype=int), background_moments=background,
                                batch_size=batch_size)
    except ValueError as err:
        raise InputError(str(err)) from None
    assert np.array_equal(levels.magnetic_indices, model.magnetic_indices)
    if symmetrize and np.any(np.delete(background, sel) != 0):
        raise InputError("--symmetrize reverses every moment: the atoms outside --magnetic must have no moment")
    searched = SymmetrizedModel(model) if symmetrize else model
    result = search_ground_state(searched, levels, seed=seed, n_lowest=k, max_evaluations=max_evaluations,
                                 cold_runs=cold_runs)

    counts = {el: searched_symbols.count(el) for el in magnitudes}
    print(f"structure   {structure}: {len(symbols)} atoms, {atoms.get_chemical_formula()}", file=out)
    print(f"models      {len(dps)} ({', '.join(str(m) for m in models)}); eta {encoding.virtual_scale} A/uB, "
          f"offset {encoding.offset} A",
          file=out)
    print("levels      " + "; ".join(f"{el} x{counts[el]}: +-{', +-'.join(_fmt(v) for v in sorted(magnitudes[el]))}"
                                      for el in magnitudes)
          + (f"; total moment {nupdown}" if nupdown is not None else "") + " (global sign fixed)", file=out)
    runs = f" (the best of {result.n_runs} runs, {result.runs_at_best} reached it)" if result.n_runs > 1 else ""
    print(f"search      {result.method}{runs}; {result.n_evaluations} evaluations of {levels.n_configurations} "
          f"configurations ({100.0 * result.n_evaluations / levels.n_configurations:.3g}%)", file=out)
    print_states(result, model, symbols, background, symmetrize, out, output)
    return 0


def print_states(result, model, symbols: list[str], background: np.ndarray, symmetrize: bool, out: TextIO,
                 output: str | None) -> None:
    """The ground state, the ensemble's spread on it, the lowest states and their MAGMOM lines (to output or out)."""
    states = [np.asarray(m, dtype=float) for m, _ in result.lowest]
    energies = np.array([e for _, e in result.lowest])

    def full(m: np.ndarray) -> np.ndarray:
        f = background.copy()
        f[model.magnetic_indices] = m
        return f

    print(f"ground state energy {result.best_energy:.6f} eV" + (" (E_sym = (E(S) + E(-S)) / 2)" if symmetrize else ""),
          file=out)
    if model.n_models > 1:
        members, _ = model.evaluate_members(states)
        if symmetrize:
            members = 0.5 * (members + model.evaluate_members(-np.asarray(states))[0])
        spread = members.std(axis=0)
        print(f"ensemble spread (std of {model.n_models} models) of the ground state: {1000 * spread[0]:.2f} meV",
              file=out)
    print("  index element  moment", file=out)
    for i, m in zip(model.magnetic_indices, result.best_moments):
        print(f"  {i:5d} {symbols[i]:<7s} {m:+7.3f}", file=out)
    seen = "of all" if result.method == "enumeration" else "seen by the search"
    print(f"lowest {len(states)} distinct states {seen} (E - E0, meV; moments in ion order "
          f"{' '.join(f'{symbols[i]}{i}' for i in model.magnetic_indices)}):", file=out)
    for n, (m, e) in enumerate(zip(states, energies), start=1):
        print(f"  {n:3d} {1000 * (e - energies[0]):10.2f}  {' '.join(_fmt(v) for v in m)}", file=out)

    lines = [f"MAGMOM = {compress(full(states[0]))}   # ground state, E = {energies[0]:.6f} eV"]
    for n, (m, e) in enumerate(zip(states[1:], energies[1:]), start=2):
        lines.append(f"# state {n}, E - E0 = {1000 * (e - energies[0]):.2f} meV: MAGMOM = {compress(full(m))}")
    text = "\n".join(lines) + "\n"
    if output:
        Path(output).write_text(text)
        print(f"MAGMOM lines written to {output}", file=out)
    else:
        print(text, end="", file=out)
