"""`spingen explore-task TASK_DIR`: one exploration task of the explore stage (01.model_devi).

This is what dpdispatcher runs on the compute node. The task directory holds `task.json`
(``ExploreTaskSettings``, written by the stage's make) and `conf.extxyz` (the start structure);
the models are the relative paths in task.json (`../graph.00K.pth`, forwarded as common files).
It runs spin-minimized MD (``spingen.md``) with the driving model(s) and writes, every trj_freq
steps, streamed and flushed:

* `traj.extxyz`: the frame (cell, positions, `initial_magmoms` = the optimized moments, 0 on
  non-magnetic atoms; `excited_magmoms` (natoms, k) = the other low states of that frame's search;
  `member_magmoms` (natoms, members) = each member's own ground state, where the spin disagreement
  was computed;
  info `step`, `model_energy` (eV, the driving model(s); ASE would turn a key `energy` into a
  calculator result when reading));
* `model_devi.out`: one row per frame, columns ``DEVI_COLUMNS``. The first seven are DP-GEN's and
  are computed as deepmd-kit's ``dp model-devi`` does, over every model of the ensemble at the
  frame's optimized moments: force deviation per atom sqrt(mean_m |f_m - <f>|^2), then max/min/avg
  over atoms; virial (divided by natoms) std over models per component, then max/min over the 9
  components and avg = |std|/3 (deepmd's definition); `devi_e` = std over models of energy per
  atom; `spin_disagree` = fraction of magnetic ions whose ground-state moment differs between
  members (each member evaluates the competitors of the frame's moments and goes downhill from
  them only when one of them is lower for it; see `spin_disagreement`); `spin_devi_e` (eV/atom) =
  how much the members disagree on the energies of those ground states: std over members of
  each state's energy above the frame's state, max over the states (0 when all members agree).
  Both every spin_devi_freq-th frame; ``SPIN_NOT_COMPUTED`` (-1) on the others; NaN when a
  member's energies are not finite.

When the driving model returns NaN/inf, the failing step gets a row of NaN, the MD stops and the
task still finishes (the stage's post counts the row as failed). Finally an empty `finished` file
marks the task complete. A restarted task that had not finished starts from scratch (old outputs
are removed first); one that finished is left as it is (``spingen.tasks.lock``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spingen.layout import DEVI_FILE
from spingen.spin.certificate import SAME_ENERGY
from spingen.tasks.lock import exclusive_task

TASK_FILE = "task.json"
CONF_FILE = "conf.extxyz"
TRAJ_FILE = "traj.extxyz"
FINISHED_TAG = "finished"
DEVI_COLUMNS = ("step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f",
                "devi_e", "spin_disagree", "spin_devi_e")
SPIN_NOT_COMPUTED = -1.0


@dataclass(frozen=True)
class ExploreTaskSettings:
    """Everything one explore task needs (task.json); units: K, bar, ps, uB, A."""

    models: tuple[str, ...]  # paths relative to the task directory
    magnetic: tuple[str, ...]
    virtual_scale: float
    offset: float
    magnitudes: Mapping[str, tuple[float, ...]]
    drive: str | int  # "mean" or the index of the driving model
    ensemble: str
    temperature: float
    pressure: float | None
    nsteps: int
    dt_ps: float
    trj_freq: int
    taut_ps: float
    taup_ps: float
    compressibility: float  # 1/bar
    spin_opt_freq: int
    spin_devi_freq: int
    seed: int
    spin_search: Mapping[str, Any] = field(default_factory=dict)
    certify: Mapping[str, Any] | None = field(default_factory=dict)  # CertificateSettings fields; None: off
    symmetrize: bool = False
    canonical: bool = False  # the models' encoding: canonical sign (spin_encoding.json)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> ExploreTaskSettings:
        data = json.loads(Path(path).read_text())
        names = set(cls.__dataclass_fields__)
        optional = {"spin_search", "certify", "symmetrize", "canonical"}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - optional)
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}")
        data["models"] = tuple(data["models"])
        data["magnetic"] = tuple(data["magnetic"])
        data["magnitudes"] = {el: tuple(v) for el, v in data["magnitudes"].items()}
        return cls(**data)

    @property
    def encoding(self):
        from spingen.spin.encoding import SpinEncoding

        return SpinEncoding(self.magnetic, self.virtual_scale, self.offset, canonical=self.canonical)


def model_deviation(energies: np.ndarray, forces: np.ndarray, virials: np.ndarray) -> np.ndarray:
    """DP-GEN's six deviations and devi_e of one frame, as deepmd-kit's model_devi computes them.

    energies (M,), forces (M, natoms, 3), virials (M, 9) of the M models; returns
    [max_devi_v, min_devi_v, avg_devi_v, max_devi_f, min_devi_f, avg_devi_f, devi_e].
    """
    forces = np.asarray(forces, dtype=float)
    natoms = forces.shape[1]
    f_devi = np.linalg.norm(np.std(forces, axis=0), axis=-1)
    v_devi = np.std(np.asarray(virials, dtype=float).reshape(len(forces), 9) / natoms, axis=0)
    e_devi = np.std(np.asarray(energies, dtype=float).reshape(-1) / natoms)
    return np.array([v_devi.max(), v_devi.min(), np.linalg.norm(v_devi) / 3,
                     f_devi.max(), f_devi.min(), f_devi.mean(), e_devi])


def spin_disagreement(calc, atoms) -> tuple[float, float, np.ndarray | None]:
    """Fraction of magnetic ions whose moment differs between the members' own ground states, the
    members' energy deviation on those states (eV/atom, see `spin_devi_e`), and the states
    (members x magnetic ions; None when not computed).

    Members start from the driving model's state: each evaluates the competitors of the calculator's
    moments (single- and two-ion moves, the driving search's lowest states) in one energy-only batch
    (not the driving model when the calculator re-optimized the moments at this geometry: they are its own);
    a member for which none is lower agrees; one for which one is lower goes on downhill from it over
    the competitors (`SpinModelCalculator.descend`), a few batches, not a search of the whole space.
    NaN when a member's energies are not finite.
    """
    if len(calc.models) < 2:
        return 0.0, 0.0, None
    energies = calc.ensemble_predictions(atoms)[0]
    # the driving model's own lowest state is the calculator's when it re-optimized them at this geometry
    held = calc.drive if calc.drive != "mean" and calc.lowest_here else None
    checked = [k for k in range(len(calc.models)) if k != held]
    pool = calc.competitors(calc.moments, calc.pair_limit)
    pool_energies = np.full((len(calc.models), len(pool)), np.inf)
    if len(pool):
        pool_energies[checked] = calc.state_energies(atoms, pool, [calc.models[k] for k in checked])
    if not (np.all(np.isfinite(energies)) and np.all(np.isfinite(pool_energies[checked]))):
        return float("nan"), float("nan"), None
    states = []
    for k, dp in enumerate(calc.models):
        if not len(pool) or pool_energies[k].min() >= energies[k] - SAME_ENERGY:
            states.append(np.asarray(calc.moments, dtype=float))
            continue
        lowest = int(np.argmin(pool_energies[k]))
        known = dict(zip(calc.state_keys(np.concatenate([calc.moments[None], pool])),
                         np.concatenate([energies[k:k + 1], pool_energies[k]])))
        state, energy = calc.descend(atoms, [dp], pool[lowest], pool_energies[k][lowest], known)
        if not np.isfinite(energy):
            return float("nan"), float("nan"), None
        states.append(state)
    states = np.array(states)
    differs = np.any(np.abs(states - states[0]) > 1e-6, axis=0)
    if not differs.any():
        return 0.0, 0.0, states
    above = (calc.state_energies(atoms, np.unique(states, axis=0)) - energies[:, None]) / len(atoms)
    return float(np.mean(differs)), float(np.max(np.std(above, axis=0))), states


def header() -> str:
    return "#" + f"{DEVI_COLUMNS[0]:>11s}" + "".join(f" {c:>19s}" for c in DEVI_COLUMNS[1:]) + "\n"


def format_row(step: int, values: Sequence[float]) -> str:
    return f"{step:12d}" + "".join(f" {float(v):19.6e}" for v in values) + "\n"


class FrameWriter:
    """The MD observer of an explore task: one trajectory frame and one model_devi row per call."""

    def __init__(self, task_dir: Path, calc, spin_devi_freq: int):
        self.traj, self.devi = task_dir / TRAJ_FILE, task_dir / DEVI_FILE
        self.calc, self.spin_devi_freq = calc, spin_devi_freq
        self.frames = 0
        self.timings = {"deviation": 0.0, "spin_disagree": 0.0, "write": 0.0}
        self.devi.write_text(header())

    def __call__(self, step: int, atoms) -> None:
        start = time.perf_counter()
        energies, forces, virials = self.calc.ensemble_predictions(atoms)
        values = list(model_deviation(energies, forces, virials))
        self.timings["deviation"] += time.perf_counter() - start
        start = time.perf_counter()
        member_states = None
        if self.spin_devi_freq > 0 and self.frames % self.spin_devi_freq == 0:
            disagreement, energy_devi, member_states = spin_disagreement(self.calc, atoms)
            values += [disagreement, energy_devi]
        else:
            values += [SPIN_NOT_COMPUTED, SPIN_NOT_COMPUTED]
        self.timings["spin_disagree"] += time.perf_counter() - start
        start = time.perf_counter()
        self._write_frame(step, atoms, member_states)
        self._append(format_row(step, values))
        self.frames += 1
        self.timings["write"] += time.perf_counter() - start

    def write_failure(self, step: int) -> None:
        """The row of a step whose driving evaluation was not finite: every value NaN."""
        self._append(format_row(step, [float("nan")] * (len(DEVI_COLUMNS) - 1)))

    def _write_frame(self, step: int, atoms, member_states: np.ndarray | None) -> None:
        import ase.io
        from ase import Atoms

        frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        frame.set_initial_magnetic_moments(self.calc.full_moments())
        excited = self.calc.excited_magmoms()
        if excited.shape[1]:
            frame.arrays["excited_magmoms"] = excited
        if member_states is not None:  # each member's own ground state, a column per member
            frame.arrays["member_magmoms"] = np.array([self.calc.full_moments(m) for m in member_states]).T
        frame.info["step"] = int(step)
        frame.info["model_energy"] = float(self.calc.results["energy"])  # "energy" would become a calc on read
        with open(self.traj, "a") as handle:
            ase.io.write(handle, frame, format="extxyz")
            handle.flush()

    def _append(self, line: str) -> None:
        with open(self.devi, "a") as handle:
            handle.write(line)
            handle.flush()


def run(task_dir: str | Path, models: Sequence[Any] | None = None) -> int:
    """Run the task in task_dir unless a copy of it already finished there; `models` (loaded DeepPot
    objects) replaces task.json's paths (tests)."""
    task_dir = Path(task_dir).resolve()
    with exclusive_task(task_dir):
        if (task_dir / FINISHED_TAG).exists():
            print(f"explore-task {task_dir.name}: finished by an earlier copy of this job; outputs kept")
            return 0
        return _run_locked(task_dir, models)


def _run_locked(task_dir: Path, models: Sequence[Any] | None) -> int:
    import ase.io

    from spingen.md import NonFiniteError, SpinModelCalculator, run_md

    settings = ExploreTaskSettings.load(task_dir / TASK_FILE)
    for name in (TRAJ_FILE, DEVI_FILE, FINISHED_TAG):
        (task_dir / name).unlink(missing_ok=True)
    atoms = ase.io.read(task_dir / CONF_FILE, format="extxyz")
    begin = time.perf_counter()
    calc = SpinModelCalculator(list(models) if models is not None else [task_dir / m for m in settings.models],
                               settings.magnitudes, encoding=settings.encoding, drive=settings.drive,
                               spin_opt_freq=settings.spin_opt_freq, search=settings.spin_search,
                               certify=settings.certify, seed=settings.seed, symmetrize=settings.symmetrize)
    writer = FrameWriter(task_dir, calc, settings.spin_devi_freq)
    status = "finished"
    try:
        run_md(atoms, calc, settings.ensemble, settings.temperature, settings.pressure, settings.nsteps,
               settings.dt_ps * 1000.0, settings.trj_freq, [writer], seed=settings.seed,
               taut_fs=settings.taut_ps * 1000.0, taup_fs=settings.taup_ps * 1000.0,
               compressibility=settings.compressibility)
    except NonFiniteError as err:
        writer.write_failure(err.step)
        status = f"stopped at step {err.step}: {err}"
        print(f"explore-task: {status}", file=sys.stderr)
    wall = time.perf_counter() - begin
    print(f"explore-task {task_dir.name}: {status}; {writer.frames} frame(s), {calc.n_evaluations} evaluations, "
          f"{calc.n_searches} searches ({calc.n_search_evaluations} configurations evaluated), moments changed "
          f"{calc.n_spin_changes} time(s); wall {wall:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in {**calc.timings, **writer.timings}.items()))
    (task_dir / FINISHED_TAG).write_text("")
    return 0
