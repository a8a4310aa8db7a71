"""Label stage (02.fp): DFT+U single points of the explore stage's candidates, collected with moments.

make: reads `01.model_devi/candidates.SSS.extxyz` of this iteration (`00.perturb/` for the initial
data of spingen.stages.init), at most fp_task_max per system and none below fp_task_min, sorts
each frame's atoms by type_map (every element one run, the POSCAR species order), applies
fp_spin_init and writes one `task.SSS.CCCCCC` per DFT run through the labeler,
plus `frame.extxyz` (the geometry, its provenance and the start moments) for collection.
run: dispatches only the tasks the labeler does not see finished (its result file exists), so
finished tasks are never recomputed, whatever changed in machine.json.
post: reads every task; converged frames whose moments are within fp_moment_tolerance of the
allowed levels are appended (atomically, without duplicates) to `02.fp/data.SSS` with their raw
DFT moments; `02.fp/labels.json` lists every task's outcome (and why earlier runs of a retried one
stopped). More failures than ratio_failed
stop the run with one message naming each failed task and its reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spingen.dispatch import TaskSpec, run_tasks
from spingen.labelers import LabelResult, create_labeler
from spingen.layout import (
    CANDIDATES_GLOB,
    EXPLORE_DIR,
    FP_DIR,
    LABELS_FILE,
    MODEL_ERRORS_FILE,
    MODEL_LINK_GLOB,
    TRAIN_DIR,
    labeled_systems,
)
from spingen.loop import Stage, StageContext
from spingen.schema import LabelSettings, MachineSection, Param, label_settings

log = logging.getLogger("spingen")

FRAME_FILE = "frame.extxyz"
OUTLOG, ERRLOG = "fp.log", "fp.err"  # the task's stdout/stderr, brought back with its results
TASK_GLOB = "task.[0-9][0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]"


@dataclass(frozen=True)
class SpinStart:
    """How one DFT run of a frame starts: moments per atom (or None) and fixed total (or None)."""

    state: int  # 0: the predicted ground state (or the only start); k: the k-th excited state
    moments: np.ndarray | None
    nupdown: float | None


@dataclass(frozen=True)
class TotalMomentRule:
    """The fixed total moment (NUPDOWN) of a state to label: round(sum over magnetic elements e of
    scale_e x the sum of e's moments in the state).

    The moments of a state are PAW-sphere / LORBIT moments, which do not add up to the cell's total
    (oxygen and the interstitial carry the rest: two Ni at +1.67 uB in LiNiO2 make a total of 2, not
    3). `fit` learns scale_e from the labels already made (each frame's DFT total against its
    per-element moment sums); an element no label informs keeps scale 1 (the plain rounded sum).
    """

    scales: Mapping[str, float]

    def total(self, symbols: Sequence[str], moments: np.ndarray) -> float:
        moments = np.asarray(moments, dtype=float)
        symbols = np.asarray(symbols)
        weighted = sum(self.scales.get(e, 1.0) * moments[symbols == e].sum() for e in set(symbols.tolist()))
        return float(np.round(weighted))

    @classmethod
    def fit(cls, entries: Sequence[Mapping], magnetic: Sequence[str]) -> TotalMomentRule:
        """From labels.json entries with `total_moment` and `moment_sums` ({element: sum of moments})."""
        rows = [e for e in entries if e.get("ok") and e.get("total_moment") is not None and e.get("moment_sums")]
        if not rows:
            return cls({})
        sums = np.array([[float(r["moment_sums"].get(e, 0.0)) for e in magnetic] for r in rows])
        totals = np.array([float(r["total_moment"]) for r in rows])
        informed = np.sum(sums ** 2, axis=0) >= 1.0  # frames whose moments do not cancel (not all AFM)
        scales = dict.fromkeys(magnetic, 1.0)
        if informed.any():
            rest = totals - sums[:, ~informed].sum(axis=1)
            fitted = np.linalg.lstsq(sums[:, informed], rest, rcond=None)[0]
            for element, scale in zip(np.asarray(magnetic)[informed], fitted):
                if np.isfinite(scale) and scale > 0:
                    scales[str(element)] = float(scale)
        return cls(scales)

    def describe(self) -> str:
        return ", ".join(f"{e} x {s:.3f}" for e, s in self.scales.items()) or "plain rounded sums"


PLAIN_TOTALS = TotalMomentRule({})  # the rounded sum of the moments
STATE_COLUMNS = {"states": "excited_magmoms", "members": "member_magmoms", "sectors": "sector_magmoms"}
SAME_STATE_ENERGY = 0.1  # meV/atom: a predicted state this close to the lowest label counts as lowest (SCF noise)


def spin_starts(atoms, strategy: str, totals: TotalMomentRule = PLAIN_TOTALS) -> list[SpinStart]:
    """The DFT runs of one candidate under fp_spin_init `strategy`.

    states: the predicted ground state and each distinct excited state of the ensemble's search
    (`excited_magmoms`); sectors: the predicted ground state and the lowest state of each total-moment
    sector the explore stage searched (`sector_magmoms`; a frame without any is labeled as under
    `predicted`, total free); members: the predicted ground state and each member model's own ground
    state (`member_magmoms`, written where the spin disagreement was computed; a frame the members
    agree on is labeled as under `predicted`, total free). Columns with NaN,
    repeats and globally reversed repeats are skipped; each state gets the fixed total
    `totals.total(symbols, moments)`.
    """
    if strategy == "random":
        return [SpinStart(0, None, None)]
    predicted = np.asarray(atoms.arrays.get("initial_magmoms", np.zeros(len(atoms))), dtype=float)
    nupdown = atoms.info.get("nupdown")  # a candidate may pin its total moment (the initial data do)
    as_predicted = [SpinStart(0, predicted, None if nupdown is None else float(nupdown))]
    if strategy == "predicted":
        return as_predicted
    states = [predicted]
    others = atoms.arrays.get(STATE_COLUMNS[strategy])
    if others is not None:
        others = np.asarray(others, dtype=float).reshape(len(atoms), -1)
        for column in others.T:
            if np.all(np.isfinite(column)) and not any(
                    np.allclose(column, s, atol=1e-6) or np.allclose(column, -s, atol=1e-6) for s in states):
                states.append(column)
    if strategy in ("members", "sectors") and len(states) == 1:  # no dispute, no sector: as under `predicted`
        return as_predicted
    symbols = atoms.get_chemical_symbols()
    return [SpinStart(k, m, totals.total(symbols, m)) for k, m in enumerate(states)]


def earlier_label_entries(workdir: Path) -> list[dict]:
    """Every labels.json entry of the run so far (initial data and finished iterations)."""
    entries = []
    for pattern in (f"iter.[0-9]*/{FP_DIR}/{LABELS_FILE}",
                    f"*/iter.[0-9]*/{FP_DIR}/{LABELS_FILE}"):  # init/iter.000000: the initial data
        for path in sorted(Path(workdir).glob(pattern)):
            try:
                entries.extend(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("fp: %s unreadable (%s), not used for the total-moment rule", path, exc)
    return entries


def sort_by_types(atoms, type_map: Sequence[str]):
    """atoms reordered (stably) so that elements come in type_map order; per-atom arrays follow."""
    rank = {s: i for i, s in enumerate(type_map)}
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(rank))
    if unknown:
        raise ValueError(f"elements {unknown} are not in type_map {list(type_map)}")
    order = sorted(range(len(atoms)), key=lambda i: rank[symbols[i]])
    sorted_atoms = atoms[order]
    sorted_atoms.info = dict(atoms.info)
    return sorted_atoms


def moment_violation(symbols: Sequence[str], moments: np.ndarray,
                     levels: Mapping[str, Sequence[float]] | None, tolerance: float) -> str | None:
    """Why moments left the allowed magnitudes (worst atom), or None when all are within tolerance."""
    if not levels:
        return None
    worst = None
    for index, (symbol, moment) in enumerate(zip(symbols, moments)):
        if symbol not in levels:
            continue
        allowed = np.asarray(levels[symbol], dtype=float)
        distance = float(np.min(np.abs(abs(moment) - allowed)))
        if distance > tolerance and (worst is None or distance > worst[0]):
            worst = (distance, index, symbol, moment, allowed)
    if worst is None:
        return None
    distance, index, symbol, moment, allowed = worst
    return (f"moment {moment:+.2f} uB of atom {index} ({symbol}) is {distance:.2f} uB from the allowed "
            f"magnitudes {[float(a) for a in allowed]} (fp_moment_tolerance {tolerance})")


class LabelStage(Stage):
    name = "fp"
    dirname = FP_DIR

    def __init__(self, param: Param | None, machine: MachineSection, settings: LabelSettings | None = None,
                 candidates_dir: str = EXPLORE_DIR):
        self.param = param
        self.machine = machine
        self.candidates_dir = candidates_dir
        self.settings = settings if settings is not None else label_settings(param)
        self.labeler = create_labeler(self.settings)

    # ---- make
    def make(self, ctx: StageContext) -> None:
        import ase.io

        path = self.path(ctx)
        n_frames = n_tasks = 0
        totals = PLAIN_TOTALS
        if self.settings.spin_init in STATE_COLUMNS:
            totals = TotalMomentRule.fit(earlier_label_entries(ctx.workdir), self.settings.magnetic)
            log.info("fp: fixed total moment of each state = round(sum of moments, %s)", totals.describe())
        for file in sorted((ctx.iter_dir / self.candidates_dir).glob(CANDIDATES_GLOB)):
            system = int(file.name.split(".")[1])
            frames = ase.io.read(file, index=":", format="extxyz") if file.stat().st_size else []
            if len(frames) < self.settings.task_min:
                log.info("fp system %03d: %d candidate(s) < fp_task_min %d: none labeled", system, len(frames),
                         self.settings.task_min)
                continue
            if len(frames) > self.settings.task_max:
                log.info("fp system %03d: %d candidates, labeling the first fp_task_max = %d", system,
                         len(frames), self.settings.task_max)
                frames = frames[: self.settings.task_max]
            count = 0
            for index, frame in enumerate(frames):
                atoms = sort_by_types(frame, self.settings.type_map)
                for start in spin_starts(atoms, self.settings.spin_init, totals):
                    task = path / f"task.{system:03d}.{count:06d}"
                    task.mkdir()
                    self.labeler.write_inputs(task, atoms, start.moments, start.nupdown)
                    _write_frame(task / FRAME_FILE, atoms, start, system, file.name, index)
                    count += 1
            log.info("fp system %03d: %d candidate frame(s) -> %d task(s) (fp_spin_init %s)", system,
                     len(frames), count, self.settings.spin_init)
            n_frames += len(frames)
            n_tasks += count
        log.info("fp: %d task(s) for %d candidate frame(s) in %s", n_tasks, n_frames, path)

    def task_dirs(self, ctx: StageContext) -> list[str]:
        return sorted(p.name for p in self.path(ctx).glob(TASK_GLOB) if p.is_dir())

    # ---- run
    def run(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        tasks = self.task_dirs(ctx)
        todo = [t for t in tasks if not self.labeler.is_finished(path / t)]
        log.info("fp: %d task(s) to run, %d already finished", len(todo), len(tasks) - len(todo))
        # dpdispatcher refuses to download a finished job with a missing backward file (a DFT code that
        # exits 0 without writing its output), which would stop the stage; an empty file instead makes
        # the task an unfinished label, excluded and reported by post. A failing command is left to
        # dpdispatcher's retries.
        outputs = " ".join(shlex.quote(name) for name in self.labeler.backward_files())
        spec = TaskSpec(command=f"{{ {self.labeler.command(self.machine.command)}; }} && touch {outputs}",
                        forward_files=[*self.labeler.forward_files(), *self.machine.user_forward_files],
                        backward_files=[*self.labeler.backward_files(), OUTLOG, ERRLOG,
                                        *self.machine.user_backward_files],
                        outlog=OUTLOG, errlog=ERRLOG)
        run_tasks(self.machine, path, todo, spec, ctx.workdir)
        if not self.labeler.retries:
            return
        if "lazy" in str(self.machine.machine.get("context_type", "")).lower():
            # LazyLocalContext runs in the task folders and keeps dpdispatcher's finished tags there: a second
            # submission of the same tasks would be taken as done, so unconverged SCFs are not retried
            log.warning("fp: no SCF retry with LazyLocalContext (dpdispatcher keeps the tasks' finished tags); "
                        "use LocalContext for retries")
            return
        retried = [t for t in tasks if self.labeler.retry(path / t)]
        if retried:
            log.info("fp: %d task(s) whose SCF did not converge run again with more iterations: %s", len(retried),
                     " ".join(retried))
            run_tasks(self.machine, path, retried, spec, ctx.workdir)

    # ---- post
    def post(self, ctx: StageContext) -> None:
        from spingen.data.npy import append_frames, build_system

        path = self.path(ctx)
        tasks = self.task_dirs(ctx)
        converged: dict[int, list[tuple[object, LabelResult]]] = {}
        report, failed = [], []
        for task in tasks:
            atoms, result = self.collect(path / task)
            system = int(task.split(".")[1])
            entry = {"task": task, "system": system, "state": int(atoms.info.get("state", 0)), "ok": result.ok,
                     "reason": result.reason}
            earlier = self.labeler.earlier_attempts(path / task)
            if earlier:
                entry["earlier_attempts"] = earlier
            if result.ok:
                converged.setdefault(system, []).append((atoms, result))
                entry.update(energy=result.energy, moments=np.round(result.moments, 3).tolist(),
                             total_moment=result.total_moment,
                             moment_sums=_moment_sums(atoms.get_chemical_symbols(), result.moments,
                                                      self.settings.magnetic))
            else:
                failed.append((task, result.reason))
                log.warning("fp: %s failed: %s", task, result.reason)
            report.append(entry)
        for system in sorted({int(t.split(".")[1]) for t in tasks}):
            results = converged.get(system, [])
            n_system = sum(1 for t in tasks if int(t.split(".")[1]) == system)
            if results:
                keep_virial = all(r.virial is not None for _, r in results)
                systems = [build_system(a.get_chemical_symbols(), r.cell[None], r.positions[None],
                                        np.array([r.energy]), r.forces[None], r.moments[None],
                                        virials=r.virial[None] if keep_virial else None,
                                        type_map=self.settings.type_map)
                           for a, r in ((a, _with_geometry(a, r)) for a, r in results)]
                merged = systems[0]
                for other in systems[1:]:
                    merged.append(other)
                added = append_frames(path / f"data.{system:03d}", merged)
                stored = f"+{added.added} frame(s) in data.{system:03d}" + (
                    f" ({added.duplicates} already there)" if added.duplicates else "")
            else:
                stored = "nothing stored"
            log.info("fp system %03d: %d converged, %d failed in %d task(s); %s", system, len(results),
                     n_system - len(results), n_system, stored)
        (path / LABELS_FILE).write_text(json.dumps(report, indent=1) + "\n")
        self._write_model_errors(ctx, [pair for results in converged.values() for pair in results])
        total = len(tasks)
        if not total:
            log.info("fp: no candidate to label in iteration %d", ctx.iteration)
            return
        ratio = len(failed) / total
        log.info("fp: failed tasks: %d in %d  %6.2f %%", len(failed), total, 100 * ratio)
        if ratio > self.settings.ratio_failed:
            lines = "\n".join(f"  {task}: {reason}" for task, reason in failed)
            raise RuntimeError(
                f"fp: {len(failed)} of {total} label tasks failed ({100 * ratio:.1f} % > ratio_failed "
                f"{100 * self.settings.ratio_failed:.1f} %); the converged frames are kept in "
                f"{path}/data.*. Failed tasks:\n{lines}")

    def _write_model_errors(self, ctx: StageContext, labeled: list[tuple[object, LabelResult]]) -> None:
        """`model_errors.json`: the iteration's ensemble on the frames it selected, before training on them."""
        path = self.path(ctx)
        models = sorted((ctx.iter_dir / TRAIN_DIR).glob(MODEL_LINK_GLOB))
        systems = labeled_systems(path)
        if not models or not systems:
            return
        from spingen.model_errors import summary

        report = summary(models, systems)
        report["spin_agreement"] = spin_agreement(labeled, self.settings.magnetic, self.settings.moment_tolerance)
        (path / MODEL_ERRORS_FILE).write_text(json.dumps(report) + "\n")
        agreement = report["spin_agreement"]
        log.info("fp: ensemble error on the %d new label(s), before training on them: energy %.2f meV/atom, "
                 "force %.1f meV/A (largest %.0f meV/A); predicted spin states agree with DFT on %s",
                 report["n_frames"], report["rmse_e"], report["rmse_f"], report["max_f_error"],
                 "-" if agreement is None else f"{agreement['agree']} of {agreement['ions']} ions")
        if agreement is not None and agreement["candidates_in_states"]:
            log.info("fp: the predicted spin state is DFT's lowest of the labeled states on %d of %d candidate(s); "
                     "%.1f meV/atom above it on average", agreement["predicted_lowest"],
                     agreement["candidates_in_states"], agreement["predicted_excess_meV_atom"])

    def collect(self, task_dir: Path) -> tuple[object, LabelResult]:
        """The frame of a task and its checked result (a failed result with the reason if excluded)."""
        import ase.io

        atoms = ase.io.read(task_dir / FRAME_FILE, format="extxyz")
        if not self.labeler.is_finished(task_dir):
            return atoms, LabelResult.failed(self.labeler.unfinished_reason(task_dir))
        result = self.labeler.read_result(task_dir)
        if not result.ok:
            return atoms, result
        n = len(atoms)
        if result.forces.shape != (n, 3) or result.moments.shape != (n,):
            return atoms, LabelResult.failed(f"result has {len(result.moments)} atoms, the frame {n}")
        arrays = [result.energy, result.forces, result.moments] + ([] if result.virial is None else [result.virial])
        if not all(np.all(np.isfinite(a)) for a in arrays):
            return atoms, LabelResult.failed("non-finite energy, forces, virial or moments")
        violation = moment_violation(atoms.get_chemical_symbols(), result.moments, self.settings.moment_levels,
                                     self.settings.moment_tolerance)
        if violation:
            return atoms, LabelResult.failed(violation)
        return atoms, result


def spin_agreement(labeled: Sequence[tuple[object, LabelResult]], magnetic: Sequence[str],
                   tolerance: float) -> dict | None:
    """Whether DFT kept the moments each label started from (same sign, magnitude within tolerance).

    ions/agree/fraction: magnetic ions of the predicted ground states (state 0 with start moments);
    states/states_kept: labels of every state whose magnetic ions DFT all kept, the measure of
    predicted states DFT does not hold (a spin search walks into them, DFT relaxes away). A frame
    may agree up to a global reversal of its moments. candidates_in_states/predicted_lowest: candidates
    labeled in their predicted state and at least one other, and those whose predicted state DFT puts
    lowest (within SAME_STATE_ENERGY); predicted_excess_meV_atom: the predicted state's mean DFT energy
    above the lowest labeled one (the ensemble's spin-state errors the labels found). None when no
    labeled frame had start moments.
    """
    ions = agree = states = kept = 0
    energies: dict[tuple, dict[int, float]] = {}  # candidate -> state -> DFT energy per atom
    for atoms, result in labeled:
        candidate = tuple(atoms.info.get(k) for k in ("system", "source", "candidate"))
        energies.setdefault(candidate, {})[int(atoms.info.get("state", 0))] = result.energy / len(atoms)
        predicted = atoms.arrays.get("initial_magmoms")
        if predicted is None:
            continue
        mask = np.isin(atoms.get_chemical_symbols(), list(magnetic))
        best = 0
        for sign in (1.0, -1.0):
            dft = sign * result.moments[mask]
            same = (np.abs(dft - predicted[mask]) <= tolerance) & (np.sign(np.round(dft, 1)) == np.sign(
                np.round(predicted[mask], 1)))
            best = max(best, int(same.sum()))
        states += 1
        kept += int(best == mask.sum())
        if int(atoms.info.get("state", 0)) == 0:
            ions += int(mask.sum())
            agree += best
    if not states:
        return None
    excess = [1000.0 * (e[0] - min(e.values())) for e in energies.values() if 0 in e and len(e) > 1]
    return {"ions": ions, "agree": agree, "fraction": agree / ions if ions else None, "states": states,
            "states_kept": kept, "candidates_in_states": len(excess),
            "predicted_lowest": sum(x <= SAME_STATE_ENERGY for x in excess),
            "predicted_excess_meV_atom": float(np.mean(excess)) if excess else None}


def _with_geometry(atoms, result: LabelResult) -> LabelResult:
    """A result with the geometry set: the code's own if it reported one, else the task's input."""
    if result.cell is not None and result.positions is not None:
        return result
    return dataclasses.replace(result, cell=np.asarray(atoms.cell[:], dtype=float), positions=atoms.get_positions())


def _moment_sums(symbols: Sequence[str], moments: np.ndarray, magnetic: Sequence[str]) -> dict[str, float]:
    """{magnetic element: sum of its atoms' moments} (what TotalMomentRule.fit reads)."""
    symbols = np.asarray(symbols)
    return {e: round(float(np.sum(moments[symbols == e])), 4) for e in magnetic if np.any(symbols == e)}


def _write_frame(path: Path, atoms, start: SpinStart, system: int, source: str, index: int) -> None:
    import ase.io

    frame = atoms.copy()
    for key in ("initial_magmoms", *STATE_COLUMNS.values()):
        frame.arrays.pop(key, None)
    if start.moments is not None:
        frame.arrays["initial_magmoms"] = np.asarray(start.moments, dtype=float)
    frame.info = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, np.integer, np.floating))}
    frame.info.update(system=system, source=source, candidate=index, state=start.state)
    if start.nupdown is not None:
        frame.info["nupdown"] = start.nupdown
    ase.io.write(path, frame, format="extxyz")
