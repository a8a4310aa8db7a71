"""The spin search's energy model over frozen deepmd-kit spin models (PyTorch backend).

``DeepmdSpinModel`` binds one geometry to one frozen spin model or an ensemble and evaluates
moment configurations of its magnetic ions in batches: every configuration of a batch is one frame
of the same geometry, moments encoded with ``SpinEncoding.to_deepmd`` (S -> spin vector
(0, 0, S + d/eta)). Energies are the ensemble mean; -dE/dS is the mean z component of deepmd-kit's
``force_mag`` (= -dE/d(spin vector)) on the magnetic ions, since spin_z = S + d/eta.

Energy-only evaluation: ``DeepPot.eval`` (deepmd-kit 3.2, pt backend) cannot skip forces: the
frozen TorchScript model's forward always takes ``torch.autograd.grad`` of the energy for the
force, force_mag and the virial (``do_grad_r``/``do_grad_c`` come from the fitting's output
definition, not from the call), and ``atomic=False`` only drops the atomic virial. This module
therefore has its own energy-only path (``energy_only=True``) that calls the frozen model's
compiled pieces in the order its forward does (spin input -> neighbour list ->
``atomic_model.forward_common_atomic`` -> sum) under ``torch.no_grad()``. It is checked once
against ``DeepPot.eval`` on first use and falls back to ``DeepPot.eval`` (with a warning) if the
model lacks these pieces or disagrees; ``energy_path`` says which path is in use.

TorchScript warm-up: with its default profiling executor a frozen model spends seconds on each of
its first two calls (per code path) profiling and re-optimising the graph (measured ~5 s each on 2
busy CPU cores for an 8-atom cell). ``optimize_jit=False`` (the default) runs the calls under
``torch.jit.optimized_execution(False)``: no warm-up; the steady state was no slower in the
benchmark (docs/benchmarks/spin_search_deepmd.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from spingen.spin.encoding import SpinEncoding
from spingen.spin.model import EnergyModel

log = logging.getLogger("spingen")

_CHECK_RTOL = 1e-9  # energy-only path vs DeepPot.eval: relative agreement required on first use


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
            from deepmd.infer import DeepPot

            m = DeepPot(str(path))
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


class DeepmdSpinModel(EnergyModel):
    """Energies and -dE/dS of moment configurations of ONE geometry under deepmd-kit spin model(s).

    models: a frozen model path, a loaded ``deepmd.infer.DeepPot``, or a sequence of them (ensemble;
    all must share one type_map). positions (natoms, 3) A; cell (3, 3) or None (no PBC); symbols:
    chemical symbol of every atom. encoding: eta/d of the training data (``SpinEncoding``).
    magnetic: the ions whose moments are searched, as atom indices or a boolean mask over atoms
    (default: every atom of an element in ``encoding.magnetic``); kept in structure order, which is
    the order of ``MomentLevels.magnetic_indices``. background_moments (natoms,): raw moments of
    the other atoms (default 0; only atoms of the model's spin types feel them).
    batch_size: most configurations per model call (bounds memory; larger batches are chunked).
    energy_only: use the forward-only path for energy-only calls (see the module docstring).
    optimize_jit: let TorchScript's profiling executor optimise the graphs (see the module docstring).
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
        batch_size: int = 256,
        energy_only: bool = True,
        optimize_jit: bool = False,
    ) -> None:
        self.models = load_models(models)
        self.symbols = tuple(symbols)
        natoms = len(self.symbols)
        self.positions = np.asarray(positions, dtype=float)
        if self.positions.shape != (natoms, 3):
            raise ValueError(f"positions must have shape ({natoms}, 3), got {self.positions.shape}")
        self.cell = None if cell is None else np.asarray(cell, dtype=float).reshape(3, 3)
        self.encoding = encoding
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
        missing = sorted(set(self.symbols) - set(self.type_map))
        if missing:
            raise ValueError(f"elements {missing} of the structure are not in the model's type_map "
                             f"{self.type_map}")
        self.atom_types = np.array([self.type_map.index(s) for s in self.symbols], dtype=np.int32)

        spin_elements = self._spin_elements()
        if magnetic is None:
            self.magnetic_indices = np.flatnonzero(encoding.magnetic_mask(self.symbols))
        else:
            sel = np.asarray(magnetic)
            if sel.dtype == bool:
                if sel.shape != (natoms,):
                    raise ValueError(f"a magnetic mask must have {natoms} entries, got {sel.shape}")
                sel = np.flatnonzero(sel)
            sel = sel.astype(int).ravel()
            if np.any((sel < 0) | (sel >= natoms)) or len(set(sel.tolist())) != sel.size:
                raise ValueError(f"magnetic indices must be distinct atoms in 0..{natoms - 1}, got {sel.tolist()}")
            self.magnetic_indices = np.sort(sel)
        if self.magnetic_indices.size == 0:
            raise ValueError(f"no magnetic ion: no atom is one of {list(encoding.magnetic)}")
        for i in self.magnetic_indices:
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
        super().__init__(self.magnetic_indices.size)
        self.magnetic_symbols = tuple(self.symbols[i] for i in self.magnetic_indices)
        self.background = np.zeros(natoms) if background_moments is None else \
            np.asarray(background_moments, dtype=float).reshape(natoms).copy()
        self.background[self.magnetic_indices] = 0.0
        self._energy_only = bool(energy_only)
        self.optimize_jit = bool(optimize_jit)
        self._fast_ok: list[bool | None] = [None] * len(self.models)  # checked on first use

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def from_atoms(cls, atoms: Any, models: Any, encoding: SpinEncoding,
                   magnetic: Sequence[int] | np.ndarray | None = None, **kwargs: Any) -> "DeepmdSpinModel":
        """Bind an ase.Atoms (positions, cell if periodic, symbols) to model path(s) or DeepPot(s)."""
        cell = atoms.cell.array if atoms.pbc.any() else None
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError("partly periodic structures are not supported: deepmd-kit needs pbc on all axes or none")
        return cls(models, atoms.positions, cell, atoms.get_chemical_symbols(), encoding, magnetic, **kwargs)

    def _spin_elements(self) -> set[str] | None:
        settings = model_spin_settings(self.models[0])
        return set(settings) if settings else None

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def energy_path(self) -> str:
        """'forward-only' when energy-only calls skip the backward pass, else 'DeepPot.eval'."""
        if not self._energy_only or any(ok is False for ok in self._fast_ok):
            return "DeepPot.eval"
        return "forward-only" if all(self._fast_ok) else "forward-only (not yet checked)"

    # -- evaluation --------------------------------------------------------------------------
    def spin_vectors(self, moments: np.ndarray) -> np.ndarray:
        """Raw moments of the magnetic ions (nconf, n_magnetic) -> deepmd spin (nconf, natoms*3)."""
        m = np.atleast_2d(np.asarray(moments, dtype=float))
        full = np.repeat(self.background[None, :], len(m), axis=0)
        full[:, self.magnetic_indices] = m
        return self.encoding.to_deepmd(full, self.symbols).reshape(len(m), -1)

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

    def _members(self, moments: np.ndarray, gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.jit.optimized_execution(self.optimize_jit):
            return self._members_batched(moments, gradient)

    def _members_batched(self, moments: np.ndarray, gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(moments)
        energies = np.empty((self.n_models, n))
        minus_grad = np.empty((self.n_models, n, self.n_magnetic)) if gradient else None
        for start in range(0, n, self.batch_size):
            part = moments[start: start + self.batch_size]
            spin = self.spin_vectors(part)
            for k, dp in enumerate(self.models):
                e, g = self._eval_one(k, dp, spin, gradient)
                energies[k, start: start + len(part)] = e
                if gradient:
                    minus_grad[k, start: start + len(part)] = g
        return energies, minus_grad

    def _frames(self, nframes: int) -> tuple[np.ndarray, np.ndarray | None]:
        coords = np.broadcast_to(self.positions.reshape(1, -1), (nframes, self.positions.size))
        cells = None if self.cell is None else np.broadcast_to(self.cell.reshape(1, 9), (nframes, 9))
        return np.ascontiguousarray(coords), (None if cells is None else np.ascontiguousarray(cells))

    def _eval_full(self, dp, spin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coords, cells = self._frames(len(spin))
        out = dp.eval(coords, cells, self.atom_types, spin=spin)
        energy, force_mag = out[0], out[3]
        return energy.reshape(-1), force_mag.reshape(len(spin), -1, 3)[:, self.magnetic_indices, 2]

    def _eval_one(self, k: int, dp, spin: np.ndarray, gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if gradient or not self._energy_only or self._fast_ok[k] is False:
            e, g = self._eval_full(dp, spin)
            return e, (g if gradient else None)
        try:
            e = _energy_forward_only(dp, *self._frames(len(spin)), self.atom_types, spin)
        except Exception as err:  # noqa: BLE001 - any internals mismatch: fall back, loudly
            log.warning("deepmd energy-only path unavailable (%s: %s); using DeepPot.eval", type(err).__name__, err)
            self._fast_ok[k] = False
            return self._eval_full(dp, spin)[0], None
        if self._fast_ok[k] is None:
            ref = self._eval_full(dp, spin[:1])[0]
            if not np.allclose(e[:1], ref, rtol=_CHECK_RTOL, atol=1e-9):
                log.warning("deepmd energy-only path disagrees with DeepPot.eval (%r vs %r); using DeepPot.eval",
                            float(e[0]), float(ref[0]))
                self._fast_ok[k] = False
                return self._eval_full(dp, spin)[0], None
            self._fast_ok[k] = True
        return e, None


def _energy_forward_only(dp, coords: np.ndarray, cells: np.ndarray | None, atom_types: np.ndarray,
                         spin: np.ndarray) -> np.ndarray:
    """Energies (nframes,) of a deepmd-kit pt spin model without the backward pass.

    Mirrors SpinModel.forward_common -> make_model.forward_common(_lower) of deepmd-kit 3.2, minus
    fit_output_to_model_output's autograd: energy_redu is the sum of the atomic energies of the
    real and virtual local atoms (virtual types are excluded inside forward_common_atomic).
    """
    import torch
    from deepmd.pt.utils.env import DEVICE, GLOBAL_PT_ENER_FLOAT_PRECISION, GLOBAL_PT_FLOAT_PRECISION
    from deepmd.pt.utils.nlist import extend_input_and_build_neighbor_list

    model = dp.deep_eval.dp.model["Default"]
    backbone = model.backbone_model
    nframes, natoms = len(spin), len(atom_types)
    with torch.no_grad():
        coord = torch.tensor(coords.reshape(nframes, natoms, 3), dtype=GLOBAL_PT_FLOAT_PRECISION, device=DEVICE)
        atype = torch.tensor(np.tile(atom_types, (nframes, 1)), dtype=torch.long, device=DEVICE)
        spin_t = torch.tensor(spin.reshape(nframes, natoms, 3), dtype=GLOBAL_PT_FLOAT_PRECISION, device=DEVICE)
        box = None if cells is None else torch.tensor(cells.reshape(nframes, 3, 3), dtype=GLOBAL_PT_FLOAT_PRECISION,
                                                      device=DEVICE)
        coord_spin, atype_spin, _ = model.process_spin_input(coord, atype, spin_t)
        cc, bb, _, _, _ = backbone._input_type_cast(coord_spin, box, None, None)
        ext_coord, ext_atype, mapping, nlist = extend_input_and_build_neighbor_list(
            cc, atype_spin, backbone.get_rcut(), backbone.get_sel(), mixed_types=True, box=bb)
        ext_coord = ext_coord.view(nframes, -1, 3)
        nlist = backbone.format_nlist(ext_coord, ext_atype, nlist, False)
        cc_ext, _, _, _, _ = backbone._input_type_cast(ext_coord, None, None, None)
        atomic = backbone.atomic_model.forward_common_atomic(cc_ext, ext_atype, nlist, mapping, None, None, None, None)
        energy = atomic["energy"].to(GLOBAL_PT_ENER_FLOAT_PRECISION).reshape(nframes, -1).sum(dim=1)
    return energy.detach().cpu().numpy().astype(float)
