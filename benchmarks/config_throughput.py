"""Seconds per moment configuration of spingen.deepmd_model.DeepmdSpinModel, the unit every spin search,
certificate and explore frame pays, on the LiNiO2 cells of benchmarks/spin_md.py.

What runs: spin_md.py's first trained model (reused from --workdir), each cell (`--cells`: the 8-atom
cell repeated 3x1x1 and 2x2x1, its 4-atom primitive cell 3x3x3 and 4x4x4), rattled as spin_md.py
rattles it; held moments drawn at random over the two Ni levels, evaluated with their gradient (as the
MD step and the certificate evaluate them), then energy-only batches of `--batch` configurations: the
held moments with one ion reversed, with two ions reversed, and random configurations (what a cold
search evaluates). Each batch is timed `--repeats` times, the fastest kept; the energies are checked
against DeepPot.eval on 3 configurations of each batch. `--whole-cell` re-evaluates every atom of every
configuration (spingen.deepmd_model.LOCAL_SHARE 0, the path before changed centres); run the script in
a checkout of an older commit to time that commit's code. Rows are kept in WORKDIR/config_throughput.json
(each with the commit it measured) and rendered together.

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/config_throughput.py \\
        --workdir work/spin_md [--whole-cell] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import spin_md  # noqa: E402  (its models, cells and levels)
from results_block import cpu_model, keep_rows, write_if_marked  # noqa: E402

DOC = REPO / "docs" / "benchmarks" / "spin_md.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/config_throughput.py) -->"
DOC_END = "<!-- results:end -->"
CELLS = {"3x1x1": (False, (3, 1, 1)), "2x2x1": (False, (2, 2, 1)), "3x3x3p": (True, (3, 3, 3)),
         "4x4x4p": (True, (4, 4, 4))}  # name -> (primitive cell, repeat)
LEVELS = (1.671, 1.86)


def batches(n_magnetic: int, size: int, rng) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Held moments and the batches of configurations timed against them."""
    held = rng.choice(LEVELS, size=n_magnetic) * rng.choice([-1.0, 1.0], size=n_magnetic)
    ions = rng.permutation(n_magnetic)
    one = np.repeat(held[None], size, axis=0)
    one[np.arange(size), ions[np.arange(size) % n_magnetic]] *= -1
    pairs = [(i, j) for i in range(n_magnetic) for j in range(i + 1, n_magnetic)]
    chosen = rng.permutation(len(pairs))[:size]
    two = np.repeat(held[None], len(chosen), axis=0)
    for row, k in zip(two, chosen):
        row[list(pairs[k])] *= -1
    random = rng.choice(LEVELS, size=(size, n_magnetic)) * rng.choice([-1.0, 1.0], size=(size, n_magnetic))
    return held, {"one ion reversed": one, "two ions reversed": two, "random": random}


def measure(dp, name: str, batch: int, repeats: int) -> list[dict]:
    """Rows of one cell: seconds per configuration of each batch kind, and the energies' check."""
    from spingen.deepmd_model import DeepmdSpinModel
    from spingen.spin.encoding import SpinEncoding

    spin_md.PRIMITIVE[0], spin_md.REPEAT[:] = CELLS[name][0], list(CELLS[name][1])
    atoms = spin_md.start_cell()
    symbols = atoms.get_chemical_symbols()
    encoding = SpinEncoding(spin_md.MAGNETIC, 0.3, 0.2, canonical=True)
    model = DeepmdSpinModel([dp], atoms.positions, atoms.cell.array, symbols, encoding)
    held, kinds = batches(model.n_magnetic, batch, np.random.default_rng(0))
    model.evaluate(held[None], gradient=True)
    for configurations in kinds.values():  # every displacement seen once: the neighbour lists settle
        model.evaluate(configurations)
    rows = []
    for kind, configurations in kinds.items():
        model.evaluate(held[None], gradient=True)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            energies = model.evaluate(configurations)[0]
            seconds.append(time.perf_counter() - start)
        check = [0, len(configurations) // 2, len(configurations) - 1]
        spins = model.spin_vectors(configurations[check])
        reference = [dp.eval(atoms.positions.reshape(1, -1), atoms.cell.array.reshape(1, 9), model.atom_types,
                             spin=s.reshape(1, -1))[0].item() for s in spins]
        rows.append({"cell": name, "atoms": len(atoms), "magnetic": model.n_magnetic, "kind": kind,
                     "configurations": len(configurations), "ms_per_configuration": 1e3 * min(seconds) / len(configurations),
                     "max_error_eV": float(np.max(np.abs(energies[check] - reference)))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def render(rows: list[dict]) -> str:
    runs = sorted({(r["run"], r["code"]) for r in rows}, key=lambda x: x[0])
    lines = ["| cell | atoms | Ni | batch | " + " | ".join(code for _, code in runs) + " | max \\|E - DeepPot.eval\\| eV |",
             "|---|---|---|---|" + "---|" * len(runs) + "---|"]
    keys = []
    for r in rows:
        if (r["cell"], r["kind"]) not in keys:
            keys.append((r["cell"], r["kind"]))
    for cell, kind in keys:
        mine = [r for r in rows if (r["cell"], r["kind"]) == (cell, kind)]
        cells = []
        for run, code in runs:
            found = [r for r in mine if (r["run"], r["code"]) == (run, code)]
            cells.append(f"{found[0]['ms_per_configuration']:.2f}" if found else "-")
        first = mine[0]
        lines.append(f"| {cell} | {first['atoms']} | {first['magnetic']} | {kind} ({first['configurations']}) | "
                     + " | ".join(cells) + f" | {max(r['max_error_eV'] for r in mine):.1e} |")
    head = "; ".join(f"{code}: {run}" for run, code in runs)
    return f"ms per configuration (fastest of the repeats; one model, one thread). Runs: {head}.\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spingen_bench_spin_md"))
    parser.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS))
    parser.add_argument("--batch", type=int, default=21, help="configurations per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--whole-cell", action="store_true", help="every atom re-evaluated (LOCAL_SHARE 0)")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    from deepmd.infer import DeepPot

    import spingen.deepmd_model as deepmd_model

    if args.whole_cell:
        deepmd_model.LOCAL_SHARE = 0.0
    models = spin_md.trained_models(args.workdir, 6000)
    dp = DeepPot(str(models[0]))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    code = commit() + (" whole cell" if args.whole_cell else "")
    measured = [r for name in args.cells for r in measure(dp, name, args.batch, args.repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, load {load}, peak RSS {peak:.0f} MiB"
    rows = [{**r, "run": run, "code": code} for r in measured]
    text = render(keep_rows(args.workdir / "config_throughput.json", rows))
    print(text)
    if not args.no_doc:
        write_if_marked(DOC, DOC_BEGIN, DOC_END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
