"""deepmd/npy systems with raw DFT moments: a thin layer over dpdata.

On disk a system is a deepmd/npy directory (``type.raw``, ``type_map.raw``,
``set.000/{box,coord,energy,force,virial,spin}.npy``). ``spin.npy`` has shape
(nframes, natoms*3) and holds the RAW DFT moments as (0, 0, S) in uB, zeros on non-magnetic
atoms. The spin encoding's offset d/eta is never stored (see ``spingen.spin.encoding``).

In memory a system is a ``dpdata.LabeledSystem`` whose ``"spins"`` entry has shape
(nframes, natoms, 3). dpdata only knows ``spins`` once its deepmd plugin has registered the data
type; it does so when it *reads* a deepmd directory but not before a first write, and without the
registration dpdata silently drops ``spins`` on write. Every function here registers it first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import dpdata
import numpy as np
from dpdata.data_type import Axis, DataType

from spingen.errors import InputError

SPINS = "spins"
_BACKUP_SUFFIX = ".spingen-old"


def ensure_spin_dtype() -> None:
    """Register dpdata's ``spins`` data type (deepmd name ``spin``) if it is not yet known."""
    if any(dt.name == SPINS for dt in dpdata.LabeledSystem.DTYPES):
        return
    try:  # dpdata's own definition, so later registrations by dpdata do not conflict
        from dpdata.plugins.deepmd import register_spin
    except ImportError:  # pragma: no cover - older/newer dpdata layouts
        dt = DataType(SPINS, np.ndarray, (Axis.NFRAMES, Axis.NATOMS, 3), required=False, deepmd_name="spin")
        dpdata.System.register_data_type(dt)
        dpdata.LabeledSystem.register_data_type(dt)
    else:
        register_spin()


def build_system(
    symbols: Sequence[str],
    cells: np.ndarray,
    coords: np.ndarray,
    energies: np.ndarray,
    forces: np.ndarray,
    moments: np.ndarray,
    virials: np.ndarray | None = None,
    type_map: Sequence[str] | None = None,
) -> dpdata.LabeledSystem:
    """A LabeledSystem from arrays (eV, A, eV/A, raw moments in uB), atoms in the given order.

    Shapes: cells (nf,3,3), coords/forces (nf,nat,3), energies (nf,), moments (nf,nat),
    virials (nf,3,3) or None. type_map defaults to the sorted distinct symbols; it may hold
    elements absent from this system (zero counts, as dpdata does).
    """
    ensure_spin_dtype()
    symbols = list(symbols)
    names = list(type_map) if type_map is not None else sorted(set(symbols))
    missing = sorted(set(symbols) - set(names))
    if missing:
        raise ValueError(f"elements {missing} are not in type_map {names}")
    types = np.array([names.index(s) for s in symbols], dtype=int)
    nf, nat = len(np.atleast_1d(energies)), len(symbols)
    data = {
        "atom_names": names,
        "atom_numbs": [int(np.sum(types == i)) for i in range(len(names))],
        "atom_types": types,
        "orig": np.zeros(3),
        "cells": np.asarray(cells, dtype=float).reshape(nf, 3, 3),
        "coords": np.asarray(coords, dtype=float).reshape(nf, nat, 3),
        "energies": np.asarray(energies, dtype=float).reshape(nf),
        "forces": np.asarray(forces, dtype=float).reshape(nf, nat, 3),
        SPINS: _moments_to_spins(np.asarray(moments, dtype=float).reshape(nf, nat)),
    }
    if virials is not None:
        data["virials"] = np.asarray(virials, dtype=float).reshape(nf, 3, 3)
    return dpdata.LabeledSystem(data=data)


def write_frames(path: str | os.PathLike, frames: Sequence[tuple], type_map: Sequence[str]) -> Path:
    """A new deepmd/npy system at path from (ase.Atoms, energy eV, forces eV/A, moments uB) frames of
    one composition, raw moments in spin.npy (tests and benchmarks make their data with it)."""
    atoms0 = frames[0][0]
    system = build_system(atoms0.get_chemical_symbols(), np.array([f[0].cell.array for f in frames]),
                          np.array([f[0].positions for f in frames]), np.array([f[1] for f in frames]),
                          np.array([f[2] for f in frames]), np.array([f[3] for f in frames]), type_map=type_map)
    return write_system_atomic(system, path)


def get_moments(system: dpdata.System) -> np.ndarray:
    """Raw moments (nframes, natoms) in uB; refuses spins with x/y components (not collinear)."""
    if SPINS not in system.data:
        raise ValueError("system has no spins (no spin.npy): spingen data needs per-atom moments")
    spins = np.asarray(system.data[SPINS], dtype=float)
    if np.any(spins[..., :2] != 0.0):
        raise ValueError("spins have x/y components: spingen stores collinear moments as (0, 0, S)")
    return spins[..., 2].copy()


def set_moments(system: dpdata.System, moments: np.ndarray) -> None:
    """Store raw moments (nframes, natoms) in uB as spins (0, 0, S), in place."""
    ensure_spin_dtype()
    moments = np.asarray(moments, dtype=float)
    expected = (system.get_nframes(), system.get_natoms())
    if moments.shape != expected:
        raise ValueError(f"moments have shape {moments.shape}, the system needs {expected}")
    system.data[SPINS] = _moments_to_spins(moments)


def _moments_to_spins(moments: np.ndarray) -> np.ndarray:
    spins = np.zeros(moments.shape + (3,))
    spins[..., 2] = moments
    return spins


def frame_hashes(system: dpdata.System, decimals: int = 6) -> list[str]:
    """A stable SHA-256 hex digest per frame, for counting and de-duplicating frames.

    It covers each atom's element name (in atom order; independent of the type-map order), cell,
    coordinates, energy, forces, virial and spins, rounded to ``decimals`` (so float32/float64
    storage and -0.0 do not matter). Frames that differ only in atom order hash differently.
    """
    names = system.data["atom_names"]
    elements = "|".join(names[t] for t in system.data["atom_types"]).encode()
    keys = ["cells", "coords", "energies", "forces", "virials", SPINS]
    arrays = [np.asarray(system.data[k], dtype=float) for k in keys if k in system.data]
    digests = []
    for i in range(system.get_nframes()):
        h = hashlib.sha256(elements)
        for key, arr in zip((k for k in keys if k in system.data), arrays):
            h.update(key.encode())
            h.update((np.round(arr[i], decimals) + 0.0).astype("<f8").tobytes())
        digests.append(h.hexdigest())
    return digests


def load_system(
    path: str | os.PathLike, type_map: Sequence[str] | None = None, require_spins: bool = True
) -> dpdata.LabeledSystem:
    """Read a deepmd/npy directory (with its raw moments) as a LabeledSystem.

    A deepmd/raw directory (``*.raw`` files, no ``set.*``) is read too, its moments from
    ``spin.raw``. With require_spins, data without moments raise InputError saying what is missing
    (spin.npy / spin.raw) and how to get it (re-import the OUTCARs with ``spingen init-data``).
    A directory left renamed aside by a write killed between its two renames is restored first.
    """
    ensure_spin_dtype()
    path = Path(path)
    _recover(path)
    if not (path / "type.raw").is_file():
        raise FileNotFoundError(f"{path} is not a deepmd/npy system (no type.raw)")
    raw = not any(path.glob("set.*")) and (path / "coord.raw").is_file()
    fmt, spin_file = ("deepmd/raw", "spin.raw") if raw else ("deepmd/npy", "spin.npy")
    system = dpdata.LabeledSystem(str(path), fmt=fmt, type_map=list(type_map) if type_map else None)
    if require_spins and SPINS not in system.data:
        raise InputError(
            f"{path}: {fmt} data without per-ion moments: no {spin_file} (each atom's magnetic moment, "
            f"stored as (0, 0, S) in uB), which spingen's spin models need. Re-import the VASP runs of these "
            "frames (ISPIN = 2, LORBIT = 11) with `spingen init-data OUTCAR... -o DIR`, which writes spin.npy "
            "beside the labels (add --all-steps for AIMD or relaxation trajectories)"
        )
    return system


def write_system_atomic(system: dpdata.LabeledSystem, path: str | os.PathLike) -> Path:
    """Write system to the deepmd/npy directory path, replacing what was there, atomically.

    The data go to a fresh temporary directory next to path (same file system), are fsync'ed, and
    then replace path by two renames: old path -> ``.NAME.spingen-old``, temporary -> path, after
    which the old copy is deleted. If the write fails, path is untouched and the temporary
    directory is removed; if the process is killed, path holds either the old or the new complete
    system, or (killed between the renames) the old one waits in ``.NAME.spingen-old`` and
    ``load_system``/``append_frames``/the next write put it back. A kill can leave a hidden ``.NAME.spingen-tmp-*``
    directory, which is safe to delete. Frames are stored in float64.
    """
    ensure_spin_dtype()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.spingen-tmp-", dir=path.parent))
    try:
        system.to("deepmd/npy", str(tmp), prec=np.float64)
        if system.get_nframes() and SPINS in system.data and not (tmp / "set.000" / "spin.npy").is_file():
            raise RuntimeError("dpdata did not write spin.npy")  # guards the registration pitfall
        _fsync_tree(tmp)
        backup = _backup_of(path)
        if path.exists():
            os.rename(path, backup)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(path)  # an error between the renames: the old system goes back at once
        raise
    shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


class AppendResult(NamedTuple):
    added: int  # frames written
    duplicates: int  # frames skipped because an identical frame (same hash) was already there
    total: int  # frames in the system afterwards


def append_frames(
    path: str | os.PathLike, system: dpdata.LabeledSystem, skip_duplicates: bool = True
) -> AppendResult:
    """Add system's frames to the deepmd/npy system at path (created if absent).

    Read + concat + atomic rewrite (write_system_atomic). The existing type-map order is kept,
    new elements are added at its end. With skip_duplicates, frames whose ``frame_hashes`` already
    occur (on disk or earlier in ``system``) are skipped; the hashes are taken with the atoms in
    element-name order (stable), so a frame stored under another type-map order (atoms sorted by
    type differently, e.g. ``init-data -t O Fe`` after ``-t Fe O``) still counts as a duplicate.
    """
    path = Path(path)
    _recover(path)
    old = load_system(path) if (path / "type.raw").is_file() else None
    seen = set(_hashes_in_element_order(old)) if old is not None else set()
    keep = []
    for i, h in enumerate(_hashes_in_element_order(system)):
        if skip_duplicates and h in seen:
            continue
        seen.add(h)
        keep.append(i)
    duplicates = system.get_nframes() - len(keep)
    if not keep:
        return AppendResult(0, duplicates, old.get_nframes() if old is not None else 0)
    new = system.sub_system(keep)
    if old is not None:
        names = old.get_atom_names() + [n for n in new.get_atom_names() if n not in old.get_atom_names()]
        merged = old.copy()
        merged.apply_type_map(names)
        new.apply_type_map(names)
        merged.append(new)  # dpdata reorders the atoms of both if their type orders differ
        new = merged
    write_system_atomic(new, path)
    return AppendResult(len(keep), duplicates, new.get_nframes())


def _hashes_in_element_order(system: dpdata.System) -> list[str]:
    """frame_hashes with the atoms stably sorted by element name: independent of the type-map order
    a system was sorted by (atoms of one element keep their relative order)."""
    names, types = system.data["atom_names"], system.data["atom_types"]
    order = sorted(range(len(types)), key=lambda i: names[types[i]])
    if order != list(range(len(types))):
        system = system.pick_atom_idx(order)
    return frame_hashes(system)


def _backup_of(path: Path) -> Path:
    path = Path(os.path.abspath(path))  # "." and "sys/.." have a name only once made absolute
    return path.with_name(f".{path.name}{_BACKUP_SUFFIX}")


def _recover(path: Path) -> None:
    """Finish a write that was killed between or after its renames."""
    backup = _backup_of(path)
    if not backup.is_dir():
        return
    if path.exists():  # the new data reached path; only the old copy's deletion was missed
        shutil.rmtree(backup)
    else:  # killed between the renames: the old complete system goes back
        os.rename(backup, path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
