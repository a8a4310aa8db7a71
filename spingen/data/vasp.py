"""Import VASP (ISPIN = 2) results with their per-ion moments into spingen's deepmd/npy data.

Parsing is ASE's: ``ase.io.read(..., format="vasp-out")`` splits an OUTCAR into ionic steps and
gives each step's cell, positions, forces, stress, energies and the ``tot`` column of that step's
``magnetization (x)`` table, so moments and labels always come from the same ionic step.
(pymatgen's ``Outcar`` keeps only the last moments table and no forces.) ASE does not expose SCF
convergence or ISPIN, so a light scan of the OUTCAR reads ISPIN, NELM and the number of
electronic steps of every ionic step (``Iteration  N(  M)`` lines). A step that took NELM steps
counts as unconverged even if its last step met EDIFF (as dpdata and custodian count it).

What is stored, per file: ONE frame, the LAST complete ionic step (the single point of an
NSW = 0 run, the final geometry of a relaxation). Energy: the free energy TOTEN (``free energy
TOTEN`` / vasprun's ``e_fr_energy``), as DP-GEN and dpdata store it, not energy(sigma->0).
Virial = -stress * volume (eV), when VASP printed the stress. Moments: raw ``tot`` values in uB.
Cell and positions stay in VASP's Cartesian frame (dpdata's VASP readers rotate the cell to
lower-triangular form; nothing here needs that, and a collinear moment is not a vector to rotate).

Refused, each with one message naming the file: ISPIN = 1 or no moments table; non-collinear
moments; the used ionic step reached NELM electronic steps (SCF not converged); a vasprun.xml
without an OUTCAR of the same run next to it (vasprun.xml holds no per-ion moments).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import ase.io
import dpdata
import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

from spingen.data.npy import AppendResult, append_frames, build_system

__all__ = [
    "ImportReport", "OutcarScan", "VaspFrame", "VaspImportError",
    "composition_name", "import_vasp", "read_vasp_frames", "scan_outcar",
]


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


def scan_outcar(path: str | Path) -> OutcarScan:
    """One pass over an OUTCAR for ISPIN, NELM, LNONCOLLINEAR and the SCF length of each ionic step."""
    header: dict[str, str] = {}
    steps: dict[int, int] = {}
    with open(path, errors="replace") as fh:
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


def read_vasp_frames(path: str | Path) -> list[VaspFrame]:
    """Frames of a spin-polarized VASP OUTCAR or vasprun.xml: the last complete ionic step only.

    A vasprun.xml gives cell, positions, energy, forces and stress; the per-ion moments and the SCF
    check then come from the OUTCAR of the same run next to it (``OUTCAR``, or the vasprun's name
    with ``vasprun`` replaced by ``OUTCAR`` and ``.xml`` dropped, e.g. vasprun.FeO.xml ->
    OUTCAR.FeO), which must agree on the number of ionic steps, the geometry and the energy.
    A directory stands for the OUTCAR in it. Raises VaspImportError naming the file when the file
    cannot give spin data.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "OUTCAR"
    if not path.is_file():
        raise VaspImportError(path, "no such file")
    with open(path, "rb") as fh:
        is_xml = fh.read(256).lstrip().startswith(b"<")
    return [_read_vasprun(path) if is_xml else _read_outcar(path)]


def _read_outcar(path: Path) -> VaspFrame:
    scan = scan_outcar(path)
    if scan.ispin is None and not scan.electronic_steps:
        raise VaspImportError(path, "not a VASP OUTCAR (no ISPIN in the header, no electronic steps)")
    if scan.ispin != 2:
        raise VaspImportError(
            path, f"not spin-polarized: ISPIN = {scan.ispin}, no per-ion moments; {_NEEDS}"
        )
    if scan.noncollinear:
        raise VaspImportError(path, "non-collinear run (LNONCOLLINEAR = T): spingen handles collinear moments")
    try:
        images = ase.io.read(path, format="vasp-out", index=":")
    except Exception as exc:  # ASE raises ParseError, ValueError, IndexError... on damaged files
        raise VaspImportError(path, f"cannot parse the OUTCAR ({type(exc).__name__}: {exc})") from exc
    if not images:
        raise VaspImportError(path, "no complete ionic step (the run stopped during its first SCF?)")
    step = len(images)
    atoms = images[-1]
    _check_scf(path, scan, step)
    moments = atoms.calc.results.get("magmoms")
    if moments is None:
        raise VaspImportError(
            path,
            f"not spin-polarized: ISPIN = 2 but no 'magnetization (x)' table in ionic step {step} "
            f"(set LORBIT = 11); {_NEEDS}",
        )
    return _frame(path, step, atoms, np.asarray(moments, dtype=float), path)


def _check_scf(path: Path, scan: OutcarScan, step: int) -> None:
    n = scan.electronic_steps.get(step)
    if n is None:
        raise VaspImportError(path, f"no electronic steps found for ionic step {step}: SCF convergence unknown")
    if scan.nelm is not None and n >= scan.nelm:
        msg = f"SCF not converged: {n} electronic steps = NELM {scan.nelm} in ionic step {step} (the frame to import)"
        raise VaspImportError(path, msg)


def _read_vasprun(path: Path) -> VaspFrame:
    outcar = _companion_outcar(path)
    if outcar is None:
        raise VaspImportError(
            path, "vasprun.xml holds no per-ion moments and no OUTCAR of the same run was found next to it "
            f"(looked for {', '.join(c.name for c in _outcar_candidates(path))}); give the OUTCAR"
        )
    try:
        from_outcar = _read_outcar(outcar)
    except VaspImportError as exc:
        raise VaspImportError(path, f"its OUTCAR {outcar.name}: {exc.reason}") from exc
    try:
        images = ase.io.read(path, format="vasp-xml", index=":")
    except Exception as exc:
        raise VaspImportError(path, f"cannot parse the vasprun.xml ({type(exc).__name__}: {exc})") from exc
    atoms = images[-1] if images else None
    if (
        atoms is None
        or len(images) != from_outcar.ionic_step
        or tuple(atoms.get_chemical_symbols()) != from_outcar.symbols
        or np.abs(atoms.positions - from_outcar.positions).max() > 1e-4
        or abs(atoms.calc.results["free_energy"] - from_outcar.energy) > 1e-5
    ):
        msg = f"{outcar.name} next to it is not from the same run (steps, atoms, geometry or energy differ)"
        raise VaspImportError(path, msg)
    frame = _frame(path, from_outcar.ionic_step, atoms, from_outcar.moments, outcar)
    return dataclasses.replace(frame, total_moment=from_outcar.total_moment)


def _outcar_candidates(vasprun: Path) -> list[Path]:
    out = [vasprun.with_name("OUTCAR")]
    name = vasprun.name
    if name.startswith("vasprun") and name != "vasprun.xml":
        derived = "OUTCAR" + name[len("vasprun"):].removesuffix(".xml")
        out.append(vasprun.with_name(derived))
    return out


def _companion_outcar(vasprun: Path) -> Path | None:
    return next((p for p in reversed(_outcar_candidates(vasprun)) if p.is_file()), None)


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
    """Outcome of import_vasp. Exit-code policy: 1 if any file was refused (the good files are still
    written, every refusal is listed), else 0."""

    out_dir: Path
    systems: dict[str, AppendResult] = field(default_factory=dict)  # system dir name -> result
    sources: dict[str, list[Path]] = field(default_factory=dict)  # system dir name -> files
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (file, "FILE: reason")
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.refused else 0

    def format(self) -> str:
        nfiles = sum(len(v) for v in self.sources.values())
        lines = [f"imported {nfiles} file(s) into {self.out_dir}, refused {len(self.refused)}"]
        for name, res in sorted(self.systems.items()):
            dup = f", {res.duplicates} duplicate(s) skipped" if res.duplicates else ""
            lines.append(f"  {name}: +{res.added} frame(s){dup}, {res.total} in the system")
        lines += [f"  note: {n}" for n in self.notes]
        if self.refused:
            lines.append("refused:")
            lines += [f"  {message}" for _, message in self.refused]
        return "\n".join(lines)

    __str__ = format


def composition_name(symbols: Iterable[str]) -> str:
    """System directory name: elements in alphabetical order with counts, e.g. Fe2O2, K4O6Sn4."""
    symbols = list(symbols)
    return "".join(f"{el}{symbols.count(el)}" for el in sorted(set(symbols)))


def import_vasp(
    paths: Iterable[str | Path], out_dir: str | Path, type_map: Sequence[str] | None = None
) -> ImportReport:
    """VASP OUTCAR/vasprun.xml files -> deepmd/npy systems under out_dir (``spingen init-data``).

    Frames are grouped by composition, one system directory per composition (see
    composition_name), atoms sorted by type. An existing system of that name gets the new frames
    appended (read + concat + atomic rewrite); frames identical to ones already there are skipped.
    type_map defaults to the sorted elements of the imported files. Refused files do not stop the
    others: they are listed in the report, whose exit_code is then 1.
    """
    out_dir = Path(out_dir)
    report = ImportReport(out_dir)
    frames: list[VaspFrame] = []
    for p in paths:
        try:
            frames += read_vasp_frames(p)
        except VaspImportError as exc:
            report.refused.append((exc.path, str(exc)))
        except OSError as exc:
            report.refused.append((Path(p), f"{p}: cannot read ({exc})"))
    frames = _one_frame_per_run(frames, report)
    if not frames:
        return report
    names = list(type_map) if type_map is not None else sorted({s for f in frames for s in f.symbols})
    groups: dict[str, list[VaspFrame]] = {}
    for frame in frames:
        unknown = sorted(set(frame.symbols) - set(names))
        if unknown:
            msg = f"{frame.source}: elements {unknown} are not in type_map {names}"
            report.refused.append((frame.source, msg))
            continue
        groups.setdefault(composition_name(frame.symbols), []).append(frame)
    for name, group in groups.items():
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
            report.refused += [(f.source, f"{f.source}: cannot append to {out_dir / name}: {exc}")
                               for f in group]
            continue
        report.sources[name] = [f.source for f in group]
    return report


def _one_frame_per_run(frames: list[VaspFrame], report: ImportReport) -> list[VaspFrame]:
    """One frame per run: of an OUTCAR given with the vasprun.xml that uses it, keep the vasprun
    frame (forces with more digits); a file given twice counts once."""
    by_run: dict[Path, VaspFrame] = {}
    for frame in frames:
        key = frame.outcar.resolve()
        kept = by_run.get(key)
        if kept is None:
            by_run[key] = frame
            continue
        if kept.source.resolve() == frame.source.resolve():
            report.notes.append(f"{frame.source} given twice: imported once")
            continue
        if kept.source == kept.outcar:
            by_run[key] = frame
            kept, frame = frame, kept
        report.notes.append(f"{frame.source} is the same run as {kept.source}: imported once, from the latter")
    return list(by_run.values())


def _without_virial(frame: VaspFrame) -> VaspFrame:
    return VaspFrame(**{**frame.__dict__, "virial": None})
