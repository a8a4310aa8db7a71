"""Make the spin-loop benchmark's held-out DFT judge once, with the loop's own GPAW settings.

The judge is `spingen init` run on a param derived from param_examples/linio2_spin_loop/param.json:
every key the same (fp_style, fp_gpaw, fp_ldau, spin), except init_data_gen, which perturbs the
32-atom explore cell (POSCAR.2x2x1, 8 Ni) with its own seed and labels each geometry in the
JUDGE_STATES below with a fixed total moment. The labeled data (deepmd/npy with spin.npy) is copied
to benchmarks/spin_loop/judge/ and never enters training.

Usage (32 GPAW runs of 32 atoms at one irreducible k-point):

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_loop/make_judge.py [--workdir /tmp/spin_judge]

`--collect-finished` writes the judge from the runs finished so far (while or after `spingen init`
runs), for a session that cannot wait for all of them: the converged labels of every geometry with
at least two states; states.json and labels.json say what is there.

`--training-set DIR --seed S [--geometries N]` labels N (default 4) other geometries of the same cell in
the same states, drawn with seed S (not the judge's), and writes them to DIR/data (deepmd/npy with
spin.npy; DIR/labels.json) instead of the judge: supercell labels to train on beside the judge's training
half (encoding_floor.py --extra-data DIR/data), never judged.

`--retry-failed MAXITER` reruns the stored judge's unconverged runs (labels.json `ok: false`) with
the same geometry (regenerated from the seed and checked against the stored frames), start moments
and total moment, allowing MAXITER SCF steps instead of the loop's 120, as many at once as there are
cores, and adds the converged ones to the judge (labels.json records each retry's maxiter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLE = REPO / "param_examples" / "linio2_spin_loop"
MACHINE = REPO / "machine_examples" / "local.json"
JUDGE_DIR = Path(__file__).resolve().parent / "judge"

# Ni of POSCAR.2x2x1 in file order: 0-3 the layer at x = 2.1 A, 4-7 the layer at x = 6.3 A; within a layer
# each Ni's four nearest Ni (2.95 A) are its two file-order neighbours (0-1-2-3-0), twice each.
# (The 6-Ni judge of 2026-12-03 also had a high-spin ion [3, 1, ...]: DFT relaxed it to ~1.7 uB every time.)
JUDGE_STATES = {
    "FM low spin": [1, 1, 1, 1, 1, 1, 1, 1],
    "in-plane AFM": [1, -1, 1, -1, 1, -1, 1, -1],
    "one layer reversed": [1, 1, 1, 1, -1, -1, -1, -1],
    "reversed nearest pair": [-1, -1, 1, 1, 1, 1, 1, 1],
}
JUDGE_GEOMETRIES = 8
JUDGE_SEED = 7  # the loop's initial data use seed 0 on another cell
TRAINING_GEOMETRIES = 4  # of a --training-set, unless --geometries


def judge_param(seed: int = JUDGE_SEED, geometries: int = JUDGE_GEOMETRIES) -> dict:
    """The loop's param with init_data_gen replaced by the judge's geometries and states (another seed and
    number of geometries: a training set made like the judge)."""
    param = json.loads((EXAMPLE / "param.json").read_text())
    param["init_data_gen"] = {
        "configs": [str(EXAMPLE / "POSCAR.2x2x1")], "pert_numb": geometries, "pert_box": 0.02,
        "pert_atom": 0.1, "spin_states": list(JUDGE_STATES.values()), "fixed_total": True,
        "ratio_failed": 0.5, "seed": seed}
    param["sys_configs"] = [[str(EXAMPLE / "POSCAR.2x2x1")]]
    param["init_data_prefix"] = str((EXAMPLE / param.get("init_data_prefix", ".")).resolve())
    return param


def labeled_system(frames: list):
    """The judge's data (a LabeledSystem, type map Li Ni O) of (atoms, LabelResult) pairs."""
    import numpy as np

    from spingen.data.npy import build_system

    return build_system(frames[0][0].get_chemical_symbols(), np.array([a.cell.array for a, _ in frames]),
                        np.array([a.positions for a, _ in frames]), np.array([r.energy for _, r in frames]),
                        np.array([r.forces for _, r in frames]), np.array([r.moments for _, r in frames]),
                        type_map=["Li", "Ni", "O"])


def collect_finished(work: Path) -> list[dict]:
    """The judge from the finished label tasks of WORKDIR/init (results still in dpdispatcher's remote
    folder included); returns one labels.json entry per task."""
    import ase.io
    import numpy as np

    from spingen.data.npy import write_system_atomic
    from spingen.labelers import create_labeler
    from spingen.schema import label_settings, load_param

    labeler = create_labeler(label_settings(load_param(work / "param.json")))
    entries, frames = [], []
    for task in sorted((work / "init" / "iter.000000" / "02.fp").glob("task.*")):
        found = [task] + sorted(work.glob(f"init/remote/*/{task.name}"))
        done = next((d for d in found if labeler.is_finished(d)), None)
        atoms = ase.io.read(task / "frame.extxyz")
        entry = {"task": task.name, "perturbation": int(atoms.info["perturbation"]),
                 "state": int(atoms.info["spin_state"]), "ok": False, "reason": "not finished"}
        if done is not None:
            result = labeler.read_result(done)
            entry.update(ok=result.ok, reason=result.reason)
            if result.ok:
                entry.update(energy=result.energy, moments=np.round(result.moments, 3).tolist())
                frames.append((atoms, result))
        entries.append(entry)
    per_geometry = {}
    for atoms, _ in frames:
        per_geometry[int(atoms.info["perturbation"])] = per_geometry.get(int(atoms.info["perturbation"]), 0) + 1
    kept = [(a, r) for a, r in frames if per_geometry[int(a.info["perturbation"])] >= 2]
    if JUDGE_DIR.exists():
        shutil.rmtree(JUDGE_DIR)
    write_system_atomic(labeled_system(kept), JUDGE_DIR / "data")
    return entries


def retry_failed(work: Path, maxiter: int) -> list[dict]:
    """Rerun the judge's unconverged labels with MAXITER SCF steps in WORKDIR/retry/task.*; add the
    converged ones to the judge data and update their labels.json entries; returns the entries."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from spingen.data.npy import append_frames, load_system
    from spingen.labelers import create_labeler
    from spingen.schema import label_settings, load_param
    from spingen.stages.init import perturbed_frames

    param = judge_param()
    param["fp_gpaw"] = {**param["fp_gpaw"], "maxiter": maxiter, "retry_maxiter": None}
    work.mkdir(parents=True, exist_ok=True)
    (work / "param.json").write_text(json.dumps(param, indent=1) + "\n")
    loaded = load_param(work / "param.json")
    labeler = create_labeler(label_settings(loaded))
    geometries = perturbed_frames(EXAMPLE / "POSCAR.2x2x1", loaded.sys_format, loaded.init_gen, 0)
    stored = load_system(JUDGE_DIR / "data", require_spins=True).data
    entries = json.loads((JUDGE_DIR / "labels.json").read_text())
    states = list(JUDGE_STATES.values())
    tasks = []
    for index, entry in enumerate(entries):
        if entry["ok"]:
            continue
        atoms = geometries[index // len(states)]
        same = (np.isclose(stored["coords"], atoms.positions, atol=1e-6).all(axis=(1, 2))
                & np.isclose(stored["cells"], atoms.cell.array, atol=1e-6).all(axis=(1, 2)))
        if not same.any():
            raise SystemExit(f"{entry['task']}: the regenerated geometry matches no stored judge frame")
        task = work / "retry" / entry["task"]
        task.mkdir(parents=True, exist_ok=True)
        state = states[index % len(states)]
        moments = np.zeros(len(atoms))
        moments[[i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "Ni"]] = state
        labeler.write_inputs(task, atoms, moments, float(sum(state)))
        tasks.append((index, atoms, task))
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")

    def label(task: Path) -> None:
        subprocess.run([str(BIN / "spingen"), "label-task", str(task)], env=env, check=True)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(label, [task for _, _, task in tasks]))
    converged = []
    for index, atoms, task in tasks:
        result = labeler.read_result(task)
        entries[index].update(ok=result.ok, reason=result.reason, maxiter=maxiter)
        if result.ok:
            entries[index].update(energy=result.energy, moments=np.round(result.moments, 3).tolist(),
                                  total_moment=result.total_moment)
            converged.append((atoms, result))
    if converged:
        append_frames(JUDGE_DIR / "data", labeled_system(converged))
    return entries


def label(work: Path, param: dict) -> Path:
    """`spingen init` on param in WORKDIR (a rerun of the same param resumes); the folder of its labeled data."""
    text = json.dumps(param, indent=1) + "\n"
    if (work / "param.json").is_file() and (work / "param.json").read_text() != text:
        raise SystemExit(f"{work} holds a run of another param.json: give --workdir a folder of its own")
    work.mkdir(parents=True, exist_ok=True)
    (work / "param.json").write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    subprocess.run([str(BIN / "spingen"), "init", str(work / "param.json"), str(MACHINE), "-w", str(work)],
                   env=env, check=True)
    return work / "init" / "iter.000000" / "02.fp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="default /tmp/spin_judge (the judge), /tmp/spin_training_seedS_nN (--training-set)")
    parser.add_argument("--collect-finished", action="store_true",
                        help="write the judge from the runs finished so far (does not run anything)")
    parser.add_argument("--retry-failed", type=int, metavar="MAXITER",
                        help="rerun the stored judge's unconverged labels with MAXITER SCF steps")
    parser.add_argument("--training-set", type=Path, metavar="DIR",
                        help="label other geometries (--seed, --geometries) into DIR instead of the judge")
    parser.add_argument("--seed", type=int, default=None, help="the training set's geometries (not the judge's seed)")
    parser.add_argument("--geometries", type=int, default=TRAINING_GEOMETRIES,
                        help="the training set's number of geometries")
    args = parser.parse_args(argv)
    if args.training_set is None and (args.seed is not None or args.geometries != TRAINING_GEOMETRIES):
        parser.error("--seed and --geometries make a training set: give --training-set DIR")
    if args.training_set is not None:
        if args.seed is None or args.seed == JUDGE_SEED:
            parser.error(f"--training-set needs --seed other than the judge's ({JUDGE_SEED})")
        if args.geometries < 1:
            parser.error(f"--geometries must be >= 1, got {args.geometries}")
        if args.training_set.is_file() or (args.training_set / "data").is_file():
            parser.error(f"--training-set {args.training_set}: a folder is expected")
        work = Path(args.workdir or f"/tmp/spin_training_seed{args.seed}_n{args.geometries}")
        labeled = label(work, judge_param(args.seed, args.geometries))
        if (args.training_set / "data").exists():
            shutil.rmtree(args.training_set / "data")
        shutil.copytree(labeled / "data.000", args.training_set / "data")
        shutil.copy(labeled / "labels.json", args.training_set / "labels.json")
        print(f"training set written to {args.training_set / 'data'}")
        return 0
    work = Path(args.workdir or "/tmp/spin_judge")
    if args.retry_failed:
        entries = retry_failed(work, args.retry_failed)
        (JUDGE_DIR / "labels.json").write_text(json.dumps(entries, indent=1) + "\n")
        print(f"judge: {sum(e['ok'] for e in entries)} converged of {len(entries)} runs")
        return 0
    if args.collect_finished:
        entries = collect_finished(work)
        (JUDGE_DIR / "labels.json").write_text(json.dumps(entries, indent=1) + "\n")
        (JUDGE_DIR / "states.json").write_text(json.dumps(JUDGE_STATES, indent=1) + "\n")
        done = sum(e["ok"] for e in entries)
        print(f"judge written to {JUDGE_DIR}: {done} converged of {len(entries)} runs")
        return 0
    labeled = label(work, judge_param())
    if JUDGE_DIR.exists():
        shutil.rmtree(JUDGE_DIR)
    shutil.copytree(labeled / "data.000", JUDGE_DIR / "data")
    shutil.copy(labeled / "labels.json", JUDGE_DIR / "labels.json")
    (JUDGE_DIR / "states.json").write_text(json.dumps(JUDGE_STATES, indent=1) + "\n")
    print(f"judge written to {JUDGE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
