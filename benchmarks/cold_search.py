"""How close the cold spin search lands to the ground state of a trained model (issue #20).

The cells, start geometry and trained models are spin_md.py's: by default its primitive cell repeated
3 3 3 (108 atoms, 27 Ni, 4^27 / 2 configurations); `--conventional --repeat 2 2 1` is the 8-Ni cell
(32,768 configurations).
Each search setting runs from each seed at the start geometry with the driving model
(`search_ground_state`, what SpinModelCalculator's first step runs); a row reports its energy above the
reference, the configurations it evaluated and its wall time. The reference is the exhaustive minimum
where spin_md.py enumerates (ENUMERATE_TRUTH), else the lowest state any run found.

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_search.py --workdir work/spin_md

Results go to docs/benchmarks/spin_md.md (the 27-Ni section, a block per cell).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import spin_md  # noqa: E402  (the cell, the models, the doc)
from results_block import cpu_model, write_if_marked  # noqa: E402

BEGIN = "<!-- results:begin (written by benchmarks/cold_search.py) -->"
# name -> search settings; "before" is the search as it was until this benchmark (spin forces, 16 / 15)
SETTINGS = {
    "default": {},
    "without exchanges in the polish (before 2026-12-06)": {"polish_exchanges": False},
    "one run per cold search (default on 2026-12-05)": {"cold_runs": 1},
    "one run without domain reversals (before 2026-12-05)": {"domain_reversals": False, "cold_runs": 1},
    "before: spin forces, population 16, patience 15": {"use_gradient": True, "population": 16, "patience": 15},
    "energy only, population 16, patience 15": {"use_gradient": False, "population": 16, "patience": 15},
    "long: population 32, patience 40": {"population": 32, "patience": 40},
    "3 runs per cold search (default until 2026-12-07)": {"cold_runs": 3},
    "8 runs per cold search": {"cold_runs": 8},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/spingen_bench_spin_md")
    parser.add_argument("--train-steps", type=int, default=6000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"of {list(SETTINGS)}")
    parser.add_argument("--repeat", type=int, nargs=3, default=[3, 3, 3])
    parser.add_argument("--conventional", action="store_true", help="repeat the 8-atom cell, not the primitive one")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown --settings {unknown}; known: {list(SETTINGS)}")
    spin_md.PRIMITIVE[0] = not args.conventional
    spin_md.REPEAT[:] = args.repeat
    from spingen.data.levels import magnitudes_from_data
    from spingen.deepmd_model import DeepmdSpinModel, load_models, resolve_encoding
    from spingen.spin.levels import MomentLevels
    from spingen.spin.search import search_ground_state

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    model_path = spin_md.trained_models(Path(args.workdir), args.train_steps)[0]
    dps = load_models([str(model_path)])
    atoms = spin_md.start_cell()
    symbols = atoms.get_chemical_symbols()
    model = DeepmdSpinModel(dps, atoms.positions, atoms.cell.array, symbols, resolve_encoding(dps), batch_size=16)
    magnitudes = magnitudes_from_data([spin_md.DATA], spin_md.MAGNETIC, tol=0.1)
    levels = MomentLevels(magnitudes, symbols)
    runs = []
    for name in [n for n in SETTINGS if n in args.settings]:
        for seed in args.seeds:
            began = time.perf_counter()
            result = search_ground_state(model, levels, seed=seed, **SETTINGS[name])
            runs.append({"name": name, "seed": seed, "energy": result.best_energy, "s": time.perf_counter() - began,
                         "configurations": result.n_evaluations,
                         "runs": result.n_runs, "run_energies": list(result.run_energies)})
            print(json.dumps(runs[-1]), flush=True)
    exhaustive = levels.n_configurations <= spin_md.ENUMERATE_TRUTH
    if exhaustive:
        best = search_ground_state(model, levels, enumerate_limit=levels.n_configurations).best_energy
    else:
        best = min(r["energy"] for r in runs)
    reference = "the exhaustive minimum" if exhaustive else f"the lowest state of all {len(runs)} runs"
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (`python benchmarks/cold_search.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`), {cpu_model()}, nproc {os.cpu_count()}; "
             f"load average before {load_before}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
             "",
             f"The start geometry of the {levels.n_magnetic}-Ni cell ({len(atoms)} atoms, levels {magnitudes['Ni']} uB, "
             f"{levels.n_configurations} configurations), model 0 of spin_md.py, seeds {args.seeds}. "
             f"Excess: above {reference}.",
             "",
             "| setting | excess per seed meV/cell | within 5 meV/cell | runs per seed | configurations mean | s mean |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in runs):
        rows = [r for r in runs if r["name"] == name]
        excess = [1000 * (r["energy"] - best) for r in rows]
        lines.append(f"| {name} | {', '.join(f'{e:.1f}' for e in excess)} | {sum(e < 5 for e in excess)}/{len(rows)} | "
                     f"{', '.join(str(r['runs']) for r in rows)} | "
                     f"{np.mean([r['configurations'] for r in rows]):.0f} | {np.mean([r['s'] for r in rows]):.0f} |")
    text = "\n".join(lines)
    print(text)
    begin = BEGIN.replace(") -->", f", {levels.n_magnetic} Ni) -->")
    if args.no_doc:
        return 0
    write_if_marked(spin_md.DOC, begin, spin_md.DOC_END, text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
