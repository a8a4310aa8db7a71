"""Wall time of GPAW label tasks on 1 and 2 cores, and the label stage's own make+collect overhead.

What is measured:

* GPAW tasks: the real label stage (`LabelStage.make`, fp_style gpaw, fp_spin_init states) writes
  two tasks per cell: the antiferromagnetic ground state and the ferromagnetic state (fixed
  total moment). Each is run exactly as dpdispatcher runs it, `spingen label-task TASK_DIR`,
  in a fresh process, in three ways:
    - 1 core: the two tasks one after the other, OMP/OpenBLAS threads 1 (the labeler's default);
    - 2 cores, 2 tasks in parallel: both tasks at once, one thread each (what a Shell machine with
      group_size 1 does on a 2-core box) — per-task time and throughput;
    - 2 cores, 2 threads per task: the tasks one after the other with OMP_NUM_THREADS =
      OPENBLAS_NUM_THREADS = 2 (GPAW here is built without MPI; threads only help BLAS/FFTW).
  Peak memory is the largest max RSS of one task process (wait4 rusage).
* make+collect: `LabelStage.make` and `LabelStage.post` for N candidate frames (no DFT: each
  task gets a copy of a real result file), divided by N; for gpaw (result.json) and vasp (a real
  OUTCAR parsed with spingen.data.vasp).

Usage (takes ~5 min with the 8-atom cell; nothing else heavy should run meanwhile):

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/label.py [--cells nio4 lini8] [--tasks 50]

Results go to docs/benchmarks/label.md between the result markers (and to stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "benchmarks" / "label.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/label.py) -->"
DOC_END = "<!-- results:end -->"
sys.path.insert(0, str(REPO))


def cells():
    from ase import Atoms
    from ase.build import bulk

    a = 4.17
    nio4 = Atoms("Ni2O2", scaled_positions=[(0, 0, 0), (.5, .5, .5), (.25, .25, .25), (.75, .75, .75)],
                 cell=[[a / 2, a / 2, a], [a / 2, a, a / 2], [a, a / 2, a / 2]], pbc=True)
    lini8 = bulk("NiO", "rocksalt", a=a, cubic=True)
    symbols = lini8.get_chemical_symbols()
    symbols[0] = symbols[2] = "Li"
    lini8.set_chemical_symbols(symbols)
    return {
        "nio4": ("NiO AFM rhombohedral, 4 atoms (Ni2O2)", nio4, 2.0),
        "lini8": ("Li2Ni2O4 rocksalt-ordered, 8 atoms (2 Ni)", lini8, 1.0),
    }


def settings(type_map, ecut, kpts):
    from spingen.schema import GpawSettings, LabelSettings, LdauSettings

    gpaw = GpawSettings(ecut, kpts, 1.0, None, 0.05, 120, "PBE", {}, True, 4.0)
    return LabelSettings("gpaw", tuple(type_map), ("Ni",), "states", {"Ni": LdauSettings(2, 6.3, 0.0)}, None, 0.5,
                         1.0, 10_000, 1, gpaw=gpaw)


def write_tasks(root: Path, atoms, moment: float, ecut: float, kpts) -> list[Path]:
    """The real make of the label stage: AFM ground state + FM excited state of one geometry."""
    import ase.io

    from spingen.loop import StageContext
    from spingen.schema import MachineSection
    from spingen.stages.label import LabelStage

    frame = atoms.copy()
    ni = [i for i, s in enumerate(frame.get_chemical_symbols()) if s == "Ni"]
    afm, fm = np.zeros(len(frame)), np.zeros(len(frame))
    afm[ni] = moment * np.array([1, -1])
    fm[ni] = moment
    frame.arrays["initial_magmoms"] = afm
    frame.arrays["excited_magmoms"] = fm[:, None]
    frame.info.update(task="bench", step=0, max_devi_f=0.2)
    cand = root / "iter.000000" / "01.model_devi" / "candidates.000.extxyz"
    cand.parent.mkdir(parents=True)
    ase.io.write(cand, [frame], format="extxyz")
    stage = LabelStage(None, MachineSection("spingen", {}, {}, 1), settings(["Li", "Ni", "O"], ecut, kpts))
    ctx = StageContext(root, 0)
    stage.path(ctx).mkdir(parents=True)
    stage.make(ctx)
    return [stage.path(ctx) / t for t in stage.task_dirs(ctx)]


def start_task(task: Path, threads: int) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([str(BIN / "spingen"), "label-task", str(task)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), time.monotonic()


def finish(proc: subprocess.Popen, t0: float) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"label-task failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "maxrss_mib": usage.ru_maxrss / 1024}


def fresh(tasks: list[Path], where: Path) -> list[Path]:
    out = []
    for task in tasks:
        dst = where / task.name
        shutil.copytree(task, dst)
        for name in ("result.json", "gpaw.txt"):
            (dst / name).unlink(missing_ok=True)
        out.append(dst)
    return out


def bench_gpaw(key: str, work: Path, ecut: float, kpts, threads: bool) -> dict:
    title, atoms, moment = cells()[key]
    tasks = write_tasks(work / key / "make", atoms, moment, ecut, kpts)
    rows = {}
    # 1 core: one after the other, 1 thread
    runs = []
    for task in fresh(tasks, work / key / "serial"):
        runs.append(finish(*start_task(task, 1)) | {"result": json.loads((task / "result.json").read_text())})
    rows["1 core (1 task, 1 thread)"] = runs
    # 2 cores: both tasks at once, 1 thread each
    t0 = time.monotonic()
    started = [start_task(t, 1) for t in fresh(tasks, work / key / "parallel")]
    par = [finish(*s) for s in started]
    rows["2 cores (2 tasks in parallel, 1 thread each)"] = par
    pair_wall = time.monotonic() - t0
    if threads:  # 2 cores: one task at a time with 2 threads
        rows["2 cores (1 task, 2 OMP/BLAS threads)"] = [finish(*start_task(t, 2))
                                                        for t in fresh(tasks, work / key / "threads")]
    states = [{"state": ("AFM ground", "FM (fixed total)")[i], "energy_eV": r["result"].get("energy"),
               "moments_Ni": [round(m, 2) for m, s in zip(r["result"].get("moments", []), atoms_symbols(tasks[i]))
                              if s == "Ni"], "scf_iterations": r["result"].get("iterations"), "ok": r["result"]["ok"]}
              for i, r in enumerate(runs)]
    return {"cell": title, "natoms": len(atoms), "kpts": json.loads((tasks[0] / "gpaw_input.json").read_text())["kpts"],
            "rows": rows, "pair_wall_s": pair_wall, "states": states}


def atoms_symbols(task: Path) -> list[str]:
    return json.loads((task / "gpaw_input.json").read_text())["symbols"]


def bench_overhead(work: Path, n: int) -> dict:
    """make + post per task without DFT, for gpaw and vasp."""
    import ase.io

    from spingen.data.npy import ensure_spin_dtype
    from spingen.loop import StageContext
    from spingen.schema import LabelSettings, MachineSection, VaspSettings
    from spingen.stages.label import LabelStage

    ensure_spin_dtype()  # one-off import/registration cost of dpdata, not per task
    out = {}
    # gpaw: the 4-atom cell, a real result.json copied into every task
    _, nio4, _ = cells()["nio4"]
    ref = work / "nio4" / "serial" / "task.000.000000" / "result.json"
    frames = []
    for i in range(n):
        f = nio4.copy()
        f.rattle(0.01, seed=i)
        f.arrays["initial_magmoms"] = np.array([2.0, -2.0, 0, 0])
        f.info.update(task="bench", step=i, max_devi_f=0.2)
        frames.append(f)
    # vasp: K4Sn4O6 single point OUTCAR (85 kB); every candidate is its geometry
    outcar = REPO / "tests" / "data" / "vasp" / "OUTCAR.K4Sn4O6_ispin2_vasp541"
    ksno = ase.io.read(outcar, format="vasp-out", index=-1)
    kframes = []
    for i in range(n):
        f = ksno.copy()
        f.calc = None
        f.arrays["initial_magmoms"] = np.zeros(len(f))
        f.info = {"task": "bench", "step": i, "max_devi_f": 0.2}
        kframes.append(f)
    pp = work / "pp"
    pp.mkdir()
    for el in ("K", "Sn", "O"):
        (pp / el).write_text(f"TITEL  = PAW_PBE {el} 06Sep2000\n")
    (work / "INCAR").write_text("ENCUT = 520\n")
    vasp = VaspSettings({el: pp / el for el in ("K", "Sn", "O")}, "ENCUT = 520\n", work / "INCAR", 0.25, None)
    cases = {
        "gpaw": (settings(["Li", "Ni", "O"], 300.0, (2, 2, 2)), frames, lambda task: shutil.copy(ref, task / "result.json")),
        "vasp": (LabelSettings("vasp", ("K", "Sn", "O"), ("Sn",), "predicted", {}, None, 0.5, 1.0, 10_000, 1, vasp=vasp),
                 kframes, lambda task: shutil.copy(outcar, task / "OUTCAR")),
    }
    for style, (label_settings, cand, fill) in cases.items():
        root = work / f"overhead_{style}"
        path = root / "iter.000000" / "01.model_devi" / "candidates.000.extxyz"
        path.parent.mkdir(parents=True)
        ase.io.write(path, cand, format="extxyz")
        stage = LabelStage(None, MachineSection("spingen", {}, {}, 1), label_settings)
        ctx = StageContext(root, 0)
        stage.path(ctx).mkdir(parents=True)
        t0 = time.perf_counter()
        stage.make(ctx)
        t_make = time.perf_counter() - t0
        tasks = [stage.path(ctx) / t for t in stage.task_dirs(ctx)]
        for task in tasks:
            fill(task)
        t0 = time.perf_counter()
        stage.post(ctx)
        t_post = time.perf_counter() - t0
        out[style] = {"tasks": len(tasks), "make_s": t_make, "post_s": t_post,
                      "per_task_ms": 1000 * (t_make + t_post) / len(tasks)}
    return out


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import gpaw

    return {"uname": " ".join(platform.uname()), "cpu": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(), "gpaw": gpaw.__version__,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def render(info: dict, gpaw_rows: list[dict], overhead: dict, ecut: float) -> str:
    lines = [DOC_BEGIN, "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"- machine: `{info['uname']}`", f"- CPU: {info['cpu']}, nproc {info['nproc']}",
             f"- Python {info['python']}, GPAW {info['gpaw']} (no MPI), load average before: {info['load_before']}, "
             f"after: {info['load_after']}", "",
             f"### GPAW label task (PW {ecut:g} eV, Fermi-Dirac 0.05 eV, U(Ni d) = 6.3 eV, stress on)", ""]
    for b in gpaw_rows:
        lines += [f"**{b['cell']}**, k-mesh {'x'.join(map(str, b['kpts']))}", "",
                  "| how | task 1 (AFM) s | task 2 (FM, fixed total) s | mean s/task | tasks/hour | peak RSS/task MiB |",
                  "|---|---|---|---|---|---|"]
        for how, runs in b["rows"].items():
            walls = [r["wall_s"] for r in runs]
            if "parallel" in how:
                throughput = 3600 * len(runs) / b["pair_wall_s"]
            else:
                throughput = 3600 / np.mean(walls)
            lines.append(f"| {how} | {walls[0]:.1f} | {walls[1]:.1f} | {np.mean(walls):.1f} | {throughput:.0f} | "
                         f"{max(r['maxrss_mib'] for r in runs):.0f} |")
        lines += ["", "| state | free energy eV | Ni moments uB | SCF iterations |", "|---|---|---|---|"]
        for s in b["states"]:
            energy = f"{s['energy_eV']:.4f}" if s["ok"] else "not converged"
            lines.append(f"| {s['state']} | {energy} | {s['moments_Ni']} | {s['scf_iterations']} |")
        lines.append("")
    lines += ["### make + collect overhead (no DFT)", "",
              "| labeler | tasks | make s | collect (post) s | per task ms |", "|---|---|---|---|---|"]
    for style, o in overhead.items():
        lines.append(f"| {style} | {o['tasks']} | {o['make_s']:.2f} | {o['post_s']:.2f} | {o['per_task_ms']:.1f} |")
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["nio4", "lini8"], choices=sorted(cells()))
    parser.add_argument("--ecut", type=float, default=300.0)
    parser.add_argument("--kpts", type=int, nargs=3, default=[2, 2, 2])
    parser.add_argument("--threads-cells", nargs="*", default=["nio4"], choices=sorted(cells()),
                        help="cells also timed with 2 OMP/BLAS threads per task")
    parser.add_argument("--tasks", type=int, default=50, help="candidate frames for the make+collect overhead")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks/label.md")
    args = parser.parse_args()
    logging.getLogger("spingen").propagate = False  # the stage's log lines are not the result
    info = machine()
    with tempfile.TemporaryDirectory(prefix="spingen-label-bench-") as tmp:
        work = Path(tmp)
        gpaw_rows = [bench_gpaw(key, work, args.ecut, tuple(args.kpts), key in args.threads_cells)
                     for key in ["nio4"] + [c for c in args.cells if c != "nio4"]]
        overhead = bench_overhead(work, args.tasks)
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(info, gpaw_rows, overhead, args.ecut)
    print(text)
    if not args.no_doc and DOC.is_file() and DOC_BEGIN in DOC.read_text():
        doc = DOC.read_text()
        DOC.write_text(doc[: doc.index(DOC_BEGIN)] + text + doc[doc.index(DOC_END) + len(DOC_END) + 1:])
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
