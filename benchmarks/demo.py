"""The whole demo loop from scratch: wall time, peak memory and whether it learns.

Runs what `make demo` runs, `spingen run param_examples/linio2_demo/param.json
machine_examples/local.json`, in a fresh work dir (initial GPAW data included), then reads
`spingen status --json` and the step durations of spingen.log, and writes them to
docs/benchmarks/demo.md between the result markers.

Usage (about 20 min on 2 idle cores; nothing else heavy should run meanwhile):

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo.py [--workdir /tmp/demo_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_block import step_durations, write_results

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "benchmarks" / "demo.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/demo.py) -->"
DOC_END = "<!-- results:end -->"
PARAM = REPO / "param_examples" / "linio2_demo" / "param.json"
MACHINE = REPO / "machine_examples" / "local.json"


def render(rows: list[dict], wall: float, durations: dict[str, float], rss_mib: float, info: dict,
           command: str) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    def ranked(row):
        return "-" if row["ranking_geometries"] is None else f"{row['ranking_right']}/{row['ranking_geometries']}"

    def predicted(row):
        return "-" if not row["candidates_in_states"] else f"{row['predicted_lowest']}/{row['candidates_in_states']}"

    lines = [f"Measured {info['date']} on `{info['uname']}` ({info['cpu']}, nproc {info['nproc']}); load average "
             f"before {info['load_before']}, after {info['load_after']}.", "", f"    {command}", "",
             f"- **wall time, fresh work dir to the closing train: {wall / 60:.1f} min** (target 20 min)",
             f"- peak resident memory of one process (the largest of spingen and every `dp`/GPAW/explore task): "
             f"{rss_mib:.0f} MiB", "",
             "| iteration | explored frames | accurate % | candidate % | of which by spin disagreement only % | "
             "failed % | selected (spin-only) | labeled | failed labels | ensemble error on the new labels, energy "
             "meV/atom | force meV/A | spin states agreeing % | labels in other states | states DFT kept % | predicted "
             "state lowest by DFT | ranked right (training geometries) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {cell(r['explore_frames'], 'd')} | {cell(r['accurate_pct'], '.1f')} | "
                     f"{cell(r['candidate_pct'], '.1f')} | {cell(r['spin_only_pct'], '.1f')} | "
                     f"{cell(r['failed_pct'], '.1f')} | {cell(r['selected'], 'd')} ({cell(r['spin_only_selected'], 'd')}) | "
                     f"{cell(r['labeled'], 'd')} | "
                     f"{cell(r['label_failed'], 'd')} | {cell(r['ensemble_rmse_e_meV_atom'], '.1f')} | "
                     f"{cell(r['ensemble_rmse_f_meV_A'], '.0f')} | {cell(r['spin_agree_pct'], '.0f')} | "
                     f"{cell(r['labeled_other_states'], 'd')} | {cell(r['states_kept_pct'], '.0f')} | "
                     f"{predicted(r)} | {ranked(r)} |")
    lines += ["", "Time per step kind, summed over iterations (s):", "",
              "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in durations.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/spingen_demo_benchmark")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uname": " ".join(platform.uname()[:3]),
            "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    command = [str(BIN / "spingen"), "run", str(PARAM), str(MACHINE), "-w", str(work)]
    start = time.monotonic()
    with open(work.parent / f"{work.name}.out", "w") as out:
        subprocess.run(command, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    status = subprocess.run([str(BIN / "spingen"), "status", str(work), "--json"], env=env, check=True,
                            capture_output=True, text=True)
    rows = json.loads(status.stdout)["iterations"]
    block = render(rows, wall, step_durations(work / "spingen.log"), rss_mib, info,
                   "spingen run param_examples/linio2_demo/param.json machine_examples/local.json -w WORKDIR")
    print(block)
    write_results(DOC, DOC_BEGIN, DOC_END, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
