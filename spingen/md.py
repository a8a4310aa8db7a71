"""Spin-minimized molecular dynamics with frozen deepmd-kit spin models.

``SpinModelCalculator`` is an ASE calculator over one or several frozen deepmd-kit spin models.
deepmd-kit's own ASE calculator cannot pass per-atom spins; this one holds the current discrete
moments of the magnetic ions and re-optimizes them with the spin search (``search_ground_state``)
every ``spin_opt_freq`` steps, warm-started from the current moments. Energy, forces and stress
are those of the current (optimized) moments, from one ``DeepPot.eval`` per driving model; forces
are -dE/dR at fixed moments. A re-optimizing step evaluates the current moments first and hands
that energy and -dE/dS (deepmd-kit's force_mag) to the search for free; it evaluates again only
when the search moved the moments.

Example, with models trained by spingen (``spin_encoding.json`` sits beside each model)::

    from ase.io import read
    from spingen.md import SpinModelCalculator, run_md

    atoms = read("POSCAR")
    atoms.calc = SpinModelCalculator(["graph.000.pth", "graph.001.pth"], {"Ni": [1.0, 3.0]},
                                     drive="mean", spin_opt_freq=1)
    print(atoms.get_potential_energy(), atoms.get_magnetic_moments())
    run_md(atoms, atoms.calc, "nvt", temperature=600, nsteps=100, dt_fs=2.0, trj_freq=10,
           observers=[lambda step, a: print(step, a.calc.moments)])

``run_md`` drives ASE's integrators (the names of ``spingen.schema.MD_ENSEMBLES``) and makes sure
the moments are optimized at every frame step it reports to its observers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator, all_changes

from spingen.spin.certificate import SAME_ENERGY, CertificateSettings, GroundStateCertificate, competitors
from spingen.spin.encoding import SpinEncoding
from spingen.spin.levels import MomentLevels
from spingen.spin.model import SymmetrizedModel
from spingen.spin.search import SEARCH_KEYS, SearchResult, search_ground_state, sector_ground_states

DEFAULT_CERTIFICATE = CertificateSettings()
log = logging.getLogger("spingen")


class NonFiniteError(RuntimeError):
    """The driving model returned NaN/inf; ``step`` is the MD step when known (set by run_md)."""

    step: int | None = None


class SpinModelCalculator(Calculator):
    """ASE calculator: deepmd-kit spin model(s) with discrete moments re-optimized along the way.

    models: frozen model paths or loaded ``deepmd.infer.DeepPot`` objects (one type_map).
    magnitudes: allowed |moment| levels (uB) per magnetic element, e.g. {"Ni": [1, 3]} (see
    ``spingen.data.levels.magnitudes_from_data`` to infer them from training data). Every nonzero level may point up or down.
    encoding: eta/d of the training data; default: ``spin_encoding.json`` beside the first model.
    drive: "mean" (ensemble mean of energy, forces, virial and of the search's energies) or the
    index of the one model that drives (0: DP-GEN's choice; n_models times cheaper).
    spin_opt_freq: re-optimize every spin_opt_freq steps (1 = every step; 0 = never after the
    first; standalone, a step is one evaluation at a new geometry; under ``run_md`` an MD step).
    moments: start moments (natoms,) in uB; default: the atoms' initial magnetic moments when any
    magnetic ion has one, else a cold search. They are snapped to the nearest allowed level.
    search: settings of ``search_ground_state`` (SEARCH_KEYS, e.g. {"max_evaluations": 8}); seed: the first search's
    seed (search n uses seed + n). total_moment: fixed sum of the moments (like NUPDOWN).
    fix_global_sign: search one of each pair S, -S (right for flip-augmented, canonical-sign or
    symmetrized models).
    symmetrize: use E_sym(S) = (E(S) + E(-S)) / 2 and its forces, virial and -dE/dS everywhere (the
    MD, the search, the deviations): exact reversal symmetry for models trained without it
    (spin/flip_symmetry "none" or "augment"), at twice the cost of each evaluation.
    optimize_jit: let TorchScript's profiling executor optimize the graphs (slow first calls).
    certify: settings of the ground-state certificate (``spingen.spin.certificate``; a mapping of
    CertificateSettings fields or the settings); None: a warm search at every re-optimizing step.
    With it, a re-optimizing step predicts from its own -dE/dS (free) which competitors of the
    current moments (single- and two-ion moves, the last search's lowest states) may lie within the
    margin, evaluates only those in energy-only batches (none: certified; GroundStateCertificate.check),
    and when one is lower, moves to it and goes on downhill over the new moments' competitors, whose
    gaps the old ones carry over where they can (GroundStateCertificate.move_to); a full warm search
    runs every certify.search_every steps. Every competitor of a cold search's result is evaluated at
    its geometry and, where one is lower, the moments go downhill as on a re-optimizing step.

    After a calculation: ``results["magmoms"]`` (natoms,), ``moments`` (magnetic ions),
    ``last_search`` (SearchResult at the last re-optimization), ``excited_magmoms()``; counters
    ``n_evaluations``, ``n_searches``, ``n_spin_changes``, ``n_search_evaluations``, ``n_certified``
    (re-optimizing steps settled by the certificate alone), ``n_references`` and
    ``n_reference_evaluations`` (competitor batches and their configurations), ``n_descents``
    (moves of the moments found by the competitors), ``timings``.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "magmoms", "magmom"]

    def __init__(self, models: Any, magnitudes: Mapping[str, Sequence[float]], *,
                 encoding: SpinEncoding | None = None, drive: str | int = "mean", spin_opt_freq: int = 1,
                 moments: np.ndarray | None = None, search: Mapping[str, Any] | None = None, seed: int = 0,
                 total_moment: float | None = None, fix_global_sign: bool = True, optimize_jit: bool = False,
                 symmetrize: bool = False, certify: CertificateSettings | Mapping[str, Any] | None = DEFAULT_CERTIFICATE,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from spingen.deepmd_model import load_models, model_spin_settings, resolve_encoding

        paths = [models] if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) else list(models)
        self.models = load_models(paths)
        if encoding is None:
            try:
                encoding = resolve_encoding(self.models)
            except ValueError as err:
                raise ValueError(f"no spin encoding: pass encoding= (eta and d of the training data) or keep "
                                 f"spin_encoding.json beside the model ({err})") from None
        self.encoding = encoding
        for k, dp in enumerate(self.models):
            scales = model_spin_settings(dp)
            for element in set(scales) & set(encoding.magnetic):
                if abs(scales[element] - encoding.virtual_scale) > 1e-9:
                    raise ValueError(f"model {k}: virtual_scale of {element} is {scales[element]}, the encoding "
                                     f"says {encoding.virtual_scale}")
        if drive == "mean":
            self.drive_models = list(self.models)
        elif isinstance(drive, (int, np.integer)) and not isinstance(drive, bool) and 0 <= drive < len(self.models):
            self.drive_models = [self.models[int(drive)]]
        else:
            raise ValueError(f"drive must be \"mean\" or a model index 0..{len(self.models) - 1}, got {drive!r}")
        self.drive = drive
        if int(spin_opt_freq) < 0:
            raise ValueError(f"spin_opt_freq must be >= 0, got {spin_opt_freq}")
        self.spin_opt_freq = int(spin_opt_freq)
        self.magnitudes = {el: [float(m) for m in mags] for el, mags in magnitudes.items()}
        unknown = sorted(set(search or {}) - set(SEARCH_KEYS))
        if unknown:
            raise ValueError(f"unknown spin search settings {unknown}; known: {list(SEARCH_KEYS)}")
        self.search_kwargs = dict(search or {})
        self.seed = int(seed)
        self.total_moment = total_moment
        self.fix_global_sign = bool(fix_global_sign)
        self.optimize_jit = bool(optimize_jit)
        self.symmetrize = bool(symmetrize)
        self.certify = CertificateSettings(**certify) if isinstance(certify, Mapping) else certify
        self.certificate: GroundStateCertificate | None = None  # of the current structure
        self._gauge: Callable[[np.ndarray], np.ndarray] | None = None  # the encoding's sign per configuration
        self._steps_since_search = 0
        self.lowest_here = False  # the moments are the driving model's lowest found at the current geometry
        self._start = None if moments is None else np.asarray(moments, dtype=float)
        self.levels: MomentLevels | None = None
        self.moments: np.ndarray | None = None  # current moments of levels.magnetic_indices
        self.last_search: SearchResult | None = None
        self.member_predictions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.member_minus_spin_grad: np.ndarray | None = None  # (M, n_magnetic) with member_predictions
        self._drive_prediction: tuple | None = None  # the driving models' (e, f, v, -dE/dS) of the last evaluation
        self.minus_spin_grad: np.ndarray | None = None  # -dE/dS of the driving mean at the moments
        self._fast_verdicts: dict[int, bool] = {}  # id(model) -> DeepmdSpinModel's fast-path check, made once
        self._step_mode = False
        self._search_next = False
        self.n_evaluations = self.n_searches = self.n_spin_changes = self.n_search_evaluations = 0
        self.n_calculations = 0  # geometries calculated (the standalone schedule counts these)
        self.n_certified = self.n_references = self.n_reference_evaluations = self.n_descents = 0
        self._moved_from: np.ndarray | None = None  # -dE/dS at the moments a move left, until it is settled
        self._step_model = None  # the spin model of the geometry being re-optimized
        self.timings = {"search": 0.0, "certify": 0.0, "evaluate": 0.0, "members": 0.0}

    # -- schedule ----------------------------------------------------------------------------
    def begin_step(self, step: int, force_search: bool = False) -> None:
        """Called by an MD driver before the evaluation of MD step `step` (0 = start).

        Switches the schedule from evaluation counting to MD steps: the next evaluation
        re-optimizes when step % spin_opt_freq == 0 or force_search (never with spin_opt_freq 0,
        except for the first evaluation without start moments).
        """
        self._step_mode = True
        self._search_next = self.spin_opt_freq > 0 and (step % self.spin_opt_freq == 0 or force_search)

    # -- ASE interface ----------------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if self.levels is None or "numbers" in system_changes:
            self._set_structure(atoms)
        elif "initial_magmoms" in system_changes:
            self._adopt_start(atoms)
        if self._step_mode:
            search_now, self._search_next = self._search_next, False
        else:
            search_now = self.spin_opt_freq > 0 and self.n_calculations % self.spin_opt_freq == 0
        self.n_calculations += 1
        self.lowest_here = False
        cold = self.moments is None
        if cold:  # no start: a cold search first
            self._warn_if_runs_disagree(self.optimize(atoms))
        if (search_now and not cold) or (cold and self.certificate is not None):
            # evaluate here first (NaN is reported as such); certificate and search reuse it. After a cold search
            # every competitor of its result is evaluated and a lower one descended to (the search's polish skips
            # the moves its surrogate predicts to rise, so its best can sit a move above a lower state)
            self._evaluate(atoms)
            if not self._reoptimize(atoms, searched=cold):
                self.lowest_here = True
                return
        self._evaluate(atoms)
        settled = self._settle_move(atoms)
        self.lowest_here = settled and (search_now or cold)

    @staticmethod
    def _warn_if_runs_disagree(result: SearchResult) -> None:
        """A cold search of several runs whose lowest state only one run reached: the landscape has basins the
        runs end in by chance, and the start may sit in a higher one that no later step's moves leave."""
        if result.n_runs > 1 and result.runs_at_best < 2:
            above = sorted(1000.0 * (e - result.best_energy) for e in result.run_energies if np.isfinite(e))[1:]
            log.warning("cold spin search: 1 of its %d runs reached its lowest state (the others %s meV per cell "
                        "higher), so the start moments may not be the ground state; give them (initial_magmoms of "
                        "the start structure) or raise the search's max_cold_runs, or set cold_runs above %d "
                        "(model_devi_spin_search)", result.n_runs, ", ".join(f"{e:.1f}" for e in above), result.n_runs)

    def _reoptimize(self, atoms, searched: bool = False) -> bool:
        """The re-optimizing step after the evaluation at the current moments: certified, checked against
        the competitors the certificate names, or searched; True when the moments moved (the caller
        evaluates again). searched: a search just found the moments here (the competitors are checked, no
        search runs and the step does not count towards search_every)."""
        before, energy, minus_grad = self.moments, self.results["energy"], self.minus_spin_grad
        cert = self.certificate
        if not searched:
            self._steps_since_search += 1
        if cert is None or (not searched and (self.last_search is None
                                              or self._steps_since_search >= cert.settings.search_every)):
            self.optimize(atoms, known=[(before, energy, minus_grad)])
            if cert is not None:
                cert.tick()
                cert.release()  # the next step evaluates the new search's competitors
            return not np.array_equal(before, self.moments)
        began = time.perf_counter()
        held = cert.holds_for(before)  # the exchanges' gaps follow their anchors', evaluated where they name one
        indices = cert.to_check(minus_grad, self._held_anchor_gaps(atoms)) if held else None
        if indices is None:
            cert.tick()
        if indices is not None and not len(indices):
            self.n_certified += 1
            self._step_model = None
            self.timings["certify"] += time.perf_counter() - began
            return False
        if self._step_model is None:
            self._step_model = self._held_model(atoms)
        if indices is None:
            pool = self.competitors(before)
            energies = self._energies(self._step_model, pool)
            cert.set_reference(before, energy, minus_grad, pool, energies, self._anchor_gaps)
        else:
            pool, energies = cert.check(indices, energy, minus_grad, self._step_energies)
        lowest = _lowest_below(energies, energy)
        lower = lowest is not None
        if lower:
            self._move(pool[lowest], minus_grad)
        else:
            self._step_model = None
        self.timings["certify"] += time.perf_counter() - began
        return lower

    def _move(self, target: np.ndarray, minus_grad_before: np.ndarray) -> None:
        """Hold `target`, a competitor found lower (first-up); the next evaluation settles the move."""
        self.moments = self.levels.to_moments(self.levels.first_up(self.levels.to_indices(target, snap=True)))[0]
        self.n_spin_changes += 1
        self.n_descents += 1
        self._moved_from = minus_grad_before

    def _settle_move(self, atoms) -> bool:
        """After a move, evaluated at the new moments: their competitors take the gaps the old ones carry over
        (GroundStateCertificate.move_to), those within the allowance are evaluated here (check), and a
        lower one moves the moments again (downhill until none is lower). False: a move left unsettled."""
        cert = self.certificate
        for _ in range(self.levels.n_magnetic * max(self.levels.n_values)):  # more moves than a descent makes
            if self._moved_from is None:
                break
            began = time.perf_counter()
            energy, minus_grad = self.results["energy"], self.minus_spin_grad
            pool = self.competitors(self.moments)
            indices = cert.move_to(self.moments, pool, self._moved_from, minus_grad, self.reversal_symmetric,
                                   self._anchor_gaps)
            self._moved_from = None
            evaluated, energies = cert.check(indices, energy, minus_grad, self._step_energies)
            self.timings["certify"] += time.perf_counter() - began
            lowest = _lowest_below(energies, energy)
            if lowest is not None:
                self._move(evaluated[lowest], minus_grad)
                self._evaluate(atoms)
        settled = self._moved_from is None
        if not settled:  # the next step evaluates every competitor
            self._moved_from = None
            cert.release()
        self._step_model = None
        return settled

    def _held_model(self, atoms):
        """The spin model of this geometry for the batches of one re-optimizing step (its neighbour data serve
        them all), the held moments evaluated first: the configuration the batches' energies follow from,
        re-evaluating only the atoms a changed ion reaches."""
        model = self.spin_model(atoms)
        model.evaluate(self.moments[None])
        return model

    def _step_energies(self, moments: np.ndarray) -> np.ndarray:
        """Driving energies of configurations at the geometry being re-optimized (one energy-only batch)."""
        return self._energies(self._step_model, moments)

    def _energies(self, model, moments: np.ndarray) -> np.ndarray:
        """Driving energies of configurations (n, n_magnetic) under the spin model of this geometry: one
        energy-only batch."""
        if len(moments) == 0:
            return np.empty(0)
        self.n_references += 1
        self.n_reference_evaluations += len(moments)
        energies = (SymmetrizedModel(model) if self.symmetrize else model).evaluate(moments)[0]
        self.keep_fast_verdicts(model)
        return energies

    def _held_anchor_gaps(self, atoms) -> Callable[[np.ndarray], np.ndarray]:
        """`_anchor_gaps` at this geometry, the step's model (`_held_model`) made at its first call: a step that
        names no competitor and no anchor makes none."""
        def gaps(anchors: np.ndarray) -> np.ndarray:
            if self._step_model is None:
                self._step_model = self._held_model(atoms)
            return self._anchor_gaps(anchors)
        return gaps

    def _anchor_gaps(self, anchors: np.ndarray) -> np.ndarray:
        """The gaps of anchors (k, n_magnetic) of the held moments at the geometry being re-optimized, under the
        step's model (``anchor_gaps``)."""
        self.n_references += 1
        self.n_reference_evaluations += len(anchors)
        model = SymmetrizedModel(self._step_model) if self.symmetrize else self._step_model
        gaps = self.anchor_gaps(model, self.moments, anchors)
        self.keep_fast_verdicts(self._step_model)
        return gaps

    def anchor_gaps(self, model, moments: np.ndarray, anchors: np.ndarray) -> np.ndarray | None:
        """E - E(S0) of a certificate's anchors of moments S0 in S0's gauge sector under an energy model of one
        geometry (one energy-only batch, S0 first: the configuration they differ from by one ion); None without
        anchors."""
        if not len(anchors):
            return None
        sign = 1.0 if self._gauge is None else float(self._gauge(np.asarray(moments, dtype=float)[None])[0])
        energies = model.sector_energies(np.concatenate([np.asarray(moments, dtype=float)[None], anchors]), sign)
        return energies[1:] - energies[0]

    def lowest_states(self) -> list[np.ndarray]:
        """The lowest configurations of the last adopted search (none before it)."""
        return [] if self.last_search is None else [np.asarray(m, dtype=float) for m, _ in self.last_search.lowest]

    def competitors(self, moments: np.ndarray) -> np.ndarray:
        """The competitors of `moments` (spingen.spin.certificate.competitors, with certify's pair_limit and
        exchange_limit, their defaults without certify) with the last search's lowest states, first-up unless
        the energy is reversal-symmetric."""
        settings = self.certify or DEFAULT_CERTIFICATE
        return competitors(self.levels, moments, self.lowest_states(), settings.pair_limit,
                           first_up=not self.reversal_symmetric, exchange_limit=settings.exchange_limit)

    @property
    def reversal_symmetric(self) -> bool:
        """E(-S) = E(S) exactly: a canonical-sign encoding or the symmetrized energy."""
        return self.encoding.canonical or self.symmetrize


    def _set_structure(self, atoms) -> None:
        from spingen.deepmd_model import atom_types

        symbols = atoms.get_chemical_symbols()
        present = sorted(set(symbols) & set(self.encoding.magnetic))
        missing = [el for el in present if el not in self.magnitudes]
        if missing:
            raise ValueError(f"no moment magnitudes for the magnetic element(s) {missing} of the structure")
        self.symbols = symbols
        self.atom_types = atom_types(self.models[0].get_type_map(), symbols, "the structure").astype(np.int32)
        self.levels = MomentLevels({el: self.magnitudes[el] for el in present}, symbols,
                                   total_moment=self.total_moment, fix_global_sign=self.fix_global_sign)
        magnetic = [symbols[i] for i in self.levels.magnetic_indices]
        self._gauge = (lambda states: self.encoding.gauge_signs(states, magnetic)) if self.encoding.canonical else None
        self.certificate = None if self.certify is None else self.new_certificate()
        self.candidate_neighbours: dict = {}  # the spin models' candidate neighbours, shared along this structure's MD
        self.moments = None
        self._adopt_start(atoms)

    def _adopt_start(self, atoms) -> None:
        """Moments to start from: the `moments` argument (once), else the atoms' initial moments if
        a magnetic ion has a nonzero one, else none (the first evaluation searches cold). A new start
        begins a new certificate: the old references and remembered states speak of other geometries (and a
        move left unsettled by a failed evaluation is dropped)."""
        if self.certificate is not None:
            self.certificate = self.new_certificate()
        self._moved_from = self._step_model = None
        explicit = self._start is not None
        full = self._start if explicit else atoms.get_initial_magnetic_moments()
        self._start = None
        full = np.asarray(full, dtype=float).reshape(len(atoms))
        start = full[self.levels.magnetic_indices]
        if explicit or np.any(start != 0):
            idx = self.levels.to_indices(start, snap=True)
            if not self.levels.is_allowed(idx)[0]:
                raise ValueError(f"start moments {start.tolist()} do not satisfy the total moment "
                                 f"{self.total_moment}")
            self.moments = self.levels.to_moments(idx)[0]
        else:
            self.moments = None

    # -- the work ----------------------------------------------------------------------------
    def spin_model(self, atoms, models: Sequence[Any] | None = None):
        """The ``DeepmdSpinModel`` of this geometry, driving models by default (not symmetrized)."""
        from spingen.deepmd_model import DeepmdSpinModel

        cell = atoms.cell.array if atoms.pbc.any() else None
        models = list(models or self.drive_models)
        checked = [self._fast_verdicts.get(id(dp)) for dp in models]
        model = DeepmdSpinModel(models, atoms.positions, cell, self.symbols, self.encoding,
                                self.levels.magnetic_indices, fast_checked=checked, optimize_jit=self.optimize_jit,
                                candidate_neighbours=self.candidate_neighbours)
        model.expect(np.array([[v.min() for v in self.levels.values], [v.max() for v in self.levels.values]]))
        return model

    def energy_model(self, atoms, models: Sequence[Any] | None = None):
        """The energy of moment configurations at this geometry as the calculator sees it: `spin_model`,
        symmetrized when the calculator is."""
        model = self.spin_model(atoms, models)
        return SymmetrizedModel(model) if self.symmetrize else model

    def keep_fast_verdicts(self, model) -> None:
        """Trust the fixed-geometry path checks that `model` (a spin_model or energy_model) made on its first
        evaluation at the geometries that follow."""
        inner = getattr(model, "inner", model)
        for dp, ok in zip(inner.models, inner.fast_ok):
            if ok is not None:
                self._fast_verdicts[id(dp)] = ok

    def new_certificate(self) -> GroundStateCertificate:
        """A ground-state certificate of this structure's moments (certify's settings, else the defaults)."""
        return GroundStateCertificate(self.levels, self.certify or DEFAULT_CERTIFICATE, self._gauge)

    def optimize(self, atoms, models: Sequence[Any] | None = None, seed: int | None = None,
                 adopt: bool = True, known: tuple | list | None = None, prior: SearchResult | None = None,
                 start: np.ndarray | None = None) -> SearchResult:
        """Search the ground state at this geometry from `start` (default: the current moments); adopt it by default.

        known: evaluations already made at this geometry (see ``search_ground_state``); prior: the
        search of a nearby geometry to warm-start from (default: the last adopted one when adopting).
        """
        began = time.perf_counter()
        if prior is None and adopt:
            prior = self.last_search
        model = self.spin_model(atoms, models)
        searched = SymmetrizedModel(model) if self.symmetrize else model
        start = self.moments if start is None else start
        result = search_ground_state(searched, self.levels, start=start, prior=prior, known=known,
                                     seed=self.seed + self.n_searches if seed is None else seed,
                                     **self.search_kwargs)
        self.keep_fast_verdicts(model)
        if adopt:
            self._steps_since_search = 0
            self.timings["search"] += time.perf_counter() - began
            self.n_search_evaluations += result.n_evaluations
            self.n_searches += 1
            best = np.asarray(result.best_moments, dtype=float)
            if self.moments is not None and not np.allclose(best, self.moments, atol=1e-9):
                self.n_spin_changes += 1
            self.moments = best
            self.last_search = result
        return result

    def full_moments(self, moments: np.ndarray | None = None) -> np.ndarray:
        """Moments of every atom (natoms,), 0 on non-magnetic atoms."""
        full = np.zeros(len(self.symbols))
        full[self.levels.magnetic_indices] = self.moments if moments is None else moments
        return full

    def excited_magmoms(self) -> np.ndarray:
        """The last search's other low states as columns (natoms, k); k may be 0."""
        if self.last_search is None:
            return np.zeros((len(self.symbols), 0))
        states = [self.full_moments(np.asarray(m, dtype=float)) for m, _ in self.last_search.lowest[1:]]
        return np.array(states).T.reshape(len(self.symbols), len(states))

    def sector_magmoms(self, atoms, max_sectors: int) -> np.ndarray:
        """The driving model's lowest state of each total-moment sector (``sector_ground_states``) around the
        atoms' initial moments (snapped to the levels), as columns (natoms, k); k is 0 where those moments
        are all 0. Sets the calculator to the atoms' structure and moments; evaluates no forces."""
        self._set_structure(atoms)
        if self.moments is None:
            return np.zeros((len(atoms), 0))
        model = self.energy_model(atoms)
        states = sector_ground_states(model, self.levels, self.moments, max_sectors=max_sectors, seed=self.seed,
                                      **self.search_kwargs)
        self.keep_fast_verdicts(model)
        columns = [self.full_moments(m) for m, _ in states]
        return np.array(columns).T.reshape(len(self.symbols), len(columns))

    def _jit(self):
        import torch

        return torch.jit.optimized_execution(self.optimize_jit)

    def predict(self, atoms, models: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Energies (M,), forces (M, natoms, 3), virials (M, 9) and -dE/dS (M, n_magnetic) of
        `models` at the current moments (-dE/dS: the z component of force_mag, as in the search);
        symmetrized: the means over S and -S (one batched call of two frames per model)."""
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError("partly periodic structures are not supported: deepmd-kit needs pbc on all axes or none")
        from spingen.deepmd_model import evaluate_frames

        signs = np.array((1.0, -1.0) if self.symmetrize else (1.0,))
        nf = len(signs)
        cell = np.tile(atoms.cell.array.reshape(1, 9), (nf, 1)) if atoms.pbc.any() else None
        states = signs[:, None] * self.full_moments()[None, :]
        coords = np.tile(atoms.positions.reshape(1, -1), (nf, 1))
        energies, forces, virials, minus_grads = [], [], [], []
        with self._jit():
            for dp in models:
                e, f, v, minus_grad = evaluate_frames(dp, coords, cell, self.atom_types, states, self.encoding,
                                                      self.symbols)
                energies.append(float(np.mean(e)))
                forces.append(f.mean(axis=0))
                virials.append(v.mean(axis=0))
                # d/dS of E(-S) is -E'(-S)
                minus_grads.append(np.mean(signs[:, None] * minus_grad[:, self.levels.magnetic_indices], axis=0))
        return np.array(energies), np.array(forces), np.array(virials), np.array(minus_grads)

    def _evaluate(self, atoms) -> None:
        start = time.perf_counter()
        e, f, v, minus_grad = self.predict(atoms, self.drive_models)
        self.timings["evaluate"] += time.perf_counter() - start
        self.member_predictions = self.member_minus_spin_grad = None  # filled by ensemble_predictions at these moments
        self._drive_prediction = (e, f, v, minus_grad)  # the driving models' own, at these moments
        self.minus_spin_grad = minus_grad.mean(axis=0)
        self.n_evaluations += 1
        energy, forces, virial = e.mean(), f.mean(axis=0), v.mean(axis=0).reshape(3, 3)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces,
                        "magmoms": self.full_moments(), "magmom": float(self.full_moments().sum())}
        if atoms.pbc.all():
            stress = -0.5 * (virial + virial.T) / atoms.get_volume()
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]
        if not (np.isfinite(energy) and np.all(np.isfinite(forces)) and np.all(np.isfinite(virial))):
            raise NonFiniteError(f"the driving model returned non-finite energy/forces/virial at evaluation "
                                 f"{self.n_evaluations} (moments {self.moments.tolist()})")

    def ensemble_predictions(self, atoms=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every model's energy (M,), forces (M, natoms, 3), virial (M, 9) at the current moments.

        Reuses the driving evaluation: every model's when every model drives (drive="mean"), else the driving
        model's, the others evaluated here.
        """
        atoms = self.atoms if atoms is None else atoms
        self.get_property("energy", atoms)
        if self.member_predictions is not None:
            return self.member_predictions
        start = time.perf_counter()
        if len(self.drive_models) == len(self.models):
            e, f, v, minus_grad = self._drive_prediction
        else:
            others = [dp for k, dp in enumerate(self.models) if k != self.drive]
            e, f, v, minus_grad = (np.insert(mine, self.drive, theirs[0], axis=0)
                                   for mine, theirs in zip(self.predict(atoms, others), self._drive_prediction))
        self.timings["members"] += time.perf_counter() - start
        self.member_predictions, self.member_minus_spin_grad = (e, f, v), minus_grad
        return self.member_predictions


def _lowest_below(energies: np.ndarray, energy: float) -> int | None:
    """The index of the lowest finite energy below `energy` by more than SAME_ENERGY; None where there is none (a
    competitor whose energy is not finite is never moved to, nor hides a lower one)."""
    finite = np.where(np.isfinite(energies), energies, np.inf)
    if not len(finite) or not finite.min() < energy - SAME_ENERGY:
        return None
    return int(np.argmin(finite))


# ---------------------------------------------------------------- MD runner
def _langevin(atoms, dt, s):
    from ase.md.langevin import Langevin

    # fixcm=False: ASE >= 3.28 warns that fixcm=True biases the NVT sampling; a drift of the centre
    # of mass changes nothing for a periodic solid
    return Langevin(atoms, dt, temperature_K=s["temperature"], friction=1.0 / s["taut"], fixcm=False, rng=s["rng"])


def _nvt_berendsen(atoms, dt, s):
    from ase.md.nvtberendsen import NVTBerendsen

    return NVTBerendsen(atoms, dt, temperature_K=s["temperature"], taut=s["taut"])


def _nvt_nose_hoover(atoms, dt, s):
    try:
        from ase.md.nose_hoover_chain import NoseHooverChainNVT
    except ImportError:  # older ASE: the stochastic velocity rescaling of Bussi et al.
        from ase.md.bussi import Bussi

        return Bussi(atoms, dt, temperature_K=s["temperature"], taut=s["taut"], rng=s["rng"])
    return NoseHooverChainNVT(atoms, dt, temperature_K=s["temperature"], tdamp=s["taut"])


def _npt(atoms, dt, s):
    try:
        from ase.md.nose_hoover_chain import MTKNPT
    except ImportError:  # older ASE: Melchionna NPT (needs an upper-triangular cell)
        from ase.md.npt import NPT

        bulk_modulus = 1.0 / (s["compressibility"] / units.bar)
        return NPT(atoms, dt, temperature_K=s["temperature"], externalstress=s["pressure"] * units.bar,
                   ttime=s["taut"], pfactor=s["taup"] ** 2 * bulk_modulus)
    return MTKNPT(atoms, dt, temperature_K=s["temperature"], pressure_au=s["pressure"] * units.bar,
                  tdamp=s["taut"], pdamp=s["taup"])


def _npt_berendsen(atoms, dt, s):
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(atoms, dt, temperature_K=s["temperature"], pressure_au=s["pressure"] * units.bar,
                        taut=s["taut"], taup=s["taup"], compressibility_au=s["compressibility"] / units.bar)


#: ensemble name (spingen.schema.MD_ENSEMBLES) -> integrator factory
INTEGRATORS: dict[str, Callable] = {
    "nvt": _langevin,
    "nvt-langevin": _langevin,
    "nvt-berendsen": _nvt_berendsen,
    "nvt-nose-hoover": _nvt_nose_hoover,
    "npt": _npt,
    "npt-berendsen": _npt_berendsen,
}


def run_md(atoms, calc: Calculator | None, ensemble: str, temperature: float, pressure: float | None = None,
           nsteps: int = 100, dt_fs: float = 2.0, trj_freq: int = 10,
           observers: Sequence[Callable[[int, Any], None]] = (), *, seed: int = 0, taut_fs: float = 100.0,
           taup_fs: float = 500.0, compressibility: float = 1e-6, init_velocities: bool = True):
    """Run `nsteps` MD steps of `ensemble` and call every observer as fn(step, atoms) at steps 0,
    trj_freq, 2*trj_freq, ... (trj_freq 0: no observer calls). Returns the ASE dynamics object.

    temperature K; pressure bar (NPT only; DP-GEN's unit); dt_fs, taut_fs, taup_fs fs;
    compressibility 1/bar (npt-berendsen; ASE NPT without MTKNPT). Velocities are drawn from a
    Maxwell-Boltzmann distribution at `temperature` (seeded) unless init_velocities is False.
    With a SpinModelCalculator the moments are re-optimized at every frame step as well as on
    its own schedule, so observers see optimized moments. NonFiniteError from the calculator
    propagates with `.step` set to the MD step whose evaluation failed.
    """
    from ase.md import velocitydistribution as velocities

    if ensemble not in INTEGRATORS:
        raise ValueError(f"unknown ensemble '{ensemble}': expected one of {sorted(INTEGRATORS)}")
    if ensemble.startswith("npt") and pressure is None:
        raise ValueError(f"ensemble '{ensemble}' needs a pressure (bar)")
    if calc is not None:
        atoms.calc = calc
    rng = np.random.default_rng(seed)
    if init_velocities:
        if hasattr(velocities, "thermalize_momenta"):  # ASE >= 3.29
            velocities.thermalize_momenta(atoms, temperature, rng=rng)
        else:
            velocities.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        velocities.Stationary(atoms)
    settings = {"temperature": float(temperature), "pressure": float(pressure or 0.0), "rng": rng,
                "taut": taut_fs * units.fs, "taup": taup_fs * units.fs, "compressibility": float(compressibility)}
    dyn = INTEGRATORS[ensemble](atoms, dt_fs * units.fs, settings)
    spin_calc = atoms.calc if hasattr(atoms.calc, "begin_step") else None
    done = {"step": -1}

    def prepare_next() -> None:
        done["step"] = dyn.nsteps
        if spin_calc is not None:
            following = dyn.nsteps + 1
            spin_calc.begin_step(following, force_search=bool(trj_freq) and following % trj_freq == 0)

    for fn in observers:
        if trj_freq:
            dyn.attach(lambda fn=fn: fn(dyn.nsteps, atoms), interval=trj_freq)
    dyn.attach(prepare_next, interval=1)  # after the frame observers: prepares the next step
    if spin_calc is not None:
        spin_calc.begin_step(0, force_search=True)
    try:
        dyn.run(nsteps)
    except NonFiniteError as err:
        err.step = done["step"] + 1
        raise
    return dyn

