"""Train stage: an ensemble of spin-aware Deep Potentials with deepmd-kit (PyTorch backend).

make: encode the stored raw moments for deepmd-kit (S -> S + d/eta, plus globally reversed twins)
into `00.train/data/`, and write one input.json per model with its own seeds.
run: `dp --pt train` then `dp --pt freeze` for each model through dpdispatcher.
post: every model must exist; its lcurve.out RMSEs are recorded in `00.train/models.json`; for spin
models, how the ensemble ranks the spin states of the training geometries labeled in several
states goes to `00.train/state_ranking.json` and the log (a warning where it puts a wrong one lowest).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spingen import layout
from spingen.cells import right_handed_cells
from spingen.dispatch import TaskSpec, run_tasks
from spingen.errors import InputError
from spingen.layout import (
    INIT_MODEL_FILE,
    LCURVE_FILE,
    MODEL_FILE,
    MODELS_REPORT,
    STATE_RANKING_REPORT,
    TRAIN_DIR,
)
from spingen.loop import Stage, StageContext
from spingen.model_errors import HIDDEN_MOMENT_TOL, system_hidden_frames
from spingen.schema import MachineSection, Param, SpinSettings, thaw
from spingen.spin.encoding import SIDECAR
from spingen.tasks.lock import LOCK_FILE

log = logging.getLogger("spingen")


class TrainStage(Stage):
    name = "train"
    dirname = TRAIN_DIR

    def __init__(self, param: Param, machine: MachineSection):
        check_training_param(param)
        self.param = param
        self.machine = machine

    # ---- make
    def make(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        systems = self.training_systems(ctx)
        written = write_training_data(systems, path / "data", self.param.type_map, self.param.spin)
        frames = sum(n for _, n, _ in written)
        twins = sum(t for _, _, t in written)
        symmetry = {"augment": f"+ {twins} globally reversed twins", "none": "(no reversal symmetry)",
                    "canonical": "(moments in canonical sign: E(S) = E(-S) exactly)"}
        log.info("training data: %d systems, %d frames %s", len(written), frames,
                 symmetry[self.param.spin.flip_symmetry] if self.param.spin.enabled else "(no spin)")
        data_dirs = [f"../data/{name}" for name, _, _ in written]
        probabilities = self.system_probabilities(ctx, len(written))
        for index in range(self.param.train.numb_models):
            task = path / f"{index:03d}"
            task.mkdir()
            seed = 1 + index + 1000 * ctx.iteration
            reused = self.param.train.init_model and ctx.iteration > 0
            settings = self.param.train.reused_training_param() if reused else self.param.train.training_param
            inp = training_input(settings, self.param.type_map, self.param.spin, data_dirs, seed)
            if probabilities:
                for part in ("training_data", "validation_data"):
                    inp["training"][part]["auto_prob"] = probabilities
            (task / "input.json").write_text(json.dumps(inp, indent=2))
            if reused:
                previous = ctx.previous()[-1].iter_dir / self.dirname / task.name / MODEL_FILE
                shutil.copyfile(previous, task / INIT_MODEL_FILE)
            if self.param.spin.enabled:
                self.param.spin.encoding.save(task / SIDECAR)

    def system_probabilities(self, ctx: StageContext, n_systems: int) -> str | None:
        """deepmd-kit's auto_prob giving the initial data training_init_data_ratio of the batches (systems
        within each part in proportion to their batches); None where the ratio is unset or a part is empty."""
        ratio = self.param.train.init_data_ratio
        n_init = len(layout.training_systems(ctx.workdir, self.param.init_data_sys, 0)) if ratio is not None else 0
        if not 0 < n_init < n_systems:
            return None
        log.info("training data: the %d initial system(s) drawn for %.0f %% of the batches, the %d labeled "
                 "system(s) for the rest (training_init_data_ratio)", n_init, 100 * ratio, n_systems - n_init)
        return f"prob_sys_size; 0:{n_init}:{ratio:g}; {n_init}:{n_systems}:{1 - ratio:g}"

    def training_systems(self, ctx: StageContext) -> list[Path]:
        """init_data_sys, the data made in WORKDIR/init and every set labeled by earlier iterations."""
        return layout.training_systems(ctx.workdir, self.param.init_data_sys, ctx.iteration)

    # ---- run
    def task_dirs(self, ctx: StageContext) -> list[str]:
        return sorted(p.name for p in self.path(ctx).glob("[0-9][0-9][0-9]") if p.is_dir())

    def run(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        todo = [d for d in self.task_dirs(ctx) if not (path / d / MODEL_FILE).is_file()]
        log.info("train: %d model(s) to train, %d already frozen", len(todo), len(self.task_dirs(ctx)) - len(todo))
        init_model = [INIT_MODEL_FILE] if todo and (path / todo[0] / INIT_MODEL_FILE).is_file() else []
        spec = TaskSpec(command=train_command(self.machine.command),
                        forward_files=["input.json", *init_model, *self.machine.user_forward_files],
                        backward_files=[MODEL_FILE, LCURVE_FILE, *self.machine.user_backward_files],
                        forward_common_files=["data"], outlog="train.log", errlog="train.err")
        run_tasks(self.machine, path, todo, spec, ctx.workdir)

    # ---- post
    def post(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        report, tasks = [], self.task_dirs(ctx)
        for task in tasks:
            model = path / task / MODEL_FILE
            if not model.is_file():
                raise RuntimeError(f"train: model {model} is missing after run_train; see "
                                   f"{path / task / 'train.err'}")
            rmse = read_lcurve(path / task / LCURVE_FILE)
            report.append({"model": f"{task}/{MODEL_FILE}", **rmse})
            link = path / f"graph.{task}.pth"
            if not link.exists():
                link.symlink_to(f"{task}/{MODEL_FILE}")
            log.info("train: model %s  %s", task, "  ".join(f"{k} {v:.4g}" for k, v in rmse.items()))
        (path / MODELS_REPORT).write_text(json.dumps(report, indent=2))
        if self.param.spin.enabled:
            self.report_state_ranking(path, [path / task / MODEL_FILE for task in tasks], self.training_systems(ctx))

    @staticmethod
    def report_state_ranking(path: Path, models: list[Path], systems: list[Path]) -> None:
        """Whether the ensemble has learned the spin states of its own training geometries (those
        labeled in several states): a model that ranks them wrongly cannot guide the spin search."""
        from spingen.model_errors import state_ranking_on

        ranking = state_ranking_on(models, systems)
        if ranking is None:
            return
        (path / STATE_RANKING_REPORT).write_text(json.dumps(ranking, indent=2))
        log.info("train: on the %d training geometries labeled in several spin states, the ensemble's state gap "
                 "RMSE is %.2f meV/atom (DFT's lowest two states: %.2f meV/atom apart on average) and its lowest "
                 "state is DFT's on %d of them", ranking["geometries"], ranking["state_gap_rmse"],
                 ranking["dft_next_state_gap_mean"], ranking["lowest_state_right"])
        wrong = ranking["geometries"] - ranking["lowest_state_right"]
        if not wrong:
            return
        fix = "more numb_steps first, then a larger energy prefactor; docs/cathode-guide.md section 2"
        why = (f"DFT's two lowest states lie closer than the models' state gap error, so the models cannot "
               f"tell them apart: models that fit the state gaps better do ({fix})"
               if ranking["dft_next_state_gap_mean"] < ranking["state_gap_rmse"] else
               f"they do not resolve those spin states yet ({fix})")
        log.warning("train: the models put a wrong spin state lowest on %d of the %d training geometries labeled "
                    "in several states; the states they put lowest lie %.2f meV/atom above DFT's lowest on average "
                    "(by DFT). %s", wrong, ranking["geometries"], ranking["pick_excess_mean"], why)


def train_command(command: str) -> str:
    """The shell line of one training task: wait for any other copy of this job to end (flock, where
    installed; see spingen.tasks.lock), train (restarting from a checkpoint if any, else from the
    previous iteration's model if given), freeze."""
    dp = command if "--pt" in command.split() else f"{command} --pt"
    return (f"exec 9>>{LOCK_FILE}; flock 9 2>/dev/null; "
            f"if [ -f checkpoint ]; then {dp} train input.json --restart $(cat checkpoint); "
            f"elif [ -f {INIT_MODEL_FILE} ]; then {dp} train input.json --init-frz-model {INIT_MODEL_FILE}; "
            f"else {dp} train input.json; fi && {dp} freeze -o {MODEL_FILE}")


def training_input(base: Mapping[str, Any], type_map: Sequence[str], spin: SpinSettings,
                   data_dirs: Sequence[str], seed: int) -> dict:
    """deepmd-kit input.json: the user's template with type_map, spin, loss type, data and seeds set (and, for a
    spin model, the sel of a descriptor in SEL_WITHOUT_VIRTUAL doubled for the virtual atoms)."""
    inp = copy.deepcopy(thaw(base))
    model = inp.setdefault("model", {})
    model["type_map"] = list(type_map)
    loss = inp.setdefault("loss", {})
    if spin.enabled:
        model["spin"] = {"use_spin": [t in spin.magnetic for t in type_map],
                         "virtual_scale": [spin.virtual_scale if t in spin.magnetic else 0.0 for t in type_map]}
        loss["type"] = "ener_spin"
        for end in ("start", "limit"):
            if f"{end}_pref_f" in loss:
                loss[f"{end}_pref_fr"] = loss.pop(f"{end}_pref_f")
            loss[f"{end}_pref_fm"] = 0.0
        descriptor = model.get("descriptor", {})
        sel = descriptor.get("sel")
        if descriptor.get("type") in SEL_WITHOUT_VIRTUAL and isinstance(sel, (int, list)):
            descriptor["sel"] = 2 * sel if isinstance(sel, int) else list(sel) * 2  # each neighbour's virtual atom
    else:
        model.pop("spin", None)
        loss["type"] = "ener"
        for end in ("start", "limit"):
            if f"{end}_pref_fr" in loss:
                loss[f"{end}_pref_f"] = loss.pop(f"{end}_pref_fr")
            loss.pop(f"{end}_pref_fm", None)
    for part in ("descriptor", "fitting_net"):
        model.setdefault(part, {})["seed"] = seed
    training = inp.setdefault("training", {})
    training["seed"] = seed
    training.setdefault("disp_file", LCURVE_FILE)
    training.setdefault("training_data", {})["systems"] = list(data_dirs)
    validation = training.setdefault("validation_data", {"batch_size": 1, "numb_btch": 1})
    validation["systems"] = list(data_dirs)
    return inp


SEL_PER_TYPE = ("se_e2_a", "se_e2_r", "se_e3")  # descriptors whose sel is one neighbour count per type
# descriptors whose sel deepmd-kit does not widen for a spin model's virtual atoms (it does for se_e2_a): the
# user's sel counts real neighbours, as for se_e2_a, and training_input doubles it
SEL_WITHOUT_VIRTUAL = ("se_e2_r", "se_e3", "dpa1", "se_atten", "se_atten_v2")


def check_training_param(param: Param) -> None:
    """default_training_param as `dp --pt train` will read the input.json made from it (deepmd-kit's own
    argument schema), and what that schema leaves to training time: numb_steps, one sel per type,
    every virtual atom within rcut of its ion."""
    from dargs.dargs import ArgumentError
    from deepmd.utils.argcheck import normalize
    from deepmd.utils.compat import update_deepmd_input

    key = f"{param.path}: key 'default_training_param"
    try:
        inp = training_input(param.train.training_param, param.type_map, param.spin, ["data"], 1)
        inp = normalize(update_deepmd_input(inp, warning=False))
    except (ArgumentError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"{key}': deepmd-kit refuses the input.json the train stage writes from it: "
                         f"{' '.join(str(err).split())}") from None
    steps = inp["training"].get("numb_steps")
    if steps is not None and steps < 1:
        raise InputError(f"{key}/training/numb_steps': expected at least 1 training step, got {steps}")
    descriptor = inp["model"]["descriptor"]
    sel, rcut = descriptor.get("sel"), descriptor.get("rcut")
    if descriptor["type"] in SEL_PER_TYPE and isinstance(sel, list) and len(sel) != len(param.type_map):
        raise InputError(f"{key}/model/descriptor/sel': expected one neighbour count per type_map entry "
                         f"({len(param.type_map)}: {' '.join(param.type_map)}), got {sel}")
    spin = param.spin
    if not spin.enabled or isinstance(spin.moments, str) or not isinstance(rcut, (int, float)):
        return
    for element, levels in spin.moments.items():
        reach = spin.virtual_scale * max(levels) + abs(spin.offset)
        if reach >= rcut:
            raise InputError(f"{param.path}: keys 'spin/moments/{element}' and 'default_training_param/model/"
                             f"descriptor/rcut': a moment of {max(levels):g} uB puts the virtual atom eta*S + d = "
                             f"{reach:.3g} A from its ion, beyond rcut {rcut:g} A: the ion would not see its own "
                             "spin; lower spin/virtual_scale or raise rcut")


def write_training_data(systems: Sequence[Path], out: Path, type_map: Sequence[str],
                        spin: SpinSettings) -> list[tuple[str, int, int]]:
    """Write every system as deepmd-kit will train on it; return (name, frames, twins added) each.

    Moments are encoded S -> S + d/eta (canonical sign if spin/flip_symmetry says so); with "augment"
    each frame's globally reversed twin (moments negated, same energy and forces) is added unless the
    data already holds it. A label whose moments the model cannot tell from a lower label of the same
    geometry (`hidden_state_frames`) is left out, with a warning; the stored data keeps it. Left-handed
    cells are written right-handed (spingen.cells.right_handed_cells).
    """
    from spingen.data.npy import load_system

    written = []
    for index, system_path in enumerate(systems):
        system = load_system(system_path)
        missing = sorted(set(system.data["atom_names"]) - set(type_map))
        if missing:
            raise ValueError(f"data '{system_path}': elements {missing} are not in type_map")
        twins = 0
        system.data["cells"] = right_handed_cells(system.data["cells"])
        if spin.enabled:
            symbols = [system.data["atom_names"][t] for t in system.data["atom_types"]]
            system = without_hidden_states(system, system_path, spin.magnetic)
            moments = system.data["spins"][..., 2]
            if spin.flip_symmetry == "augment":
                reversed_frames = missing_reversed_twins(system.data["coords"], system.data["energies"], moments)
                if reversed_frames.size:
                    twin = system.sub_system(reversed_frames)
                    twin.data["spins"] = -twin.data["spins"]
                    system.append(twin)
                    twins = reversed_frames.size
                    moments = system.data["spins"][..., 2]
            system.data["spins"] = spin.encoding.to_deepmd(moments, symbols)
        else:
            system.data.pop("spins", None)
        name = f"sys.{index:03d}"
        system.to("deepmd/npy", str(out / name))
        written.append((name, system.get_nframes() - twins, twins))
    return written


def without_hidden_states(system, path: Path, magnetic: Sequence[str]):
    """The system without its `hidden_state_frames` (magnetic: the magnetic elements), warned about."""
    hidden, excess = system_hidden_frames(system, magnetic)
    if not hidden.size:
        return system
    log.warning("train: data '%s': %d label(s) left out of training: each has the magnetic moments of a lower label "
                "of its geometry (within %.2g uB on every magnetic ion) but lies %.1f-%.1f meV/atom above it, so the "
                "spin model would see one input with two energies (a fixed total moment that went to the ligands "
                "can do this); the stored data keeps them", path, hidden.size, HIDDEN_MOMENT_TOL,
                1000 * excess.min(), 1000 * excess.max())
    return system.sub_system(np.setdiff1d(np.arange(system.get_nframes()), hidden))


def missing_reversed_twins(coords: np.ndarray, energies: np.ndarray, moments: np.ndarray,
                           decimals: int = 4) -> np.ndarray:
    """Indices of frames whose all-moments-reversed twin is absent (frames with moments only)."""
    def key(i: int, sign: float) -> bytes:
        return (np.round(coords[i], decimals).tobytes() + np.round(energies[i], decimals).tobytes()
                + (np.round(sign * moments[i], 2) + 0.0).tobytes())

    present = {key(i, 1.0) for i in range(len(coords))}
    needed = [i for i in range(len(coords))
              if np.any(np.abs(moments[i]) > 1e-3) and key(i, -1.0) not in present]
    return np.array(needed, dtype=int)


def read_lcurve(path: Path) -> dict[str, float]:
    """The last row of deepmd-kit's lcurve.out, as {column: value} for the rmse columns."""
    lines = path.read_text().splitlines()
    header = next((ln for ln in lines if ln.startswith("#")), None)
    rows = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if header is None or not rows:
        raise RuntimeError(f"train: {path} has no header or no data row")
    names = header.lstrip("#").split()
    values = [float(v) for v in rows[-1].split()]
    return {n: v for n, v in zip(names, values) if n.startswith("rmse")}
