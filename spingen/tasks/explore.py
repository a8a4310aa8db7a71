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
  members (each member goes downhill from its own state of the frame before, or a lower one of its last
  states and driving moments, certified, and from the frame's moments where those lie below that end, and
  keeps the lower end; see `MemberStates`);
  `spin_devi_e` (eV/atom) =
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

import copy
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from spingen.layout import DEVI_FILE
from spingen.spin.certificate import SAME_ENERGY, state_key
from spingen.tasks.lock import exclusive_task

TASK_FILE = "task.json"
CONF_FILE = "conf.extxyz"
TRAJ_FILE = "traj.extxyz"
FINISHED_TAG = "finished"
SECTORS_FILE, SECTORS_GLOB = "sectors.{step:06d}.{sectors}.npy", "sectors.*.npy"  # sector_states of one frame
DEVI_COLUMNS = ("step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f",
                "devi_e", "spin_disagree", "spin_devi_e")
SPIN_NOT_COMPUTED = -1.0
VISITED_STATES = 8  # a member's last distinct states (its own and the driving moments) checked again at every frame


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


class MemberStates:
    """Each member's own ground state at the frames of one explore task (the spin disagreement's states).

    A member descends from its own state of the frame before, certified as the driving calculator
    certifies its moments (``spingen.spin.certificate``, with the calculator's certify settings): from
    -dE/dS at the start only the competitors that may lie lower are evaluated, in energy-only batches,
    none when the start is certified. A member for which one is lower moves to it and goes on downhill,
    its new competitors taking the gaps the old ones carry over (``GroundStateCertificate.move_to``).
    Its state can sit in a local minimum of its landscape, several ions away from a lower one that
    single- and two-ion moves do not reach, so two more starts: its last VISITED_STATES distinct states
    (those it ended at and the driving moments of the frames before) are evaluated at every frame (one
    batch), and the descent starts from the lowest of them where it lies below both its own state and
    the driving moments; and it descends from the driving moments too, checking every competitor there,
    where those lie below the end of that descent or that end is not finite (the only descent at its
    first frame, or where its state is the driving one).
    A state its certificate held before is resumed from the references it left there
    (``GroundStateCertificate.resume``), not checked against every competitor again.
    The lower end is its state (the first on a tie), and its certificate keeps the errors both descents
    measured. Each member's energy at the driving moments is the one the frame's deviation computed. Not the
    driving model where the calculator re-optimized its moments at this geometry: they are its own.
    """

    def __init__(self, calc) -> None:
        self.calc = calc
        self.levels = None  # the structure the states speak of
        self.models: list = []  # each member's energy model at the geometry of the last `states`
        self.seen: list[dict[bytes, float]] = []
        self.held: dict[int, np.ndarray] = {}  # member -> its ground state at the last frame
        self.certificates: dict[int, Any] = {}  # member -> GroundStateCertificate of its held state
        self.visited: dict[int, list[np.ndarray]] = {}  # member -> its states and the driving moments, latest last

    def states(self, atoms, energies: np.ndarray, minus_grads: np.ndarray) -> np.ndarray:
        """(members x magnetic ions) ground states at this geometry; energies (M,) and -dE/dS (M, n_magnetic)
        of every member at the calculator's moments. NaN rows where a member's energies are not finite."""
        calc = self.calc
        if self.levels is not calc.levels:
            self.levels, self.held, self.certificates, self.visited = calc.levels, {}, {}, {}
        self.models = [calc.energy_model(atoms, [dp]) for dp in calc.models]  # this geometry's, for every batch
        drive = np.asarray(calc.moments, dtype=float)
        # per member: configuration -> energy evaluated at this geometry, the driving moments' given
        self.seen = [{state_key(drive): float(energy)} for energy in energies]
        held = calc.drive if calc.drive != "mean" and calc.lowest_here else None
        found = []
        for k in range(len(calc.models)):
            if k == held:  # its own: what it certified of the frames before no longer speaks of them
                self.held[k] = drive
                self.certificates.pop(k, None)
            found.append(self.held[k] if k == held else self._member_state(k, drive, energies[k], minus_grads[k]))
            self._visit(k, [found[-1], drive])
        for model in self.models:
            calc.keep_fast_verdicts(model)
        return np.array(found)

    def energies(self, states: np.ndarray) -> np.ndarray:
        """Every member's energies (M, n) of configurations (n, n_magnetic) at the geometry of the last `states`."""
        return np.array([self._energies(k, states) for k in range(len(self.models))])

    def _energies(self, k: int, configurations: np.ndarray) -> np.ndarray:
        """Member k's energies of configurations at this geometry, none evaluated twice here."""
        seen = self.seen[k]
        keys = [state_key(row) for row in configurations]
        new = [i for i, key in enumerate(keys) if key not in seen]
        if new:
            seen.update(zip([keys[i] for i in new], self.models[k].evaluate(configurations[new])[0]))
        return np.array([seen[key] for key in keys], dtype=float)

    def _member_state(self, k: int, drive: np.ndarray, energy: float, minus_grad: np.ndarray) -> np.ndarray:
        """Member k's state here: the lower end of the descents from its own state (or a lower one it visited)
        and from the driving moments `drive` (energy and -dE/dS there under member k); NaN where neither ends
        finite."""
        calc = self.calc
        own = self.held.pop(k, None)
        cert = self.certificates.pop(k, None) or calc.new_certificate()
        if calc.certify is None:  # no certificate asked for: every competitor of every start, every frame
            cert.release()
        if own is None or self._same_state(own, drive):
            ends = [self._descend(k, cert, drive, energy, minus_grad)]
        else:
            own = self._lowest_visited(k, own, drive, energy)
            own_energy, own_grad = self.models[k].evaluate(own[None], gradient=True)
            ends = [self._descend(k, cert, own, float(own_energy[0]), own_grad[0])]
            if not energy >= ends[0][0] - SAME_ENERGY:  # below its own minimum (or that not finite)
                drive_cert = copy.deepcopy(cert)  # its measured errors, not its state (this geometry counted)
                drive_cert.release()
                ends.append(self._descend(k, drive_cert, drive, energy, minus_grad, counted=True))
        finite = [end for end in ends if np.isfinite(end[0])]
        kept = finite[0] if finite else ends[0]
        if len(finite) == 2 and finite[1][0] < finite[0][0] - SAME_ENERGY:  # the first end on a tie
            kept = finite[1]
        for end in ends:  # the errors measured on the way are kept, whichever end counts
            if end is not kept:
                kept[2].absorb_errors(end[2])
        self.certificates[k] = kept[2]
        if not finite:
            kept[2].release()
            return np.full(len(drive), np.nan)
        self.held[k] = kept[1]
        return kept[1]

    def _lowest_visited(self, k: int, own: np.ndarray, drive: np.ndarray, drive_energy: float) -> np.ndarray:
        """own, or the lowest here of the other states member k visited where it lies below both own and the
        driving moments (at drive_energy) under member k."""
        others = [state for state in self.visited.get(k, [])
                  if not (self._same_state(state, own) or self._same_state(state, drive))]
        if not others:
            return own
        energies = self._energies(k, np.array([own, *others]))
        energies = np.where(np.isfinite(energies), energies, np.inf)
        best = int(np.argmin(energies))
        return others[best - 1] if energies[best] < min(energies[0], drive_energy) - SAME_ENERGY else own

    def _visit(self, k: int, states: Sequence[np.ndarray]) -> None:
        """Keep finite states among member k's last VISITED_STATES (latest last, one of each S and -S)."""
        visited = self.visited.setdefault(k, [])
        for state in states:
            if np.all(np.isfinite(state)):
                visited[:] = [v for v in visited if not self._same_state(v, state)] + [np.array(state, dtype=float)]
        del visited[:-VISITED_STATES]

    def _same_state(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether moments a and b are one state (S and -S are under a fixed global sign)."""
        return np.array_equal(a, b) or (self.calc.levels.fix_global_sign and np.array_equal(a, -b))

    def _descend(self, k: int, cert, start: np.ndarray, energy: float, minus_grad: np.ndarray,
                 counted: bool = False) -> tuple:
        """(energy, state, cert) at the end of member k's certified descent from start (energy, -dE/dS
        there); NaN energy where a member's energies are not finite. counted: cert has seen this geometry."""
        calc, levels, model = self.calc, self.calc.levels, self.models[k]
        held = cert.holds_for(start)
        pool = None if held else calc.competitors(start)
        resumable = not counted and calc.certify is not None  # without a certificate: every competitor, every frame
        if held or (resumable and cert.resume(start, pool)):
            # the exchanges' gaps follow their anchors' (spingen.spin.certificate); a state it visited before
            # is resumed from the references it left there
            indices = cert.to_check(minus_grad, partial(calc.anchor_gaps, model, start))
        else:
            if not counted:
                cert.tick()
            indices = None
        for _ in range(levels.n_magnetic * max(levels.n_values)):  # more moves than a descent makes
            if indices is None:  # (only at the start: a move names what to check)
                pool_energies = self._energies(k, pool)
            else:
                pool, pool_energies = cert.check(indices, energy, minus_grad, lambda states: self._energies(k, states))
            if not (np.isfinite(energy) and np.all(np.isfinite(pool_energies))):
                return float("nan"), start, cert
            if indices is None:
                cert.set_reference(start, energy, minus_grad, pool, pool_energies, partial(calc.anchor_gaps, model, start))
            if not (len(pool) and pool_energies.min() < energy - SAME_ENERGY):
                return energy, start, cert
            moved_from = minus_grad  # downhill: the lower state's competitors take the gaps carried over
            start = levels.to_moments(levels.first_up(levels.to_indices(pool[np.argmin(pool_energies)], snap=True)))[0]
            energy, minus_grad = (v[0] for v in model.evaluate(start[None], gradient=True))
            pool = calc.competitors(start)
            indices = cert.move_to(start, pool, moved_from, minus_grad, calc.reversal_symmetric,
                                   partial(calc.anchor_gaps, model, start))
        cert.release()  # still moving: the next frame evaluates every competitor
        return float(energy), start, cert


def spin_disagreement(calc, atoms, members: MemberStates | None = None) -> tuple[float, float, np.ndarray | None]:
    """Fraction of magnetic ions whose moment differs between the members' own ground states, the
    members' energy deviation on those states (eV/atom, see `spin_devi_e`), and the states
    (members x magnetic ions; None when not computed). members: the states of the frames before (a
    task's `MemberStates`), default none: every member checks every competitor of the driving moments.
    NaN when a member's energies are not finite.
    """
    if len(calc.models) < 2:
        return 0.0, 0.0, None
    energies = calc.ensemble_predictions(atoms)[0]
    minus_grads = calc.member_minus_spin_grad
    if not np.all(np.isfinite(energies)):
        return float("nan"), float("nan"), None
    members = members or MemberStates(calc)
    states = members.states(atoms, energies, minus_grads)
    if not np.all(np.isfinite(states)):
        return float("nan"), float("nan"), None
    levels = calc.levels  # S and -S are one state under a fixed global sign: compared first-up
    compared = levels.to_moments(levels.first_up(levels.to_indices(states, snap=True))) if levels.fix_global_sign \
        else states
    differs = np.any(np.abs(compared - compared[0]) > 1e-6, axis=0)
    if not differs.any():
        return 0.0, 0.0, states
    above = (members.energies(np.unique(states, axis=0)) - energies[:, None]) / len(atoms)
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
        self.members = MemberStates(calc)
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
            disagreement, energy_devi, member_states = spin_disagreement(self.calc, atoms, self.members)
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


def task_calculator(task_dir: Path, settings: ExploreTaskSettings, models: Sequence[Any] | None = None):
    """The task's spin-minimized calculator (``SpinModelCalculator``) with task.json's models and settings;
    `models` (loaded DeepPot objects) replaces the paths."""
    from spingen.md import SpinModelCalculator

    return SpinModelCalculator(list(models) if models is not None else [task_dir / m for m in settings.models],
                               settings.magnitudes, encoding=settings.encoding, drive=settings.drive,
                               spin_opt_freq=settings.spin_opt_freq, search=settings.spin_search,
                               certify=settings.certify, seed=settings.seed, symmetrize=settings.symmetrize)


def sector_states(task_dir: Path, frames: Sequence[Any], max_sectors: int,
                  models: Sequence[Any] | None = None) -> list[np.ndarray]:
    """For each frame of the task (a candidate: info `step`, its moments in initial_magmoms) the lowest state of
    each of up to max_sectors total-moment sectors around those moments under the task's driving model(s),
    columns (natoms, k) (``SpinModelCalculator.sector_magmoms``). Each frame's result is kept in the task
    directory (`sectors.STEP.K.npy`), so that a post killed and rerun searches only what it had not."""
    calc = None
    states = []
    for frame in frames:
        cache = task_dir / SECTORS_FILE.format(step=int(frame.info["step"]), sectors=max_sectors)
        if cache.is_file():
            states.append(np.load(cache))
            continue
        if calc is None:
            calc = task_calculator(task_dir, ExploreTaskSettings.load(task_dir / TASK_FILE), models)
        columns = calc.sector_magmoms(frame, max_sectors)
        partial = cache.with_suffix(".part.npy")
        np.save(partial, columns)
        partial.replace(cache)
        states.append(columns)
    return states


def _run_locked(task_dir: Path, models: Sequence[Any] | None) -> int:
    import ase.io

    from spingen.md import NonFiniteError, run_md

    settings = ExploreTaskSettings.load(task_dir / TASK_FILE)
    for name in (TRAJ_FILE, DEVI_FILE, FINISHED_TAG):
        (task_dir / name).unlink(missing_ok=True)
    for stale in task_dir.glob(SECTORS_GLOB):  # sector states of an earlier trajectory
        stale.unlink()
    atoms = ase.io.read(task_dir / CONF_FILE, format="extxyz")
    begin = time.perf_counter()
    calc = task_calculator(task_dir, settings, models)
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
