"""Import VASP (ISPIN = 2) results with their per-ion moments into spingen's deepmd/npy data.

Parsing is ASE's: ``ase.io.read(..., format="vasp-out")`` splits an OUTCAR into ionic steps and
gives each step's cell, positions, forces, stress, energies and the ``tot`` column of that step's
``magnetization (x)`` table, so moments and labels always come from the same ionic step.
(pymatgen's ``Outcar`` keeps only the last moments table and no forces.) ASE does not expose SCF
convergence or ISPIN, so a light scan of the OUTCAR reads ISPIN, NELM and the number of
electronic steps of every ionic step (``Iteration  N(  M)`` lines). A step that took NELM steps
counts as unconverged even if its last step met EDIFF (as dpdata and custodian count it).

Compressed files (gzip, xz, bzip2: OUTCAR.gz, vasprun.xml.gz, ...) are read transparently; the
compression is recognised by the file's first bytes, not its name.

What is stored, per file: by default ONE frame, the LAST complete ionic step (the single point of
an NSW = 0 run, the final geometry of a relaxation). With ``all_steps`` (``init-data
--all-steps``), every complete ionic step 1, 1 + stride, 1 + 2*stride, ... of an AIMD run or a
relaxation, each with the moments of its own ``magnetization (x)`` table; selected steps whose SCF
reached NELM are left out and counted. Energy: the free energy TOTEN (``free energy
TOTEN`` / vasprun's ``e_fr_energy``), as DP-GEN and dpdata store it, not energy(sigma->0).
Virial = -stress * volume (eV), when VASP printed the stress. Moments: raw ``tot`` values in uB.
Cell and positions stay in VASP's Cartesian frame (dpdata's VASP readers rotate the cell to
lower-triangular form; nothing here needs that, and a collinear moment is not a vector to rotate).

Refused, each with one message naming the file: ISPIN = 1 or no moments table; non-collinear
moments; the used ionic step reached NELM electronic steps (SCF not converged; with all_steps:
every selected step did); a vasprun.xml without an OUTCAR of the same run next to it (vasprun.xml
holds no per-ion moments); a compressed file that cannot be decompressed.

Refused frames (``import_vasp``; not written, reported with file, ionic step and test), see
``poison_reasons``: non-finite values; a positive total energy; a force above MAX_FORCE eV/A; an
energy per atom far from the other frames of the same composition in the import (robust z-score
on the median absolute deviation above ENERGY_Z_MAX and more than ENERGY_MIN_DEVIATION eV/atom
from their median, tested when at least ENERGY_MIN_FRAMES frames remain).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import ase.io
import dpdata
import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

from spingen.data.npy import AppendResult, append_frames, build_system
from spingen.errors import InputError

__all__ = [
    "ENERGY_MIN_DEVIATION", "ENERGY_MIN_FRAMES", "ENERGY_Z_MAX", "MAX_FORCE",
    "ImportReport", "OutcarScan", "VaspFrame", "VaspImportError", "VaspRead",
    "check_type_map", "composition_name", "import_vasp", "open_vasp_file", "poison_reasons",
    "read_vasp", "read_vasp_frames", "scan_outcar",
]

# Tests that refuse a frame of an import (poison_reasons). A blown-up run (atoms too close, a
# diverged MD) shows as positive total energies, huge forces or energies far from everything else.
MAX_FORCE = 50.0  # eV/A: largest |F| of one atom a frame may hold (DFT forces of sane frames: < ~20)
ENERGY_Z_MAX = 10.0  # robust z-score |e - median| / (1.4826 * MAD) of the energy per atom above which...
ENERGY_MIN_DEVIATION = 2.0  # ...a frame is refused, if also more than this many eV/atom from the median
ENERGY_MIN_FRAMES = 3  # fewest frames of one composition (passing the other tests) for the energy test
# (A real LDA+U relaxation, FeO in tests/data/vasp, spans 1.9 eV/atom while its spin state changes:
# robust z up to 5.4, 1.6 eV/atom from the median; both bounds keep such frames.)

_COMPRESSIONS = ((b"\x1f\x8b", "gzip", gzip.open), (b"\xfd7zXZ\x00", "xz", lzma.open), (b"BZh", "bzip2", bz2.open))
_COMPRESSED_SUFFIXES = (".gz", ".xz", ".bz2")
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


class VaspImportError(ValueError):
    """A VASP file that cannot become spingen data; str() is "PATH: reason"."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class VaspFrame:
    """One labeled ionic step: A, eV, eV/A, moments in uB; atoms in the file's order."""

    source: Path
    ionic_step: int  # 1-based, as in the OUTCAR's "Iteration N(M)"
    symbols: tuple[str, ...]
    cell: np.ndarray  # (3, 3)
    positions: np.ndarray  # (natoms, 3), Cartesian
    energy: float  # free energy TOTEN
    forces: np.ndarray  # (natoms, 3)
    virial: np.ndarray | None  # (3, 3) or None without stress
    moments: np.ndarray  # (natoms,)
    outcar: Path  # the OUTCAR the moments and the SCF check came from (source itself for an OUTCAR)
    total_moment: float | None = None  # the cell's total moment ("number of electron ... magnetization")

    def to_system(self, type_map: Sequence[str] | None = None) -> dpdata.LabeledSystem:
        return build_system(
            self.symbols, self.cell[None], self.positions[None], np.array([self.energy]),
            self.forces[None], self.moments[None],
            virials=None if self.virial is None else self.virial[None], type_map=type_map,
        )


@dataclass(frozen=True)
class OutcarScan:
    """What ASE does not report: ISPIN, NELM, non-collinearity, electronic steps per ionic step."""

    ispin: int | None
    nelm: int | None
    noncollinear: bool
    electronic_steps: dict[int, int]  # ionic step (1-based) -> electronic steps it took


_NEEDS = "spingen needs ISPIN = 2 per-ion moments"
_ITERATION = re.compile(r"Iteration\s+(\d+)\s*\(\s*(\d+)\s*\)")
_HEADER = {key: re.compile(rf"^\s*{key}\s*=\s*(\S+?);?\s") for key in ("ISPIN", "NELM", "LNONCOLLINEAR")}


def _compression(path: Path) -> tuple[str, object] | None:
    """(name, opener) of the file's compression, from its first bytes; None for a plain file."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next(((name, opener) for magic, name, opener in _COMPRESSIONS if head.startswith(magic)), None)


def open_vasp_file(path: str | Path, binary: bool = False):
    """Open a VASP output for reading, decompressing gzip/xz/bzip2 files (recognised by their first
    bytes) on the fly; text mode replaces undecodable bytes."""
    path = Path(path)
    compression = _compression(path)
    if compression is None:
        return open(path, "rb") if binary else open(path, errors="replace")
    stream = compression[1](path, "rb")
    return stream if binary else _NamedText(stream, str(path))


class _NamedText(io.TextIOWrapper):
    """Decompressed text that keeps the file's name (ASE's OUTCAR reader asks for ``fd.name``; xz
    and bzip2 streams have none)."""

    def __init__(self, buffer, name: str):
        super().__init__(buffer, errors="replace")
        self._path_name = name

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._path_name


def scan_outcar(path: str | Path) -> OutcarScan:
    """One pass over an OUTCAR for ISPIN, NELM, LNONCOLLINEAR and the SCF length of each ionic step."""
    header: dict[str, str] = {}
    steps: dict[int, int] = {}
    with open_vasp_file(path) as fh:
        for line in fh:
            if "Iteration" in line:
                m = _ITERATION.search(line)
                if m:
                    ionic, electronic = int(m.group(1)), int(m.group(2))
                    steps[ionic] = max(steps.get(ionic, 0), electronic)
            elif len(header) < len(_HEADER) and "=" in line:
                for key, rx in _HEADER.items():
                    if key not in header and (m := rx.match(line)):
                        header[key] = m.group(1)
    ispin = int(header["ISPIN"]) if "ISPIN" in header else None
    nelm = int(header["NELM"]) if "NELM" in header else None
    return OutcarScan(ispin, nelm, header.get("LNONCOLLINEAR", "F").upper().startswith("T"), steps)


class VaspRead(NamedTuple):
    """What one file gives: its frames, and the selected ionic steps left out as unconverged."""

    frames: list[VaspFrame]
    unconverged: list[int]  # selected ionic steps (1-based) whose SCF reached NELM (all_steps only)
    nsteps: int  # complete ionic steps in the file


def read_vasp_frames(path: str | Path, all_steps: bool = False, stride: int = 1) -> list[VaspFrame]:
    """Frames of a spin-polarized VASP OUTCAR or vasprun.xml (see read_vasp): by default the last
    complete ionic step only; with all_steps, every stride-th converged one."""
    return read_vasp(path, all_steps, stride).frames


def read_vasp(path: str | Path, all_steps: bool = False, stride: int = 1) -> VaspRead:
    """Frames of a spin-polarized VASP OUTCAR or vasprun.xml, plain or compressed (gzip, xz, bzip2).

    By default one frame, the last complete ionic step, which must have converged. With all_steps,
    ionic steps 1, 1 + stride, 1 + 2*stride, ... each with the moments of its own step; selected
    steps whose SCF reached NELM are left out and listed in ``unconverged`` (the file is refused
    only when all of them did).

    A vasprun.xml gives cell, positions, energy, forces and stress; the per-ion moments and the SCF
    check then come from the OUTCAR of the same run next to it (``OUTCAR``, or the vasprun's name
    with ``vasprun`` replaced by ``OUTCAR`` and ``.xml`` dropped, e.g. vasprun.FeO.xml ->
    OUTCAR.FeO; each also with .gz, .xz or .bz2), which must agree on the number of ionic steps, the
    geometry and the energy. A directory stands for the OUTCAR (or OUTCAR.gz, ...) in it. Raises
    VaspImportError naming the file when the file cannot give spin data.
    """
    if stride < 1:
        raise InputError(f"stride must be a positive integer (every stride-th ionic step), got {stride}")
    path = Path(path)
    if path.is_dir():
        path = next((c for c in _with_suffixes(path / "OUTCAR") if c.is_file()), path / "OUTCAR")
    if not path.is_file():
        raise VaspImportError(path, "no such file")
    try:
        with open_vasp_file(path, binary=True) as fh:
            is_xml = fh.read(256).lstrip().startswith(b"<")
    except _DECOMPRESSION_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    return _read_vasprun(path, all_steps, stride) if is_xml else _read_outcar(path, all_steps, stride)


def _unreadable(path: Path, exc: BaseException) -> VaspImportError:
    compression = _compression(path)
    if compression is None:
        return VaspImportError(path, f"cannot read ({type(exc).__name__}: {exc})")
    return VaspImportError(path, f"cannot decompress this {compression[0]} file ({type(exc).__name__}: {exc}); "
                                 "a truncated or damaged archive?")


def _read_outcar(path: Path, all_steps: bool = False, stride: int = 1) -> VaspRead:
    try:
        scan = scan_outcar(path)
    except _DECOMPRESSION_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    if scan.ispin is None and not scan.electronic_steps:
        raise VaspImportError(path, "not a VASP OUTCAR (no ISPIN in the header, no electronic steps)")
    if scan.noncollinear:  # VASP prints ISPIN = 1 for these
        raise VaspImportError(path, "non-collinear run (LNONCOLLINEAR = T): spingen handles collinear moments")
    if scan.ispin != 2:
        raise VaspImportError(
            path, f"not spin-polarized: ISPIN = {scan.ispin}, no per-ion moments; {_NEEDS}"
        )
    try:
        with open_vasp_file(path) as fh:
            images = ase.io.read(fh, format="vasp-out", index=":")
    except Exception as exc:  # ASE raises ParseError, ValueError, IndexError... on damaged files
        raise VaspImportError(path, f"cannot parse the OUTCAR ({type(exc).__name__}: {exc})") from exc
    if not images:
        raise VaspImportError(path, "no complete ionic step (the run stopped during its first SCF?)")
    nsteps = len(images)
    selected = list(range(1, nsteps + 1, stride)) if all_steps else [nsteps]
    frames, unconverged = [], []
    for step in selected:
        if all_steps and _scf_unconverged(scan, step):
            unconverged.append(step)
            continue
        _check_scf(path, scan, step)
        atoms = images[step - 1]
        moments = atoms.calc.results.get("magmoms")
        if moments is None:
            raise VaspImportError(
                path,
                f"not spin-polarized: ISPIN = 2 but no 'magnetization (x)' table in ionic step {step} "
                f"(set LORBIT = 11); {_NEEDS}",
            )
        frames.append(_frame(path, step, atoms, np.asarray(moments, dtype=float), path))
    if not frames:
        raise VaspImportError(
            path, f"SCF not converged in any of the {len(selected)} selected ionic step(s) (each reached NELM "
            f"{scan.nelm}): nothing to import"
        )
    return VaspRead(frames, unconverged, nsteps)


def _scf_unconverged(scan: OutcarScan, step: int) -> bool:
    n = scan.electronic_steps.get(step)
    return n is not None and scan.nelm is not None and n >= scan.nelm


def _check_scf(path: Path, scan: OutcarScan, step: int) -> None:
    n = scan.electronic_steps.get(step)
    if n is None:
        raise VaspImportError(path, f"no electronic steps found for ionic step {step}: SCF convergence unknown")
    if scan.nelm is not None and n >= scan.nelm:
        msg = f"SCF not converged: {n} electronic steps = NELM {scan.nelm} in ionic step {step} (the frame to import)"
        raise VaspImportError(path, msg)


def _read_vasprun(path: Path, all_steps: bool = False, stride: int = 1) -> VaspRead:
    outcar = _companion_outcar(path)
    if outcar is None:
        looked = ", ".join(c.name for c in _outcar_candidates(path))
        raise VaspImportError(
            path, "vasprun.xml holds no per-ion moments and no OUTCAR of the same run was found next to it "
            f"(looked for {looked}, each also with .gz, .xz or .bz2); give the OUTCAR"
        )
    try:
        from_outcar = _read_outcar(outcar, all_steps, stride)
    except VaspImportError as exc:
        raise VaspImportError(path, f"its OUTCAR {outcar.name}: {exc.reason}") from exc
    try:
        with open_vasp_file(path, binary=True) as fh:
            images = ase.io.read(fh, format="vasp-xml", index=":")
    except Exception as exc:
        raise VaspImportError(path, f"cannot parse the vasprun.xml ({type(exc).__name__}: {exc})") from exc
    msg = f"{outcar.name} next to it is not from the same run (steps, atoms, geometry or energy differ)"
    if len(images) != from_outcar.nsteps:
        raise VaspImportError(path, msg)
    frames = []
    for ref in from_outcar.frames:
        atoms = images[ref.ionic_step - 1]
        if (
            tuple(atoms.get_chemical_symbols()) != ref.symbols
            or np.abs(atoms.positions - ref.positions).max() > 1e-4
            or abs(atoms.calc.results["free_energy"] - ref.energy) > 1e-5
        ):
            raise VaspImportError(path, msg)
        frame = _frame(path, ref.ionic_step, atoms, ref.moments, outcar)
        frames.append(dataclasses.replace(frame, total_moment=ref.total_moment))
    return VaspRead(frames, from_outcar.unconverged, from_outcar.nsteps)


def _with_suffixes(path: Path) -> list[Path]:
    return [path] + [path.with_name(path.name + suffix) for suffix in _COMPRESSED_SUFFIXES]


def _outcar_candidates(vasprun: Path) -> list[Path]:
    out = [vasprun.with_name("OUTCAR")]
    name = vasprun.name
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.startswith("vasprun") and name != "vasprun.xml":
        derived = "OUTCAR" + name[len("vasprun"):].removesuffix(".xml")
        out.append(vasprun.with_name(derived))
    return out


def _companion_outcar(vasprun: Path) -> Path | None:
    candidates = [c for stem in reversed(_outcar_candidates(vasprun)) for c in _with_suffixes(stem)]
    return next((p for p in candidates if p.is_file()), None)


def _frame(path: Path, step: int, atoms, moments: np.ndarray, outcar: Path) -> VaspFrame:
    results = atoms.calc.results
    if moments.shape != (len(atoms),):
        raise VaspImportError(path, f"moments have shape {moments.shape}, expected {len(atoms)} collinear values")
    stress = results.get("stress")
    virial = None if stress is None else -voigt_6_to_full_3x3_stress(stress) * atoms.get_volume()
    return VaspFrame(
        source=path, ionic_step=step, symbols=tuple(atoms.get_chemical_symbols()),
        cell=np.array(atoms.cell[:], dtype=float), positions=atoms.get_positions(),
        energy=float(results["free_energy"]), forces=np.array(results["forces"], dtype=float),
        virial=virial, moments=moments.copy(), outcar=outcar,
        total_moment=None if results.get("magmom") is None else float(results["magmom"]),
    )


@dataclass
class ImportReport:
    """Outcome of import_vasp. Exit-code policy: 1 if any file or frame was refused (the good ones are
    still written, every refusal is listed), else 0. Ionic steps left out because their SCF did not
    converge (all_steps) are counted but are no refusal."""

    out_dir: Path
    systems: dict[str, AppendResult] = field(default_factory=dict)  # system dir name -> result
    sources: dict[str, list[Path]] = field(default_factory=dict)  # system dir name -> files
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (file, "FILE: reason")
    rejected: list[tuple[Path, int, str]] = field(default_factory=list)  # (file, ionic step, "FILE: step: why")
    unconverged: dict[Path, list[int]] = field(default_factory=dict)  # file -> ionic steps left out
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.refused or self.rejected else 0

    def format(self) -> str:
        nfiles = len({p for v in self.sources.values() for p in v})
        frames = f" and {len(self.rejected)} frame(s)" if self.rejected else ""
        lines = [f"imported {nfiles} file(s) into {self.out_dir}, refused {len(self.refused)} file(s){frames}"]
        for name, res in sorted(self.systems.items()):
            dup = f", {res.duplicates} duplicate(s) skipped (already in the system)" if res.duplicates else ""
            lines.append(f"  {name}: +{res.added} frame(s){dup}, {res.total} in the system")
        if self.unconverged:
            n = sum(len(v) for v in self.unconverged.values())
            lines.append(f"  excluded {n} ionic step(s) whose SCF did not converge (NELM reached):")
            lines += [f"    {path}: step(s) {_ranges(steps)}" for path, steps in self.unconverged.items()]
        lines += [f"  note: {n}" for n in self.notes]
        if self.refused:
            lines.append("refused:")
            lines += [f"  {message}" for _, message in self.refused]
        if self.rejected:
            lines.append("refused frames (not written):")
            lines += [f"  {message}" for _, _, message in self.rejected]
        return "\n".join(lines)

    __str__ = format


def _ranges(steps: Sequence[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    out, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if j == i else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(out)


def composition_name(symbols: Iterable[str]) -> str:
    """System directory name: elements in alphabetical order with counts, e.g. Fe2O2, K4O6Sn4."""
    symbols = list(symbols)
    return "".join(f"{el}{symbols.count(el)}" for el in sorted(set(symbols)))


def check_type_map(type_map: Sequence[str]) -> list[str]:
    """The type map as a list; InputError naming the symbol for a duplicate or a non-element."""
    from ase.data import chemical_symbols

    names = list(type_map)
    known = set(chemical_symbols[1:])
    for i, name in enumerate(names):
        if name not in known:
            hint = f" (did you mean '{name.capitalize()}'?)" if name.capitalize() in known else ""
            raise InputError(f"type map (-t) {' '.join(names)}: '{name}' is not a chemical element symbol{hint}; "
                             "give element symbols such as Li Ni O")
        if name in names[:i]:
            raise InputError(f"type map (-t) {' '.join(names)}: '{name}' is given twice; each element once")
    return names


def poison_reasons(frames: Sequence[VaspFrame]) -> list[str | None]:
    """Why each frame must not become training data (None: it may), for frames of ONE composition.

    The tests, in order (the first that fails is reported): a non-finite energy, force or moment;
    a positive total energy (a blown-up run); an atom with |F| > MAX_FORCE eV/A; an energy per atom
    far from the other frames: with at least ENERGY_MIN_FRAMES frames passing the earlier tests,
    robust z = |e - median| / (1.4826 * MAD) > ENERGY_Z_MAX AND |e - median| > ENERGY_MIN_DEVIATION
    eV/atom (e: energy per atom, median and MAD, the median absolute deviation, over those frames).
    """
    reasons: list[str | None] = []
    for f in frames:
        fmax = float(np.max(np.linalg.norm(f.forces, axis=1))) if len(f.forces) else 0.0
        if not (np.isfinite(f.energy) and np.all(np.isfinite(f.forces)) and np.all(np.isfinite(f.moments))):
            reasons.append("non-finite energy, force or moment (test: all values finite)")
        elif f.energy > 0:
            reasons.append(f"positive total energy {f.energy:+.6g} eV (test: total energy > 0, a blown-up run)")
        elif fmax > MAX_FORCE:
            reasons.append(f"force of {fmax:.4g} eV/A on one atom (test: |F| > {MAX_FORCE:g} eV/A)")
        else:
            reasons.append(None)
    ok = [i for i, r in enumerate(reasons) if r is None]
    if len(ok) < ENERGY_MIN_FRAMES:
        return reasons
    per_atom = np.array([frames[i].energy / len(frames[i].symbols) for i in ok])
    median = float(np.median(per_atom))
    scale = 1.4826 * float(np.median(np.abs(per_atom - median)))
    for i, e in zip(ok, per_atom):
        deviation = abs(e - median)
        z = deviation / scale if scale > 0 else np.inf
        if z > ENERGY_Z_MAX and deviation > ENERGY_MIN_DEVIATION:
            reasons[i] = (
                f"energy {e:.6g} eV/atom is {deviation:.4g} eV/atom from the median {median:.6g} eV/atom of the "
                f"{len(ok)} {composition_name(frames[i].symbols)} frames of this import (test: robust z-score "
                f"|e - median| / (1.4826 MAD) = {z:.3g} > {ENERGY_Z_MAX:g} and |e - median| > "
                f"{ENERGY_MIN_DEVIATION:g} eV/atom)"
            )
    return reasons


def import_vasp(
    paths: Iterable[str | Path], out_dir: str | Path, type_map: Sequence[str] | None = None,
    all_steps: bool = False, stride: int = 1,
) -> ImportReport:
    """VASP OUTCAR/vasprun.xml files (plain, .gz, .xz, .bz2) -> deepmd/npy systems under out_dir
    (``spingen init-data``).

    One frame per file (its last ionic step), or with all_steps every stride-th converged ionic step
    (read_vasp). Frames are grouped by composition, one system directory per composition (see
    composition_name), atoms sorted by type. Frames failing a test of poison_reasons (positive
    energy, |F| > MAX_FORCE, energy per atom far outside the rest of the composition) are refused:
    not written, reported with file, ionic step and test. An existing system of that name gets the
    new frames appended (read + concat + atomic rewrite); frames identical to ones already there
    (append_frames: same cell, coordinates, energy, forces, virial and moments, whatever the type-map
    order) are skipped and counted. type_map defaults to the sorted elements of the imported files;
    a duplicate or non-element symbol in it raises InputError before anything is read. Refused
    files do not stop the others: they are listed in the report, whose exit_code is then 1.
    """
    out_dir = Path(out_dir)
    given_map = check_type_map(type_map) if type_map is not None else None
    if stride < 1:
        raise InputError(f"--stride must be a positive integer (import every N-th ionic step), got {stride}")
    report = ImportReport(out_dir)
    frames: list[VaspFrame] = []
    runs_seen: set[Path] = set()
    for p in paths:
        try:
            read = read_vasp(p, all_steps, stride)
        except VaspImportError as exc:
            report.refused.append((exc.path, str(exc)))
            continue
        except OSError as exc:
            report.refused.append((Path(p), f"{p}: cannot read ({exc})"))
            continue
        frames += read.frames
        run = read.frames[0].outcar
        if read.unconverged and run.resolve() not in runs_seen:
            report.unconverged[run] = read.unconverged
        runs_seen.add(run.resolve())
    frames = _one_frame_per_step(frames, report)
    if not frames:
        return report
    names = given_map if given_map is not None else sorted({s for f in frames for s in f.symbols})
    groups: dict[str, list[VaspFrame]] = {}
    for frame in frames:
        unknown = sorted(set(frame.symbols) - set(names))
        if unknown:
            msg = f"{frame.source}: elements {unknown} are not in type_map {names}"
            if (frame.source, msg) not in report.refused:
                report.refused.append((frame.source, msg))
            continue
        groups.setdefault(composition_name(frame.symbols), []).append(frame)
    for name, group in groups.items():
        kept = []
        for frame, reason in zip(group, poison_reasons(group)):
            if reason is None:
                kept.append(frame)
            else:
                message = f"{frame.source}: ionic step {frame.ionic_step}: {reason}"
                report.rejected.append((frame.source, frame.ionic_step, message))
        group = kept
        if not group:
            continue
        if any(f.virial is None for f in group) and any(f.virial is not None for f in group):
            report.notes.append(f"{name}: some files printed no stress; virials dropped for this import")
            group = [_without_virial(f) for f in group]
        systems = [f.to_system(names) for f in group]
        merged = systems[0]
        merged.sort_atom_types()
        for s in systems[1:]:
            s.sort_atom_types()
            merged.append(s)
        try:
            report.systems[name] = append_frames(out_dir / name, merged)
        except (RuntimeError, ValueError, AssertionError) as exc:  # dpdata's refusals to concatenate
            sources = list(dict.fromkeys(f.source for f in group))
            report.refused += [(p, f"{p}: cannot append to {out_dir / name}: {exc}") for p in sources]
            continue
        report.sources[name] = list(dict.fromkeys(f.source for f in group))
    return report


def _one_frame_per_step(frames: list[VaspFrame], report: ImportReport) -> list[VaspFrame]:
    """One frame per ionic step of a run: of an OUTCAR given with the vasprun.xml that uses it, keep
    the vasprun frames (forces with more digits); a file given twice counts once."""
    by_step: dict[tuple[Path, int], VaspFrame] = {}
    for frame in frames:
        key = (frame.outcar.resolve(), frame.ionic_step)
        kept = by_step.get(key)
        if kept is None:
            by_step[key] = frame
            continue
        if kept.source.resolve() == frame.source.resolve():
            note = f"{frame.source} given twice: imported once"
        else:
            if kept.source == kept.outcar:
                by_step[key] = frame
                kept, frame = frame, kept
            note = f"{frame.source} is the same run as {kept.source}: imported once, from the latter"
        if note not in report.notes:
            report.notes.append(note)
    return list(by_step.values())


def _without_virial(frame: VaspFrame) -> VaspFrame:
    return VaspFrame(**{**frame.__dict__, "virial": None})
