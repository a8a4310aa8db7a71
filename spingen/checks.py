"""Checks of param.json against the data it points to (run before anything is submitted)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from spingen.schema import LabelSettings, Param


def system_symbols(system: Path, type_map: tuple[str, ...]) -> list[str]:
    """Chemical symbol of every atom of a deepmd/npy system, checked against type_map."""
    types = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    names_file = system / "type_map.raw"
    names = names_file.read_text().split() if names_file.is_file() else list(type_map)
    if types.size and types.max() >= len(names):
        raise ValueError(f"data '{system}': type.raw has type {types.max()} but only {len(names)} types are named")
    symbols = [names[t] for t in types]
    foreign = sorted(set(symbols) - set(type_map))
    if foreign:
        raise ValueError(f"data '{system}': elements {foreign} are not in type_map {list(type_map)}")
    return symbols


def read_structures(file: Path, fmt: str, type_map: tuple[str, ...]) -> list:
    """Every frame of a structure file (ase.Atoms) as the explore stage reads it, its elements in type_map;
    ValueError names the file and what is wrong with it."""
    from ase.io import read

    if file.is_dir():
        raise ValueError(f"'{file}' is a directory; expected a structure file ({fmt})")
    problem = poscar_problem(file) if fmt == "vasp" else None
    if problem:
        raise ValueError(f"'{file}': {problem}")
    try:
        frames = read(file, index=":", format=fmt)
    except Exception as err:  # ase raises many types for unreadable files
        raise ValueError(f"cannot read '{file}' as {fmt} ({type(err).__name__}: {' '.join(str(err).split())})") from None
    if not frames:
        raise ValueError(f"'{file}' holds no structure ({fmt})")
    foreign = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()} - set(type_map))
    if foreign:
        raise ValueError(f"'{file}': elements {foreign} are not in type_map {list(type_map)}")
    return frames


def poscar_problem(file: Path) -> str | None:
    """What ASE misreads or reports obscurely in a VASP 5 POSCAR: a counts line that does not match the
    species line, or counts that do not add up to the coordinate lines (up to the first blank line)."""
    try:
        lines = file.read_text(errors="replace").splitlines()
    except OSError:
        return None  # ase says why
    if len(lines) < 8:
        return None
    species, counts = lines[5].split(), lines[6].split()
    if not species or not counts or not all(c.isdigit() for c in counts) or any(_is_number(s) for s in species):
        return None  # VASP 4 (no species line) or no POSCAR at all: ase says what it finds
    if len(species) != len(counts):
        return (f"its species line names {len(species)} element(s) ({' '.join(species)}) but its counts line has "
                f"{len(counts)} number(s) ({' '.join(counts)})")
    first = 9 if lines[7].strip().lower().startswith("s") else 8  # after 'Selective dynamics', 'Direct'/'Cartesian'
    coordinates = 0
    while first + coordinates < len(lines) and lines[first + coordinates].strip():
        coordinates += 1
    atoms = sum(int(c) for c in counts)
    if coordinates != atoms:
        return f"its counts ({' '.join(counts)}) add up to {atoms} atoms but {coordinates} coordinate lines follow"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def system_moments(system: Path, natoms: int) -> np.ndarray | None:
    """Raw moments (nframes, natoms) of every set of a system, or None without spin.npy."""
    sets = sorted(system.glob("set.*"))
    if not sets or not all((s / "spin.npy").is_file() for s in sets):
        return None
    spins = [np.load(s / "spin.npy").reshape(-1, natoms, 3) for s in sets]
    return np.concatenate(spins)[..., 2]


def check_param_data(param: Param) -> None:
    """type_map vs data, spins present, and no moment that puts a virtual atom on its ion."""
    from spingen.errors import InputError

    spin = param.spin
    observed: dict[str, list[np.ndarray]] = {e: [] for e in spin.magnetic}
    for system in param.init_data_sys:
        try:
            symbols = system_symbols(system, param.type_map)
        except ValueError as err:
            raise InputError(f"{param.path}: key 'init_data_sys': {err}") from None
        if not spin.enabled:
            continue
        moments = system_moments(system, len(symbols))
        if moments is None:
            raise InputError(f"{param.path}: key 'init_data_sys': data '{system}': no spin.npy in its sets; "
                             "a spin model needs the per-ion moments (import VASP runs with `spingen init-data`, "
                             "or set spin/enabled false)")
        for element in spin.magnetic:
            columns = [i for i, s in enumerate(symbols) if s == element]
            observed[element].append(moments[:, columns].ravel())
    if not spin.enabled:
        return
    values = {e: np.concatenate(v) if v else np.zeros(0) for e, v in observed.items()}
    if param.init_gen is not None:  # the start moments of the data to be made stand for its moments
        starts = np.array([m for states in param.init_gen.spin_states for state in states for m in state])
        values = {e: np.concatenate([v, starts]) for e, v in values.items()}
    if isinstance(spin.moments, str):
        absent = [e for e, v in values.items() if v.size == 0]
        if absent:
            raise InputError(f"{param.path}: key 'spin/moments' is \"auto\" but the data holds no {absent} "
                             "atoms to infer their moments from: give them explicitly")
    else:
        for element, levels in spin.moments.items():
            values[element] = np.concatenate([values[element], levels, np.negative(levels)])
    for element, moments in values.items():
        if spin.flip_symmetry != "none" or param.raw.get("model_devi_spin_symmetrize"):  # -S is evaluated too
            moments = np.concatenate([moments, -moments])
        bad = spin.encoding.overlapping_moments(moments, spin.min_virtual_distance)
        if bad:
            raise InputError(
                f"{param.path}: keys 'spin/virtual_scale' ({spin.virtual_scale}) and 'spin/offset' "
                f"({spin.offset}): {element} moment(s) {[round(m, 3) for m in bad[:5]]} uB put the virtual atom "
                f"within {spin.min_virtual_distance} A of its ion (|eta*S + d| too small); choose d/eta away "
                f"from these moments")


def input_warnings(param: Param, settings: LabelSettings) -> list[str]:
    """What `spingen check` and `spingen run` warn of before anything runs: `label_mismatches` and
    `hidden_labels`. settings: the label stage's (spingen.schema.label_settings)."""
    return label_mismatches(param, settings) + hidden_labels(param)


def hidden_labels(param: Param) -> list[str]:
    """One warning per initial data system holding labels the train stage will leave out
    (spingen.model_errors.hidden_state_frames: the moments of a lower label of the same geometry)."""
    from spingen.data.npy import load_system
    from spingen.model_errors import HIDDEN_ENERGY_TOL, HIDDEN_MOMENT_TOL, system_hidden_frames

    if not param.spin.enabled:
        return []
    found = []
    for path in param.init_data_sys:
        hidden, excess = system_hidden_frames(load_system(path), param.spin.magnetic)
        if hidden.size:
            found.append(f"data '{path}': {hidden.size} label(s) repeat the magnetic moments of a lower label of "
                         f"their geometry (within {HIDDEN_MOMENT_TOL:g} uB on every magnetic ion) "
                         f"{1000 * excess.min():.1f}-{1000 * excess.max():.1f} meV/atom above it (more than "
                         f"{1000 * HIDDEN_ENERGY_TOL:g} meV/atom): the spin model cannot tell them apart, so training leaves "
                         "them out (docs/cathode-guide.md section 4)")
    return found


def label_mismatches(param: Param, settings: LabelSettings) -> list[str]:
    """One warning per pair of labeled cells (the initial data's, init_data_gen's and the explored ones), one a
    supercell of the other, whose labels would differ by a discretization error no model can fit: k-point
    meshes (fp_gpaw kpts/kspacing, fp_kspacing) that do not sample the same k-points, and GPAW real-space grids
    out of the supercell's ratio. Empty when all agree or nothing is known.
    settings: the label stage's (spingen.schema.label_settings)."""
    if settings.gpaw is None and (settings.vasp is None or (settings.vasp.kspacing is None
                                                            and settings.vasp.kpoints is None)):
        return []
    pairs = _supercell_pairs(param)
    return _kpoint_mismatches(pairs, settings) + _grid_mismatches(pairs, settings.gpaw)


class SupercellPair(NamedTuple):
    """Two labeled cells (ase.Atoms of their first frame), big = matrix @ small (rows are lattice vectors)."""
    small_name: str
    small: object
    big_name: str
    big: object
    matrix: np.ndarray


def _supercell_pairs(param: Param) -> list[SupercellPair]:
    """Every two labeled cells of which one is a supercell of the other."""
    from spingen.labelers.kmesh import supercell_matrix

    pairs = []
    for (name_a, a), (name_b, b) in itertools.combinations(_labeled_cells(param), 2):
        (small_name, small), (big_name, big) = sorted([(name_a, a), (name_b, b)], key=lambda cell: len(cell[1]))
        matrix = supercell_matrix(small.cell[:], big.cell[:])
        if matrix is not None:
            pairs.append(SupercellPair(small_name, small, big_name, big, matrix))
    return pairs


def _kpoint_mismatches(pairs: list[SupercellPair], settings: LabelSettings) -> list[str]:
    from spingen.labelers.kmesh import folds_onto, kpoint_mesh

    gpaw, vasp = settings.gpaw, settings.vasp
    if gpaw is not None:
        fixed, spacing, key = gpaw.kpts, gpaw.kspacing, "fp_gpaw/kspacing"
    else:
        fixed, spacing, key = vasp.kpoints, vasp.kspacing, "fp_kspacing"

    def mesh(atoms, step):
        return tuple(fixed) if fixed is not None else kpoint_mesh(atoms.cell[:], atoms.pbc, step)

    def mismatched(step):
        return [pair for pair in pairs if not folds_onto(pair.small.cell[:], mesh(pair.small, step),
                                                          pair.big.cell[:], mesh(pair.big, step))]

    found = mismatched(spacing)
    if not found:
        return []
    candidates = np.round(np.arange(spacing or 1.0, 0.1, -0.01), 2)
    better = next((s for s in candidates if not mismatched(s)), None) if fixed is None else None
    advice = (f"; {key} {better:g} would fold them" if better is not None else
              "; choose meshes that fold onto each other (a cell at (3k, m, n) is its 3x1x1 supercell at (k, m, n))")
    return [f"k-points: {big_name} ({len(big)} atoms) at {mesh(big, spacing)} does not sample the k-points of "
            f"{small_name} ({len(small)} atoms) at {mesh(small, spacing)}: labeled so, the two differ by a k-point error "
            f"(60 meV/atom for LiNiO2 at 0.8 /A, docs/benchmarks/spin_loop.md){advice}"
            for small_name, small, big_name, big, _ in found]


def _grid_mismatches(pairs: list[SupercellPair], gpaw) -> list[str]:
    """GPAW only: pairs whose real-space grids are not in the ratio of the supercell (a diagonal M; grids of a
    rotated supercell are not compared), and the largest fp_gpaw/h (a step of 1e-4 A) that puts them in it."""
    from spingen.labelers.kmesh import density_grid

    if gpaw is None:
        return []
    pairs = [pair for pair in pairs if np.count_nonzero(pair.matrix - np.diag(np.diag(pair.matrix))) == 0]

    def grids(pair, h):
        return density_grid(pair.small.cell[:], gpaw.ecut, h), density_grid(pair.big.cell[:], gpaw.ecut, h)

    def in_ratio(pair, h):
        small, big = grids(pair, h)
        return all(n_big == m * n_small for n_small, n_big, m in zip(small, big, np.diag(pair.matrix)))

    def mismatched(h):
        return [pair for pair in pairs if not in_ratio(pair, h)]

    found = mismatched(gpaw.h)
    if not found:
        return []
    coarsest = max(np.max(np.linalg.norm(pair.small.cell[:], axis=1) / grids(pair, gpaw.h)[0]) for pair in pairs)
    candidates = sorted({np.ceil(1e4 * length / n) / 1e4 for pair in pairs
                         for length in np.linalg.norm(pair.small.cell[:], axis=1)
                         for n in range(int(np.ceil(length / coarsest)), int(np.ceil(length / coarsest)) + 8)},
                        reverse=True)
    better = next((h for h in candidates if not mismatched(h)), None)
    advice = (f"; fp_gpaw/h {better:g} would fit them" if better is not None else
              "; set fp_gpaw/h so that each cell's length is a whole number of grid steps")
    lines = []
    for pair in found:
        n_small, n_big = grids(pair, gpaw.h)
        ratio = tuple(int(m) for m in np.diag(pair.matrix))
        lines.append(f"real-space grid: {pair.big_name} ({len(pair.big)} atoms) gets {n_big} points, not {ratio} "
                     f"times the {n_small} of {pair.small_name} ({len(pair.small)} atoms): labeled so, the two differ by GPAW's "
                     f"grid error (3.8 meV/atom for LiNiO2 at 300 eV, the same for every spin state; "
                     f"docs/cathode-guide.md section 3){advice}")
    return lines


def _labeled_cells(param: Param) -> list[tuple[str, object]]:
    """(name, ase.Atoms of its first frame) of every cell the labeler sees: initial data, init_data_gen
    configs, explored structures (each file once)."""
    from ase import Atoms

    cells = []
    for system in param.init_data_sys:
        box = next(iter(sorted(system.glob("set.*/box.npy"))), None)
        if box is None or not (system / "type.raw").is_file():
            continue
        natoms = np.loadtxt(system / "type.raw", dtype=int, ndmin=1).size
        cells.append((f"init_data_sys '{system.name}'", Atoms(f"X{natoms}", cell=np.load(box)[0].reshape(3, 3),
                                                               pbc=True)))
    files = [f for group in param.sys_configs for f in group]
    if param.init_gen is not None:
        files = list(param.init_gen.configs) + files
    for file in dict.fromkeys(files):
        cells.append((f"'{file.name}'", read_structures(file, param.sys_format, param.type_map)[0]))
    return cells
