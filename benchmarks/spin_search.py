"""Benchmarks of the spin ground-state search (spingen.spin) on analytic models.

    python benchmarks/spin_search.py            # every benchmark, writes docs/benchmarks/spin_search.md
    python benchmarks/spin_search.py --quick    # few frames, prints only (unless --output)
    python benchmarks/spin_search.py --only ncm warm_start

Each benchmark is a function returning a markdown section; register more in BENCHMARKS
(a deepmd-kit model benchmark belongs there too). The analytic model adds a biquadratic term
B(r)(S_i S_j)^2 to on-site + Heisenberg exchange, so the search's pair surrogate is NOT exact
for it (with B = 0 it would be; that variant is reported as well).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # small solves; threads only fight on a shared CPU

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from results_block import cpu_model  # noqa: E402

from spingen.spin import (  # noqa: E402
    AnalyticSpinModel,
    Exchange,
    MomentLevels,
    SearchSettings,
    search_ground_state,
    triangular_layers,
)

EXCHANGE = [Exchange(0.025, 0.5), Exchange(-0.004, 1.5, r_ref=5.0, cutoff=7.0)]  # AFM nn, weak FM
BIQUADRATIC = Exchange(5e-4, 0.5)
# 8 ions x 4 signed states
SYMBOLS8 = ["Ni", "Co", "Mn", "Ni", "Co", "Mn", "Ni", "Co"]
MAGS8 = {"Ni": [1, 3], "Co": [1, 4], "Mn": [3, 4]}
ONSITE8 = {"Ni": {1: 0.0, 3: 0.45}, "Co": {1: 0.0, 4: 0.7}, "Mn": {3: 0.0, 4: 0.25}}
# NCM-like: the 27 transition-metal ions of Li27Ni9Co9Mn9O54, levels of the paper
SYMBOLS27 = [["Ni", "Co", "Mn"][(i + j + k) % 3] for k in range(3) for j in range(3) for i in range(3)]
MAGS27 = {"Co": [0, 1, 4, 5], "Ni": [0, 1, 3, 4], "Mn": [1, 2, 3, 4]}
ONSITE27 = {"Co": {0: 0.0, 1: 0.15, 4: 0.6, 5: 0.9}, "Ni": {0: 0.2, 1: 0.0, 3: 0.35, 4: 0.8},
            "Mn": {1: 0.9, 2: 0.5, 3: 0.0, 4: 0.2}}


def random_frame(nx, ny, nz, symbols, onsite, rng, biquadratic=BIQUADRATIC) -> AnalyticSpinModel:
    """The layered cell, strained by 2% and displaced by 0.15 A (normal, per coordinate)."""
    pos, cell = triangular_layers(nx, ny, nz)
    strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
    pos = pos @ strain + rng.normal(0, 0.15, pos.shape)
    return AnalyticSpinModel(pos, cell @ strain, symbols, onsite, EXCHANGE, biquadratic=biquadratic)


def trajectory(nx, ny, nz, symbols, onsite, n_frames, rng):
    """Frames of a smooth displacement: three sine modes per coordinate, amplitude 0.12 A each."""
    pos, cell = triangular_layers(nx, ny, nz)
    amp = rng.normal(0, 0.12, (3,) + pos.shape)
    phase = rng.uniform(0, 2 * np.pi, (3,) + pos.shape)
    omega = np.array([0.05, 0.11, 0.23])  # rad per frame
    for f in range(n_frames):
        disp = sum(amp[k] * np.sin(omega[k] * f + phase[k]) for k in range(3))
        yield AnalyticSpinModel(pos + disp, cell, symbols, onsite, EXCHANGE, biquadratic=BIQUADRATIC)


def exhaustive(model, levels_free: MomentLevels) -> tuple[float, np.ndarray, int]:
    """Ground-state energy, its moments, and the number of single-ion-move local minima
    (reversal pairs counted once) over the whole free-sign space."""
    n = levels_free.n_values
    rows = np.array(np.unravel_index(np.arange(int(np.prod(n))), n)).T
    energies = model.calculate(levels_free.to_moments(rows), False)[0]
    strides = np.append(np.cumprod(n[::-1])[::-1][1:], 1)
    is_min = np.ones(len(rows), dtype=bool)
    for i in range(len(n)):
        for d in range(1, n[i]):
            nb = rows.copy()
            nb[:, i] = (nb[:, i] + d) % n[i]
            is_min &= energies <= energies[nb @ strides]
    best = int(np.argmin(energies))
    return float(energies[best]), levels_free.to_moments(rows[best])[0], int(is_min.sum()) // 2


def simulated_annealing(model, levels, budget, seed, t0=0.3, t1=0.003) -> float:
    """One Metropolis chain of random single-ion moves, geometric cooling over `budget` evaluations
    (t0, t1 in eV; one chain beat 4 and 16 parallel chains here)."""
    rng = np.random.default_rng(seed)
    row = levels.random_indices(1, rng)[0]
    energy = model.evaluate(levels.to_moments(row))[0][0]
    best = energy
    for step in range(budget - 1):
        temp = t0 * (t1 / t0) ** (step / max(budget - 2, 1))
        trial = row.copy()
        i = rng.integers(levels.n_magnetic)
        trial[i] = (trial[i] + rng.integers(1, levels.n_values[i])) % levels.n_values[i]
        e = model.evaluate(levels.to_moments(trial))[0][0]
        if e < energy or rng.random() < np.exp(-(e - energy) / temp):
            row, energy = trial, e
        best = min(best, e)
    return float(best)


def random_search(model, levels, budget, seed) -> float:
    rows = levels.random_indices(budget, np.random.default_rng(seed))
    return float(model.evaluate(levels.to_moments(rows))[0].min())


def _stats(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.0f} / {np.median(v):.0f} / {v.max():.0f}"


def bench_random_frames(quick: bool) -> str:
    """(a) 8 ions x 4 states, random frames: GA vs the exhaustive ground state."""
    n_frames = 10 if quick else 100
    levels = MomentLevels(MAGS8, SYMBOLS8)
    free = MomentLevels(MAGS8, SYMBOLS8, fix_global_sign=False)
    variants = [("GA, defaults", {}, BIQUADRATIC),
                ("GA, defaults, B = 0 (surrogate exact)", {}, None),
                ("GA without surrogate (first-order screening only)", {"use_surrogate": False}, BIQUADRATIC)]
    lines = [f"### (a) 8 magnetic ions x 4 states, {n_frames} random frames",
             "", f"Space: {free.n_configurations} configurations with free signs, "
             f"{levels.n_configurations} with the global sign fixed (what the GA searches).", "",
             "| variant | success | evaluations mean / median / max | % of 65,536 | % of 32,768 "
             "| s per search | single-move local minima mean / max | distinct ground states |",
             "|---|---|---|---|---|---|---|---|"]
    for name, overrides, bq in variants:
        rng = np.random.default_rng(2024)
        hits, evals, minima, ground, seconds = [], [], [], set(), 0.0
        for f in range(n_frames):
            model = random_frame(2, 2, 2, SYMBOLS8, ONSITE8, rng, biquadratic=bq)
            e0, m0, n_min = exhaustive(model, free)
            t = time.perf_counter()
            result = search_ground_state(model, levels, seed=f, enumerate_limit=0, **overrides)
            seconds += time.perf_counter() - t
            hits.append(result.best_energy <= e0 + 1e-9)
            evals.append(result.n_evaluations)
            minima.append(n_min)
            ground.add(levels.first_up(levels.to_indices(m0))[0].tobytes())
        ev = np.mean(evals)
        lines.append(f"| {name} | {np.mean(hits):.0%} ({sum(hits)}/{n_frames}) | {_stats(evals)} | "
                     f"{100 * ev / 65536:.2f} | {100 * ev / 32768:.2f} | {seconds / n_frames:.2f} | "
                     f"{np.mean(minima):.1f} / {max(minima)} | {len(ground)} |")
    return "\n".join(lines)


def bench_ncm(quick: bool) -> str:
    """(b) 27-ion NCM-like cell: GA vs simulated annealing and random search at the same budget."""
    n_frames, n_seeds = (2, 2) if quick else (5, 3)
    levels = MomentLevels(MAGS27, SYMBOLS27)
    rng = np.random.default_rng(27)
    rows = {k: [] for k in ("GA", "SA, same budget", "SA, 4x budget", "random, same budget")}
    evals, seconds = [], []
    for _ in range(n_frames):
        model = random_frame(3, 3, 3, SYMBOLS27, ONSITE27, rng)
        found = {k: [] for k in rows}
        for seed in range(n_seeds):
            t = time.perf_counter()
            result = search_ground_state(model, levels, seed=seed)
            seconds.append(time.perf_counter() - t)
            budget = result.n_evaluations
            evals.append(budget)
            found["GA"].append(result.best_energy)
            found["SA, same budget"].append(simulated_annealing(model, levels, budget, seed))
            found["SA, 4x budget"].append(simulated_annealing(model, levels, 4 * budget, seed))
            found["random, same budget"].append(random_search(model, levels, budget, seed))
        reference = [search_ground_state(model, levels, seed=100 + s, patience=40, population=32).best_energy
                     for s in range(1 if quick else 2)]
        reference.append(simulated_annealing(model, levels, 5000 if quick else 20000, 99))
        best_known = min(reference + [e for v in found.values() for e in v])
        for k in rows:
            rows[k].extend(np.array(found[k]) - best_known)
    lines = [f"### (b) NCM-like cell, 27 magnetic ions ({levels.n_configurations:.3g} configurations), "
             f"{n_frames} random frames x {n_seeds} seeds",
             "", f"GA evaluations per search mean / median / max: {_stats(evals)}; "
             f"{np.mean(seconds):.1f} s per GA search. Best known per frame: lowest of every run here, "
             "longer GA runs (patience 40, population 32) and a 20,000-step annealing.", "",
             "| method | reaches best known | mean gap (eV per cell) | max gap |", "|---|---|---|---|"]
    for k, gaps in rows.items():
        g = np.array(gaps)
        lines.append(f"| {k} | {np.mean(g < 1e-6):.0%} | {g.mean():.4f} | {g.max():.4f} |")
    return "\n".join(lines)


def bench_warm_start(quick: bool) -> str:
    """(c) warm start (prior = previous frame's result) along smooth trajectories vs cold starts."""
    n_frames = 10 if quick else 50
    lines = [f"### (c) Warm start along a smooth trajectory, {n_frames} consecutive frames", "",
             "Each frame is searched cold (seed = frame) and warm (`prior=` the previous frame's warm "
             "result: its 5 lowest configurations start, its surrogate seeds the fit). Ratios are "
             "of mean evaluations per frame, frames 2..n.", "",
             "| cell | cold evaluations mean / median / max | warm mean / median / max | warm / cold "
             "| warm above cold | warm below cold | ground-state changes | warm misses exhaustive |",
             "|---|---|---|---|---|---|---|---|"]
    cases = [("8 ions x 4 states", (2, 2, 2), SYMBOLS8, MAGS8, ONSITE8, 0),
             ("NCM-like, 27 ions", (3, 3, 3), SYMBOLS27, MAGS27, ONSITE27, None)]
    for name, shape, symbols, mags, onsite, limit in cases:
        levels = MomentLevels(mags, symbols)
        free = MomentLevels(mags, symbols, fix_global_sign=False) if limit is not None else None
        extra = {} if limit is None else {"enumerate_limit": limit}
        prior, prev_key = None, None
        cold_ev, warm_ev, above, below, changes, misses = [], [], 0, 0, 0, 0
        for f, model in enumerate(trajectory(*shape, symbols, onsite, n_frames, np.random.default_rng(50))):
            cold = search_ground_state(model, levels, seed=f, **extra)
            warm = cold if prior is None else search_ground_state(model, levels, seed=f, prior=prior, **extra)
            key = levels.first_up(levels.to_indices(cold.best_moments))[0].tobytes()
            if prior is not None:
                cold_ev.append(cold.n_evaluations)
                warm_ev.append(warm.n_evaluations)
                above += warm.best_energy > cold.best_energy + 1e-9
                below += warm.best_energy < cold.best_energy - 1e-9
                changes += key != prev_key
                if free is not None:
                    misses += warm.best_energy > exhaustive(model, free)[0] + 1e-9
            prior, prev_key = warm, key
        miss = f"{misses}/{n_frames - 1}" if free is not None else "n/a"
        lines.append(f"| {name} | {_stats(cold_ev)} | {_stats(warm_ev)} | "
                     f"{np.mean(warm_ev) / np.mean(cold_ev):.1%} | {above} | {below} | {changes} | {miss} |")
    return "\n".join(lines)


def bench_budget(quick: bool) -> str:
    """(d) the explore stage's cheap setting: warm searches capped at a few evaluations per frame."""
    n_frames = 10 if quick else 50
    lines = [f"### (d) Budgeted warm searches along the same trajectories, {n_frames} frames", "",
             "What spin-minimized MD can afford at every step (benchmarks/explore.md). Each frame is "
             "searched warm from the previous frame's budgeted result (`prior=`, `start=` its best) "
             "with `max_evaluations` = budget new energy-only evaluations (`use_gradient` off). "
             "'MD step's evaluation' = the energy and -dE/dS at the start moments are handed over "
             "(`known=`), as `SpinModelCalculator` does with its own MD evaluation, so they cost "
             "nothing and the start's spin force screens the first moves. The reference is the "
             "exhaustive minimum (8 ions) or the lowest of cold searches with 4 seeds (27 ions). A "
             "miss is a frame whose budgeted result lies above the reference; 'recovered' counts "
             "misses followed by a hit within the next 3 frames (the MD carries on from the "
             "budgeted state).", "",
             "| cell | budget | MD step's evaluation | ground-state changes | misses | recovered within 3 frames "
             "| mean gap of misses (meV per cell) | max gap |",
             "|---|---|---|---|---|---|---|---|"]
    cases = [("8 ions x 4 states", (2, 2, 2), SYMBOLS8, MAGS8, ONSITE8, True),
             ("NCM-like, 27 ions", (3, 3, 3), SYMBOLS27, MAGS27, ONSITE27, False)]
    for name, shape, symbols, mags, onsite, exact in cases:
        levels = MomentLevels(mags, symbols)
        free = MomentLevels(mags, symbols, fix_global_sign=False)
        models = list(trajectory(*shape, symbols, onsite, n_frames, np.random.default_rng(50)))
        refs, keys = [], []
        for f, model in enumerate(models):
            if exact:
                ref, moments, _ = exhaustive(model, free)
            else:
                runs = [search_ground_state(model, levels, seed=100 * f + k) for k in range(4)]
                best = min(runs, key=lambda r: r.best_energy)
                ref, moments = best.best_energy, best.best_moments
            refs.append(ref)
            keys.append(levels.first_up(levels.to_indices(moments))[0].tobytes())
        changes = sum(a != b for a, b in zip(keys, keys[1:]))
        for budget in (4, 8, 16):
            for handed in (False, True):
                prior = search_ground_state(models[0], levels, seed=0)
                hit, gaps = [], []
                for f, model in enumerate(models[1:], start=1):
                    start = prior.best_moments
                    known = (start, *model.evaluate(start, gradient=True)) if handed else None
                    prior = search_ground_state(model, levels, seed=f, prior=prior, start=start, known=known,
                                                max_evaluations=budget, use_gradient=False, enumerate_limit=0)
                    gap = prior.best_energy - refs[f]
                    hit.append(gap < 1e-9)
                    if gap >= 1e-9:
                        gaps.append(gap * 1000)
                misses = [i for i, h in enumerate(hit) if not h]
                recovered = sum(any(hit[i + 1: i + 4]) for i in misses)
                mean_gap = f"{np.mean(gaps):.1f}" if gaps else "-"
                max_gap = f"{np.max(gaps):.1f}" if gaps else "-"
                lines.append(f"| {name} | {budget} | {'yes' if handed else 'no'} | {changes} | {len(misses)}/{len(hit)} "
                             f"| {recovered}/{len(misses)} | {mean_gap} | {max_gap} |")
    return "\n".join(lines)


BENCHMARKS = {"random_frames": bench_random_frames, "ncm": bench_ncm, "warm_start": bench_warm_start,
              "budget": bench_budget}


def machine() -> str:
    cpu = cpu_model()
    return (f"- machine: `{' '.join(platform.uname())}`\n- CPU: {cpu}, nproc {os.cpu_count()}\n"
            f"- Python {platform.python_version()}, numpy {np.__version__}, BLAS threads "
            f"{os.environ.get('OPENBLAS_NUM_THREADS')}\n- search defaults: `{SearchSettings()}`")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few frames, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these only")
    parser.add_argument("--output", type=Path, help="markdown file (default: docs/benchmarks/spin_search.md "
                        "for a full run, none for --quick)")
    args = parser.parse_args(argv)
    start = time.time()
    sections = []
    for name in args.only or BENCHMARKS:
        t = time.time()
        sections.append(BENCHMARKS[name](args.quick))
        print(sections[-1], f"\n\n({name}: {time.time() - t:.0f} s)\n", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    text = "\n\n".join([
        "## Spin ground-state search on analytic models",
        f"`python benchmarks/spin_search.py{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s, peak memory {peak:.0f} MiB.",
        machine(), *sections]) + "\n"
    output = args.output or (None if args.quick else Path(__file__).parents[1] / "docs/benchmarks/spin_search.md")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
