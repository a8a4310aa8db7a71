"""Explore stage (01.model_devi): spin-minimized MD with the ensemble, deviations, candidate selection.

make: one `task.SSS.CCCCCC` per (system SSS of model_devi_jobs[iter].sys_idx, start structure of
sys_configs[SSS] (every frame of every file, read by ase in sys_format), temperature, pressure),
holding `task.json` (``ExploreTaskSettings``) and `conf.extxyz`; the models of 00.train are
linked as `graph.00K.pth` into the stage folder (forwarded once, as common files). Moment
magnitudes come from spin/moments or, when "auto", are clustered from the moments of the data
this iteration trained on (`moments.json`). The stage seed goes to `seed.json`.
run: `<model_devi command> explore-task .` through dpdispatcher for the tasks without their
`finished` tag: a finished task is never run again, whatever changed in machine.json.
post: classifies every row of every model_devi.out (steps < model_devi_skip left out):
failed (max_devi_f >= hi, or NaN/inf anywhere), candidate (lo <= max_devi_f < hi, or a computed
spin disagreement above model_devi_spin_trust whose energy deviation on the disputed states is
above model_devi_spin_e_trust), else accurate. Candidates are sampled with the
recorded seed, at most fp_task_max per system and fp_task_max_total in all, none for a system
with fewer than fp_task_min. Writes `candidates.SSS.extxyz` for the label stage (each frame:
cell/pbc/positions/symbols, arrays `initial_magmoms` (predicted ground state, uB, 0 on
non-magnetic atoms) and, when the search found them, `excited_magmoms` (natoms, k) and
`member_magmoms` (natoms, members: each member's own ground state), with fp_spin_init "sectors"
`sector_magmoms` (natoms, k: the lowest state of each total-moment sector); info `task`,
`step`, `max_devi_f`, plus `max_devi_v`, `devi_e`, `spin_disagree`, `spin_devi_e`), DP-GEN's
`candidate/rest_accurate/rest_failed.shuffled.SSS.out` lists and `selection.json` (counts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from spingen.cells import right_handed
from spingen.dispatch import TaskSpec, run_tasks
from spingen.errors import InputError
from spingen.layout import (
    CANDIDATES_FILE,
    EXPLORE_DIR,
    MODEL_LINK_GLOB,
    MOMENTS_FILE,
    SELECTION_CLASSES,
    SELECTION_FILE,
    TRAIN_DIR,
    training_systems,
)
from spingen.loop import Stage, StageContext
from spingen.schema import MODEL_DEVI_DRIVERS, ExploreSettings, MachineSection, Param, explore_settings
from spingen.tasks.explore import (
    CONF_FILE,
    DEVI_COLUMNS,
    DEVI_FILE,
    FINISHED_TAG,
    TASK_FILE,
    TRAJ_FILE,
    ExploreTaskSettings,
    sector_states,
)

log = logging.getLogger("spingen")

SEED_FILE = "seed.json"
OUTLOG, ERRLOG = "explore.log", "explore.err"
_COL = {name: i for i, name in enumerate(DEVI_COLUMNS)}

T = TypeVar("T")


def stage_seed(base: int, iteration: int) -> int:
    return int(np.random.SeedSequence([base, iteration]).generate_state(1)[0]) & 0x7FFFFFFF


def task_seed(seed: int, system: int, counter: int) -> int:
    return int(np.random.SeedSequence([seed, system, counter]).generate_state(1)[0]) & 0x7FFFFFFF


class ExploreStage(Stage):
    name = "model_devi"
    dirname = EXPLORE_DIR

    def __init__(self, param: Param, machine: MachineSection, settings: ExploreSettings | None = None):
        self.param = param
        self.machine = machine
        self.settings = settings if settings is not None else explore_settings(param)
        if not param.spin.enabled:
            raise InputError(f"{param.path}: key 'spin/enabled' is false: spingen explores with spin models "
                             "only (a pristine Deep Potential loop is DP-GEN's; benchmarks/paper/accuracy.py "
                             "trains the pristine baseline)")

    # ---- make
    def make(self, ctx: StageContext) -> None:
        import ase.io

        path = self.path(ctx)
        job = self.settings.jobs[ctx.iteration]
        models = self._link_models(ctx)
        encoding = self._encoding(ctx, models)
        magnitudes = self._magnitudes(ctx, encoding)
        seed = stage_seed(self.settings.seed, ctx.iteration)
        (path / SEED_FILE).write_text(json.dumps({"seed": seed, "model_devi_seed": self.settings.seed,
                                                  "iteration": ctx.iteration}, indent=1) + "\n")
        n_tasks = 0
        for system in job.sys_idx:
            counter = 0
            for conf in self.param.sys_configs[system]:
                try:
                    frames = ase.io.read(conf, index=":", format=self.param.sys_format)
                except Exception as err:  # noqa: BLE001 - ase raises many kinds
                    raise InputError(f"sys_configs[{system}]: cannot read '{conf}' as "
                                     f"'{self.param.sys_format}' with ase: {err}") from None
                for atoms in map(right_handed, frames):
                    self._check_structure(atoms, conf, magnitudes)
                    for temperature in job.temps:
                        for pressure in job.pressures:
                            task = path / f"task.{system:03d}.{counter:06d}"
                            task.mkdir()
                            ase.io.write(task / CONF_FILE, atoms, format="extxyz")
                            self._task_settings(job, models, encoding, magnitudes, temperature, pressure,
                                                task_seed(seed, system, counter)).save(task / TASK_FILE)
                            counter += 1
            n_tasks += counter
        log.info("model_devi: %d task(s), %d model(s), moments %s, ensemble %s, %d steps of %g ps", n_tasks,
                 len(models), magnitudes, job.ensemble, job.nsteps, self.settings.dt_ps)

    def _link_models(self, ctx: StageContext) -> list[str]:
        path = self.path(ctx)
        sources = sorted((ctx.iter_dir / TRAIN_DIR).glob(MODEL_LINK_GLOB))
        if not sources:
            raise RuntimeError(f"model_devi: no model {MODEL_LINK_GLOB} in {ctx.iter_dir / TRAIN_DIR}")
        for source in sources:
            link = path / source.name
            if not link.exists():
                link.symlink_to(os.path.relpath(source, path))
        return [source.name for source in sources]

    def _encoding(self, ctx: StageContext, models: Sequence[str]):
        from spingen.spin.encoding import SpinEncoding

        found = {SpinEncoding.beside(self.path(ctx) / m) for m in models}
        found.discard(None)
        if len(found) > 1:
            raise RuntimeError(f"model_devi: the models of {ctx.iter_dir / TRAIN_DIR} were trained with different "
                               f"spin encodings: {sorted(map(str, found))}")
        return found.pop() if found else self.param.spin.encoding

    def _magnitudes(self, ctx: StageContext, encoding) -> dict[str, list[float]]:
        from spingen.data.levels import supported_magnitudes

        spin = self.param.spin
        support = None
        if isinstance(spin.moments, str):
            systems = training_systems(ctx.workdir, self.param.init_data_sys, ctx.iteration)
            try:
                inferred = supported_magnitudes(systems, spin.magnetic, spin.min_level_support)
            except ValueError as err:
                raise InputError(f"{self.param.path}: key 'spin/moments' is \"auto\" but {err}") from None
            magnitudes, support = inferred.kept, inferred.describe()
            source = f"clustered from the moments of {len(systems)} training system(s): {support}"
            for element, refused in inferred.refused.items():
                log.warning("model_devi: %s level(s) %s uB refused: seen in fewer than spin/min_level_support %d "
                            "training frames (%s); the spin search leaves them out. To keep one, list the levels "
                            "in spin/moments, e.g. {\"%s\": %s}", element, refused, spin.min_level_support,
                            support, element, sorted(inferred.support[element]))
        else:
            magnitudes = {el: list(v) for el, v in spin.moments.items()}
            source = "spin/moments"
        for element, levels in magnitudes.items():
            bad = encoding.overlapping_moments([s * m for m in levels for s in (1, -1)], spin.min_virtual_distance)
            if bad:
                raise InputError(f"{self.param.path}: moment level(s) {bad} uB of {element} ({source}) put the "
                                 f"virtual atom within spin/min_virtual_distance {spin.min_virtual_distance} A of "
                                 f"its ion; give spin/moments explicitly or change spin/offset")
        (self.path(ctx) / MOMENTS_FILE).write_text(json.dumps({"magnitudes": magnitudes, "source": source},
                                                              indent=1) + "\n")
        return magnitudes

    def _check_structure(self, atoms, conf: Path, magnitudes: Mapping[str, Sequence[float]]) -> None:
        symbols = set(atoms.get_chemical_symbols())
        foreign = sorted(symbols - set(self.param.type_map))
        if foreign:
            raise InputError(f"sys_configs: '{conf}' has elements {foreign} that are not in type_map "
                             f"{list(self.param.type_map)}")
        if not symbols & set(magnitudes):
            raise InputError(f"sys_configs: '{conf}' has no magnetic ion ({sorted(magnitudes)}) to explore")
        if atoms.pbc.any() and not atoms.pbc.all():
            raise InputError(f"sys_configs: '{conf}' is periodic along some axes only; deepmd-kit needs all or none")

    def _task_settings(self, job, models, encoding, magnitudes, temperature, pressure, seed) -> ExploreTaskSettings:
        s = self.settings
        return ExploreTaskSettings(
            models=tuple(f"../{m}" for m in models), magnetic=tuple(encoding.magnetic),
            virtual_scale=encoding.virtual_scale, offset=encoding.offset,
            magnitudes={el: tuple(v) for el, v in magnitudes.items()}, drive=MODEL_DEVI_DRIVERS[s.driver],
            ensemble=job.ensemble, temperature=temperature, pressure=pressure, nsteps=job.nsteps, dt_ps=s.dt_ps,
            trj_freq=job.trj_freq, taut_ps=job.taut_ps, taup_ps=job.taup_ps, compressibility=s.compressibility,
            spin_opt_freq=job.spin_opt_freq, spin_devi_freq=job.spin_devi_freq, seed=seed, spin_search=dict(s.spin_search),
            certify=None if s.certify is None else dict(s.certify),
            symmetrize=s.symmetrize, canonical=encoding.canonical)

    # ---- run
    def task_dirs(self, ctx: StageContext) -> list[str]:
        return sorted(p.name for p in self.path(ctx).glob("task.[0-9][0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]")
                      if p.is_dir())

    def run(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        tasks = self.task_dirs(ctx)
        todo = [d for d in tasks if not (path / d / FINISHED_TAG).is_file()]
        log.info("model_devi: %d task(s) to run, %d already finished", len(todo), len(tasks) - len(todo))
        models = sorted(p.name for p in path.glob(MODEL_LINK_GLOB))
        spec = TaskSpec(command=f"{self.machine.command} explore-task .",
                        forward_files=[TASK_FILE, CONF_FILE, *self.machine.user_forward_files],
                        backward_files=[TRAJ_FILE, DEVI_FILE, FINISHED_TAG, OUTLOG, ERRLOG,
                                        *self.machine.user_backward_files],
                        forward_common_files=models, outlog=OUTLOG, errlog=ERRLOG)
        run_tasks(self.machine, path, todo, spec, ctx.workdir)

    # ---- post
    def post(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        s = self.settings
        seed_file = path / SEED_FILE
        seed = json.loads(seed_file.read_text())["seed"] if seed_file.is_file() else stage_seed(s.seed, ctx.iteration)
        for old in path.glob("candidates.*.extxyz"):
            old.unlink()
        counts: dict[int, dict[str, int]] = {}
        classified: dict[int, dict[str, list[tuple[str, int, np.ndarray]]]] = {}
        for task in self.task_dirs(ctx):
            if not (path / task / FINISHED_TAG).is_file():
                raise RuntimeError(f"model_devi: task {path / task} did not finish; see its {ERRLOG}")
            system = int(task.split(".")[1])
            rows = read_model_devi(path / task / DEVI_FILE)
            labels = classify(rows, s.f_trust_lo, s.f_trust_hi, s.spin_trust, s.skip, s.v_trust_lo, s.v_trust_hi,
                              s.spin_e_trust)
            count = counts.setdefault(system, {c: 0 for c in SELECTION_CLASSES} | {"nan": 0, "spin_only": 0})
            lists = classified.setdefault(system, {c: [] for c in SELECTION_CLASSES})
            finite = np.all(np.isfinite(rows[:, 1:]), axis=1)
            spin_only = self._spin_only(rows)
            for row, label, ok, by_spin in zip(rows, labels, finite, spin_only):
                if label is None:
                    continue
                count[label] += 1
                count["nan"] += int(not ok)
                count["spin_only"] += int(label == "candidate" and by_spin)
                lists[label].append((task, int(row[0]), row))
        candidates = {system: lists["candidate"] for system, lists in classified.items()}
        spin_only_flags = {system: self._spin_only(picked_rows(items)) for system, items in candidates.items()}
        selected = sample_candidates(candidates, s.task_max, s.task_max_total, s.task_min, seed, spin_only_flags,
                                     s.spin_only_share)
        report = {"seed": seed, "f_trust_lo": s.f_trust_lo, "f_trust_hi": s.f_trust_hi, "spin_trust": s.spin_trust,
                  "spin_e_trust": s.spin_e_trust,
                  "skip": s.skip, "fp_task_max": s.task_max, "fp_task_max_total": s.task_max_total,
                  "fp_task_min": s.task_min, "fp_spin_only_share": s.spin_only_share, "systems": {}}
        for system in sorted(counts):
            count, total = counts[system], sum(counts[system][c] for c in SELECTION_CLASSES)
            for label in SELECTION_CLASSES:
                log.info("system %03d %-9s : %6d in %6d %6.2f %%", system, label, count[label], total,
                         100.0 * count[label] / total if total else 0.0)
            self._write_lists(path, system, classified[system], seed)
            if selected[system]:
                write_candidates(path, path / CANDIDATES_FILE.format(system), selected[system], s.sectors)
            report["systems"][f"{system:03d}"] = {
                **count, "total": total, "selected": len(selected[system]),
                "spin_only_selected": int(self._spin_only(picked_rows(selected[system])).sum())}
            log.info("system %03d accurate/candidate/failed ratios %.4f / %.4f / %.4f; %d NaN/inf row(s), %d "
                     "candidate(s) by spin disagreement only; %d selected (%d of them spin-only)", system,
                     *(count[c] / total if total else 0.0 for c in SELECTION_CLASSES), count["nan"], count["spin_only"],
                     len(selected[system]), report["systems"][f"{system:03d}"]["spin_only_selected"])
        n_selected = sum(len(v) for v in selected.values())
        report["selected"] = n_selected
        (path / SELECTION_FILE).write_text(json.dumps(report, indent=1) + "\n")
        log.info("model_devi: %d candidate(s) selected for labeling (fp_task_max %d per system, fp_task_max_total "
                 "%s)", n_selected, s.task_max, s.task_max_total)

    def _spin_only(self, rows: np.ndarray) -> np.ndarray:
        """Rows of model_devi.out that are candidates by spin disagreement alone (forces below f_trust_lo)."""
        s = self.settings
        return spin_flags(rows, s.spin_trust, s.spin_e_trust) & (rows[:, _COL["max_devi_f"]] < s.f_trust_lo)

    @staticmethod
    def _write_lists(path: Path, system: int, lists, seed: int) -> None:
        """DP-GEN's candidate/rest_accurate/rest_failed.shuffled.SSS.out: 'task step max_devi_f' lines."""
        names = {"candidate": "candidate", "accurate": "rest_accurate", "failed": "rest_failed"}
        for label, name in names.items():
            items = lists[label]
            order = np.random.default_rng([seed, system, SELECTION_CLASSES.index(label)]).permutation(len(items))
            lines = [f"{items[i][0]} {items[i][1]} {items[i][2][_COL['max_devi_f']]:.6e}\n" for i in order]
            (path / f"{name}.shuffled.{system:03d}.out").write_text("".join(lines))


# ---------------------------------------------------------------- selection (pure functions)
def read_model_devi(path: Path) -> np.ndarray:
    """Rows (n, len(DEVI_COLUMNS)) of a model_devi.out; NaN/inf kept."""
    rows = np.loadtxt(path, comments="#", ndmin=2)
    if rows.size == 0:
        return np.zeros((0, len(DEVI_COLUMNS)))
    if rows.shape[1] != len(DEVI_COLUMNS):
        raise RuntimeError(f"{path}: expected {len(DEVI_COLUMNS)} columns {DEVI_COLUMNS}, got {rows.shape[1]}")
    return rows


def spin_flags(rows: np.ndarray, spin_trust: float, spin_e_trust: float = 0.0) -> np.ndarray:
    """Rows whose spin disagreement was computed (>= 0) and exceeds spin_trust, and whose members'
    energy deviation on the disputed states exceeds spin_e_trust."""
    spin, energy = rows[:, _COL["spin_disagree"]], rows[:, _COL["spin_devi_e"]]
    with np.errstate(invalid="ignore"):
        return (spin >= 0) & (spin > spin_trust) & (energy > spin_e_trust)


def classify(rows: np.ndarray, lo: float, hi: float, spin_trust: float, skip: int, v_lo: float = math.inf,
             v_hi: float = math.inf, spin_e_trust: float = 0.0) -> list[str | None]:
    """'accurate' / 'candidate' / 'failed' per row; None for steps < skip.

    DP-GEN's rule, plus spins and NaN: failed if any deviation is NaN/inf; else candidate if
    lo <= max_devi_f < hi, or v_lo <= max_devi_v < v_hi, or (below both hi) a computed spin
    disagreement (the -1 of 'not computed' excluded) is above spin_trust with an energy deviation on
    the disputed states above spin_e_trust; else failed if
    max_devi_f >= hi or max_devi_v >= v_hi; else accurate.
    """
    rows = np.asarray(rows, dtype=float).reshape(-1, len(DEVI_COLUMNS))
    f = rows[:, _COL["max_devi_f"]]
    v = rows[:, _COL["max_devi_v"]]
    finite = np.all(np.isfinite(rows[:, 1:]), axis=1)
    with np.errstate(invalid="ignore"):
        below_hi = (f < hi) & (v < v_hi)
        in_window = ((f >= lo) & (f < hi)) | ((v >= v_lo) & (v < v_hi)) | (spin_flags(rows, spin_trust, spin_e_trust) & below_hi)
        candidate = finite & in_window
        failed = ~finite | (~candidate & ((f >= hi) | (v >= v_hi)))
    labels: list[str | None] = []
    for step, bad, cand in zip(rows[:, 0], failed, candidate):
        labels.append(None if step < skip else "failed" if bad else "candidate" if cand else "accurate")
    return labels


def picked_rows(picks: Sequence[tuple[str, int, np.ndarray]]) -> np.ndarray:
    """The model_devi.out rows (n, len(DEVI_COLUMNS)) of (task, step, row) picks."""
    return np.array([row for _, _, row in picks], dtype=float).reshape(-1, len(DEVI_COLUMNS))


def sample_candidates(candidates: Mapping[int, Sequence[T]], task_max: int, task_max_total: int | None,
                      task_min: int, seed: int, spin_only: Mapping[int, Sequence[bool]] | None = None,
                      spin_only_share: float = 0.0) -> dict[int, list[T]]:
    """Seeded random picks per system: at most task_max each (none below task_min), then at most
    task_max_total in all, taken in turn from each system's picks (system order). With spin_only (a
    flag per candidate), ceil(spin_only_share x task_max) of a system's picks are flagged ones where it
    has that many, spread through its picks so that a capped first k keep ceil(spin_only_share x k)."""
    picked: dict[int, list[T]] = {}
    for system in sorted(candidates):
        items = list(candidates[system])
        if len(items) < task_min:
            picked[system] = []
            continue
        order = np.random.default_rng([seed, system]).permutation(len(items))
        flags = (spin_only or {}).get(system, [False] * len(items))
        reserved = [int(i) for i in order if flags[i]][: _share_of(spin_only_share, task_max)]
        taken = set(reserved)
        rest = [int(i) for i in order if int(i) not in taken][: task_max - len(reserved)]
        merged: list[int] = []  # a flagged pick wherever the prefix so far holds fewer than its share
        while reserved or rest:
            spin_due = sum(flags[i] for i in merged) < _share_of(spin_only_share, len(merged) + 1)
            merged.append((reserved if reserved and (spin_due or not rest) else rest).pop(0))
        picked[system] = [items[i] for i in merged]
    if task_max_total is None or sum(len(v) for v in picked.values()) <= task_max_total:
        return picked
    capped: dict[int, list[T]] = {system: [] for system in picked}
    taken, depth = 0, 0
    while taken < task_max_total:
        for system in sorted(picked):
            if depth < len(picked[system]) and taken < task_max_total:
                capped[system].append(picked[system][depth])
                taken += 1
        depth += 1
    return capped


def _share_of(share: float, n: int) -> int:
    """ceil(share x n), the product rounded first (0.28 x 25 is 7, not the float's ceil 8)."""
    return math.ceil(round(share * n, 9))


def write_candidates(stage_dir: Path, out: Path, picks: Sequence[tuple[str, int, np.ndarray]],
                     sectors: int = 0) -> None:
    """The label stage's input: the picked frames of the trajectories, with moments and deviations; with
    sectors > 0 also `sector_magmoms`, each frame's lowest state in up to that many total-moment sectors
    under its task's driving model (``spingen.tasks.explore.sector_states``)."""
    import ase.io
    from ase import Atoms

    frames = []
    by_task: dict[str, list[tuple[int, np.ndarray]]] = {}
    for task, step, row in sorted(picks, key=lambda p: (p[0], p[1])):
        by_task.setdefault(task, []).append((step, row))
    for task, items in by_task.items():
        first = len(frames)
        traj = {int(a.info["step"]): a for a in ase.io.read(stage_dir / task / TRAJ_FILE, index=":", format="extxyz")}
        for step, row in items:
            if step not in traj:
                raise RuntimeError(f"model_devi: {stage_dir / task / TRAJ_FILE} has no frame of step {step}")
            source = traj[step]
            frame = Atoms(source.get_chemical_symbols(), positions=source.positions, cell=source.cell,
                          pbc=source.pbc)
            frame.set_initial_magnetic_moments(source.get_initial_magnetic_moments())
            for key in ("excited_magmoms", "member_magmoms"):
                if key in source.arrays:
                    frame.arrays[key] = np.asarray(source.arrays[key], dtype=float).reshape(len(source), -1)
            frame.info.update(task=task, step=int(step), max_devi_f=float(row[_COL["max_devi_f"]]),
                              max_devi_v=float(row[_COL["max_devi_v"]]), devi_e=float(row[_COL["devi_e"]]),
                              spin_disagree=float(row[_COL["spin_disagree"]]),
                              spin_devi_e=float(row[_COL["spin_devi_e"]]))
            frames.append(frame)
        if sectors:
            began = time.perf_counter()
            for frame, states in zip(frames[first:], sector_states(stage_dir / task, frames[first:], sectors)):
                if states.shape[1]:
                    frame.arrays["sector_magmoms"] = states
            log.info("model_devi: %s: sector states of %d candidate(s) searched in %.1f s", task,
                     len(frames) - first, time.perf_counter() - began)
    ase.io.write(out, frames, format="extxyz")

