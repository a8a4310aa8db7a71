"""Progress of a work dir: `spingen status` (a table or JSON) and `spingen plot` (one PNG).

Reads only what the loop and the stages write: `record.spingen`, `spingen.log` and, per iteration,
`00.train/models.json`, `01.model_devi/selection.json` and `task.*/model_devi.out`,
`02.fp/labels.json` and `02.fp/model_errors.json`. A missing or unreadable file leaves its cells
empty (None), so a run in progress or one that crashed can be inspected while it is where it is.
Units: the lcurve RMSEs as deepmd-kit prints them (energy eV/atom, force eV/A); the ensemble's
error on an iteration's new labels in meV/atom and meV/A; ratios in %.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spingen.errors import InputError
from spingen.layout import (
    DEVI_FILE,
    EXPLORE_DIR,
    FP_DIR,
    INIT_DIR,
    INIT_STAGE_DIRS,
    ITER_GLOB,
    LABELS_FILE,
    LOG_FILE,
    MODEL_ERRORS_FILE,
    MODELS_REPORT,
    PHASES,
    RECORD_FILE,
    SELECTION_CLASSES,
    SELECTION_FILE,
    STAGE_DIRS,
    STAGE_NAMES,
    STATE_RANKING_REPORT,
    TRAIN_DIR,
    iteration_name,
)
from spingen.loop import Record

LAST_STEP = len(STAGE_DIRS) * len(PHASES) - 1
DPGEN_RECORD = "record.dpgen"
LOG_STEP = re.compile(r"\biter \d{6} step \d{2}:")
LOG_FINISHED = re.compile(r"\bfinished: (\d+) iterations")
MISSING = "-"


@dataclass
class Status:
    """What `spingen status` shows: one dict per iteration and the record's last finished step."""

    workdir: Path
    rows: list[dict]
    last: tuple[int, int] | None
    finished: bool
    init: dict | None = None  # the initial data of init_data_gen (WORKDIR/init), when there is one


def step_label(step: int, dirname: bool = True, stages: tuple[str, ...] = STAGE_DIRS) -> str:
    """'02.fp run' (dirname) or 'fp run' for a step number of an iteration made of `stages`."""
    stage = stages[step // len(PHASES)]
    return f"{stage if dirname else STAGE_NAMES[stage]} {PHASES[step % len(PHASES)]}"


def read_json(path: Path):
    """The content of a JSON file, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finite(value) -> float | None:
    """value as a float, None when missing or NaN/inf."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def run_finished(workdir: Path) -> int | None:
    """n_iterations when the log's last loop message says the run finished, else None."""
    try:
        lines = (workdir / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return None
    n_iterations = None
    for line in lines:
        if LOG_STEP.search(line):
            n_iterations = None
        elif match := LOG_FINISHED.search(line):
            n_iterations = int(match.group(1))
    return n_iterations


def iteration_step(iteration: int, last: tuple[int, int] | None, finished: bool) -> str:
    """'done', the step this iteration is at (the next one after the record) or 'not started'."""
    if last is None:
        return step_label(0) if iteration == 0 else "not started"
    last_iteration, last_step = last
    if iteration < last_iteration or (iteration == last_iteration and (last_step == LAST_STEP or finished)):
        return "done"
    if iteration == last_iteration:
        return step_label(last_step + 1)
    if iteration == last_iteration + 1 and last_step == LAST_STEP:
        return step_label(0)
    return "not started"


def explore_summary(selection) -> dict:
    """Explored frames, accurate/candidate/failed %, candidates by spin disagreement only (% of
    frames: their force deviation is below the lower trust level), selected count and how many of those are
    spin-only (absent from runs before fp_spin_only_share) from selection.json."""
    if not isinstance(selection, dict):
        return {"explore_frames": None, **{f"{c}_pct": None for c in SELECTION_CLASSES}, "spin_only_pct": None,
                "selected": None, "spin_only_selected": None}
    systems = list(selection.get("systems", {}).values())
    counts = {c: sum(s.get(c, 0) for s in systems) for c in SELECTION_CLASSES}
    total = sum(counts.values())
    spin_only = sum(s.get("spin_only", 0) for s in systems)
    return {"explore_frames": total, **{f"{c}_pct": 100.0 * counts[c] / total if total else None for c in SELECTION_CLASSES},
            "spin_only_pct": 100.0 * spin_only / total if total else None, "selected": selection.get("selected"),
            "spin_only_selected": (sum(s["spin_only_selected"] for s in systems)
                                   if all("spin_only_selected" in s for s in systems) else None)}


def label_summary(labels) -> dict:
    """Converged and failed label tasks from labels.json."""
    if not isinstance(labels, list):
        return {"labeled": None, "label_failed": None, "labeled_other_states": None}
    labeled = sum(1 for entry in labels if entry.get("ok"))
    other_states = sum(1 for entry in labels if entry.get("ok") and entry.get("state", 0) > 0)
    return {"labeled": labeled, "label_failed": len(labels) - labeled, "labeled_other_states": other_states}


def model_rmses(models) -> list[dict] | None:
    """Each model's last lcurve energy/force RMSE: the validation set's, else the training set's."""
    if not isinstance(models, list):
        return None
    result = []
    for entry in models:
        found = {"set": None, "rmse_e_eV_atom": None, "rmse_f_eV_A": None}
        for subset in ("val", "trn"):
            energy = finite(entry.get(f"rmse_e_{subset}"))
            force = finite(entry.get(f"rmse_f_{subset}"))
            force = force if force is not None else finite(entry.get(f"rmse_fr_{subset}"))
            if energy is not None or force is not None:
                found = {"set": subset, "rmse_e_eV_atom": energy, "rmse_f_eV_A": force}
                break
        result.append({"model": Path(str(entry.get("model", "?"))).parts[0], **found})
    return result


def ensemble_summary(errors) -> dict:
    """The ensemble's error on the iteration's new labels (before training on them) and spin agreement."""
    if not isinstance(errors, dict):
        return {"ensemble_frames": None, "ensemble_rmse_e_meV_atom": None, "ensemble_rmse_f_meV_A": None,
                "spin_agree_pct": None, "states_kept_pct": None, "predicted_lowest": None, "candidates_in_states": None}
    spin = errors.get("spin_agreement")
    spin = spin if isinstance(spin, dict) else {}
    fraction = finite(spin.get("fraction"))
    states, kept = spin.get("states"), spin.get("states_kept")
    return {"ensemble_frames": errors.get("n_frames"), "ensemble_rmse_e_meV_atom": finite(errors.get("rmse_e")),
            "ensemble_rmse_f_meV_A": finite(errors.get("rmse_f")),
            "spin_agree_pct": 100.0 * fraction if fraction is not None else None,
            "states_kept_pct": 100.0 * kept / states if isinstance(states, int) and states and isinstance(kept, int)
            else None,
            "predicted_lowest": spin.get("predicted_lowest"), "candidates_in_states": spin.get("candidates_in_states")}


def ranking_summary(ranking) -> dict:
    """How the iteration's ensemble ranks the spin states of its training geometries labeled in
    several states (00.train/state_ranking.json): lowest state right (k of n) and state gap RMSE."""
    if not isinstance(ranking, dict):
        return {"ranking_right": None, "ranking_geometries": None, "state_gap_rmse_meV_atom": None}
    return {"ranking_right": ranking.get("lowest_state_right"), "ranking_geometries": ranking.get("geometries"),
            "state_gap_rmse_meV_atom": finite(ranking.get("state_gap_rmse"))}


def iteration_dirs(workdir: Path) -> dict[int, Path]:
    """The iter.NNNNNN folders of a work dir by iteration."""
    return {int(p.name.split(".")[1]): p for p in workdir.glob(ITER_GLOB) if p.is_dir()}


def init_summary(workdir: Path) -> dict | None:
    """Where the initial-data run of WORKDIR/init stands and what it labeled; None without one."""
    root = workdir / INIT_DIR
    if not root.is_dir():
        return None
    n_steps = len(INIT_STAGE_DIRS) * len(PHASES)
    last = Record(root).last(n_steps)
    if last is not None and last[1] == n_steps - 1:
        step = "done"
    else:
        index = 0 if last is None else last[1] + 1
        step = step_label(index, stages=INIT_STAGE_DIRS)
    fp = root / iteration_name(0) / FP_DIR
    return {"step": step, "tasks": len(list(fp.glob("task.*"))),
            **label_summary(read_json(fp / LABELS_FILE))}


def gather(workdir: Path) -> Status:
    """The status of a work dir; InputError when it is missing or holds no run."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError(f"work dir '{workdir}' does not exist")
    if (workdir / DPGEN_RECORD).is_file() and not (workdir / RECORD_FILE).is_file():
        raise InputError(f"'{workdir}' is a DP-GEN work dir ({DPGEN_RECORD}, no {RECORD_FILE}): spingen status "
                         f"reads spingen's runs only; DP-GEN's progress is in its {DPGEN_RECORD} and dpgen.log")
    last = Record(workdir).last(LAST_STEP + 1)
    dirs = iteration_dirs(workdir)
    init = init_summary(workdir)
    if last is None and not dirs and init is None:
        raise InputError(f"'{workdir}' is not a spingen work dir: no {RECORD_FILE} and no iter.* folder")
    finished = last is not None and last[1] == len(PHASES) - 1 and run_finished(workdir) == last[0]
    indices = sorted(set(dirs) | set(range(last[0] + 1 if last else 0)))
    rows = []
    for iteration in indices:
        path = workdir / iteration_name(iteration)
        rows.append({"iteration": iteration, "step": iteration_step(iteration, last, finished),
                     **explore_summary(read_json(path / EXPLORE_DIR / SELECTION_FILE)),
                     **label_summary(read_json(path / FP_DIR / LABELS_FILE)),
                     "models": model_rmses(read_json(path / TRAIN_DIR / MODELS_REPORT)),
                     **ranking_summary(read_json(path / TRAIN_DIR / STATE_RANKING_REPORT)),
                     **ensemble_summary(read_json(path / FP_DIR / MODEL_ERRORS_FILE))})
    return Status(workdir, rows, last, finished, init)


def format_json(status: Status) -> str:
    return json.dumps({"workdir": str(status.workdir), "init": status.init, "iterations": status.rows,
                       "last_finished": status.last, "finished": status.finished}, indent=1)


def _number(value, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def format_status(status: Status) -> str:
    """An aligned text table, a legend and the record's last finished step."""
    names = sorted({m["model"] for row in status.rows for m in row["models"] or []})
    header = ["iter", "step", "explored", "acc %", "cand %", "(spin) %", "fail %", "selected", "(spin)", "labeled",
              "(states)", "lbl failed", *(f"m{name} E/F" for name in names), "ranked", "gap", "new E", "new F",
              "spin %", "kept %", "pred low"]
    table = [header]
    for row in status.rows:
        models = {m["model"]: m for m in row["models"] or []}
        cells = [f"{row['iteration']:06d}", row["step"], _number(row["explore_frames"], "d"),
                 _number(row["accurate_pct"], ".1f"), _number(row["candidate_pct"], ".1f"),
                 _number(row["spin_only_pct"], ".1f"), _number(row["failed_pct"], ".1f"), _number(row["selected"], "d"),
                 _number(row["spin_only_selected"], "d"), _number(row["labeled"], "d"), _number(row["labeled_other_states"], "d"),
                 _number(row["label_failed"], "d")]
        for name in names:
            model = models.get(name)
            if model is None or model["set"] is None:
                cells.append(MISSING)
            else:
                cells.append(f"{_number(model['rmse_e_eV_atom'], '.3g')}/{_number(model['rmse_f_eV_A'], '.3g')}"
                             + ("*" if model["set"] == "trn" else ""))
        ranked = (MISSING if row["ranking_geometries"] is None
                  else f"{row['ranking_right']}/{row['ranking_geometries']}")
        cells += [ranked, _number(row["state_gap_rmse_meV_atom"], ".1f"),
                  _number(row["ensemble_rmse_e_meV_atom"], ".2f"), _number(row["ensemble_rmse_f_meV_A"], ".1f"),
                  _number(row["spin_agree_pct"], ".1f"), _number(row["states_kept_pct"], ".0f"),
                  MISSING if not row["candidates_in_states"] else f"{row['predicted_lowest']}/{row['candidates_in_states']}"]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [] if status.init is None else [init_line(status.init), ""]
    lines += ["  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             .rstrip() for line in table]
    lines += ["",
              "mNNN E/F: model NNN's last lcurve RMSE, energy eV/atom / force eV/A, on the validation set "
              "(* on the training set: no validation data)",
              "(spin) %: candidates only because the models disagree on the ground-state moments (force "
              "deviation below the lower trust level); selected (spin): how many of the selected are such candidates "
              "(fp_spin_only_share reserves picks for them)",
              "(states): labels in a state other than the predicted ground state (fp_spin_init states/members/sectors)",
              "ranked, gap: training geometries labeled in several spin states on which the ensemble's lowest "
              "state is DFT's (k/n), and its state gap RMSE there, meV/atom",
              "new E/F: the ensemble's RMSE on the iteration's new labels before training on them, meV/atom / "
              "meV/A; spin %: magnetic ions whose predicted moment agrees with DFT's; kept %: labels whose start "
              "moments DFT kept on every magnetic ion (a state DFT does not keep is a spurious minimum of the model); "
              "pred low: candidates labeled in several states whose predicted state DFT puts lowest (k/n)",
              last_line(status)]
    return "\n".join(lines)


def init_line(init: dict) -> str:
    labeled = "" if init["labeled"] is None else f", {init['labeled']} labeled, {init['label_failed']} failed"
    return f"initial data ({INIT_DIR}/): {init['step']}, {init['tasks']} DFT task(s){labeled}"


def last_line(status: Status) -> str:
    if status.last is None:
        return f"last finished: none ({RECORD_FILE} is missing or empty)"
    iteration, step = status.last
    line = f"last finished: iter {iteration:06d} step {step:02d} ({step_label(step, dirname=False)})"
    return line + (f"; the run is finished ({iteration} iterations)" if status.finished else "")


# ---------------------------------------------------------------- plot
def max_devi_f(explore_dir: Path, skip: int) -> np.ndarray:
    """The finite max_devi_f of every row (steps >= skip) of every task's model_devi.out; partial rows left out."""
    values = []
    for devi in sorted(explore_dir.glob(f"task.*/{DEVI_FILE}")):
        try:
            lines = devi.read_text().splitlines()
        except OSError:
            continue
        header = next((ln.lstrip("#").split() for ln in lines if ln.startswith("#")), [])
        if "max_devi_f" not in header or "step" not in header:
            continue
        column, step_column = header.index("max_devi_f"), header.index("step")
        for line in lines:
            fields = line.split()
            if line.startswith("#") or len(fields) != len(header):
                continue
            try:
                step, value = float(fields[step_column]), float(fields[column])
            except ValueError:
                continue
            if step >= skip and math.isfinite(value):
                values.append(value)
    return np.array(values)


def _iteration_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _plot_ratios(ax, rows: list[dict]) -> None:
    shown = [r for r in rows if r["accurate_pct"] is not None]
    ax.set_title("(a) explored frames")
    if not shown:
        return _no_data(ax)
    x = [r["iteration"] for r in shown]
    bottom = np.zeros(len(shown))
    for label, color in zip(SELECTION_CLASSES, ("tab:green", "tab:orange", "tab:red")):
        height = np.array([r[f"{label}_pct"] for r in shown])
        if label == "candidate":  # the candidates found by spin disagreement only, hatched at its base
            spin_only = np.array([r["spin_only_pct"] or 0.0 for r in shown])
            ax.bar(x, spin_only, bottom=bottom, color="none", edgecolor="k", hatch="//", lw=0,
                   label="candidate by spin only")
        ax.bar(x, height, bottom=bottom, color=color, label=label, zorder=0)
        bottom += height
    for r in shown:  # how the iteration's ensemble ranks the spin states of its training geometries
        if r["ranking_geometries"]:
            ax.annotate(f"ranked {r['ranking_right']}/{r['ranking_geometries']}", (r["iteration"], 100), ha="center",
                        va="bottom", fontsize=7)
    _iteration_axis(ax)
    ax.set_ylim(0, 110)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)


def _plot_errors(ax, rows: list[dict], quantity: str) -> None:
    """Ensemble error on new labels and each model's lcurve RMSE (x1000) per iteration, in meV."""
    ensemble_key, lcurve_key, unit = {"energy": ("ensemble_rmse_e_meV_atom", "rmse_e_eV_atom", "meV/atom"),
                                      "force": ("ensemble_rmse_f_meV_A", "rmse_f_eV_A", "meV/A")}[quantity]
    ax.set_title(f"(b) {quantity} RMSE")
    plotted = []
    ensemble = [(r["iteration"], r[ensemble_key]) for r in rows if r[ensemble_key] is not None]
    if ensemble:
        plotted += ax.plot(*zip(*ensemble), "ko-", label="ensemble on new labels")
    per_model: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for model in row["models"] or []:
            if model[lcurve_key] is not None:
                per_model.setdefault(model["model"], []).append((row["iteration"], 1000.0 * model[lcurve_key]))
    for name, points in sorted(per_model.items()):
        plotted += ax.plot(*zip(*points), ".--", lw=0.8, label=f"model {name} lcurve")
    if not plotted:
        return _no_data(ax)
    if all(y > 0 for line in plotted for y in line.get_ydata()):
        ax.set_yscale("log")
    _iteration_axis(ax)
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)


def _plot_deviations(ax, workdir: Path, rows: list[dict]) -> None:
    ax.set_title("(c) max_devi_f: box 25-75 %, whiskers 5-95 %")
    positions, samples = [], []
    trust: dict[str, list[tuple[int, float]]] = {"f_trust_lo": [], "f_trust_hi": []}
    for row in rows:
        explore_dir = workdir / iteration_name(row["iteration"]) / EXPLORE_DIR
        selection = read_json(explore_dir / SELECTION_FILE)
        selection = selection if isinstance(selection, dict) else {}
        values = max_devi_f(explore_dir, int(selection.get("skip") or 0))
        if not values.size:
            continue
        positions.append(row["iteration"])
        samples.append(values)
        for key, points in trust.items():
            if (value := finite(selection.get(key))) is not None:
                points.append((row["iteration"], value))
    if not samples:
        return _no_data(ax)
    ax.boxplot(samples, positions=positions, widths=0.6, whis=(5, 95), showfliers=False, manage_ticks=False)
    for (key, points), color in zip(trust.items(), ("tab:orange", "tab:red")):
        if points:
            x, y = np.array(points).T
            ax.hlines(y, x - 0.45, x + 0.45, colors=color, linestyles="--", label=key)
    if all(float(np.min(v)) > 0 for v in samples):
        ax.set_yscale("log")
    _iteration_axis(ax)
    ax.set_ylabel("max_devi_f (eV/A)")
    if any(trust.values()):
        ax.legend(fontsize=7)


def _plot_parity(axes, workdir: Path, rows: list[dict]) -> None:
    """DFT vs ensemble energy and forces of the latest iteration with parity data in model_errors.json."""
    parity, iteration = None, None
    for row in reversed(rows):
        errors = read_json(workdir / iteration_name(row["iteration"]) / FP_DIR / MODEL_ERRORS_FILE)
        if isinstance(errors, dict) and isinstance(errors.get("parity"), dict) and errors["parity"].get("e_dft"):
            parity, iteration = errors["parity"], row["iteration"]
            break
    for ax, key, unit in zip(axes, ("e", "f"), ("energy (eV/atom)", "force component (eV/A)")):
        ax.set_title(f"(d) {unit.split()[0]} parity" + (f", iter {iteration:06d}" if parity else ""))
        dft = np.asarray((parity or {}).get(f"{key}_dft") or [], float)
        model = np.asarray((parity or {}).get(f"{key}_model") or [], float)
        if not dft.size or dft.size != model.size:
            _no_data(ax)
            continue
        ax.plot(dft, model, "o" if key == "e" else ".", ms=3)
        low, high = float(min(dft.min(), model.min())), float(max(dft.max(), model.max()))
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xlabel(f"DFT {unit}")
        ax.set_ylabel(f"model {unit}")


def plot_report(workdir: Path, out: Path) -> Path:
    """Write the progress figure of a work dir to out (PNG); returns out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    status = gather(workdir)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    _plot_ratios(axes[0, 0], status.rows)
    _plot_errors(axes[0, 1], status.rows, "energy")
    _plot_errors(axes[0, 2], status.rows, "force")
    _plot_deviations(axes[1, 0], workdir, status.rows)
    _plot_parity(axes[1, 1:], workdir, status.rows)
    fig.suptitle(f"{workdir.resolve()}: {last_line(status)}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
