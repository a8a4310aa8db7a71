"""fp_style "vasp": POSCAR, INCAR, KPOINTS (or KSPACING) and POTCAR per task; OUTCAR parsed back.

The POSCAR lists species in runs of equal consecutive atoms (the label stage sorts atoms by
type_map first, so each element is one run). Everything per species follows those runs: the
POTCAR concatenation (from fp_pp_files, by element) and LDAUL/LDAUU/LDAUJ (from fp_ldau; -1/0/0
for species without an entry). The INCAR is the fp_incar template with, per frame, ISPIN 2,
LORBIT 11 if absent, the LDAU block, MAGMOM and NUPDOWN (the template's MAGMOM and NUPDOWN are
dropped: they cannot follow each frame's atoms). Results are read with spingen.data.vasp (free
energy TOTEN, forces, virial, the per-ion `tot` moments of the last ionic step); a step that
reached NELM is a failed frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spingen.errors import InputError
from spingen.labelers.base import Labeler, LabelResult
from spingen.schema import LabelSettings

INCAR, POSCAR, POTCAR, KPOINTS, OUTCAR, VASPRUN = "INCAR", "POSCAR", "POTCAR", "KPOINTS", "OUTCAR", "vasprun.xml"
_FINISHED_MARK = b"General timing and accounting"
_PER_FRAME_KEYS = ("MAGMOM", "NUPDOWN")
_LDAU_KEYS = ("LDAU", "LDAUTYPE", "LDAUL", "LDAUU", "LDAUJ", "LMAXMIX")
_TITEL = re.compile(r"TITEL\s*=\s*\S+\s+([A-Z][a-z]?)")
_GEOMETRY_TOLERANCE = 1e-3  # A: OUTCAR vs POSCAR positions of a single point


def parse_incar(text: str) -> dict[str, str]:
    """INCAR text -> {KEY: value}, in file order; comments (# !) dropped, `;` separates statements."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = re.split(r"[#!]", line, maxsplit=1)[0]
        for statement in line.split(";"):
            if "=" in statement:
                key, value = statement.split("=", 1)
                if key.strip():
                    out[key.strip().upper()] = value.strip()
    return out


def _true(value: str | None) -> bool:
    return value is not None and value.strip().lstrip(".").upper().startswith("T")


def _num(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def compress(values: Sequence[float]) -> str:
    """VASP's run-length form: [0, 0, 0, 1.5, -1.5, -1.5] -> '3*0 1.5 2*-1.5'."""
    words: list[str] = []
    texts = [_num(v) for v in values]
    i = 0
    while i < len(texts):
        j = i
        while j < len(texts) and texts[j] == texts[i]:
            j += 1
        words.append(texts[i] if j - i == 1 else f"{j - i}*{texts[i]}")
        i = j
    return " ".join(words)


def species_runs(symbols: Sequence[str]) -> list[tuple[str, int]]:
    """Runs of equal consecutive symbols: the POSCAR species and count lines."""
    runs: list[tuple[str, int]] = []
    for s in symbols:
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


def potcar_element(text: str) -> str | None:
    """The element a POTCAR is for, from its first TITEL line (None if it has none)."""
    m = _TITEL.search(text)
    return m.group(1) if m else None


class VaspLabeler(Labeler):
    style = "vasp"
    result_file = OUTCAR

    def __init__(self, settings: LabelSettings):
        super().__init__(settings)
        vasp = settings.vasp
        self.template = parse_incar(vasp.incar)
        where = f"fp_incar '{vasp.incar_path}'"
        nsw = self.template.get("NSW", "0").split()[0]
        try:
            nsw_value = int(float(nsw))
        except ValueError:
            raise InputError(f"{where}: NSW = {nsw} is not a number") from None
        if nsw_value > 0:
            raise InputError(f"{where}: NSW = {nsw_value}; labels are single points of the candidate "
                             "geometry: set NSW = 0 (or remove it)")
        if _true(self.template.get("LDAU")) and not settings.ldau:
            raise InputError(f"{where}: LDAU = .TRUE. but fp_ldau is empty; give U per element in fp_ldau "
                             "(per-species LDAUL/LDAUU/LDAUJ in a template cannot follow each frame's species)")
        self.potcars: dict[str, str] = {}
        for element, file in vasp.pp_files.items():
            text = Path(file).read_text(errors="replace")
            named = potcar_element(text)
            if named is not None and named != element:
                raise InputError(f"fp_pp_files: the POTCAR for {element} ({file}) is for {named} "
                                 "(its TITEL line); check the order against type_map or use a mapping")
            self.potcars[element] = text if text.endswith("\n") else text + "\n"

    # ---- inputs
    def write_inputs(self, task_dir: Path, atoms, initial_moments: np.ndarray | None,
                     nupdown: float | None) -> None:
        task_dir = Path(task_dir)
        symbols = atoms.get_chemical_symbols()
        runs = species_runs(symbols)
        missing = sorted({s for s, _ in runs} - set(self.potcars))
        if missing:
            raise ValueError(f"no POTCAR for {missing} (fp_pp_files covers {sorted(self.potcars)})")
        (task_dir / POSCAR).write_text(self.poscar(atoms, runs))
        (task_dir / POTCAR).write_text("".join(self.potcars[s] for s, _ in runs))
        (task_dir / INCAR).write_text(self.incar(runs, initial_moments, nupdown))
        if self.settings.vasp.kpoints is not None:
            k = self.settings.vasp.kpoints
            (task_dir / KPOINTS).write_text(f"Gamma-centred mesh (spingen fp_kpoints)\n0\nGamma\n{k[0]} {k[1]} {k[2]}\n0 0 0\n")

    @staticmethod
    def poscar(atoms, runs: list[tuple[str, int]]) -> str:
        lines = [" ".join(f"{s}{n}" for s, n in runs), "1.0"]
        lines += ["  " + " ".join(f"{x:20.14f}" for x in row) for row in np.asarray(atoms.cell[:])]
        lines += ["  " + " ".join(s for s, _ in runs), "  " + " ".join(str(n) for _, n in runs), "Direct"]
        lines += ["  " + " ".join(f"{x:18.14f}" for x in row) for row in atoms.get_scaled_positions(wrap=False)]
        return "\n".join(lines) + "\n"

    def incar(self, runs: list[tuple[str, int]], initial_moments: np.ndarray | None,
              nupdown: float | None) -> str:
        tags = {k: v for k, v in self.template.items() if k not in _PER_FRAME_KEYS}
        tags["ISPIN"] = "2"
        tags.setdefault("LORBIT", "11")
        vasp = self.settings.vasp
        if vasp.kspacing is not None:
            tags["KSPACING"] = _num(vasp.kspacing)
            tags["KGAMMA"] = ".TRUE."
        ldau = self.settings.ldau
        if ldau:
            for key in _LDAU_KEYS:
                tags.pop(key, None)
            entries = [ldau.get(s) for s, _ in runs]
            if any(e is not None for e in entries):
                tags["LDAU"] = ".TRUE."
                tags["LDAUTYPE"] = "2"
                tags["LDAUL"] = " ".join(str(e.L) if e else "-1" for e in entries)
                tags["LDAUU"] = " ".join(_num(e.U) if e else "0" for e in entries)
                tags["LDAUJ"] = " ".join(_num(e.J) if e else "0" for e in entries)
                tags["LMAXMIX"] = "6" if any(e and e.L == 3 for e in entries) else "4"
            else:
                tags["LDAU"] = ".FALSE."
        if initial_moments is not None:
            tags["MAGMOM"] = compress(initial_moments)
        if nupdown is not None:
            tags["NUPDOWN"] = _num(nupdown)
        body = "\n".join(f"{k} = {v}" for k, v in tags.items())
        return f"# written by spingen from {vasp.incar_path.name}\n{body}\n"

    def command(self, machine_command: str) -> str:
        return machine_command

    def forward_files(self) -> Sequence[str]:
        files = [POSCAR, INCAR, POTCAR]
        return files + [KPOINTS] if self.settings.vasp.kpoints is not None else files

    def backward_files(self) -> Sequence[str]:
        return [OUTCAR, VASPRUN]

    # ---- results
    def is_finished(self, task_dir: Path) -> bool:
        """VASP ran to its end: its OUTCAR has the closing timing block (a killed run has not)."""
        outcar = Path(task_dir) / OUTCAR
        if not outcar.is_file():
            return False
        with open(outcar, "rb") as fh:
            fh.seek(max(0, outcar.stat().st_size - 65536))
            return _FINISHED_MARK in fh.read()

    def unfinished_reason(self, task_dir: Path) -> str:
        outcar = Path(task_dir) / OUTCAR
        if not outcar.is_file() or outcar.stat().st_size == 0:
            return f"not finished: VASP wrote no {OUTCAR} (its stderr is kept in the task folder)"
        return (f"not finished: {OUTCAR} ends before VASP's closing timing block (the run was killed or its "
                "disk filled while writing)")

    def read_result(self, task_dir: Path) -> LabelResult:
        from spingen.data.vasp import VaspImportError, read_vasp_frames

        task_dir = Path(task_dir)
        source = next((task_dir / n for n in (OUTCAR, VASPRUN) if (task_dir / n).is_file()), None)
        if source is None:
            return LabelResult.failed(f"no {OUTCAR} or {VASPRUN} in the task")
        try:
            (frame,) = read_vasp_frames(source)
        except VaspImportError as exc:
            return LabelResult.failed(f"{source.name}: {exc.reason}")
        poscar = self._read_poscar(task_dir)
        if poscar is not None:
            symbols, positions = poscar
            if tuple(symbols) != frame.symbols:
                return LabelResult.failed(f"{source.name} has atoms {frame.symbols}, the POSCAR {tuple(symbols)}")
            shift = _largest_displacement(frame.cell, frame.positions, positions)
            if shift > _GEOMETRY_TOLERANCE:
                return LabelResult.failed(f"{source.name}: positions differ from the POSCAR by {shift:.3g} A "
                                          "(a relaxation, or the output of another task)")
        return LabelResult(True, energy=frame.energy, forces=frame.forces, virial=frame.virial,
                           moments=frame.moments, cell=frame.cell, positions=frame.positions,
                           total_moment=frame.total_moment)

    @staticmethod
    def _read_poscar(task_dir: Path):
        import ase.io

        path = task_dir / POSCAR
        if not path.is_file():
            return None
        atoms = ase.io.read(path, format="vasp")
        return atoms.get_chemical_symbols(), atoms.get_positions()


def _largest_displacement(cell: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Largest minimum-image distance (A) between two position sets in the same cell."""
    frac = np.linalg.solve(np.asarray(cell).T, (np.asarray(a) - np.asarray(b)).T).T
    frac -= np.round(frac)
    return float(np.linalg.norm(frac @ np.asarray(cell), axis=1).max())
