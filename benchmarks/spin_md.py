"""Exactness and cost of spin-minimized MD with a TRAINED LiNiO2 spin model (issue #20).

What runs:

* models: two LiNiO2 spin models (canonical sign, eta 0.3, d 0.2, the paper benchmark's network and
  its energy-weighted loss), trained `--train-steps` steps on every frame of
  benchmarks/paper/data/linio2 (GPAW DFT+U, 8-atom cells in several states) with seeds 1 and 2,
  by spingen's own train-stage functions and `dp --pt`; reused from --workdir when present;
* the cell: the 8-atom cell of benchmarks/paper/linio2/POSCAR repeated `--repeat` (default 3x1x1:
  24 atoms, 6 Ni, the spin-loop benchmark's supercell; 2x2x1: 32 atoms, 8 Ni), rattled; Ni levels
  1.671 and 1.86 uB (the two the data holds, told apart at tol 0.1), 4 signed per ion: 4^6 / 2 =
  2,048 configurations with the global sign fixed (8 Ni: 32,768). The default search enumerates
  up to 2,048, so for 6 Ni a full search is an enumeration (about 20 s here): too costly at every
  MD step, cheap enough once per sampled frame for the truth;
* for each setting: `run_md` (spingen.md) NVT Langevin at `--temperature`, dt 2 fs, same start
  and seed, cold start (the first search is the setting's own); spin_opt_freq 0 (fixed moments)
  is the cost baseline, in the same process. Every `--sample-every` steps (every 10th sample for
  the budgeted search) the geometry and the moments the calculator holds are kept; afterwards each
  distinct sampled geometry is enumerated with the driving model (`--workers` processes): exact %
  of the samples and the mean excess energy of the misses;
* the explore task's frames (2-model ensemble, a frame every `--trj-freq` steps of `--frame-steps`):
  seconds of the spin disagreement per frame with the members' states kept from frame to frame (the
  default) and computed afresh at the same frames, and the non-driving member's state both ways
  against its own exhaustive minimum (`--frames-only`: this and the fixed-moment baseline alone,
  written to its own block; `--no-frames`: without it). Each temperature and cell (`--repeat`) other
  than 900 K and 3x1x1 writes blocks of its own.

Usage (about 30 min on 2 cores with the models trained; training adds ~25 min):

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_md.py

writes the results into docs/benchmarks/spin_md.md between the result markers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "paper"))
import accuracy  # noqa: E402  (the paper benchmark's network, loss and training)
from results_block import cpu_model, write_if_marked  # noqa: E402

DATA = HERE / "paper" / "data" / "linio2"
POSCAR = HERE / "paper" / "linio2" / "POSCAR"
TYPE_MAP = ["Li", "Ni", "O"]
MAGNETIC = ("Ni",)
DOC = REPO / "docs" / "benchmarks" / "spin_md.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/spin_md.py) -->"
DOC_END = "<!-- results:end -->"
# name -> (spin_opt_freq, search settings, certificate settings or None, judged every k-th sample); the first
# is the cost baseline (not judged). Exact settings share one trajectory, so their truth is computed once.
SETTINGS = {
    "fixed moments": (0, {}, None, 0),
    "default (certificate)": (1, {}, {}, 1),
    "certificate, no state memory": (1, {}, {"remembered_states": 0}, 1),
    "certificate, single-ion moves only": (1, {}, {"pair_limit": 0, "exchange_limit": 0}, 1),
    "certificate with exchanges": (1, {}, {"exchange_limit": 1000}, 1),  # (the default's since 2026-12-07 for 27 Ni)
    "certificate, no exchanges": (1, {}, {"exchange_limit": 0}, 1),  # (the default before 2026-12-07)
    "certificate, every competitor at max_age": (1, {}, {"backstop_age": 20}, 1),  # (before 2026-12-06)
    "certificate, no probes": (1, {}, {"probes": 0}, 1),  # every unmeasured competitor at once (before probes)
    "search every step": (1, {}, None, 1),  # (--search-steps steps)
    "budget 8 every step": (1, {"max_evaluations": 8}, None, 10),
}


def trained_models(workdir: Path, steps: int, seeds=(1, 2)) -> list[Path]:
    """Frozen canonical-sign LiNiO2 spin models, one per seed (reused when trained from the same input)."""
    param = accuracy.training_param(steps, (1.0, 50.0), (10.0, 1.0))
    folders = [accuracy.prepare(f"canonical_seed{seed}", workdir, DATA, True, 0.3, 0.2, param, seed, MAGNETIC,
                                TYPE_MAP, symmetry="canonical") for seed in seeds]
    with ThreadPoolExecutor(len(folders)) as pool:
        list(pool.map(accuracy.train, folders))
    return [f / "frozen_model.pth" for f in folders]


DEFAULT_REPEAT = (3, 1, 1)
REPEAT = list(DEFAULT_REPEAT)  # set from --repeat
PRIMITIVE = [False]  # set from --primitive
# the 8-atom cell's cations alternate in layers normal to a; its primitive cell (Li Ni O2) in its lattice vectors
TO_PRIMITIVE = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]])  # right-handed: deepmd-kit needs det > 0
ENUMERATE_TRUTH = 2 ** 16  # larger moment spaces are judged against the best of long searches
TRUTH_SEEDS = (0, 1, 2)  # the cold searches of that judgment
TRUTH_SEARCH = {"population": 32, "patience": 40, "use_gradient": False}  # longer than the default (27, 27)


def start_cell():
    """The explored cell: the LiNiO2 8-atom cell (2 Ni), or its 4-atom primitive cell (1 Ni) with
    --primitive, repeated REPEAT, rattled."""
    from ase.io import read

    conventional = read(POSCAR)
    if PRIMITIVE[0]:
        conventional = primitive_cell(conventional)
    atoms = conventional.repeat(tuple(REPEAT))
    atoms.rattle(0.03, seed=7)
    return atoms


def primitive_cell(conventional):
    """The primitive cell of the 8-atom cell: its atoms that are distinct under TO_PRIMITIVE's lattice."""
    from ase import Atoms

    cell = TO_PRIMITIVE @ conventional.cell.array
    scaled = np.round(np.linalg.solve(cell.T, conventional.positions.T).T, 6) % 1.0
    _, first = np.unique(np.round(scaled, 4) % 1.0, axis=0, return_index=True)
    first = np.sort(first)
    assert len(first) == len(conventional) // 2, "TO_PRIMITIVE is not a primitive cell of the 8-atom cell"
    return Atoms([conventional[i].symbol for i in first], scaled_positions=scaled[first], cell=cell, pbc=True)


def run_setting(dps, magnitudes, name: str, steps: int, sample_every: int, temperature: float,
                judged: bool = True) -> dict:
    """NVT MD of one setting from a cold start; wall per step (step 0 excluded), counters, sampled geometries
    (none when not judged)."""
    from spingen.md import SpinModelCalculator, run_md

    freq, search, certify, thin = SETTINGS[name]
    thin = thin if judged else 0
    atoms = start_cell()
    calc = SpinModelCalculator(dps, magnitudes, drive=0, spin_opt_freq=freq, search=search, certify=certify, seed=5)
    atoms.calc = calc
    t0 = time.perf_counter()
    atoms.get_potential_energy()  # step 0: the cold search, outside the timing
    cold = {"s": time.perf_counter() - t0, "configurations": calc.n_search_evaluations}
    base = dict(calc.timings)
    counts0 = {k: getattr(calc, k) for k in ("n_searches", "n_spin_changes", "n_search_evaluations", "n_certified",
                                              "n_references", "n_reference_evaluations", "n_evaluations")}
    samples = []

    def sample(step, a):
        samples.append({"step": step, "positions": a.positions.copy(), "cell": a.cell.array.copy(),
                        "moments": calc.moments.copy()})

    t0 = time.perf_counter()
    run_md(atoms, calc, "nvt", temperature, nsteps=steps, dt_fs=2.0, trj_freq=sample_every * thin if thin else 0,
           observers=[sample] if thin else [], seed=3)
    wall = time.perf_counter() - t0
    counts = {k[2:]: getattr(calc, k) - v for k, v in counts0.items()}
    return {"name": name, "steps": steps, "wall_per_step": wall / steps, "cold": cold, **counts,
            "timings": {k: calc.timings[k] - base[k] for k in base}, "samples": samples}


_WORKER: dict = {}


def exhaustive_minimum(job) -> tuple[float, float, float]:
    """(lowest energy, gap to the next state, seconds) over every configuration at one geometry (a worker);
    beyond ENUMERATE_TRUTH configurations the best of the TRUTH_SEEDS cold searches and one warm from
    the held moments (TRUTH_SEARCH settings), the gap that of the best search's next state."""
    model_path, positions, cell, symbols, magnitudes, held = job
    from spingen.deepmd_model import DeepmdSpinModel, load_models, resolve_encoding
    from spingen.spin.levels import MomentLevels
    from spingen.spin.search import search_ground_state

    if model_path not in _WORKER:
        dps = load_models([model_path])
        _WORKER[model_path] = (dps, resolve_encoding(dps))
    dps, encoding = _WORKER[model_path]
    model = DeepmdSpinModel(dps, positions, cell, symbols, encoding, batch_size=16)
    levels = MomentLevels(magnitudes, symbols)
    t0 = time.perf_counter()
    if levels.n_configurations <= ENUMERATE_TRUTH:
        result = search_ground_state(model, levels, enumerate_limit=levels.n_configurations, n_lowest=2)
    else:
        starts = [{"seed": seed} for seed in TRUTH_SEEDS] + ([{"start": held}] if held is not None else [])
        result = min((search_ground_state(model, levels, n_lowest=2, cold_runs=1, **TRUTH_SEARCH, **start)
                      for start in starts), key=lambda r: r.best_energy)  # its seeds are its runs (cache tag)
    return result.best_energy, result.lowest[1][1] - result.best_energy, time.perf_counter() - t0


class Truth:
    """Exhaustive minima of the driving model at the sampled geometries (each distinct one enumerated
    once, in `workers` processes, and kept in `cache` for the next run); beyond ENUMERATE_TRUTH
    configurations the best of long searches (exhaustive_minimum)."""

    def __init__(self, model_path: Path, magnitudes, symbols, workers: int, cache: Path):
        self.model_path, self.magnitudes, self.symbols, self.workers = str(model_path), magnitudes, symbols, workers
        method = [] if self.exhaustive else [TRUTH_SEEDS, TRUTH_SEARCH]  # searched minima depend on the searches
        tag = hashlib.sha1(json.dumps([self.model_path, magnitudes, symbols, *method]).encode()).hexdigest()[:12]
        self.cache = cache / f"truth_{tag}.json"
        stored = json.loads(self.cache.read_text()) if self.cache.is_file() else {}
        self.minima: dict[str, tuple[float, float]] = {k: (e, g) for k, (e, g, _) in stored.items()}
        self.seconds: dict[str, float] = {k: t for k, (_, _, t) in stored.items()}

    @property
    def exhaustive(self) -> bool:
        from spingen.spin.levels import MomentLevels

        return MomentLevels(self.magnitudes, self.symbols).n_configurations <= ENUMERATE_TRUTH

    def method(self) -> str:
        """How each geometry's minimum is found, in words."""
        if self.exhaustive:
            return "enumerated"
        settings = ", ".join(f"{k} {v}" for k, v in TRUTH_SEARCH.items())
        return (f"searched (the best of {len(TRUTH_SEEDS)} cold genetic searches, {settings}, and one started "
                f"from the held moments with the default warm patience)")

    @staticmethod
    def key(sample) -> str:
        return hashlib.sha1(np.round(sample["positions"], 8).tobytes()).hexdigest()

    def compute(self, samples: list[dict]) -> None:
        from concurrent.futures import ProcessPoolExecutor

        todo = {self.key(s): s for s in samples if self.key(s) not in self.minima}
        jobs = [(self.model_path, s["positions"], s["cell"], self.symbols, self.magnitudes, s.get("moments"))
                for s in todo.values()]
        import multiprocessing

        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for key, (energy, gap, seconds) in zip(todo, pool.map(exhaustive_minimum, jobs)):
                self.minima[key] = (energy, gap)
                self.seconds[key] = seconds
                self.cache.write_text(json.dumps({k: [*v, self.seconds[k]] for k, v in self.minima.items()}))

    def judge(self, samples: list[dict]) -> dict:
        """Exact count of the samples, mean excess (meV per cell) of the misses, smallest gap seen."""
        from spingen.deepmd_model import DeepmdSpinModel, load_models, resolve_encoding

        dps = load_models([self.model_path])
        encoding = resolve_encoding(dps)
        excess, gaps = [], []
        for s in samples:
            model = DeepmdSpinModel(dps, s["positions"], s["cell"], self.symbols, encoding)
            energy, gap = self.minima[self.key(s)]
            excess.append(float(model.evaluate(s["moments"][None])[0][0]) - energy)
            gaps.append(gap)
        excess = np.array(excess)
        misses = excess > 1e-6
        return {"sampled": len(samples), "exact": int((~misses).sum()), "below": int((excess < -1e-6).sum()),
                "miss_excess_meV": float(excess[misses].mean() * 1000) if misses.any() else 0.0,
                "min_gap_meV": float(min(gaps) * 1000)}


def render(info: dict, results: list[dict], truth: Truth) -> str:
    base = results[0]["wall_per_step"]
    lines = [
        f"Measured {info['date']} (`{info['command']}`).",
        "",
        f"- machine: `{info['machine']}`; CPU: {info['cpu']}, nproc {info['cores']}; OMP_NUM_THREADS={info['omp']}; "
        f"load average before: {info['load_before']}, after: {info['load_after']}",
        f"- peak RSS of the benchmark process: {info['peak_mib']:.0f} MiB",
        f"- models: 2 canonical-sign LiNiO2 spin models, {info['train_steps']} training steps on "
        f"benchmarks/paper/data/linio2 (trained in {info['train_s']:.0f} s each, 2 at a time)",
        f"- cell: {info['formula']}, {info['natoms']} atoms, {info['n_magnetic']} Ni, levels "
        f"{info['magnitudes']} uB ({info['n_configurations']} configurations with the global sign fixed); "
        f"NVT Langevin {info['temperature']:.0f} K, dt 2 fs, cold start",
        f"- one fixed-moment MD step: {1000 * base:.1f} ms; truth: {len(truth.seconds)} distinct sampled geometries "
        f"{truth.method()} with the driving model (so far; cached in the work dir), "
        f"{np.mean(list(truth.seconds.values())):.0f} s each ({truth.workers} processes)",
        "",
        "| setting | spin_opt_freq | search | certificate | MD steps | ms / step | ratio to fixed | exact (sampled) | "
        "mean excess of misses meV/cell | searches | moments changed | certified steps | competitor batches "
        "(configurations) | search configurations | cold search s (configurations) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        freq, search, certify, _ = SETTINGS[r["name"]]
        certificate = "-" if certify is None else json.dumps(certify) if certify else "on"
        judged = r.get("judged")
        exact = "-" if judged is None else \
            f"{judged['exact']}/{judged['sampled']} ({100 * judged['exact'] / judged['sampled']:.0f}%)"
        excess = "-" if judged is None else f"{judged['miss_excess_meV']:.1f}"
        lines.append(
            f"| {r['name']} | {freq} | {json.dumps(search) if search else 'default'} | "
            f"{certificate} | {r['steps']} | {1000 * r['wall_per_step']:.1f} | "
            f"{r['wall_per_step'] / base:.2f} | {exact} | {excess} | {r['searches']} | {r['spin_changes']} | "
            f"{r['certified']} | {r['references']} ({r['reference_evaluations']}) | {r['search_evaluations']} | "
            f"{r['cold']['s']:.1f} ({r['cold']['configurations']}) |")
    gaps = [r["judged"]["min_gap_meV"] for r in results if r.get("judged")]
    lines += ["", f"Smallest gap between the {'exhaustive' if truth.exhaustive else 'best known'} minimum and the "
              f"next state over the sampled geometries: {min(gaps):.1f} meV/cell." if gaps else ""]
    below = sum(r["judged"]["below"] for r in results if r.get("judged"))
    if not truth.exhaustive:
        lines.append(f"'exact' counts the samples whose held moments are at or below the best of those searches; "
                     f"below it: {below}.")
    return "\n".join(lines)


def frame_costs(dps, magnitudes, workdir: Path, temperature: float, steps: int, trj_freq: int) -> dict:
    """An explore task's frames along NVT MD (model 0 drives, certificate on, a frame every trj_freq steps):
    seconds of each frame's spin disagreement with the members' states kept from frame to frame (the
    explore task's FrameWriter) and, at the same frames, computed afresh (every member checks every
    competitor of the driving moments); the non-driving member's state both ways, for the truth."""
    from spingen.md import SpinModelCalculator, run_md
    from spingen.tasks.explore import FrameWriter, spin_disagreement

    atoms = start_cell()
    calc = SpinModelCalculator(dps, magnitudes, drive=0, seed=5)
    folder = workdir / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    writer = FrameWriter(folder, calc, spin_devi_freq=1)
    frames = []

    def frame(step, a):
        before = writer.timings["spin_disagree"]
        writer(step, a)
        kept_s = writer.timings["spin_disagree"] - before
        t0 = time.perf_counter()
        fresh = spin_disagreement(calc, a)[2]
        frames.append({"step": step, "kept_s": kept_s, "fresh_s": time.perf_counter() - t0,
                       "positions": a.positions.copy(), "cell": a.cell.array.copy(),
                       "kept": writer.members.held[1].copy(), "fresh": fresh[1].copy()})

    run_md(atoms, calc, "nvt", temperature, nsteps=steps, dt_fs=2.0, trj_freq=trj_freq, observers=[frame], seed=3)
    return {"frames": frames, "members": len(dps), "trj_freq": trj_freq, "steps": steps}


def judge_frames(costs: dict, truth: Truth, fixed_step_s: float) -> dict:
    """Seconds per frame (the first, a cold start, apart) and the member's states against its exhaustive minima."""
    frames = costs["frames"]
    truth.compute(frames)
    found = {}
    for way in ("kept", "fresh"):
        judged = truth.judge([{**f, "moments": f[way]} for f in frames])
        later = [f[f"{way}_s"] for f in frames[1:]]
        found[way] = {**judged, "first_s": frames[0][f"{way}_s"], "mean_s": float(np.mean(later)),
                      "max_s": float(np.max(later)), "fixed_steps": float(np.mean(later)) / fixed_step_s}
    return found


def render_frames(info: dict, costs: dict, judged: dict) -> str:
    lines = [f"Measured {info['date']} (`{info['command']}`), {info['cpu']}, nproc {info['cores']}; load average "
             f"before {info['load_before']}, after {info['load_after']}.", "",
             f"The explore task's frames along {costs['steps']} steps of NVT MD at {info['temperature']:.0f} K "
             f"({info['natoms']} atoms, {info['n_magnetic']} Ni, {info['n_configurations']} configurations; model 0 "
             f"drives with the certificate; a frame every {costs['trj_freq']} steps: {len(costs['frames'])} frames), "
             f"{costs['members']} members. Member 1's state at each frame against its exhaustive minimum there "
             f"(enumerated with member 1).", "",
             "| members' states | first frame s | later frames: mean s | max s | mean in fixed-moment MD steps | "
             "member 1 at its exhaustive minimum | mean excess of misses meV/cell |",
             "|---|---|---|---|---|---|---|"]
    names = {"kept": "kept from frame to frame, certified (default)",
             "fresh": "afresh at every frame (every competitor of the driving moments)"}
    for way, j in judged.items():
        lines.append(f"| {names[way]} | {j['first_s']:.2f} | {j['mean_s']:.2f} | {j['max_s']:.2f} | "
                     f"{j['fixed_steps']:.1f} | {j['exact']}/{j['sampled']} | {j['miss_excess_meV']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=6000)
    parser.add_argument("--workdir", default="/tmp/spingen_bench_spin_md")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--steps", type=int, default=100, help="MD steps of every setting")
    parser.add_argument("--search-steps", type=int, default=10,
                        help="MD steps of 'search every step' (each step is a full search: tens of seconds)")
    parser.add_argument("--repeat", type=int, nargs=3, default=REPEAT, help="supercell of the 8-atom cell")
    parser.add_argument("--primitive", action="store_true",
                        help="repeat the 4-atom primitive cell instead (--repeat 3 3 3: 108 atoms, 27 Ni)")
    parser.add_argument("--sample-every", type=int, default=5, help="steps between geometries judged exhaustively")
    parser.add_argument("--temperature", type=float, default=900.0)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"of {list(SETTINGS)}")
    parser.add_argument("--workers", type=int, default=2, help="processes enumerating the truth")
    parser.add_argument("--unjudged", nargs="*", default=[],
                        help="settings timed but not judged (on the 8-Ni cell each truth costs minutes)")
    parser.add_argument("--levels", type=float, nargs="*", default=None,
                        help="Ni magnitudes (uB); default: inferred from the data at tol 0.1 (1.671, 1.86)")
    parser.add_argument("--frame-steps", type=int, default=100, help="MD steps of the explore-frame measurement")
    parser.add_argument("--trj-freq", type=int, default=10, help="MD steps between explore frames")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--frames-only", action="store_true",
                       help="only the explore-frame measurement (and the fixed-moment baseline), its block only")
    parts.add_argument("--no-frames", action="store_true", help="leave out the explore-frame measurement")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    default_cell = tuple(args.repeat) == DEFAULT_REPEAT and not args.primitive
    REPEAT[:] = args.repeat
    PRIMITIVE[0] = args.primitive
    command = "python benchmarks/spin_md.py " + " ".join(argv if argv is not None else sys.argv[1:])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = trained_models(workdir, args.train_steps)
    print(json.dumps([str(m) for m in models]), flush=True)
    if args.train_only:
        return 0
    from deepmd.infer import DeepPot

    from spingen.data.levels import magnitudes_from_data
    from spingen.spin.levels import MomentLevels

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    magnitudes = {"Ni": args.levels} if args.levels else magnitudes_from_data([DATA], MAGNETIC, tol=0.1)
    dps = [DeepPot(str(m)) for m in models]
    symbols = start_cell().get_chemical_symbols()
    results = []
    chosen = ["fixed moments"] if args.frames_only else [n for n in SETTINGS if n in args.settings]
    for name in chosen:
        steps = args.search_steps if name == "search every step" else args.steps
        r = run_setting(dps, magnitudes, name, steps, args.sample_every, args.temperature, name not in args.unjudged)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
    truth = Truth(models[0], magnitudes, symbols, args.workers, workdir)
    truth.compute([s for r in results for s in r["samples"]])
    for r in results:
        samples = r.pop("samples")
        if samples:
            r["judged"] = truth.judge(samples)
            print(r["name"], json.dumps(r["judged"]), flush=True)
    if not args.no_frames:
        costs = frame_costs(dps, magnitudes, workdir, args.temperature, args.frame_steps, args.trj_freq)
        frames = judge_frames(costs, Truth(models[1], magnitudes, symbols, args.workers, workdir),
                              results[0]["wall_per_step"])
        print(json.dumps(frames), flush=True)
    atoms = start_cell()
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command,
            "machine": " ".join(platform.uname()[:3]), "cpu": cpu_model(), "cores": os.cpu_count(),
            "omp": os.environ.get("OMP_NUM_THREADS"), "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train_steps": args.train_steps,
            "train_s": float(np.mean([json.loads((m.parent / "time.json").read_text())["train_s"] for m in models])),
            "formula": atoms.get_chemical_formula(), "natoms": len(atoms), "n_magnetic": symbols.count("Ni"),
            "magnitudes": magnitudes["Ni"], "n_configurations": MomentLevels(magnitudes, symbols).n_configurations,
            "temperature": args.temperature}
    # a block of its own per temperature and cell
    suffix = ("" if default_cell else f", {'x'.join(map(str, args.repeat))}{' primitive' if args.primitive else ''}") + \
        ("" if args.temperature == 900.0 else f", {args.temperature:.0f} K")
    blocks = []
    if not args.no_frames:
        blocks.append((DOC_BEGIN.replace(") -->", f"{suffix}, explore frames) -->"), render_frames(info, costs, frames)))
    if not args.frames_only:
        blocks.insert(0, (DOC_BEGIN.replace(") -->", f"{suffix}) -->"), render(info, results, truth)))
    for begin, text in blocks:
        print(text)
        if args.no_doc:
            continue
        write_if_marked(DOC, begin, DOC_END, text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
