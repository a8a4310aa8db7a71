"""Ground-state search through a real deepmd-kit spin model: success, economy, throughput.

What is measured:

(a) search: a spin model (se_e2_a, small network) is trained here on a 32-atom LiNiO2-like cell
    (conftest's Li2Ni2O4 rocksalt cell repeated 2x2x1: 8 Li, 8 Ni, 16 O) with Morse energies and
    forces plus a spin energy (on-site e(|S|) + exchange J(r) S_i S_j between Ni, its position
    derivative included in the forces), moments drawn from +-{1, 3} uB. On each test frame (a new
    random perturbation of the cell) every one of the 4^8 / 2 = 32768 configurations (global
    sign fixed) is evaluated through `DeepmdSpinModel` (energy-only, batched) to get the
    exhaustive minimum of the model's own landscape; then `search_ground_state` (its defaults,
    GA with spin-force screening, a fresh counter per run) runs with each seed. Success: the
    search's best energy equals the exhaustive minimum (1e-7 eV). Evaluations used are the
    search's distinct configurations, as a share of 32768.
(b) throughput: configurations per second of `DeepmdSpinModel.evaluate` at population sizes
    1, 16, 64, 256 on its fixed-geometry path (with -dE/dS as the GA asks, and energy-only; with
    and without TorchScript optimisation) and with fast=False (one `DeepPot.eval` per batch),
    against plain `DeepPot.eval` one call per configuration; and the TorchScript warm-up of the
    first calls on a fresh load with and without jit optimisation.

Per-frame search results are appended to WORKDIR/search.jsonl and reused on a rerun with the
same settings, so a long run can be resumed. The results block of
docs/benchmarks/spin_search_deepmd.md (between its markers) is rewritten; the text around it is
kept.

Usage (CPU; long: the exhaustive enumerations dominate):

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/spin_search_deepmd.py \
        --workdir /tmp/spin_search_deepmd --frames 25 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
TYPE_MAP = ["Li", "Ni", "O"]
ETA, OFFSET = 0.3, 0.2
LEVELS = {"Ni": [1.0, 3.0]}
ONSITE = {"Ni": {1.0: 0.0, 3.0: 0.12}}  # eV per Ni
EXCHANGE = dict(strength=0.012, decay=0.6, r_ref=2.95, cutoff=4.5)  # eV/uB^2 at the Ni-Ni distance
DOC_BEGIN = "<!-- results:begin (written by benchmarks/spin_search_deepmd.py) -->"
DOC_END = "<!-- results:end -->"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DP_INTRA_OP_PARALLELISM_THREADS",
               "DP_INTER_OP_PARALLELISM_THREADS", "DP_INFER_BATCH_SIZE")


# ------------------------------------------------------------------ the cell and its data
def base_cell():
    from ase.build import bulk

    base = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    symbols = base.get_chemical_symbols()
    symbols[0], symbols[2] = "Li", "Li"
    base.set_chemical_symbols(symbols)
    return base.repeat((2, 2, 1))


def spin_energy(atoms, moments: np.ndarray) -> float:
    """On-site + exchange energy of the Ni moments (moments over all atoms)."""
    from spingen.spin.model import AnalyticSpinModel, Exchange

    model = AnalyticSpinModel(atoms.positions, atoms.cell.array, atoms.get_chemical_symbols(), ONSITE,
                              Exchange(**EXCHANGE))
    return float(model.evaluate(moments[model.magnetic_indices][None])[0][0])


def spin_forces(atoms, moments: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """-d(spin energy)/d(positions) by central differences (only Ni positions enter)."""
    forces = np.zeros((len(atoms), 3))
    for i in np.flatnonzero(np.array(atoms.get_chemical_symbols()) == "Ni"):
        for x in range(3):
            shifted = atoms.copy()
            shifted.positions[i, x] += h
            e_plus = spin_energy(shifted, moments)
            shifted.positions[i, x] -= 2 * h
            forces[i, x] = -(e_plus - spin_energy(shifted, moments)) / (2 * h)
    return forces


def perturbed(seed: int, rattle: float = 0.1):
    atoms = base_cell()
    atoms.rattle(rattle, seed=seed)
    return atoms


def write_data(path: Path, n_frames: int, seed: int) -> None:
    """deepmd/npy system with raw moments in spin.npy, as spingen stores data."""
    from ase.calculators.morse import MorsePotential

    rng = np.random.default_rng(seed)
    coords, boxes, energies, forces, spins = [], [], [], [], []
    for _ in range(n_frames):
        atoms = perturbed(int(rng.integers(1 << 30)))
        atoms.calc = MorsePotential(epsilon=0.3, r0=2.1, rho0=4.0)
        moments = np.zeros(len(atoms))
        ni = np.array(atoms.get_chemical_symbols()) == "Ni"
        moments[ni] = rng.choice([-3.0, -1.0, 1.0, 3.0], size=ni.sum())
        coords.append(atoms.positions.ravel())
        boxes.append(atoms.cell.array.ravel())
        energies.append(atoms.get_potential_energy() + spin_energy(atoms, moments))
        forces.append((atoms.get_forces() + spin_forces(atoms, moments)).ravel())
        spin = np.zeros((len(atoms), 3))
        spin[:, 2] = moments
        spins.append(spin.ravel())
    symbols = base_cell().get_chemical_symbols()
    path.mkdir(parents=True)
    (path / "type_map.raw").write_text("\n".join(TYPE_MAP) + "\n")
    (path / "type.raw").write_text("\n".join(str(TYPE_MAP.index(s)) for s in symbols) + "\n")
    sets = path / "set.000"
    sets.mkdir()
    for name, values in (("coord", coords), ("box", boxes), ("energy", energies), ("force", forces),
                         ("spin", spins)):
        np.save(sets / f"{name}.npy", np.array(values))


def training_param(steps: int) -> dict:
    return {
        "model": {
            "descriptor": {"type": "se_e2_a", "sel": [16, 16, 28], "rcut_smth": 0.5, "rcut": 4.5,
                           "neuron": [8, 16], "axis_neuron": 4},
            "fitting_net": {"neuron": [32, 32]},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.002, "stop_lr": 0.0001, "decay_steps": max(1, steps // 20)},
        "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 10, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"numb_steps": steps, "disp_freq": max(1, steps // 10), "save_freq": steps,
                     "training_data": {"batch_size": 4}},
    }


def train_model(root: Path, steps: int, n_frames: int, env: dict) -> dict:
    """Data, dp --pt train, freeze; returns what it took. Reuses a frozen model of the same settings."""
    from spingen.schema import SpinSettings
    from spingen.stages.train import read_lcurve, training_input, write_training_data

    model = root / "frozen_model.pth"
    settings = root / "train_settings.json"
    wanted = {"steps": steps, "frames": n_frames, "param": training_param(steps), "onsite": repr(ONSITE),
              "exchange": EXCHANGE}
    if model.is_file() and settings.is_file() and json.loads(settings.read_text())["wanted"] == wanted:
        return json.loads(settings.read_text())["report"]
    for old in ("raw", "data"):
        if (root / old).exists():
            import shutil
            shutil.rmtree(root / old)
    t0 = time.perf_counter()
    write_data(root / "raw", n_frames, seed=7)
    spin = SpinSettings(True, ("Ni",), ETA, OFFSET, "auto", 0.05, "augment")
    written = write_training_data([root / "raw"], root / "data", TYPE_MAP, spin)
    inp = training_input(training_param(steps), TYPE_MAP, spin, ["data/sys.000"], seed=11)
    (root / "input.json").write_text(json.dumps(inp, indent=1))
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(root / "train.log", "w") as log:
        subprocess.run([str(BIN / "dp"), "--pt", "train", "input.json"], cwd=root, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
        subprocess.run([str(BIN / "dp"), "--pt", "freeze", "-o", model.name], cwd=root, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    t_train = time.perf_counter() - t0
    report = {"data_s": t_data, "train_freeze_s": t_train, "frames": n_frames, "twins": written[0][2],
              "steps": steps, "lcurve": read_lcurve(root / "lcurve.out")}
    settings.write_text(json.dumps({"wanted": wanted, "report": report}, indent=1))
    return report


# ------------------------------------------------------------------ (a) search vs exhaustive
def search_frames(dp, n_frames: int, seeds: list[int], batch: int, store: Path, key: str) -> list[dict]:
    from spingen.deepmd_model import DeepmdSpinModel
    from spingen.spin import MomentLevels, SpinEncoding, search_ground_state
    from spingen.spin.model import AnalyticSpinModel, Exchange

    encoding = SpinEncoding(("Ni",), ETA, OFFSET)
    done = {}
    if store.is_file():
        for line in store.read_text().splitlines():
            row = json.loads(line)
            if row["key"] == key:
                done[row["frame"]] = row
    rows = []
    t_start = time.perf_counter()
    for f in range(n_frames):
        if f in done:
            rows.append(done[f])
            continue
        atoms = perturbed(seed=100_000 + f)
        symbols = atoms.get_chemical_symbols()
        levels = MomentLevels(LEVELS, symbols)
        model = DeepmdSpinModel.from_atoms(atoms, dp, encoding, batch_size=batch)
        t0 = time.perf_counter()
        every, energies = [], []
        for chunk in levels.iter_moments(chunk_size=4 * batch):
            every.append(chunk)
            energies.append(model.evaluate(chunk)[0])
        every, energies = np.concatenate(every), np.concatenate(energies)
        t_exh = time.perf_counter() - t0
        order = np.argsort(energies)
        e_min = float(energies[order[0]])
        truth = AnalyticSpinModel(atoms.positions, atoms.cell.array, symbols, ONSITE, Exchange(**EXCHANGE))
        truth_e = truth.evaluate(every)[0]
        row = {"key": key, "frame": f, "n_configurations": int(levels.n_configurations),
               "exhaustive_s": t_exh, "exhaustive_min": e_min,
               "gap_meV": 1000 * float(energies[order[1]] - e_min),
               "model_min_is_analytic_min": bool(int(np.argmin(truth_e)) == int(order[0])),
               "energy_path": model.path, "runs": []}
        for seed in seeds:
            searcher = DeepmdSpinModel.from_atoms(atoms, dp, encoding, batch_size=batch)
            t0 = time.perf_counter()
            result = search_ground_state(searcher, levels, seed=seed)
            row["runs"].append({
                "seed": seed, "success": bool(result.best_energy <= e_min + 1e-7),
                "excess_meV": 1000 * (result.best_energy - e_min), "n_evaluations": int(result.n_evaluations),
                "n_calls": int(searcher.n_calls), "generations": int(result.n_generations),
                "method": result.method, "seconds": time.perf_counter() - t0})
        with open(store, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        new = sum(1 for r in rows if r["frame"] not in done)
        eta = elapsed / max(new, 1) * (n_frames - f - 1)
        ok = sum(r["success"] for r in row["runs"])
        print(f"frame {f + 1}/{n_frames}: exhaustive {t_exh:.1f} s, search ok {ok}/{len(seeds)}, "
              f"evals {[r['n_evaluations'] for r in row['runs']]}; ETA {eta / 60:.1f} min", flush=True)
    return rows


# ------------------------------------------------------------------ (b) throughput
def timed(fn, min_time: float = 2.0, min_reps: int = 3) -> float:
    """Seconds per call, median of repetitions, run until min_time and min_reps are both reached."""
    times = []
    t_all = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - t_all < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return float(np.median(times))


def throughput(model_path: Path, sizes: list[int], min_time: float) -> dict:
    import torch
    from deepmd.infer import DeepPot

    from spingen.deepmd_model import DeepmdSpinModel
    from spingen.spin import SpinEncoding

    encoding = SpinEncoding(("Ni",), ETA, OFFSET)
    atoms = perturbed(seed=424242)
    dp = DeepPot(str(model_path))
    rng = np.random.default_rng(0)

    warm = {}
    for optimize in (False, True):  # first calls on a fresh load
        fresh = DeepPot(str(model_path))
        m = DeepmdSpinModel.from_atoms(atoms, fresh, encoding, optimize_jit=optimize)
        calls = []
        for grad in (True, True, True, False, False, False):
            s = rng.choice([-3.0, -1.0, 1.0, 3.0], size=(16, 8))
            t0 = time.perf_counter()
            m.evaluate(s, gradient=grad)
            calls.append(time.perf_counter() - t0)
        warm["optimize_jit" if optimize else "no_optimize"] = calls

    rows = []
    variants = {"fast": dict(), "fast_jitopt": dict(optimize_jit=True), "eval": dict(fast=False)}
    models = {name: DeepmdSpinModel.from_atoms(atoms, dp, encoding, **kw) for name, kw in variants.items()}
    for m in models.values():  # past the profiling executor's warm-up on every path
        for _ in range(3):
            m.evaluate(rng.choice([-3.0, 3.0], size=(4, 8)), gradient=True)
            m.evaluate(rng.choice([-3.0, 3.0], size=(4, 8)))
    coords = atoms.positions.reshape(1, -1)
    cell = atoms.cell.array.reshape(1, 9)
    for n in sizes:
        s = rng.choice([-3.0, -1.0, 1.0, 3.0], size=(n, 8))
        spin = models["fast"].spin_vectors(s)
        atype = models["fast"].atom_types

        def per_frame():
            for k in range(n):
                dp.eval(coords, cell, atype, spin=spin[k: k + 1])

        row = {"population": n}
        for name, fn in (
            ("fast_grad", lambda: models["fast"].evaluate(s, gradient=True)),
            ("fast_energy", lambda: models["fast"].evaluate(s)),
            ("fast_grad_jitopt", lambda: models["fast_jitopt"].evaluate(s, gradient=True)),
            ("fast_energy_jitopt", lambda: models["fast_jitopt"].evaluate(s)),
            ("eval_batch", lambda: models["eval"].evaluate(s, gradient=True)),
            ("deeppot_per_frame", per_frame),
        ):
            if name == "deeppot_per_frame":
                with torch.jit.optimized_execution(True):  # DeepPot as a user calls it
                    sec = timed(fn, min_time)
            else:
                sec = timed(fn, min_time)
            row[name] = n / sec
        rows.append(row)
        print("throughput", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {"warmup": warm, "rows": rows, "natoms": len(atoms), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------ report
def machine_info() -> dict:
    cpu, mem = "unknown", ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        mem = next(f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
                   for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    versions = {}
    for name in ("deepmd-kit", "torch", "numpy"):
        try:
            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = "?"
    return {"uname": " ".join(platform.uname()), "cpu": cpu, "nproc": len(os.sched_getaffinity(0)),
            "memory": mem, "python": platform.python_version(), "versions": versions,
            "threads_env": {k: os.environ.get(k, "(unset)") for k in THREAD_VARS}}


def search_version() -> str:
    """sha1 of spingen/spin/search.py and the defaults of search_ground_state (they are being tuned)."""
    import inspect

    from spingen.spin import search

    digest = hashlib.sha1(Path(search.__file__).read_bytes()).hexdigest()[:12]
    params = inspect.signature(search.search_ground_state).parameters
    defaults = ", ".join(f"{k}={v.default}" for k, v in params.items() if v.default is not inspect.Parameter.empty)
    return f"spingen/spin/search.py sha1 {digest}; search_ground_state defaults: {defaults}"


def summarize(rows: list[dict]) -> dict:
    runs = [r for row in rows for r in row["runs"]]
    n_conf = rows[0]["n_configurations"] if rows else 0
    evals = np.array([r["n_evaluations"] for r in runs], dtype=float)
    fails = [(row["frame"], r["seed"], round(r["excess_meV"], 3)) for row in rows for r in row["runs"]
             if not r["success"]]
    return {
        "frames": len(rows), "runs": len(runs), "success": sum(r["success"] for r in runs),
        "n_configurations": n_conf,
        "evals_mean": float(evals.mean()) if runs else float("nan"),
        "evals_median": float(np.median(evals)) if runs else float("nan"),
        "evals_p90": float(np.percentile(evals, 90)) if runs else float("nan"),
        "evals_max": float(evals.max()) if runs else float("nan"),
        "calls_mean": float(np.mean([r["n_calls"] for r in runs])) if runs else float("nan"),
        "generations_mean": float(np.mean([r["generations"] for r in runs])) if runs else float("nan"),
        "search_s_mean": float(np.mean([r["seconds"] for r in runs])) if runs else float("nan"),
        "exhaustive_s_mean": float(np.mean([row["exhaustive_s"] for row in rows])) if rows else float("nan"),
        "gap_meV_median": float(np.median([row["gap_meV"] for row in rows])) if rows else float("nan"),
        "gap_meV_min": float(np.min([row["gap_meV"] for row in rows])) if rows else float("nan"),
        "model_min_is_analytic_min": sum(row["model_min_is_analytic_min"] for row in rows),
        "energy_paths": sorted({row["energy_path"] for row in rows}),
        "failures": fails,
    }


def render(info: dict, args, command: str, train: dict, search: dict, thr: dict, memory: dict,
           started: str, load: tuple[str, str], wall: float) -> str:
    def f(x, nd=1):
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:,.{nd}f}"

    lines = [DOC_BEGIN, "", f"Run {started}, {wall / 60:.1f} min wall in all. Command:", "", "```",
             command, "```", "", "Machine:", "",
             f"- `uname -a`: {info['uname']}",
             f"- CPU: {info['cpu']}; nproc {info['nproc']}; memory {info['memory']}",
             f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- threads: torch.get_num_threads() = {thr.get('torch_threads', '?')}; "
             + ", ".join(f"{k}={v}" for k, v in info["threads_env"].items()),
             f"- load average (1 min) at start / end: {load[0]} / {load[1]} (other engineers' jobs shared the "
             "2 cores; wall times are affected, the counts are not)",
             f"- peak RSS: this process {memory['self_MiB']:.0f} MiB; children (dp train/freeze) "
             f"{memory['children_MiB']:.0f} MiB", "",
             "Model: se_e2_a (neuron [8, 16], axis 4, rcut 4.5 A, sel [16, 16, 28]), fitting [32, 32], spin on Ni "
             f"(eta {ETA} A/uB, d {OFFSET} A); {train['frames']} training frames + {train['twins']} reversed twins, "
             f"{train['steps']} steps, batch 4; data {f(train['data_s'])} s, train+freeze {f(train['train_freeze_s'])} s; "
             "last lcurve row: " + ", ".join(f"{k} {v:.3g}" for k, v in train["lcurve"].items()), ""]
    if search["frames"]:
        s = search
        lines += [
            "### (a) search vs exhaustive enumeration",
            "",
            f"32-atom cell, 8 Ni x 4 levels (+-1, +-3 uB), global sign fixed: {s['n_configurations']} configurations "
            f"per frame. {s['frames']} perturbed frames x {len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))})"
            f" = {s['runs']} searches with `search_ground_state` defaults.",
            "",
            f"Search code: {search_version()}.",
            "",
            "| quantity | value |", "|---|---|",
            f"| success (best = exhaustive minimum) | {s['success']}/{s['runs']} ({100 * s['success'] / s['runs']:.1f}%) |",
            f"| evaluations per search: mean / median / p90 / max | {f(s['evals_mean'])} / {f(s['evals_median'], 0)} / "
            f"{f(s['evals_p90'], 0)} / {f(s['evals_max'], 0)} |",
            f"| ... as % of exhaustive (mean / max) | {100 * s['evals_mean'] / s['n_configurations']:.2f}% / "
            f"{100 * s['evals_max'] / s['n_configurations']:.2f}% |",
            f"| model calls (batches) per search, mean | {f(s['calls_mean'])} |",
            f"| GA generations per search, mean | {f(s['generations_mean'])} |",
            f"| wall per search, mean | {f(s['search_s_mean'], 2)} s |",
            f"| wall per exhaustive enumeration, mean | {f(s['exhaustive_s_mean'])} s (energy path: "
            f"{', '.join(s['energy_paths'])}) |",
            f"| gap ground -> 1st excited state (model), median / min | {f(s['gap_meV_median'], 2)} / "
            f"{f(s['gap_meV_min'], 3)} meV |",
            f"| frames whose model minimum is the analytic (training-law) minimum | {s['model_min_is_analytic_min']}/"
            f"{s['frames']} |",
            "",
            "Failures (frame, seed, excess meV): " + (", ".join(map(str, s["failures"])) or "none"), ""]
    if thr:
        lines += ["### (b) throughput (configurations per second, 32-atom cell, one geometry)", "",
                  "Steady state (after warm-up calls). All columns but the last are `DeepmdSpinModel.evaluate` on "
                  "the whole population in one call: `fast` = fixed-geometry path (`grad` = with -dE/dS, as the "
                  "GA asks; `energy` = energy only), `jitopt` = the same with `optimize_jit=True`, `fast=False` = "
                  "one `DeepPot.eval` per batch (energy, forces, virial, force_mag). `DeepPot per frame` = plain "
                  "`DeepPot.eval` one call per configuration (default TorchScript settings).", "",
                  "| population | fast, grad | fast, energy | fast, grad, jitopt | fast, energy, jitopt "
                  "| fast=False (DeepPot.eval per batch) | DeepPot.eval per frame |", "|---|---|---|---|---|---|---|"]
        for r in thr["rows"]:
            lines.append(f"| {r['population']} | {f(r['fast_grad'])} | {f(r['fast_energy'])} | "
                         f"{f(r['fast_grad_jitopt'])} | {f(r['fast_energy_jitopt'])} | "
                         f"{f(r['eval_batch'])} | {f(r['deeppot_per_frame'])} |")
        lines += ["", "First calls on a freshly loaded model (seconds; 3 calls with -dE/dS then 3 energy-only, "
                  "16 configurations each):", ""]
        for name, calls in thr["warmup"].items():
            lines.append(f"- {name}: " + ", ".join(f"{c:.3f}" for c in calls))
        lines.append("")
    lines.append(DOC_END)
    return "\n".join(lines)


DOC_TEMPLATE = """# Spin search through a deepmd-kit spin model

`benchmarks/spin_search_deepmd.py`: how often `search_ground_state` finds the exhaustive minimum of
a real (small) deepmd-kit spin model's landscape, how many evaluations it spends, and how fast
`spingen.deepmd_model.DeepmdSpinModel` evaluates configurations compared with plain
`DeepPot.eval`. The block below is rewritten by each run; see the script's docstring for what
exactly is measured.

{results}
"""


def write_doc(path: Path, block: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else ""
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        path.write_text(head + block + rest.split(DOC_END, 1)[1])
    else:
        path.write_text(DOC_TEMPLATE.format(results=block))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/spin_search_deepmd", help="folder for data, model, results")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--train-frames", type=int, default=60, help="training frames (default 60)")
    parser.add_argument("--frames", type=int, default=100, help="test frames for (a) (default 100; 0 skips (a))")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="GA seeds per frame (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="DeepmdSpinModel batch_size (default 256)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 16, 64, 256], help="populations for (b)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per throughput cell")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "spin_search_deepmd.md"))
    args = parser.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.perf_counter()
    load0 = f"{os.getloadavg()[0]:.2f}"
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    train = train_model(root, args.steps, args.train_frames, env)
    print("model:", train, flush=True)

    from deepmd.infer import DeepPot

    model_path = root / "frozen_model.pth"
    key = hashlib.sha1(model_path.read_bytes() + json.dumps([args.seeds, args.batch_size, search_version()]).encode()
                       ).hexdigest()[:12]
    rows = search_frames(DeepPot(str(model_path)), args.frames, args.seeds, args.batch_size,
                         root / "search.jsonl", key) if args.frames else []
    search = summarize(rows)
    thr = throughput(model_path, args.sizes, args.min_time) if args.sizes else {}
    memory = {"self_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "children_MiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    command = "PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/spin_search_deepmd.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    block = render(info, args, command, train, search, thr, memory, started,
                   (load0, f"{os.getloadavg()[0]:.2f}"), time.perf_counter() - t_start)
    (root / "summary.json").write_text(json.dumps({"train": train, "search": search, "throughput": thr,
                                                   "memory": memory, "machine": info}, indent=1))
    write_doc(Path(args.output), block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
