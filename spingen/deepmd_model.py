"""The spin search's energy model over frozen deepmd-kit spin models (PyTorch backend).

``DeepmdSpinModel`` binds one geometry to one frozen spin model or an ensemble and evaluates
moment configurations of its magnetic ions in batches: every configuration of a batch is one frame
of the same geometry, moments encoded with ``SpinEncoding.to_deepmd`` (S -> spin vector
(0, 0, S + d/eta)). Energies are the ensemble mean; -dE/dS is the mean z component of deepmd-kit's
``force_mag`` (= -dE/d(spin vector)) on the magnetic ions, since spin_z = S + d/eta.

Two evaluation paths, both one model call per batch (at most ``batch_size`` configurations):

* ``DeepPot.eval`` (``fast=False``, and the fallback): energies, forces, virial and force_mag of
  every frame. It cannot skip the forces: the frozen TorchScript model's forward always takes
  ``torch.autograd.grad`` of the energy for force, force_mag and virial (``do_grad_r``/``do_grad_c``
  come from the fitting's output definition, not from the call; ``atomic=False`` only drops the
  atomic virial), and it rebuilds the ghost atoms and neighbour list of every frame, which for a
  small periodic cell costs more than the network.
* fixed-geometry (``fast=True``, default): every frame of a ``DeepmdSpinModel`` has the same real
  atoms and cell; only the virtual atoms move, along z, by eta*S + d. So the ghost atoms and a
  superset neighbour list (cutoff rcut + 2 x the largest virtual displacement) are built once;
  per batch only the displaced coordinates are gathered. Where no centre can have more neighbours
  of a type within rcut than the model's sel, over every displacement seen so far, the list is
  split by type once (a batch only masks what lies beyond rcut: 14 % less time per configuration
  on 24-atom LiNiO2); else the model's own ``format_nlist`` keeps, per frame, the nearest sum(sel)
  within rcut, as deepmd-kit's forward does. Then the
  frozen model's compiled ``atomic_model.forward_common_atomic`` gives the atomic energies; the
  energy is their sum. Only the real atoms are centres: a spin model excludes the virtual atoms' own
  energies (``atom_exclude_types``), so their descriptors, which deepmd-kit's forward computes and
  then zeroes, are not computed (the same energies; 2-3x less time per configuration on the 24- to
  256-atom LiNiO2 cells of benchmarks/config_throughput.py). And an energy-only batch near the
  configuration last evaluated with its gradient (the held moments, whose competitors a certificate
  or a descent evaluates) re-evaluates only the atoms whose neighbours can hold a moved virtual atom,
  adding their change to that configuration's atomic energies, where those are at most LOCAL_SHARE
  of the atoms, for descriptors whose atomic energy depends on the centre's own neighbours alone
  (LOCAL_DESCRIPTORS; not DPA-2/3's message passing). With a plain se_e2_a descriptor and the typed list, the
  neighbour sections that no moment moves (the real atoms, and the virtual atoms of non-magnetic types, which
  sit on their atoms) are embedded and summed once per geometry (``_UnmovedSums``): a batch embeds only the
  magnetic virtual atoms' section (16 of 112 neighbour slots on the LiNiO2 model; 3x less time per batch on
  24 atoms); a configuration near a base embeds only the slots that hold a virtual atom it moved (one per changed
  centre for a one-ion change), at the base's and at its own positions, their difference added to the base's
  neighbour sums; and each centre goes through its own type's fitting network only (deepmd-kit's fitting runs
  every type's network, the virtual types' included, over every centre and keeps one): 16 one-ion changes of
  108-atom LiNiO2 in 10 ms against 27. benchmarks/config_throughput.py times them.
  Energy-only calls run under ``torch.no_grad()`` (no backward at all);
  with gradient, one ``torch.autograd.grad`` of the energy with respect to the spin vectors gives
  -dE/dS directly (no forces, no virial). The path is checked against ``DeepPot.eval`` (energy
  and force_mag of one frame) on first use and falls back to ``DeepPot.eval`` with a warning if
  the model lacks these compiled pieces or disagrees; ``path`` says which is in use.

An MD step's energy, forces, virial and -dE/dS at the held moments (``evaluate_frames``) come from the spin
model's own forward, called directly: ``DeepPot.eval`` calls the same forward but first moves the whole model
to the device and splits the frames into batches on every call (76 against 30 ms per 24-atom LiNiO2 frame on
one CPU core).

TorchScript warm-up: with its default profiling executor a frozen model spends seconds on each of
its first two calls (per code path) profiling and re-optimising the graph (measured ~5 s each on 2
busy CPU cores for an 8-atom cell). ``optimize_jit=False`` (the default) runs the calls under
``torch.jit.optimized_execution(False)``: no warm-up; steady-state throughput with and without it
is in docs/benchmarks/spin_search_deepmd.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from spingen.spin.encoding import SpinEncoding
from spingen.spin.model import EnergyModel, minimum_image_distances, nearest_neighbours

log = logging.getLogger("spingen")

_CHECK_RTOL = 1e-9  # fixed-geometry path vs DeepPot.eval: relative agreement required on first use
LOCAL_DESCRIPTORS = {"DescrptSeA", "DescrptSeR", "DescrptSeT", "DescrptDPA1", "DescrptSeAttenV2", "DescrptSeTTebd"}
# ^ descriptors whose atomic energy depends on the centre's own neighbours alone (no message passing)
LOCAL_SHARE = 0.75  # a batch re-evaluates only the changed centres while they are at most this share of all
NEIGHBOUR_SKIN = 0.5  # A: candidate neighbours shared along a trajectory (`candidate_neighbours`) are built this much wider
# and kept while no atom has moved half of it since
NEAR_BASES = 4  # configurations evaluated whole that later frames near them follow (the held moments; other sectors)
NEAR_CALLS = 4  # an energy-only call takes this many batches: those near the base re-evaluate few centres
BATCH_ATOMS = 1024  # atoms per model call by default, as deepmd-kit's DP_INFER_BATCH_SIZE: on CPU the time per
# configuration is lowest near it (24-atom LiNiO2: 8.3 ms at 21 configurations per call, 14 ms at 256)


def load_deeppot(path: str | os.PathLike) -> Any:
    """deepmd-kit's DeepPot for a frozen .pth model, without TorchScript's first-call optimization.

    The graph executor's profiling pass re-optimizes a scripted model on its first calls: about
    15-30 s per small spin model on 2 busy cores, paid by every explore task and post_fp for
    every model, against 0.3-0.5 s per evaluation after it. Turned off, the first evaluation costs
    about 2 s and later ones are no slower for these models (measured in the demo's work dir).
    """
    import torch
    from deepmd.infer import DeepPot

    for name in ("deepmd.env", "deepmd.utils.batch_size"):  # thread and batch-size hints, once per model
        logging.getLogger(name).setLevel(logging.ERROR)
    torch._C._get_graph_executor_optimize(False)
    return DeepPot(str(path))


def load_models(models: Any) -> list[Any]:
    """Paths (or already-loaded DeepPot objects), one or a sequence -> list of DeepPot."""
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Iterable):
        models = [models]
    loaded = []
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            path = Path(m)
            if not path.is_file():
                raise FileNotFoundError(f"model file '{path}' does not exist")
            m = load_deeppot(path)
        loaded.append(m)
    if not loaded:
        raise ValueError("no model given")
    return loaded


def model_spin_settings(dp: Any) -> dict[str, float]:
    """{element: virtual_scale} of the spin types of a deepmd-kit model (from its definition script).

    Empty if the model has no spin or its definition cannot be read.
    """
    try:
        script = dp.get_model_def_script()
    except Exception:  # noqa: BLE001 - older/other backends
        return {}
    if isinstance(script, str):
        import json

        script = json.loads(script) if script else {}
    spin = (script or {}).get("spin")
    type_map = list(dp.get_type_map())
    if not spin:
        return {}
    use = spin.get("use_spin", [])
    if use and isinstance(use[0], bool):
        types = [i for i, u in enumerate(use) if u]
    elif use and isinstance(use[0], str):
        types = [type_map.index(u) for u in use if u in type_map]
    else:
        types = [int(u) for u in use]
    scale = spin.get("virtual_scale", 0.0)
    if isinstance(scale, (int, float)):
        per_type = {t: float(scale) for t in types}
    elif len(scale) == len(type_map):
        per_type = {t: float(scale[t]) for t in types}
    elif len(scale) == len(types):
        per_type = {t: float(s) for t, s in zip(types, scale)}
    else:
        return {}
    return {type_map[t]: s for t, s in per_type.items() if t < len(type_map)}


def model_path(model: Any) -> str | None:
    """The file of a model given as a path or as a loaded DeepPot (None when unknown)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(getattr(model, "deep_eval", None), "model_path", None)


def resolve_encoding(models: Sequence[Any], offset: float | None = None, virtual_scale: float | None = None,
                     path: str | os.PathLike | None = None) -> SpinEncoding:
    """The spin encoding deepmd-kit saw in training, for models given as paths or loaded DeepPots.

    eta (virtual_scale) and the magnetic elements are read from the models themselves and must agree
    between them; the offset d and the sign convention are not stored in a deepmd-kit model and come
    from the spin_encoding.json spingen's train stage puts beside each model. `offset` replaces d
    (needed when no spin_encoding.json is there), `virtual_scale` replaces eta; `path`: the first
    model's file when it is given loaded. ValueError names what is missing or inconsistent.
    """
    loaded = load_models(list(models))
    scales = [model_spin_settings(dp) for dp in loaded]
    if any(s != scales[0] for s in scales[1:]):
        raise ValueError(f"the models' spin settings differ: {scales}")
    path = path or model_path(models[0])
    saved = SpinEncoding.beside(path) if path else None
    magnetic = tuple(scales[0]) or (saved.magnetic if saved else ())
    etas = set(scales[0].values())
    if virtual_scale is None:
        if len(etas) > 1:
            raise ValueError(f"the model's virtual_scale differs between elements {scales[0]}: give eta explicitly")
        virtual_scale = etas.pop() if etas else (saved.virtual_scale if saved else None)
    if virtual_scale is None:
        raise ValueError(f"'{path}': the model's virtual_scale (eta) cannot be read; give it")
    if offset is None:
        if saved is None:
            raise ValueError(f"no spin_encoding.json lies beside '{path}' and the offset d (A) is "
                             "not stored in a deepmd-kit model: give it (spin/offset of the param.json the model "
                             "was trained with)")
        offset = saved.offset
    return SpinEncoding(magnetic, float(virtual_scale), float(offset), canonical=saved is not None and saved.canonical)


def atom_types(type_map: Sequence[str], symbols: Sequence[str], where: str) -> np.ndarray:
    """deepmd-kit's atom types of `symbols` under a model's type_map; ValueError names `where` and the elements."""
    unknown = sorted(set(symbols) - set(type_map))
    if unknown:
        raise ValueError(f"elements {unknown} of {where} are not in the model's type_map {list(type_map)}")
    return np.array([list(type_map).index(s) for s in symbols], dtype=int)


def evaluate_frames(dp, coords: np.ndarray, cells: np.ndarray | None, types: np.ndarray,
                    moments: np.ndarray | None = None, encoding: SpinEncoding | None = None,
                    symbols: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Energies (nf,), forces (nf, natoms, 3), virials (nf, 9) of nf frames and, for a spin model given raw
    moments (nf, natoms) and their encoding, -dE/dS (nf, natoms) of the raw moments (the z component of
    force_mag times the encoding's gauge sign); None without moments.

    A spin model of the PyTorch backend is called directly (``_spin_forward``: the same outputs as
    ``DeepPot.eval``, half its time on CPU); other models through ``DeepPot.eval``."""
    nf, natoms = len(coords), len(types)
    coords = np.reshape(coords, (nf, natoms * 3))
    cells = None if cells is None else np.reshape(cells, (nf, 9))
    if moments is None:
        e, f, v = dp.eval(coords, cells, types)[:3]
        minus_grad = None
    else:
        spin = encoding.to_deepmd(moments, symbols).reshape(nf, -1)
        forward = _pt_model(dp)
        if forward is None:
            e, f, v, force_mag = dp.eval(coords, cells, types, spin=spin)[:4]
        else:
            e, f, v, force_mag = _spin_forward(forward, coords, cells, types, spin)
        signs = encoding.gauge_signs(moments, symbols)
        minus_grad = signs[:, None] * np.reshape(force_mag, (nf, natoms, 3))[..., 2]
    return np.reshape(e, nf), np.reshape(f, (nf, natoms, 3)), np.reshape(v, (nf, 9)), minus_grad


def _pt_model(dp):
    """The PyTorch spin model behind a loaded DeepPot, or None: another backend, a model with a data modifier (which
    DeepPot.eval adds), or an object that is not a DeepPot (a wrapper of its eval is kept)."""
    from deepmd.infer import DeepPot

    deep_eval = getattr(dp, "deep_eval", None)
    if not isinstance(dp, DeepPot) or type(deep_eval).__module__ != "deepmd.pt.infer.deep_eval":
        return None
    if getattr(deep_eval, "modifier", None) is not None or not dp.has_spin:
        return None
    try:
        return deep_eval.dp.model["Default"]
    except (AttributeError, KeyError, TypeError):
        return None


def _frames_per_call(natoms: int) -> int:
    """Frames of a spin model's call that hold about BATCH_ATOMS atoms, each atom counted twice (real and virtual)."""
    return max(1, BATCH_ATOMS // (2 * natoms))


def _spin_forward(model, coords: np.ndarray, cells: np.ndarray | None, types: np.ndarray,
                  spin: np.ndarray) -> tuple[np.ndarray, ...]:
    """energy, force, virial, force_mag of a spin model's own forward, as DeepPot.eval returns them, in calls of
    about BATCH_ATOMS atoms (real and virtual; DeepPot.eval's batch on CPU). DeepPot.eval calls the same forward but
    first moves the whole model to the device and splits the frames into batches on every call: 76 against 30 ms
    per 24-atom LiNiO2 frame on one CPU core (205 against 94 ms at 108 atoms)."""
    import torch
    from deepmd.pt.utils.env import DEVICE, GLOBAL_PT_FLOAT_PRECISION

    nf, natoms = len(coords), len(types)
    per_call = _frames_per_call(natoms)

    def tensor(values, shape):
        return torch.tensor(np.reshape(values, shape), dtype=GLOBAL_PT_FLOAT_PRECISION, device=DEVICE)

    parts = []
    for start in range(0, nf, per_call):
        frames = slice(start, min(nf, start + per_call))
        n = frames.stop - frames.start
        atype = torch.tensor(np.tile(np.asarray(types).reshape(1, natoms), (n, 1)), dtype=torch.long, device=DEVICE)
        box = None if cells is None else tensor(cells[frames], (n, 3, 3))
        out = model(tensor(coords[frames], (n, natoms, 3)), atype, spin=tensor(spin[frames], (n, natoms, 3)), box=box)
        parts.append([out[key].detach().cpu().numpy() for key in ("energy", "force", "virial", "force_mag")])
    return tuple(np.concatenate(column) for column in zip(*parts))


class DeepmdSpinModel(EnergyModel):
    """Energies and -dE/dS of moment configurations of ONE geometry under deepmd-kit spin model(s).

    models: a frozen model path, a loaded ``deepmd.infer.DeepPot``, or a sequence of them (ensemble;
    all must share one type_map). positions (natoms, 3) A; cell (3, 3) or None (no PBC); symbols:
    chemical symbol of every atom. encoding: eta/d of the training data (``SpinEncoding``).
    magnetic: the ions whose moments are searched, as atom indices or a boolean mask over atoms
    (default: every atom of an element in ``encoding.magnetic``); kept in structure order, which is
    the order of ``MomentLevels.magnetic_indices``. background_moments (natoms,): raw moments of
    the other atoms (default 0; only atoms of the model's spin types feel them).
    batch_size: most configurations per model call (bounds memory; larger batches are chunked); default:
    BATCH_ATOMS // (2 natoms), the spin model seeing every atom twice (real and virtual).
    fast: use the fixed-geometry path (see the module docstring), checked against DeepPot.eval.
    fast_checked: per-model verdicts of that check from an earlier geometry of the same models
    (``fast_ok`` of another instance): True skips the check, False uses DeepPot.eval, None checks.
    optimize_jit: let TorchScript's profiling executor optimise the graphs (see the module docstring).
    candidate_neighbours: a dict the fixed-geometry path keeps its candidate neighbours in, shared by the models of later
    geometries of one trajectory: built NEIGHBOUR_SKIN wider, they serve every geometry until an atom has moved
    half of it (a Verlet list; the neighbour search was almost half the time that binds a 108-atom cell).
    """

    def __init__(
        self,
        models: Any,
        positions: np.ndarray,
        cell: np.ndarray | None,
        symbols: Sequence[str],
        encoding: SpinEncoding,
        magnetic: Sequence[int] | np.ndarray | None = None,
        *,
        background_moments: np.ndarray | None = None,
        batch_size: int | None = None,
        fast: bool = True,
        fast_checked: Sequence[bool | None] | None = None,
        optimize_jit: bool = False,
        candidate_neighbours: dict | None = None,
    ) -> None:
        self.models = load_models(models)
        self.symbols = tuple(symbols)
        natoms = len(self.symbols)
        self.positions = np.asarray(positions, dtype=float)
        if self.positions.shape != (natoms, 3):
            raise ValueError(f"positions must have shape ({natoms}, 3), got {self.positions.shape}")
        self.cell = None if cell is None else np.asarray(cell, dtype=float).reshape(3, 3)
        self.encoding = encoding
        if batch_size is None:
            batch_size = _frames_per_call(natoms)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

        self.type_map = list(self.models[0].get_type_map())
        for dp in self.models[1:]:
            if list(dp.get_type_map()) != self.type_map:
                raise ValueError(f"ensemble members have different type maps: {self.type_map} vs "
                                 f"{list(dp.get_type_map())}")
        for dp in self.models:
            if not getattr(dp, "has_spin", False):
                raise ValueError("a model of the ensemble is not a spin model (DeepPot.has_spin is False)")
        self.atom_types = atom_types(self.type_map, self.symbols, "the structure").astype(np.int32)
        self.magnetic_indices = self._searched_ions(magnetic, encoding)
        super().__init__(self.magnetic_indices.size)
        self.magnetic_symbols = tuple(self.symbols[i] for i in self.magnetic_indices)
        self.background = np.zeros(natoms) if background_moments is None else \
            np.asarray(background_moments, dtype=float).reshape(natoms).copy()
        self.background[self.magnetic_indices] = 0.0
        self.fast = bool(fast)
        self.optimize_jit = bool(optimize_jit)
        self.candidate_neighbours = candidate_neighbours
        self._fixed: list[_FixedGeometry | None] = [None] * len(self.models)
        self._expected: np.ndarray | None = None  # spin vectors whose range every fixed-geometry path covers from the start
        self.fast_ok: list[bool | None] = [None] * len(self.models)  # checked on first use
        if fast_checked is not None:
            if len(fast_checked) != len(self.models):
                raise ValueError(f"fast_checked has {len(fast_checked)} verdicts for {len(self.models)} models")
            self.fast_ok = [None if ok is None else bool(ok) for ok in fast_checked]

    # -- construction helpers ----------------------------------------------------------------
    def _searched_ions(self, magnetic: Sequence[int] | np.ndarray | None, encoding: SpinEncoding) -> np.ndarray:
        """Sorted indices of the searched ions (from indices, a mask, or the encoding's elements), checked
        against the encoding's magnetic elements and the model's spin types."""
        natoms = len(self.symbols)
        if magnetic is None:
            indices = np.flatnonzero(encoding.magnetic_mask(self.symbols))
        else:
            sel = np.asarray(magnetic)
            if sel.dtype == bool:
                if sel.shape != (natoms,):
                    raise ValueError(f"a magnetic mask must have {natoms} entries, got {sel.shape}")
                sel = np.flatnonzero(sel)
            sel = sel.astype(int).ravel()
            if np.any((sel < 0) | (sel >= natoms)) or len(set(sel.tolist())) != sel.size:
                raise ValueError(f"magnetic indices must be distinct atoms in 0..{natoms - 1}, got {sel.tolist()}")
            indices = np.sort(sel)
        if indices.size == 0:
            raise ValueError(f"no magnetic ion: no atom is one of {list(encoding.magnetic)}")
        spin_elements = self._spin_elements()
        for i in indices:
            el = self.symbols[i]
            if el not in encoding.magnetic:
                raise ValueError(f"atom {i} ({el}) is searched but {el} is not magnetic in the encoding "
                                 f"{list(encoding.magnetic)}")
            if spin_elements is not None and el not in spin_elements:
                raise ValueError(f"atom {i} ({el}) is searched but the model has no spin for {el} "
                                 f"(spin types: {sorted(spin_elements)})")
        if spin_elements is not None:
            unencoded = sorted({s for s in self.symbols if s in spin_elements and s not in encoding.magnetic})
            if unencoded:
                raise ValueError(f"the model has spin for {unencoded} but the encoding does not list them as "
                                 f"magnetic {list(encoding.magnetic)}")
        return indices

    @classmethod
    def from_atoms(cls, atoms: Any, models: Any, encoding: SpinEncoding,
                   magnetic: Sequence[int] | np.ndarray | None = None, **kwargs: Any) -> DeepmdSpinModel:
        """Bind an ase.Atoms (positions, cell if periodic, symbols) to model path(s) or DeepPot(s)."""
        cell = atoms.cell.array if atoms.pbc.any() else None
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError("partly periodic structures are not supported: deepmd-kit needs pbc on all axes or none")
        return cls(models, atoms.positions, cell, atoms.get_chemical_symbols(), encoding, magnetic, **kwargs)

    def _spin_elements(self) -> set[str] | None:
        settings = model_spin_settings(self.models[0])
        return set(settings) if settings else None

    @cached_property
    def neighbours(self) -> np.ndarray:
        return nearest_neighbours(minimum_image_distances(self.positions[self.magnetic_indices], self.cell))

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def path(self) -> str:
        """Evaluation path in use: 'fixed-geometry', 'DeepPot.eval', or per model joined by '/'."""
        if not self.fast:
            return "DeepPot.eval"
        names = ["fixed-geometry" if ok else "DeepPot.eval" if ok is False else "fixed-geometry (unchecked)"
                 for ok in self.fast_ok]
        return names[0] if len(set(names)) == 1 else "/".join(names)

    # -- evaluation --------------------------------------------------------------------------
    def spin_vectors(self, moments: np.ndarray) -> np.ndarray:
        """Raw moments of the magnetic ions (nconf, n_magnetic) -> deepmd spin (nconf, natoms*3)."""
        full = self.full_moments(moments)
        return self.encoding.to_deepmd(full, self.symbols).reshape(len(full), -1)

    def full_moments(self, moments: np.ndarray) -> np.ndarray:
        """Raw moments of the magnetic ions (nconf, n_magnetic) -> of every atom (nconf, natoms)."""
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        full = np.repeat(self.background[None, :], len(m), axis=0)
        full[:, self.magnetic_indices] = m
        return full

    def sector_energies(self, moments: np.ndarray, sign: float) -> np.ndarray:
        """Energies of configurations seen in the gauge sector `sign` (sign x moments, without the canonical
        sign; the same as ``evaluate`` for the configurations of that sector). Counted like ``evaluate``."""
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        if m.ndim != 2 or m.shape[1] != self.n_magnetic:
            raise ValueError(f"moments must have shape (nconf, {self.n_magnetic}), got {np.shape(moments)}")
        if not self.encoding.canonical:
            return self.evaluate(m)[0]
        energies = self._members(float(sign) * m, False, gauged=False)[0].mean(axis=0)
        self.n_evaluations += len(m)
        self.n_calls += 1
        return energies

    def expect(self, moments: np.ndarray) -> None:
        """Configurations (n, n_magnetic) whose range of moments, in either gauge sign, later batches span (the
        lowest and highest allowed level of each ion): the cached neighbour data of this geometry cover it
        from the start, instead of growing (and re-summing what no moment moves) batch after batch."""
        full = self.full_moments(np.asarray(moments, dtype=float))
        full = np.concatenate([full, -full]) if self.encoding.canonical else full
        self._cover(self.encoding.to_deepmd(full, self.symbols, gauged=False))

    def _cover(self, spin: np.ndarray) -> None:
        """Widen the expected range by these spin vectors (n, natoms, 3) and grow every fixed-geometry path's
        neighbour data to it (once, not per batch)."""
        self._expected = _span(np.concatenate([spin] + ([] if self._expected is None else [self._expected])))
        for fixed in self._fixed:
            if fixed is not None:
                fixed.cover(self._expected)

    def calculate(self, moments, gradient):
        energies, minus_grad = self._members(moments, gradient)
        return energies.mean(axis=0), (minus_grad.mean(axis=0) if gradient else None)

    def evaluate_members(self, moments: np.ndarray, gradient: bool = False
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-model energies (n_models, nconf) and -dE/dS (n_models, nconf, n_magnetic) or None.

        Counted like ``evaluate`` (n_evaluations += nconf); the ensemble spread of these is the
        spin disagreement of a configuration.
        """
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        if m.ndim != 2 or m.shape[1] != self.n_magnetic:
            raise ValueError(f"moments must have shape (nconf, {self.n_magnetic}), got {np.shape(moments)}")
        energies, minus_grad = self._members(m, gradient)
        self.n_evaluations += len(m)
        self.n_calls += 1
        return energies, minus_grad

    def _members(self, moments: np.ndarray, gradient: bool, gauged: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        n = len(moments)
        energies = np.empty((self.n_models, n))
        minus_grad = np.empty((self.n_models, n, self.n_magnetic)) if gradient else None
        step = self.batch_size if gradient else NEAR_CALLS * self.batch_size  # the fixed path splits what it evaluates whole
        parts = [self.full_moments(moments[start: start + step]) for start in range(0, n, step)]
        spins = [self.encoding.to_deepmd(full, self.symbols, gauged) for full in parts]
        if spins:  # the batch's whole range at once: the neighbour data grow once, not per part
            self._cover(np.concatenate(spins))
        with torch.jit.optimized_execution(self.optimize_jit):
            for start, full, spin in zip(range(0, n, step), parts, spins):
                part = moments[start: start + step]
                spin = spin.reshape(len(part), -1)
                if gradient:  # force_mag is the derivative at the encoded sign: -dE/dS = sign * force_mag
                    signs = self.encoding.gauge_signs(full, self.symbols)
                for k in range(self.n_models):
                    e, g = self._eval_one(k, spin, gradient)
                    energies[k, start: start + len(part)] = e
                    if gradient:
                        minus_grad[k, start: start + len(part)] = signs[:, None] * g
        return energies, minus_grad

    def _frames(self, nframes: int) -> tuple[np.ndarray, np.ndarray | None]:
        coords = np.broadcast_to(self.positions.reshape(1, -1), (nframes, self.positions.size))
        cells = None if self.cell is None else np.broadcast_to(self.cell.reshape(1, 9), (nframes, 9))
        return np.ascontiguousarray(coords), (None if cells is None else np.ascontiguousarray(cells))

    def _eval_full(self, dp, spin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DeepPot.eval: energies (nf,) and force_mag (nf, natoms, 3)."""
        coords, cells = self._frames(len(spin))
        out = dp.eval(coords, cells, self.atom_types, spin=spin)
        return out[0].reshape(-1), out[3].reshape(len(spin), -1, 3)

    def _eval_one(self, k: int, spin: np.ndarray, gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
        dp = self.models[k]
        mag = self.magnetic_indices
        if not self.fast or self.fast_ok[k] is False:
            e, fm = self._eval_full(dp, spin)
            return e, (fm[:, mag, 2] if gradient else None)
        try:
            if self._fixed[k] is None:
                self._fixed[k] = _FixedGeometry(dp, self.positions, self.cell, self.atom_types,
                                                self.candidate_neighbours)
                if self._expected is not None:
                    self._fixed[k].cover(self._expected)
            e, fm = self._fixed[k].evaluate(spin, gradient, self.batch_size)
        except Exception as err:  # noqa: BLE001 - any internals mismatch: fall back, loudly
            log.warning("deepmd fixed-geometry path unavailable (%s: %s); using DeepPot.eval", type(err).__name__, err)
            self.fast_ok[k] = False
            return self._eval_one(k, spin, gradient)
        if self.fast_ok[k] is None:  # first use: energy and force_mag of one frame against DeepPot.eval
            e0, fm0 = self._fixed[k].evaluate(spin[:1], True)
            e_ref, fm_ref = self._eval_full(dp, spin[:1])
            ok = (np.allclose(e[:1], e_ref, rtol=_CHECK_RTOL, atol=1e-9)
                  and np.allclose(e0, e_ref, rtol=_CHECK_RTOL, atol=1e-9)
                  and np.allclose(fm0, fm_ref, rtol=1e-6, atol=1e-9))
            if not ok:
                log.warning("deepmd fixed-geometry path disagrees with DeepPot.eval (energy %r vs %r, max "
                            "|force_mag| difference %.3g); using DeepPot.eval", float(e[0]), float(e_ref[0]),
                            float(np.abs(fm0 - fm_ref).max()))
                self.fast_ok[k] = False
                return self._eval_one(k, spin, gradient)
            self.fast_ok[k] = True
        return e, (fm[:, mag, 2] if gradient else None)


def _span(spin: np.ndarray) -> np.ndarray:
    """Two rows (2, natoms, 3): the lowest and highest of each component of spin vectors (n, natoms, 3)."""
    return np.stack([spin.min(axis=0), spin.max(axis=0)])


@dataclass(frozen=True)
class _Candidates:
    """A model's ghosts and candidate neighbours built at `positions` (the atom types and cell: frame): they hold
    every neighbour within rcut + 2 x (reach - the largest displacement of an atom since) of the spin-expanded
    frame."""

    positions: np.ndarray
    frame: bytes
    reach: float
    ext_atype: Any
    mapping: Any
    shift: Any
    nlist: Any


@dataclass(frozen=True)
class _Base:
    """A configuration evaluated at every centre, which the frames near it follow: its spin vectors (natoms, 3), atomic
    energies (centres,) and, on the split se_e2_a path, each centre's neighbour sum (centres, 4, ng) before the
    division by nnei (else None)."""

    spin: np.ndarray
    atomic: np.ndarray
    sums: Any = None


class _FixedGeometry:
    """One frozen pt spin model bound to one geometry: ghosts and candidate neighbours built once.

    See the module docstring. Mirrors deepmd-kit 3.2's SpinModel.forward_common ->
    make_model.forward_common(_lower), minus fit_output_to_model_output's derivatives.
    """

    def __init__(self, dp, positions: np.ndarray, cell: np.ndarray | None, atom_types: np.ndarray,
                 candidate_neighbours: dict | None = None) -> None:
        import torch
        from deepmd.pt.utils.env import DEVICE, GLOBAL_PT_ENER_FLOAT_PRECISION, GLOBAL_PT_FLOAT_PRECISION

        self.torch, self.device = torch, DEVICE
        self.prec, self.ener_prec = GLOBAL_PT_FLOAT_PRECISION, GLOBAL_PT_ENER_FLOAT_PRECISION
        self.model = dp.deep_eval.dp.model["Default"]
        self.backbone = self.model.backbone_model
        self.rcut = float(self.backbone.get_rcut())
        self.sel = list(self.backbone.get_sel())
        natoms = len(atom_types)
        self.coord = torch.tensor(np.asarray(positions).reshape(1, natoms, 3), dtype=self.prec, device=DEVICE)
        self.atype = torch.tensor(np.asarray(atom_types).reshape(1, natoms), dtype=torch.long, device=DEVICE)
        self.box = None if cell is None else torch.tensor(np.asarray(cell).reshape(1, 3, 3), dtype=self.prec,
                                                          device=DEVICE)
        scale = self.model.virtual_scale_mask.detach().cpu().numpy()
        self.signed_scale = scale[np.asarray(atom_types)]  # virtual_scale per atom (displacement = spin x it)
        self.atom_scale = np.abs(self.signed_scale)  # |virtual_scale| per atom
        self.reach = -1.0  # largest virtual displacement the cached neighbour candidates cover
        self.moves = np.zeros((2, natoms, 3))  # [low, high] of every virtual displacement seen, per atom and axis
        self.typed_nlist = None  # the neighbour list every configuration within `moves` can use; None: format per batch
        try:  # compressed or multi-list descriptors read the list in distance order: format it per batch
            self.sorted_nlist = bool(self.backbone.need_sorted_nlist_for_lower())
        except Exception:  # noqa: BLE001 - a model without the method: assume it needs the order
            self.sorted_nlist = True
        descriptor = getattr(self.backbone.atomic_model, "descriptor", None)
        self.local = getattr(descriptor, "original_name", type(descriptor).__name__) in LOCAL_DESCRIPTORS
        self.bases: list[_Base] = []  # configurations evaluated whole: the first (the held moments: the last evaluated
        # with their gradient) and up to NEAR_BASES - 1 far from it (another gauge sector's moments), which the frames
        # near them follow
        self.touch: np.ndarray | None = None  # (natoms, centres): the centres an atom's virtual atom can come within rcut of
        self.split = _UnmovedSums.of(self.model)  # se_e2_a: the neighbour sections no configuration moves, summed once
        self.candidate_neighbours = candidate_neighbours  # model -> _Candidates of an earlier geometry
        self.frame = np.asarray(atom_types).tobytes() + (b"" if cell is None else np.asarray(cell, dtype=float).tobytes())
        self.positions = np.asarray(positions, dtype=float).reshape(natoms, 3)

    def _build(self, reach: float) -> None:
        """Ghosts and every neighbour within rcut + 2*reach of the spin-expanded reference frame: those of an earlier
        geometry (`candidate_neighbours`) where they still cover it, else built afresh (NEIGHBOUR_SKIN wider when shared)."""
        torch = self.torch
        from deepmd.pt.utils.nlist import extend_input_and_build_neighbor_list

        with torch.no_grad():
            zero = torch.zeros_like(self.coord)
            coord_spin, atype_spin, _ = self.model.process_spin_input(self.coord, self.atype, zero)
            shared = self.candidate_neighbours
            kept = None if shared is None else shared.get(self.model)  # an earlier geometry's of this model
            same_frame = kept is not None and kept.frame == self.frame  # else the atoms or cell changed (NPT)
            reach_left = kept.reach - float(np.max(np.linalg.norm(self.positions - kept.positions, axis=1))) \
                if same_frame else -np.inf  # what they still cover after the atoms' moves since
            if reach > reach_left:
                skin = NEIGHBOUR_SKIN if shared is not None and (kept is None or same_frame) else 0.0
                ext, ext_atype, mapping, nlist = extend_input_and_build_neighbor_list(
                    coord_spin, atype_spin, self.rcut + 2.0 * reach + skin, self.sel, mixed_types=True,
                    box=self.box, cap_neighbors=False)
                ext = ext.view(1, -1, 3)
                local = torch.gather(coord_spin, 1, mapping.unsqueeze(-1).expand(-1, -1, 3))
                kept = _Candidates(self.positions, self.frame, reach + skin / 2, ext_atype, mapping, ext - local,
                                   nlist[:, :self._centres(atype_spin)])
                reach_left = kept.reach
                if shared is not None:
                    shared[self.model] = kept
            local = torch.gather(coord_spin, 1, kept.mapping.unsqueeze(-1).expand(-1, -1, 3))
        self.shift = kept.shift  # lattice image (and wrapping) shift of every extended atom
        self.ext_atype, self.mapping, self.ext_ref = kept.ext_atype, kept.mapping, local + kept.shift
        self.nlist = kept.nlist
        self.reach = reach_left
        self._fix_nlist()

    def _centres(self, atype_spin) -> int:
        """How many leading local atoms have atomic energies: the real atoms where the model excludes every
        virtual atom's own energy (deepmd-kit's spin models do: the virtual atoms only shape their neighbours'
        descriptors), else every local atom."""
        natoms = self.coord.shape[1]
        excluded = set(getattr(self.backbone.atomic_model, "atom_exclude_types", None) or [])
        virtual = set(atype_spin[0, natoms:].tolist())
        return natoms if virtual <= excluded else 2 * natoms

    def _fix_nlist(self) -> None:
        """The typed neighbour list for every configuration whose virtual displacements lie within `moves`.

        A candidate is kept when some displacements within them bring it within rcut of its centre (each
        axis apart: the nearest the pair's offset can come over the range of relative shifts). When every
        centre keeps at most sel neighbours of each type (sum(sel) for a mixed-type descriptor), the
        kept set, split by type once, is what the model's format_nlist would keep for any such
        configuration, up to order within a type, which the descriptors sum over; per batch only the
        neighbours beyond rcut are masked. Otherwise, or for a descriptor that needs the list sorted by
        distance (deepmd-kit's need_sorted_nlist_for_lower: compressed tables, DPA2/DPA3), None: format_nlist
        per batch."""
        torch = self.torch
        self.touch = None
        if self.split is not None:
            self.split.sums = None  # the kept neighbours may have changed
        if self.sorted_nlist:
            self.typed_nlist = None
            return
        natoms = self.coord.shape[1]
        low = np.concatenate([np.zeros((natoms, 3)), self.moves[0]])  # real atoms then their virtual atoms
        high = np.concatenate([np.zeros((natoms, 3)), self.moves[1]])
        nlist = self.nlist[0].cpu().numpy()
        valid = nlist >= 0
        neighbours = self.mapping[0].cpu().numpy()[np.where(valid, nlist, 0)]
        ext = self.ext_ref[0].detach().cpu().numpy()
        offset = ext[np.where(valid, nlist, 0)] - ext[: len(nlist), None, :]  # centre -> candidate, reference frame
        shift_low = low[neighbours] - high[: len(nlist), None, :]
        shift_high = high[neighbours] - low[: len(nlist), None, :]
        nearest = np.clip(0.0, offset + shift_low, offset + shift_high)  # per axis, the closest to 0 reachable
        kept = valid & (np.sum(nearest**2, axis=-1) <= self.rcut**2)
        if len(nlist) == natoms:  # the real atoms are the centres: a virtual atom moves none of them but its neighbours
            self.touch = np.zeros((natoms, natoms), dtype=bool)  # atom a's virtual atom (local natoms + a) can reach
            centre, column = np.nonzero(kept & (neighbours >= natoms))
            self.touch[neighbours[centre, column] - natoms, centre] = True
        kept_nlist = np.where(kept, nlist, -1)
        ext_atype = self.ext_atype[0].cpu().numpy()
        types = np.where(kept, ext_atype[np.where(kept, nlist, 0)], -1)
        if self.backbone.mixed_types():
            if kept.sum(axis=1).max() > sum(self.sel):
                self.typed_nlist = None
                return
            order = np.argsort(~kept, axis=1, kind="stable")
            typed = np.full((len(nlist), sum(self.sel)), -1, dtype=nlist.dtype)
            width = min(typed.shape[1], nlist.shape[1])
            typed[:, :width] = np.take_along_axis(kept_nlist, order, axis=1)[:, :width]
            self.typed_nlist = torch.tensor(typed[None], dtype=self.nlist.dtype, device=self.device)
            return
        if any((types == t).sum(axis=1).max() > n for t, n in enumerate(self.sel)):
            self.typed_nlist = None
            return
        from deepmd.pt.utils.nlist import nlist_distinguish_types

        padding = max(0, sum(self.sel) - kept_nlist.shape[1])  # as format_nlist pads a short list
        kept_nlist = np.pad(kept_nlist, ((0, 0), (0, padding)), constant_values=-1)
        kept_t = torch.tensor(kept_nlist[None], dtype=self.nlist.dtype, device=self.device)
        self.typed_nlist = nlist_distinguish_types(kept_t, self.ext_atype, self.sel)

    def _within_rcut(self, ext, nlist):
        """nlist with the neighbours beyond rcut of their centre in each frame set to -1 (as format_nlist)."""
        torch = self.torch
        nf, nloc, nnei = nlist.shape
        valid = nlist >= 0
        index = torch.where(valid, nlist, 0).reshape(nf, nloc * nnei, 1).expand(-1, -1, 3)
        neighbours = torch.gather(ext, 1, index).reshape(nf, nloc, nnei, 3)
        distance = torch.linalg.norm(neighbours - ext[:, :nloc, None, :], dim=-1)
        return torch.where(valid & ~(distance > self.rcut), nlist, -1)

    def cover(self, spin: np.ndarray) -> None:
        """Grow the ghosts and neighbour candidates (reach) and the typed list (moves) to cover these spin vectors
        (nf, natoms*3 or natoms, 3) too; a growth of the typed list re-sums what no moment moves."""
        natoms = self.coord.shape[1]
        spin = np.asarray(spin, dtype=float).reshape(len(spin), natoms, 3)
        reach = float(np.max(np.linalg.norm(spin, axis=-1) * self.atom_scale[None, :]))
        displacement = spin * self.signed_scale[None, :, None]
        moves = np.stack([np.minimum(self.moves[0], displacement.min(axis=0)),
                          np.maximum(self.moves[1], displacement.max(axis=0))])
        grown = not np.array_equal(moves, self.moves)
        self.moves = moves
        if reach > self.reach:
            self._build(max(reach, 1.25 * self.reach))
        elif grown:
            self._fix_nlist()

    def evaluate(self, spin: np.ndarray, gradient: bool, whole_batch: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """spin (nf, natoms*3) -> energies (nf,), -dE/d(spin) (nf, natoms, 3) or None. Energy-only frames near the
        base configuration re-evaluate only the centres they change, the others every centre (in calls of at
        most whole_batch frames)."""
        nf, natoms = len(spin), self.coord.shape[1]
        spin = np.asarray(spin, dtype=float).reshape(nf, natoms, 3)
        self.cover(spin)
        energies = np.empty(nf)
        whole = np.arange(nf)  # the frames evaluated at every centre
        if not gradient and self.local and self.bases and self.touch is not None:
            try:
                whole = self._near_bases(spin, energies)
            except Exception as err:  # noqa: BLE001 - internals mismatch: every centre from now on, loudly
                log.warning("deepmd changed-centres path unavailable (%s: %s); evaluating every atom",
                            type(err).__name__, err)
                self.local, whole = False, np.arange(nf)
        step = whole_batch or nf
        grads = []
        for start in range(0, len(whole), step):
            part = whole[start: start + step]
            energies[part], grad = self._every_centre(spin[part], gradient)
            grads.append(grad)
        return energies, (np.concatenate(grads) if gradient else None)

    def _near_bases(self, spin: np.ndarray, energies: np.ndarray) -> np.ndarray:
        """Energies of the frames (nf, natoms, 3) near a base configuration, from its atomic energies (each such
        frame re-evaluates at most LOCAL_SHARE of the centres); of two or more frames near none, the first is
        evaluated whole and kept as another base while there is room. Returns the frames left to evaluate whole."""
        pending = np.arange(len(spin))
        while len(pending):
            nearest, near = self._nearest(spin[pending])
            for b in np.unique(nearest[near]):
                frames = pending[near & (nearest == b)]
                energies[frames] = self._changed_centres(spin[frames], self.bases[b])
            pending = pending[~near]
            if len(pending) < 2 or len(self.bases) >= NEAR_BASES:
                break
            energies[pending[0]] = self._every_centre(spin[pending[:1]], False, keep=True)[0][0]
            pending = pending[1:]
        return pending

    def _nearest(self, spin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For frames (nf, natoms, 3): the base that changes the fewest centres, and whether that is at most
        LOCAL_SHARE of them."""
        counts = np.array([self._changed(spin, base.spin).sum(axis=1) for base in self.bases])
        nearest = np.argmin(counts, axis=0)
        return nearest, counts[nearest, np.arange(len(spin))] <= LOCAL_SHARE * self.touch.shape[1]

    def _changed(self, spin: np.ndarray, base_spin: np.ndarray) -> np.ndarray:
        """(nf, centres): the centres whose candidate neighbours hold a virtual atom that moves from base_spin
        (natoms, 3) to each frame of spin (nf, natoms, 3)."""
        moved = np.any(spin != base_spin[None], axis=2)  # (nf, natoms)
        return (moved.astype(np.int64) @ self.touch.astype(np.int64)) > 0

    def _every_centre(self, spin: np.ndarray, gradient: bool, keep: bool = False
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies (and -dE/d(spin)) of frames (nf, natoms, 3), every centre evaluated. The first frame becomes
        the first base when evaluated with its gradient or when there is none, another one with keep."""
        torch = self.torch
        spin_t = torch.tensor(spin, dtype=self.prec, device=self.device, requires_grad=gradient)
        with torch.set_grad_enabled(gradient):
            per_atom, sums = self._atomic_energies(spin_t)
            energy = per_atom.sum(dim=1)
            minus_grad = None
            if gradient:
                (grad,) = torch.autograd.grad(energy.sum(), spin_t)
                minus_grad = (-grad).detach().cpu().numpy()
        if gradient or keep or not self.bases:  # the held moments are evaluated with their gradient: their competitors follow
            base = _Base(spin[0].copy(), per_atom[0].detach().cpu().numpy().astype(float),
                         None if sums is None else sums[0].detach())
            self.bases = self.bases + [base] if keep else [base] + self.bases[1:]
        return energy.detach().cpu().numpy().astype(float), minus_grad

    def _changed_centres(self, spin: np.ndarray, base: _Base) -> np.ndarray:
        """Energies of configurations spin (nf, natoms, 3) from a base configuration's atomic energies, re-evaluating
        only the centres whose candidate neighbours hold a virtual atom that moved (each frame its own centres,
        padded to the most any frame needs)."""
        torch = self.torch
        nf = len(spin)
        changed = self._changed(spin, base.spin)
        width = int(changed.sum(axis=1).max())
        if width == 0:
            return np.full(nf, base.atomic.sum())
        order = np.argsort(~changed, axis=1, kind="stable")[:, :width]  # each frame's changed centres first
        valid = np.take_along_axis(changed, order, axis=1)
        with torch.no_grad():
            if base.sums is not None and self._split_path() and self.split.uniform:
                now = self._moved_neighbour_energies(spin, base, order, valid)
            else:
                now = self._atomic_energies(torch.tensor(spin, dtype=self.prec, device=self.device), order, valid)[0]
        change = np.where(valid, now.cpu().numpy().astype(float) - base.atomic[order], 0.0).sum(axis=1)
        return base.atomic.sum() + change

    def _split_path(self) -> bool:
        """Whether batches take the split se_e2_a path (`_UnmovedSums`): a plain se_e2_a model, the typed list, the
        real atoms as the only centres."""
        return self.split is not None and self.typed_nlist is not None and self.nlist.shape[1] == self.coord.shape[1]

    def _extended(self, spin_t):
        """Extended coordinates (nf, nall, 3) of the real and virtual atoms at spin vectors spin_t (nf, natoms, 3)."""
        torch = self.torch
        nf = spin_t.shape[0]
        coord_spin, _, _ = self.model.process_spin_input(self.coord.expand(nf, -1, -1).contiguous(),
                                                         self.atype.expand(nf, -1).contiguous(), spin_t)
        mapping = self.mapping.expand(nf, -1)
        return torch.gather(coord_spin, 1, mapping.unsqueeze(-1).expand(-1, -1, 3)) + self.shift

    def _moved_neighbour_energies(self, spin: np.ndarray, base: _Base, order: np.ndarray, valid: np.ndarray):
        """Atomic energies (nf, width) of the centres `order` of each frame (valid: those that count) on the split
        se_e2_a path, from the base's neighbour sums: only the neighbour slots that hold a virtual atom moved from
        the base are embedded, at the base's positions and at the frame's, and their difference added (a one-ion
        change embeds one slot per centre instead of the magnetic section's every slot). The slots' atoms are
        placed in a compact frame of their own (the picked centres, then each moved slot's atom), not gathered
        into the whole extended frame."""
        torch = self.torch
        nf, width = order.shape
        natoms = self.coord.shape[1]
        pick = torch.tensor(order, dtype=torch.long, device=self.device)
        rows = self.typed_nlist[0][pick]  # (nf, width, nnei): the picked centres' neighbours, extended indices
        local = self.mapping[0][rows.clamp(min=0)]
        owner = (local - natoms).clamp(min=0)  # the real atom whose virtual atom a slot holds
        moved = torch.tensor(np.any(spin != base.spin[None], axis=2), device=self.device)  # (nf, natoms)
        frames = torch.arange(nf, device=self.device)[:, None, None]
        slot_moved = (rows >= 0) & (local >= natoms) & moved[frames, owner]
        slot_moved &= torch.tensor(valid, device=self.device)[..., None]
        base_spin = torch.tensor(base.spin, dtype=self.prec, device=self.device)
        spin_t = torch.tensor(spin, dtype=self.prec, device=self.device)
        scale = torch.tensor(self.signed_scale, dtype=self.prec, device=self.device)
        centres = self.ext_ref[0][pick]  # real atoms: where they are at every configuration
        before, after, types = [centres], [centres], [self.ext_atype[0][pick]]  # the compact frame, in pieces
        parts, placed = [], width
        for start, stop, kind in self.split.moving:
            section = slot_moved[..., start:stop]
            most = int(section.sum(dim=-1).max())
            if not most:
                continue
            first = torch.argsort((~section).to(torch.int8), dim=-1, stable=True)[..., :most]  # moved slots first
            slots = torch.gather(rows[..., start:stop], -1, first).clamp(min=0)
            who = torch.gather(owner[..., start:stop], -1, first)
            reference = self.ext_ref[0][slots]  # (nf, width, most, 3): the slot's virtual atom at zero spin
            displacement = scale[who][..., None]
            before.append((reference + base_spin[who] * displacement).reshape(nf, -1, 3))
            after.append((reference + spin_t[frames, who] * displacement).reshape(nf, -1, 3))
            types.append(self.ext_atype[0][slots].reshape(nf, -1))
            index = placed + torch.arange(width * most, device=self.device).reshape(width, most)
            parts.append((torch.where(torch.gather(section, -1, first), index, -1), start, kind))
            placed += width * most
        sums = base.sums[pick]
        atype = torch.cat(types, dim=1)
        if parts:
            coords = torch.cat([torch.cat(before, dim=1), torch.cat(after, dim=1)])
            both = [(self._within_rcut(coords, torch.cat([part, part])), start, kind) for part, start, kind in parts]
            moved_sums = self.split.section_sums(coords, torch.cat([atype, atype]), both, width)
            sums = sums + (moved_sums[nf:] - moved_sums[:nf])
        return self.split.fitted(sums, atype[:, :width]).to(self.ener_prec)

    def _atomic_energies(self, spin_t, order: np.ndarray | None = None, valid: np.ndarray | None = None):
        """Atomic energies (nf, centres) of spin vectors spin_t (nf, natoms, 3); with order (nf, width) only
        those centres of each frame (valid: which of them count; the rest are padding), placed ahead of the
        extended atoms. With them, on the split se_e2_a path for every centre, each centre's neighbour sum
        (nf, centres, 4, ng); else None."""
        torch = self.torch
        nf = spin_t.shape[0]
        ext = self._extended(spin_t)
        mapping = self.mapping.expand(nf, -1).contiguous()
        ext_atype = self.ext_atype.expand(nf, -1).contiguous()
        rows = self.nlist if self.typed_nlist is None else self.typed_nlist
        if order is None:
            rows = rows.expand(nf, -1, -1)
        else:
            pick = torch.tensor(order, dtype=torch.long, device=self.device)
            ext = torch.cat([torch.gather(ext, 1, pick.unsqueeze(-1).expand(-1, -1, 3)), ext], dim=1)
            ext_atype = torch.cat([torch.gather(ext_atype, 1, pick), ext_atype], dim=1)
            mapping = torch.cat([torch.gather(mapping, 1, pick), mapping], dim=1)
            rows = rows[0][pick]  # (nf, width, nnei)
            keep = torch.tensor(valid, device=self.device).unsqueeze(-1) & (rows >= 0)
            rows = torch.where(keep, rows + pick.shape[1], -1)  # the extended atoms sit after the picked centres now
        if self.typed_nlist is None:
            nlist = self.backbone.format_nlist(ext.detach(), ext_atype, rows.contiguous(), True)
        else:
            nlist = self._within_rcut(ext.detach(), rows)
        cc, _, _, _, _ = self.backbone._input_type_cast(ext, None, None, None)
        if self._split_path():
            if self.split.sums is None:
                with torch.no_grad():
                    self.split.sums = self.split.unmoved_sums(self.ext_ref, self.ext_atype,
                                                              self._within_rcut(self.ext_ref, self.typed_nlist))[0]
            centres = None if order is None else torch.tensor(order, dtype=torch.long, device=self.device)
            sums = self.split.neighbour_sums(cc, ext_atype, nlist, centres)
            energies = self.split.fitted(sums, ext_atype[:, :nlist.shape[1]]).to(self.ener_prec)
            return energies, (sums if order is None else None)
        atomic = self.backbone.atomic_model.forward_common_atomic(cc, ext_atype, nlist, mapping, None, None, None, None)
        return atomic["energy"].to(self.ener_prec).reshape(nf, -1), None


class _UnmovedSums:
    """Atomic energies of an se_e2_a spin model whose neighbour sections that no moment moves are summed once.

    deepmd-kit's DescrptBlockSeA sums, for each centre, rr^T G(s(r)) over its neighbours, one section per neighbour
    type, and builds the descriptor from that sum. At one geometry with the real atoms as centres only the virtual
    atoms of the magnetic types move with the moments (on the LiNiO2 model: Ni_spin, 16 of 112 neighbour slots);
    every other section's sum is the same for every configuration, so it is computed once (`sums`, per centre) and
    a batch embeds only the moving sections. A configuration near a base (`_Base`) embeds fewer still: only the
    slots whose virtual atom moved from the base, their change added to the base's sums (`section_sums`; needs
    one normalisation for every slot of a moving section, `uniform`). The rest mirrors DescrptBlockSeA.forward,
    DPAtomicModel.forward_atomic and forward_common_atomic: pair and atom exclusions, the fitting net, the output
    bias. Plain (uncompressed) float64 se_e2_a only; the first-use check against DeepPot.eval covers it like the
    rest of the path.
    """

    def __init__(self, atomic_model, moving: list[int]) -> None:
        self.am, self.sea = atomic_model, atomic_model.descriptor.sea
        sec = [int(x) for x in self.sea.sec]
        self.moving = [(sec[t], sec[t + 1], t) for t in moving]
        self.unmoved = [(sec[t], sec[t + 1], t) for t in range(len(sec) - 1) if t not in moving]
        self.uniform = all(bool((stat[:, start:stop] == stat[:, start:start + 1]).all())
                           for stat in (self.sea.mean, self.sea.stddev) for start, stop, _ in self.moving)
        import torch

        fitting = atomic_model.fitting_net
        float64 = fitting.bias_atom_e.dtype == torch.float64 and all(p.dtype == torch.float64 for p in fitting.parameters())
        # (deepmd-kit rounds the bias to the fitting's precision: a float32 fitting is left to its own forward)
        self.typed_fitting = (float64 and not bool(fitting.mixed_types) and fitting.remove_vaccum_contribution is None
                              and int(fitting.numb_fparam) == 0 and int(fitting.numb_aparam) == 0
                              and int(getattr(fitting, "dim_case_embd", 0)) == 0 and fitting.var_name == "energy")
        self.sums = None  # (centres, 4, ng): the unmoved sections' sum at this geometry's neighbour list

    @classmethod
    def of(cls, model) -> _UnmovedSums | None:
        """The split for a spin model with a plain se_e2_a descriptor (virtual types after the real ones), else None."""
        import torch

        atomic_model = model.backbone_model.atomic_model
        descriptor = getattr(atomic_model, "descriptor", None)
        if getattr(descriptor, "original_name", type(descriptor).__name__) != "DescrptSeA":
            return None
        sea = descriptor.sea
        scale = model.virtual_scale_mask.detach().cpu().numpy()
        if getattr(sea, "compress", True) or int(sea.ntypes) != 2 * len(scale) or sea.mean.dtype != torch.float64:
            return None  # (a float32 descriptor would sum in another order than its own forward: not to 1e-9)
        return cls(atomic_model, [len(scale) + t for t in range(len(scale)) if scale[t] != 0])

    def unmoved_sums(self, coord, ext_atype, nlist):
        """The unmoved sections' sums (nf, nloc, 4, ng) of the centres of nlist."""
        parts = [(nlist[:, :, start:stop], start, kind) for start, stop, kind in self.unmoved]
        return self.section_sums(coord, ext_atype, parts, nlist.shape[1])

    def neighbour_sums(self, coord, ext_atype, nlist, centres=None):
        """Each centre's sum over every neighbour (nf, nloc, 4, ng) of the centres of nlist: every real atom, or the
        real atoms `centres` (nf, nloc)."""
        nf = nlist.shape[0]
        xyz = self.sums.expand(nf, -1, -1, -1) if centres is None else self.sums[centres]
        parts = [(nlist[:, :, start:stop], start, kind) for start, stop, kind in self.moving]
        return xyz + self.section_sums(coord, ext_atype, parts, nlist.shape[1])

    def fitted(self, sums, atype):
        """Atomic energies (nf, nloc) of centres of types atype (nf, nloc) from their neighbour sums (nf, nloc, 4, ng)."""
        am, sea = self.am, self.sea
        nf, nloc = atype.shape
        xyz = sums / int(sea.nnei)
        columns = xyz.transpose(-1, -2)  # (nf, nloc, ng, 4)
        descriptor = (columns @ xyz[..., :int(sea.axis_neuron)]).reshape(nf, nloc, -1)
        from deepmd.pt.utils.env import GLOBAL_PT_FLOAT_PRECISION

        descriptor = descriptor.to(GLOBAL_PT_FLOAT_PRECISION)
        if self.typed_fitting:
            fitted = {"energy": self._fit_by_type(descriptor, atype)}
        else:
            fitted = am.fitting_net(descriptor, atype, gr=columns[..., 1:4], g2=None, h2=None, fparam=None, aparam=None)
        energy = am.apply_out_stat(fitted, atype)["energy"].reshape(nf, nloc)
        return energy if am.atom_excl is None else energy * am.atom_excl(atype)

    def _fit_by_type(self, descriptor, atype):
        """The energy fitting's output (nf, nloc, 1) as deepmd-kit's GeneralFitting._forward_common gives it without
        parameters (fparam, aparam, case embedding, vacuum contribution), each centre through its own type's network
        alone: that forward runs every type's network over every centre and keeps one (6 networks, 3 of them for the
        virtual types, over each real atom of a spin model)."""
        fitting = self.am.fitting_net
        networks = fitting.filter_layers.networks
        outs = descriptor.new_zeros((*atype.shape, 1))
        for kind in range(int(fitting.bias_atom_e.shape[0])):
            mine = atype == kind
            if bool(mine.any()):
                outs[mine] = getattr(networks, str(kind))(descriptor[mine]) + fitting.bias_atom_e[kind]
        return outs.where(fitting.emask(atype).to(bool)[..., None], 0.0)

    def _excluded(self, nlist, ext_atype):
        """nlist without the pairs the atomic model excludes (forward_common_atomic's pair_excl)."""
        if self.am.pair_excl is None:
            return nlist
        return nlist.where(self.am.pair_excl(nlist, ext_atype) == 1, -1)

    def section_sums(self, coord, ext_atype, parts, nloc):
        """Sum (nf, nloc, 4, ng) of rr^T G(s) over the neighbours of `parts`: (neighbour list (nf, nloc, n), the
        first slot of the section it stands for (its normalisation), the neighbour type); each centre type its
        network."""
        from deepmd.pt.model.descriptor.env_mat import prod_env_mat

        sea = self.sea
        atype = ext_atype[:, :nloc]
        xyz = coord.new_zeros((coord.shape[0], nloc, 4, int(sea.filter_neuron[-1])))
        ntypes, one_side = int(sea.ntypes), bool(sea.type_one_side)
        networks = sea.filter_layers.networks
        for part, start, kind in parts:
            part = self._excluded(part, ext_atype)
            stop = start + part.shape[-1]
            env = prod_env_mat(coord, part, atype, sea.mean[:, start:stop], sea.stddev[:, start:stop], float(sea.rcut),
                               float(sea.rcut_smth), protection=float(sea.env_protection))[0]
            rr = env * sea.emask(part, ext_atype).unsqueeze(-1)  # (nf, nloc, n, 4)
            for centre_type in [None] if one_side else range(ntypes):
                network = getattr(networks, str(kind if one_side else kind * ntypes + centre_type))
                mine = (atype >= 0) if centre_type is None else (atype == centre_type)
                if bool(mine.any()):
                    picked = rr[mine]  # (m, n, 4)
                    xyz[mine] += picked.transpose(-1, -2) @ network(picked[..., :1])
        return xyz
