"""Cost of spin-minimized MD: wall time per MD step with re-optimized moments vs fixed moments.

What runs (one process, one model, one start structure):

* the model: a paper-size se_e2_a spin model (embedding [25, 50, 100], axis 16, fitting
  [240, 240, 240], rcut 6 A, sel [40, 40, 80]) trained for ONE step on 8-atom LiNiO2-like frames
  and frozen, i.e. essentially UNTRAINED: its cost per evaluation is that of a production model,
  its energy landscape over moments is not a physical one (so the spin-change counts say how the
  search behaves on a rough landscape, not how often LiNiO2 moments flip);
* the cell: 64 atoms, Li16Ni16O32 (the 8-atom rocksalt-ordered cell of the tests repeated 2x2x2,
  rattled), 16 magnetic Ni with magnitudes {1, 3} uB (4 levels each: 2^31 configurations with the
  global sign fixed; the genetic search runs, never enumeration);
* the ground state of the start geometry is searched once (cold); every run below starts from it;
* for each setting, `run_md` (spingen.md) NVT Langevin at 600 K, dt 2 fs, from the same start and
  seed, no frames written: spin_opt_freq 0 (fixed moments: one DeepPot.eval per step, the
  baseline; `--steps` steps) and spin_opt_freq 1, 5, 20 (a warm-started search every N steps;
  max(--steps-search, --min-searches x N) steps), then spin_opt_freq 1 with budgeted search
  settings (`--variants`). Wall time per step excludes step 0. Counted: searches, searches that
  changed the moments, configurations evaluated, and where the time went (calculator timers +
  cProfile of the energy model's `evaluate`, i.e. the deepmd-kit calls of the searches).
* the cost of one written frame of an explore task (2-model ensemble): deviations + the spin
  disagreement (one search per model).

Usage (minutes; nothing else heavy should run meanwhile):

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explore.py

writes the results into docs/benchmarks/explore.md between the result markers.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_block import time_two_frames, write_results

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "benchmarks" / "explore.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/explore.py) -->"
DOC_END = "<!-- results:end -->"
TYPE_MAP = ["Li", "Ni", "O"]
MAGNITUDES = {"Ni": [1.0, 3.0]}


def base_cell():
    from ase.build import bulk

    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    symbols = atoms.get_chemical_symbols()
    symbols[0], symbols[2] = "Li", "Li"
    atoms.set_chemical_symbols(symbols)
    return atoms


def write_data(path: Path, n_frames: int = 8) -> None:
    """8-atom frames with Morse energies/forces and random moments (only to let deepmd-kit start)."""
    from ase.calculators.morse import MorsePotential

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n_frames):
        atoms = base_cell()
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = MorsePotential(epsilon=0.3, r0=2.1, rho0=4.0)
        moments = np.where(atoms.symbols == "Ni", rng.choice([1.0, -1.0, 3.0, -3.0], size=len(atoms)), 0.0)
        frames.append((atoms, atoms.get_potential_energy(), atoms.get_forces(), moments))
    from spingen.data.npy import write_frames

    write_frames(path, frames, TYPE_MAP)


def paper_size_models(workdir: Path, n_models: int) -> list[Path]:
    """Frozen paper-size spin models trained for one step (different seeds); reused if present."""
    from spingen.schema import SpinSettings
    from spingen.stages.train import training_input, write_training_data

    spin = SpinSettings(True, ("Ni",), 0.3, 0.2, "auto", 0.05, "augment")
    models = [workdir / f"{k:03d}" / "frozen_model.pth" for k in range(n_models)]
    if all(m.is_file() for m in models):
        return models
    if not (workdir / "raw").exists():
        write_data(workdir / "raw")
        write_training_data([workdir / "raw"], workdir / "data", TYPE_MAP, spin)
    param = {
        "model": {"descriptor": {"type": "se_e2_a", "sel": [40, 40, 80], "rcut_smth": 0.5, "rcut": 6.0,
                                 "neuron": [25, 50, 100], "axis_neuron": 16},
                  "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True}},
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 0.001, "decay_steps": 100},
        "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1},
        "training": {"numb_steps": 1, "disp_freq": 1, "save_freq": 1, "training_data": {"batch_size": 1}},
    }
    for k, model in enumerate(models):
        task = model.parent
        task.mkdir(parents=True, exist_ok=True)
        (task / "input.json").write_text(json.dumps(training_input(param, TYPE_MAP, spin, ["../data/sys.000"], k + 1)))
        for command in ("train input.json", f"freeze -o {model.name}"):
            subprocess.run([str(BIN / "dp"), "--pt", *command.split()], cwd=task, check=True, capture_output=True)
        spin.encoding.save(task / "spin_encoding.json")
    return models


def start_cell():
    atoms = base_cell().repeat((2, 2, 2))
    atoms.rattle(0.03, seed=7)
    return atoms


def model_time(profile: cProfile.Profile) -> float:
    """Seconds inside the energy model's ``evaluate`` (every deepmd-kit call the searches make)."""
    stats = pstats.Stats(profile)
    return sum(cumtime for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items()
               if filename.endswith(os.path.join("spingen", "spin", "model.py")) and name == "evaluate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="MD steps at fixed spins and the least per setting")
    parser.add_argument("--min-searches", type=int, default=2,
                        help="each setting runs max(--steps-search, min-searches * spin_opt_freq) steps")
    parser.add_argument("--steps-search", type=int, default=10, help="steps of a spin_opt_freq 1 setting")
    parser.add_argument("--freqs", type=int, nargs="*", default=[1, 5, 20], help="spin_opt_freq settings with the default search")
    parser.add_argument("--variants", nargs="*", default=['{"max_evaluations": 8}',
                                                          '{"max_evaluations": 8, "use_gradient": false}',
                                                          '{"max_evaluations": 16, "use_gradient": false}'],
                        help="extra spin_opt_freq 1 settings: JSON spin-search keyword arguments")
    parser.add_argument("--workdir", default="/tmp/spingen_bench_explore")
    parser.add_argument("--no-doc", action="store_true", help="print only, do not edit docs/benchmarks/explore.md")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    models = paper_size_models(workdir, 2)
    t_models = time.perf_counter() - t0

    from deepmd.infer import DeepPot

    from spingen.md import SpinModelCalculator

    dps = [DeepPot(str(m)) for m in models]
    atoms = start_cell()
    cold = SpinModelCalculator(dps[:1], MAGNITUDES, drive=0, seed=1)
    atoms.calc = cold
    t0 = time.perf_counter()
    atoms.get_potential_energy()
    t_cold = time.perf_counter() - t0
    ground = atoms.get_magnetic_moments()
    print(f"cold search: {t_cold:.1f} s, {cold.n_search_evaluations} configurations", flush=True)

    fixed = SpinModelCalculator(dps[:1], MAGNITUDES, drive=0, spin_opt_freq=0, moments=ground)
    probe = start_cell()
    probe.calc = fixed
    probe.get_potential_energy()
    t0 = time.perf_counter()
    for _ in range(5):
        probe.positions[0, 0] += 1e-3
        probe.get_potential_energy()
    t_eval = (time.perf_counter() - t0) / 5
    model = fixed.spin_model(probe)
    m = ground[model.magnetic_indices]
    model.evaluate(m[None])  # first use checks the forward-only path against DeepPot.eval
    t0 = time.perf_counter()
    model.evaluate(np.repeat(m[None], 8, axis=0))
    t_forward = (time.perf_counter() - t0) / 8
    path = getattr(model, "path", None) or getattr(model, "energy_path", "")
    print(f"one evaluation: {t_eval:.3f} s; energy only, batch of 8: {t_forward:.3f} s per configuration "
          f"({path})", flush=True)

    settings = [(0, {}, args.steps)] + [(f, {}, max(args.steps_search, args.min_searches * f)) for f in args.freqs]
    settings += [(1, json.loads(v), args.steps_search) for v in args.variants]
    results = []
    for freq, search, steps in settings:
        r = measure_schedule(dps, ground, freq, steps, search)
        results.append(r)
        print(json.dumps(r), flush=True)

    # one frame of an explore task: 2-model deviations + spin disagreement
    frame_atoms = start_cell()
    frame_calc = SpinModelCalculator(dps, MAGNITUDES, drive=0, spin_opt_freq=0, moments=ground)
    frame_atoms.calc = frame_calc
    frame_atoms.get_potential_energy()
    t_frame, frame_split, t_next = time_two_frames(frame_calc, frame_atoms, workdir / "frame")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = report(started, load_before, os.getloadavg(), t_models, t_cold, cold.n_search_evaluations, t_eval,
                  t_forward, results, t_frame, frame_split, t_next, peak)
    print(text)
    if not args.no_doc:
        write_results(DOC, DOC_BEGIN, DOC_END, text)
    return 0


def measure_schedule(dps, ground, freq: int, steps: int, search: dict) -> dict:
    """Like `measure`, but frames never force a search: only spin_opt_freq decides (trj_freq 0)."""
    from spingen.md import SpinModelCalculator, run_md

    atoms = start_cell()
    calc = SpinModelCalculator(dps[:1], MAGNITUDES, drive=0, spin_opt_freq=freq, moments=ground, search=search,
                               seed=5)
    atoms.calc = calc
    atoms.get_potential_energy()  # step 0 outside the timing (a warm search from the ground state)
    base = dict(calc.timings)
    n0 = (calc.n_searches, calc.n_spin_changes, calc.n_search_evaluations)
    profile = cProfile.Profile()
    profile.enable()
    t0 = time.perf_counter()
    run_md(atoms, calc, "nvt", 600, nsteps=steps, dt_fs=2.0, trj_freq=0, seed=3, init_velocities=True)
    wall = time.perf_counter() - t0
    profile.disable()
    timings = {k: calc.timings[k] - base[k] for k in base}
    in_model = model_time(profile)
    return {"freq": freq, "search": search, "steps": steps, "wall_per_step": wall / steps,
            "searches": calc.n_searches - n0[0],
            "changes": calc.n_spin_changes - n0[1], "configurations": calc.n_search_evaluations - n0[2],
            "timings": timings, "search_model_s": in_model}


def report(started, load_before, load_after, t_models, t_cold, cold_configs, t_eval, t_forward, results, t_frame,
           frame_split, t_next, peak) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import deepmd
    import torch

    base = results[0]["wall_per_step"]
    lines = [
        f"Measured {started}.",
        "",
        f"- machine: `{' '.join(platform.uname())}`",
        f"- CPU: {cpu}, nproc {os.cpu_count()}; torch threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
        f"- Python {platform.python_version()}, deepmd-kit {deepmd.__version__}, torch {torch.__version__}; "
        f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}",
        f"- peak RSS of the benchmark process: {peak:.0f} MiB",
        "- model: paper-size se_e2_a (25/50/100, fitting 240x3, rcut 6 A), UNTRAINED (1 training step); "
        + (f"making 2 such models took {t_models:.0f} s" if t_models >= 1 else "the 2 models were reused from the "
           "work dir"),
        "- cell: Li16Ni16O32, 64 atoms, 16 magnetic Ni, levels +-1, +-3 uB; NVT Langevin 600 K, dt 2 fs",
        f"- one DeepPot.eval of the cell (energy, forces, virial): {t_eval:.3f} s; energy only (forward-only path, "
        f"batch of 8): {t_forward:.3f} s per configuration; cold ground-state search of the start geometry: "
        f"{t_cold:.1f} s ({cold_configs} configurations)",
        "",
        "| spin_opt_freq | search settings | MD steps | s / MD step | ratio to fixed spins | searches | moments "
        "changed | configurations / search | search s | of which model evaluations s | MD evaluations s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_search = r["configurations"] / r["searches"] if r["searches"] else 0
        name = "0 (fixed)" if r["freq"] == 0 else str(r["freq"])
        settings = json.dumps(r["search"]) if r["search"] else "defaults"
        lines.append(f"| {name} | {settings} | {r['steps']} | {r['wall_per_step']:.3f} | "
                     f"{r['wall_per_step'] / base:.2f} | {r['searches']} | {r['changes']} | {per_search:.1f} | "
                     f"{r['timings']['search']:.1f} | {r['search_model_s']:.1f} | {r['timings']['evaluate']:.1f} |")
    lines += ["", f"One written frame of an explore task with 2 models (deviations + spin disagreement, one "
                  f"search per model): {t_frame:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                      frame_split.items()) + "); "
              f"the next frame (atoms moved by 0.02 A rms; each member warm-starts from its own previous "
              f"search): {t_next:.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
