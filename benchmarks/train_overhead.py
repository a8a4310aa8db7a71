"""Wall-time overhead of spingen's train stage against running deepmd-kit by hand.

What is compared, on the same data and the same deepmd-kit input files:

* spingen: the real `spingen.loop.Loop` driving `TrainStage` make/run/post (iteration 0 only),
  in a fresh Python process per measurement, exactly as `spingen run` does it (imports, param and
  machine checks, data conversion, one dpdispatcher Shell/LocalContext submission of all models,
  post). Phases are timed separately.
* by hand, concurrent: in a fresh folder holding copies of the input.json files spingen wrote and
  of its converted `data/`, `dp --pt train input.json && dp --pt freeze -o frozen_model.pth` for
  every model, all models started at once (`&`, then `wait`). spingen's Shell batch runs the
  models of one submission concurrently, so this is the like-for-like baseline.
* by hand, sequential: the same commands, one model after the other.

Every measurement runs in its own child process (this file, `_measure` sub-command), which makes
itself a child subreaper so that the deepmd-kit processes dpdispatcher detaches with `nohup ... &`
are reaped by it and their peak RSS shows up in its RUSAGE_CHILDREN.

Usage (takes several minutes; nothing else heavy should run meanwhile):

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/train_overhead.py \
        --steps 500 --numb-models 2 --repeat 3 --check-interval 1 30 --omp-num-threads 1

Without --omp-num-threads the calling environment is passed unchanged (deepmd-kit's thread
defaults); either way both sides get the same environment, and it is reported. HOME is pointed at
the benchmark folder (dpdispatcher keeps records under $HOME/.dpdispatcher).
The results block of docs/benchmarks/train_overhead.md (between its markers) is rewritten;
the text around it is kept.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_block import cpu_model

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
DP = str(BIN / "dp")
TYPE_MAP = ["Li", "Ni", "O"]
DOC_BEGIN = "<!-- results:begin (written by benchmarks/train_overhead.py) -->"
DOC_END = "<!-- results:end -->"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DP_INTRA_OP_PARALLELISM_THREADS",
               "DP_INTER_OP_PARALLELISM_THREADS", "TF_INTRA_OP_PARALLELISM_THREADS",
               "TF_INTER_OP_PARALLELISM_THREADS", "NUM_WORKERS")


# ------------------------------------------------------------------ inputs
def lini_frames(n_frames: int, seed: int):
    """Perturbed Li2Ni2O4 cells (8 atoms): Morse energies/forces plus a spin-state energy."""
    from ase.build import bulk
    from ase.calculators.morse import MorsePotential

    rng = np.random.default_rng(seed)
    base = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    symbols = base.get_chemical_symbols()
    symbols[0], symbols[2] = "Li", "Li"
    base.set_chemical_symbols(symbols)
    ni = [i for i, s in enumerate(symbols) if s == "Ni"]
    frames = []
    for _ in range(n_frames):
        atoms = base.copy()
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = MorsePotential(epsilon=0.3, r0=2.1, rho0=4.0)
        moments = np.zeros(len(atoms))
        moments[ni] = rng.choice([1.0, -1.0, 3.0, -3.0], size=len(ni))
        spin_energy = 0.4 * np.sum(np.abs(moments[ni]) - 1.0) + 0.05 * moments[ni[0]] * moments[ni[1]]
        frames.append((atoms, atoms.get_potential_energy() + spin_energy, atoms.get_forces(), moments))
    return frames


def write_spin_system(path: Path, n_frames: int, seed: int = 0) -> None:
    """A deepmd/npy system with raw moments (uB) in spin.npy, as spingen stores data."""
    from spingen.data.npy import write_frames

    write_frames(path, lini_frames(n_frames, seed), TYPE_MAP)


def training_param(steps: int) -> dict:
    """A small se_e2_a network: embedding [8, 16], fitting [32, 32]."""
    return {
        "model": {
            "descriptor": {"type": "se_e2_a", "sel": [10, 10, 20], "rcut_smth": 0.5, "rcut": 4.0,
                           "neuron": [8, 16], "axis_neuron": 4},
            "fitting_net": {"neuron": [32, 32]},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 1e-5, "decay_steps": 50},
        "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"numb_steps": steps, "disp_freq": 100, "save_freq": steps,
                     "training_data": {"batch_size": 1}},
    }


def write_inputs(root: Path, frames: int, steps: int, numb_models: int, intervals: list[int]) -> dict:
    """data/init, confs/POSCAR, param.json and one machine.json per check_interval."""
    from ase.io import write

    write_spin_system(root / "data" / "init", frames)
    (root / "confs").mkdir()
    write(root / "confs" / "POSCAR", lini_frames(1, 99)[0][0], format="vasp")
    param = {
        "type_map": TYPE_MAP,
        "init_data_sys": ["data/init"],
        "sys_configs": [["confs/POSCAR"]],
        "numb_models": numb_models,
        "default_training_param": training_param(steps),
        "spin": {"magnetic": ["Ni"], "virtual_scale": 0.3, "offset": 0.2, "moments": {"Ni": [1, 3]}},
        "model_devi_jobs": [{"sys_idx": [0], "temps": [300], "nsteps": 10, "trj_freq": 5}],
        "model_devi_f_trust_lo": 0.05,
        "model_devi_f_trust_hi": 0.3,
        "fp_style": "gpaw",
        "fp_task_max": 4,
    }
    (root / "param.json").write_text(json.dumps(param, indent=1))
    machines = {}
    for interval in intervals:
        section = {
            "command": DP,
            "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": "./",
                        "remote_root": "remote"},
            "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1},
            "check_interval": interval,
        }
        machine = {"api_version": "1.0", "train": section, "model_devi": dict(section), "fp": [dict(section)]}
        path = root / f"machine.ci{interval}.json"
        path.write_text(json.dumps(machine, indent=1))
        machines[interval] = path
    return machines


def prepare_byhand_inputs(root: Path, machine: Path) -> Path:
    """Run TrainStage.make once (untimed) to get the input.json files and converted data/."""
    from spingen.loop import StageContext
    from spingen.schema import load_machine, load_param
    from spingen.stages.train import TrainStage

    prep = root / "prep"
    stage = TrainStage(load_param(root / "param.json"), load_machine(machine).train)
    ctx = StageContext(prep, 0)
    stage.path(ctx).mkdir(parents=True)
    stage.make(ctx)
    return stage.path(ctx)


# ------------------------------------------------------------------ one measurement (child process)
def become_subreaper() -> None:
    """Orphaned descendants (dpdispatcher's `nohup bash job.sub &`) get reparented to us."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


class DpWatcher:
    """Samples, every `interval` s, whether a `dp` process runs below this process.

    First and last sighting bracket the deepmd-kit work; what a side spends outside that bracket
    (staging, submission, polling, download) is its overhead. Same sampler on both sides.
    """

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval = interval
        self.first: float | None = None
        self.last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> DpWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def dp_below(root: int) -> bool:
        parent, dps = {}, []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            close = stat.rfind(b")")
            comm = stat[stat.find(b"(") + 1:close]
            fields = stat[close + 2:].split()
            if fields[0] == b"Z":
                continue
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            if comm == b"dp":
                dps.append(pid)
        for pid in dps:
            seen = 0
            while pid > 1 and seen < 64:
                if pid == root:
                    return True
                pid, seen = parent.get(pid, 0), seen + 1
        return False

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            now = time.perf_counter()
            if self.dp_below(me):
                self.first = now if self.first is None else self.first
                self.last = now
            self._stop.wait(self.interval)


def reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def measure_spingen(workdir: Path, param: Path, machine: Path) -> dict:
    t0 = time.perf_counter()
    from spingen.loop import Loop, setup_logging
    from spingen.schema import load_machine, load_param
    from spingen.stages.train import TrainStage

    param_obj = load_param(param)
    section = load_machine(machine).train
    setup_logging(workdir)
    stage = TrainStage(param_obj, section)
    times: dict[str, float] = {"setup": time.perf_counter() - t0}

    marks: dict[str, float] = {}

    def timed(name, method):
        def wrapper(ctx):
            start = marks[f"{name}_start"] = time.perf_counter()
            try:
                return method(ctx)
            finally:
                marks[f"{name}_end"] = time.perf_counter()
                times[name] = marks[f"{name}_end"] - start
        return wrapper

    for phase in ("make", "run", "post"):
        setattr(stage, phase, timed(phase, getattr(stage, phase)))
    with DpWatcher() as watch:
        Loop(workdir, [stage], n_iterations=0, closing_stages=1).run()
    times["loop_total"] = time.perf_counter() - t0
    train = workdir / "iter.000000" / "00.train"
    models = sorted(p.name for p in train.glob("[0-9][0-9][0-9]") if (p / "frozen_model.pth").is_file())
    return {"phases": times, "models": models,
            "dp_window": dp_window(watch, marks["run_start"], marks["run_end"])}


def dp_window(watch: DpWatcher, start: float, end: float) -> dict:
    """Seconds from `start` to the first dp process, dp first-to-last, last dp to `end`."""
    if watch.first is None:
        return {}
    return {"lead_in": watch.first - start, "dp_span": watch.last - watch.first, "lead_out": end - watch.last}


def byhand_script(tasks: list[str], concurrent: bool) -> str:
    one = ('( cd "{d}" && "$DP" --pt train input.json && "$DP" --pt freeze -o frozen_model.pth ) '
           '>"{d}/train.log" 2>"{d}/train.err"')
    if concurrent:
        lines = ["pids=''"]
        lines += [one.format(d=d) + " & pids=\"$pids $!\"" for d in tasks]
        lines += ["rc=0", "for p in $pids; do wait $p || rc=1; done", "exit $rc"]
    else:
        lines = ["set -e"] + [one.format(d=d) for d in tasks]
    return "\n".join(lines) + "\n"


def measure_byhand(folder: Path, concurrent: bool) -> dict:
    tasks = sorted(p.name for p in folder.glob("[0-9][0-9][0-9]") if p.is_dir())
    script = byhand_script(tasks, concurrent)
    (folder / "byhand.sh").write_text(script)
    env = dict(os.environ, DP=DP)
    with DpWatcher() as watch:
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "byhand.sh"], cwd=folder, env=env)
        t1 = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"by-hand training failed in {folder} (see */train.err)")
    models = [d for d in tasks if (folder / d / "frozen_model.pth").is_file()]
    return {"phases": {"commands": t1 - t0}, "models": models, "dp_window": dp_window(watch, t0, t1)}


def vm_hwm_kib() -> int:
    """Peak resident set size of this process image (VmHWM), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child_main(args: argparse.Namespace) -> int:
    become_subreaper()
    folder = Path(args.folder)
    if args.mode == "spingen":
        result = measure_spingen(folder, Path(args.param), Path(args.machine))
    else:
        result = measure_byhand(folder, concurrent=args.mode == "concurrent")
    reap_all()
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # RUSAGE_SELF's ru_maxrss keeps the high-water mark of the process image before exec (the
    # forking driver); VmHWM is this image's own peak. Both are kept.
    result["maxrss_self_kib"] = own.ru_maxrss
    result["vmhwm_self_kib"] = vm_hwm_kib()
    result["maxrss_children_kib"] = children.ru_maxrss
    result["cpu_self_s"] = own.ru_utime + own.ru_stime
    result["cpu_children_s"] = children.ru_utime + children.ru_stime
    Path(args.result).write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------ driver
def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(threshold: float, max_wait: float, window: float = 5.0) -> float:
    """Wait until the machine is at most `threshold` busy over `window` s; return the seconds waited."""
    ncpu = len(os.sched_getaffinity(0))
    start = last_note = time.monotonic()
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        busy = (cpu_busy_seconds() - b0) / (window * ncpu)
        waited = time.monotonic() - start
        if busy <= threshold or waited >= max_wait:
            if busy > threshold:
                print(f"  machine still {busy:.0%} busy after {waited:.0f} s; measuring anyway", flush=True)
            elif waited > window + 1:
                print(f"  machine idle after {waited:.0f} s of waiting", flush=True)
            return waited
        if waited < window + 1 or time.monotonic() - last_note >= 300:
            print(f"  machine {busy:.0%} busy (other processes); waiting ({waited:.0f} s so far)", flush=True)
            last_note = time.monotonic()


def run_child(mode: str, folder: Path, root: Path, env: dict, machine: Path | None = None) -> dict:
    result_file = folder.parent / f"{folder.name}.result.json"
    cmd = [sys.executable, str(HERE), "_measure", mode, str(folder), "--result", str(result_file)]
    if mode == "spingen":
        cmd += ["--param", str(root / "param.json"), "--machine", str(machine)]
    log = open(folder.parent / f"{folder.name}.log", "w")
    load_before = os.getloadavg()[0]
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    busy = cpu_busy_seconds() - busy0
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {mode} in {folder} failed (rc {proc.returncode}); see {log.name}")
    result = json.loads(result_file.read_text())
    result["process_wall"] = wall
    # 1-minute load average before and after: anything well above the models running here means
    # another process competed for the cores and the wall times are not to be trusted
    result["loadavg"] = [load_before, os.getloadavg()[0]]
    # CPU seconds the machine spent on anything but this measurement while it ran
    result["foreign_cpu_s"] = max(0.0, busy - result["cpu_self_s"] - result["cpu_children_s"])
    # spingen: the whole process, as `spingen run` would take it (interpreter start, imports,
    # checks, loop). by hand: the shell commands only (no Python start-up counted against them).
    result["total"] = wall if mode == "spingen" else result["phases"]["commands"]
    return result


def measure_variant(variant: str, folder: Path, root: Path, env: dict, machines: dict, prep_train: Path,
                    args: argparse.Namespace) -> dict:
    """One measurement of one variant in a fresh folder (after waiting for an idle machine)."""
    if args.idle_threshold < 1:
        wait_until_idle(args.idle_threshold, args.max_wait)
    folder.mkdir(parents=True)
    if variant.startswith("spingen"):
        result = run_child("spingen", folder, root, env, machines[int(variant[len("spingen_ci"):])])
        train = folder / "iter.000000" / "00.train"
        for task in sorted(prep_train.glob("[0-9][0-9][0-9]")):
            if (train / task.name / "input.json").read_text() != (task / "input.json").read_text():
                raise RuntimeError(f"{train / task.name}/input.json differs from the by-hand copy")
    else:
        shutil.copytree(prep_train / "data", folder / "data", symlinks=True)
        for task in sorted(prep_train.glob("[0-9][0-9][0-9]")):
            (folder / task.name).mkdir()
            shutil.copy2(task / "input.json", folder / task.name / "input.json")
        result = run_child(variant.split("_")[1], folder, root, env)
    if len(result["models"]) != args.numb_models:
        raise RuntimeError(f"{variant}: {len(result['models'])} frozen models, expected {args.numb_models}")
    return result


def machine_info(env: dict) -> dict:
    cpu = cpu_model()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
    except OSError:
        pass
    versions = {}
    for name in ("deepmd-kit", "torch", "dpdispatcher", "dpdata", "numpy"):
        try:
            from importlib.metadata import version
            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = "?"
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "versions": versions,
        "threads_env": {k: env.get(k, "(unset)") for k in THREAD_VARS},
    }


def thread_lines(log: Path) -> list[str]:
    """deepmd-kit's own report of its thread settings, from one by-hand train log."""
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if "DEEPMD INFO" in line and ("Num Intra Threads" in line or "Num Inter Threads" in line):
            text = " ".join(line.split("DEEPMD INFO")[-1].split())
            if text not in found:
                found.append(text)
    return found


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, results in runs.items():
        phases = sorted({k for r in results for k in r["phases"]})
        out[name] = {
            "total": [r["total"] for r in results],
            "total_median": median([r["total"] for r in results]),
            "phases_median": {p: median([r["phases"][p] for r in results if p in r["phases"]]) for p in phases},
            "cpu_median": median([r["cpu_self_s"] + r["cpu_children_s"] for r in results]),
            "dp_window_median": {k: median([r["dp_window"][k] for r in results if r.get("dp_window")])
                                 for k in ("lead_in", "dp_span", "lead_out")},
            # wall time outside the deepmd-kit processes: what this side adds, nearly load-independent
            "outside_dp_median": median([r["total"] - r["dp_window"]["dp_span"] for r in results
                                         if r.get("dp_window")]),
            "total_min": min(r["total"] for r in results),
            "loadavg_max": max(max(r["loadavg"]) for r in results),
            "foreign_cpu_max": max(r["foreign_cpu_s"] for r in results),
            "contended_kept": sum(1 for r in results if r.get("contended")),
            "maxrss_self_mib": max(r["maxrss_self_kib"] for r in results) / 1024,
            "vmhwm_self_mib": max((r.get("vmhwm_self_kib", 0) for r in results), default=0) / 1024,
            "maxrss_children_mib": max(r["maxrss_children_kib"] for r in results) / 1024,
        }
    return out


def render(summary: dict, info: dict, args: argparse.Namespace, command: str, thread_report: list[str],
           date: str, discarded: list[dict], summary_runs: dict[str, list[dict]]) -> str:
    conc = summary["byhand_concurrent"]["total_median"]
    seq = summary["byhand_sequential"]["total_median"]
    lines = [
        DOC_BEGIN,
        "",
        f"Run of {date}: {args.numb_models} models x {args.steps} steps, {args.frames} frames "
        f"(+ {args.frames} flip twins), {args.repeat} repeats, median shown.",
        "",
        "```",
        command,
        "```",
        "",
        "| variant | median wall (s) | all runs (s) | make | run | post | setup | ratio vs by hand, concurrent | ratio vs by hand, sequential | CPU time (s) | max other CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x):
        return "" if x is None or x != x else f"{x:.2f}"

    for name, s in summary.items():
        ph = s["phases_median"]
        label = {"byhand_concurrent": "by hand, concurrent (`&` + `wait`)",
                 "byhand_sequential": "by hand, sequential"}.get(name, name.replace("spingen_ci", "spingen, check_interval "))
        lines.append(
            f"| {label} | {s['total_median']:.2f} | {', '.join(f'{t:.2f}' for t in s['total'])} | "
            f"{fmt(ph.get('make'))} | {fmt(ph.get('run'))} | {fmt(ph.get('post'))} | {fmt(ph.get('setup'))} | "
            f"{s['total_median'] / conc:.3f} | {s['total_median'] / seq:.3f} | {s['cpu_median']:.1f} | "
            f"{s['foreign_cpu_max']:.1f} |")
    paired = {name: [r["total"] / c["total"] for r, c in zip(runs, summary_runs["byhand_concurrent"])]
              for name, runs in summary_runs.items() if name.startswith("spingen")}
    if paired:
        lines += ["", "Paired ratios (each spingen run / the by-hand concurrent run of the same repeat), which "
                  "cancel slow drifts in machine load: "
                  + "; ".join(f"{n.replace('spingen_ci', 'check_interval ')}: "
                              + ", ".join(f"{x:.3f}" for x in v) + f" (median {median(v):.3f})"
                              for n, v in paired.items()) + "."]
    lines += ["", "CPU time: user + system of the measuring process and all its descendants. Other CPU: CPU seconds "
              "the machine spent on other processes during the measurement (a measurement with more than "
              f"{args.max_foreign:.0%} of the cores busy elsewhere is repeated, up to {args.retries} times)."]
    kept = sum(s["contended_kept"] for s in summary.values())
    if kept:
        lines += ["", f"**{kept} measurement(s) in the table ran while other processes used the cores "
                  "(retries exhausted): treat their wall times with care.**"]
    if discarded:
        lines += ["", f"{len(discarded)} contended measurement(s) were discarded and repeated: "
                  + ", ".join(f"{d['variant']} {d['total']:.1f} s (other CPU {d['foreign_cpu_s']:.0f} s)"
                              for d in discarded) + "."]
    lines += ["", "Where the time goes (median; a sampler at 0.2 s looks for `dp` processes below the measuring "
              "process: *lead-in* = start of the run phase / of the shell commands to the first `dp` seen, "
              "*dp span* = first to last `dp` seen, *lead-out* = last `dp` seen to the end of the run phase / "
              "of the commands; +-0.2 s):", "",
              "| variant | lead-in (s) | dp span (s) | lead-out (s) | total - dp span (s) |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        w = s["dp_window_median"]
        lines.append(f"| {name} | {fmt(w['lead_in'])} | {fmt(w['dp_span'])} | {fmt(w['lead_out'])} | "
                     f"{fmt(s['outside_dp_median'])} |")
    base = summary["byhand_concurrent"]
    lines += ["", "spingen's added wall time = its (total - dp span) minus the by-hand one, which hardly depends "
              "on the machine's load; against the fastest by-hand concurrent run "
              f"({base['total_min']:.2f} s) that gives:", ""]
    for name, s in summary.items():
        if name.startswith("spingen"):
            added = s["outside_dp_median"] - base["outside_dp_median"]
            lines.append(f"- {name.replace('spingen_ci', 'check_interval ')}: +{added:.2f} s, ratio "
                         f"{(base['total_min'] + added) / base['total_min']:.3f}")
    lines += ["", "Run phase alone (dpdispatcher submission of both models) against the concurrent by-hand commands:", ""]
    for name, s in summary.items():
        if name.startswith("spingen"):
            run = s["phases_median"]["run"]
            lines.append(f"- {name.replace('spingen_ci', 'check_interval ')}: run {run:.2f} s, "
                         f"{run - conc:+.2f} s vs by hand ({run / conc:.3f}x)")
    lines += ["", "Peak resident memory, largest over the repeats (a single process's peak, not the sum of "
              "concurrent ones). Measuring process: VmHWM of the child that ran spingen's loop (or the by-hand "
              "shell); RUSAGE_SELF's ru_maxrss would also count the benchmark driver it was forked from. "
              "Largest child: RUSAGE_CHILDREN's ru_maxrss, i.e. the biggest `dp` process.", "",
              "| variant | measuring process (VmHWM) | largest child (RUSAGE_CHILDREN) |", "|---|---|---|"]
    for name, s in summary.items():
        own = f"{s['vmhwm_self_mib']:.0f} MiB" if s["vmhwm_self_mib"] else "n/a"
        lines.append(f"| {name} | {own} | {s['maxrss_children_mib']:.0f} MiB |")
    lines += ["", "Machine:", "",
              f"- `{info['uname']}`",
              f"- CPU: {info['cpu']}; nproc {info['nproc']} (os.cpu_count {info['cpu_count']}); memory {info['memory']}",
              f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
              "- thread variables (same for both sides): "
              + ", ".join(f"{k}={v}" for k, v in info["threads_env"].items())]
    if thread_report:
        lines.append("- deepmd-kit reports: " + "; ".join(f"`{t}`" for t in thread_report))
    lines += ["", DOC_END]
    return "\n".join(lines)


DOC_TEMPLATE = """# Train stage overhead

How much wall time does spingen's train stage add on top of running deepmd-kit by hand?

{results}
"""


def write_doc(path: Path, block: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and DOC_BEGIN in path.read_text() and DOC_END in path.read_text():
        text = path.read_text()
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        path.write_text(head + block + tail)
    else:
        path.write_text(DOC_TEMPLATE.format(results=block))


def rerender_main(args: argparse.Namespace) -> int:
    """Write the results block again from a kept results.json (e.g. after changing the layout)."""
    data = json.loads(Path(args.render).read_text())
    saved = data.get("args", {})
    for key, value in saved.items():
        setattr(args, key, value)
    block = render(summarize(data["runs"]), data["machine"], args, data.get("command", "(see results.json)"),
                   data.get("threads", []), data.get("date", "?"), data.get("discarded", []), data["runs"])
    print(block)
    if args.output:
        write_doc(Path(args.output), block)
    return 0


def driver_main(args: argparse.Namespace) -> int:
    intervals = args.check_interval
    root = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="spingen-train-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"work dir {root} is not empty")
    print(f"benchmark folder: {root}", flush=True)
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(root / "home")  # dpdispatcher keeps its records under $HOME/.dpdispatcher
    (root / "home").mkdir()
    env.pop("PYTHONPATH", None)
    if args.omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.omp_num_threads)

    machines = write_inputs(root, args.frames, args.steps, args.numb_models, intervals)
    prep_train = prepare_byhand_inputs(root, machines[intervals[0]])
    # warm the page cache for torch/deepmd imports so the first measurement is not penalized
    subprocess.run([sys.executable, "-c", "import torch, deepmd.pt.entrypoints.main, dpdispatcher, dpdata"],
                   env=env, check=True)

    variants = [f"spingen_ci{i}" for i in intervals] + ["byhand_concurrent", "byhand_sequential"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    discarded: list[dict] = []
    ncpu = len(os.sched_getaffinity(0))
    for rep in range(args.repeat):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate against drift
        for variant in order:
            for attempt in range(args.retries + 1):
                folder = root / f"rep{rep}" / (variant if attempt == 0 else f"{variant}.retry{attempt}")
                result = measure_variant(variant, folder, root, env, machines, prep_train, args)
                contended = result["foreign_cpu_s"] > args.max_foreign * result["total"] * ncpu
                print(f"rep {rep} {variant:<18} {result['total']:8.2f} s  cpu "
                      f"{result['cpu_self_s'] + result['cpu_children_s']:7.1f} s  other cpu "
                      f"{result['foreign_cpu_s']:5.1f} s  "
                      + " ".join(f"{k} {v:.2f}" for k, v in {**result["phases"], **result["dp_window"]}.items())
                      + ("  CONTENDED" if contended else ""), flush=True)
                if not contended:
                    break
                if attempt == args.retries:
                    print(f"  keeping a contended measurement of {variant} after {args.retries} retries", flush=True)
                    result["contended"] = True
                    break
                discarded.append({"variant": variant, "rep": rep, **result})
            runs[variant].append(result)

    summary = summarize(runs)
    info = machine_info(env)
    command = "PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/train_overhead.py " + " ".join(
        [f"--steps {args.steps}", f"--numb-models {args.numb_models}", f"--frames {args.frames}",
         f"--repeat {args.repeat}", "--check-interval " + " ".join(map(str, intervals)),
         f"--idle-threshold {args.idle_threshold:g}", f"--retries {args.retries}"]
        + ([f"--omp-num-threads {args.omp_num_threads}"] if args.omp_num_threads is not None else []))
    threads = thread_lines(root / "rep0" / "byhand_concurrent" / "000" / "train.err")
    date = time.strftime("%Y-%m-%d")
    block = render(summary, info, args, command, threads, date, discarded, runs)
    saved_args = {k: getattr(args, k) for k in ("steps", "numb_models", "frames", "repeat", "check_interval",
                                                "omp_num_threads", "idle_threshold", "max_foreign", "retries")}
    (root / "results.json").write_text(json.dumps({"runs": runs, "summary": summary, "machine": info,
                                                    "discarded": discarded, "args": saved_args,
                                                    "command": command, "threads": threads, "date": date},
                                                   indent=1))
    print(block)
    if args.output:
        write_doc(Path(args.output), block)
        print(f"wrote {args.output}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="sub")
    child = sub.add_parser("_measure", help="internal: one measurement in a child process")
    child.add_argument("mode", choices=["spingen", "concurrent", "sequential"])
    child.add_argument("folder")
    child.add_argument("--result", required=True)
    child.add_argument("--param")
    child.add_argument("--machine")
    parser.add_argument("--steps", type=int, default=500, help="training steps per model (default 500)")
    parser.add_argument("--numb-models", type=int, default=2, help="models in the ensemble (default 2)")
    parser.add_argument("--frames", type=int, default=40, help="frames in the data set (default 40)")
    parser.add_argument("--repeat", type=int, default=2, help="measurements per variant (default 2)")
    parser.add_argument("--check-interval", type=int, nargs="+", default=[1],
                        help="dpdispatcher polling interval(s) in s for the spingen side (default 1; "
                             "spingen's machine.json default is 30)")
    parser.add_argument("--omp-num-threads", type=int,
                        help="set OMP_NUM_THREADS for both sides (default: pass the environment unchanged, "
                             "i.e. deepmd-kit's defaults)")
    parser.add_argument("--idle-threshold", type=float, default=0.1,
                        help="before each measurement wait until the machine is at most this busy "
                             "(fraction of all cores over 5 s; default 0.1; 1 disables)")
    parser.add_argument("--max-wait", type=float, default=3600,
                        help="longest wait for an idle machine before a measurement, s (default 3600)")
    parser.add_argument("--max-foreign", type=float, default=0.05,
                        help="a measurement during which other processes used more than this fraction of "
                             "all cores is repeated (default 0.05)")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeats of a contended measurement before keeping it anyway (default 2)")
    parser.add_argument("--workdir", help="empty folder for the runs (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "train_overhead.md"),
                        help="markdown file to update (results block); '' for none")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite the results block from a kept results.json")
    args = parser.parse_args(argv)
    if args.sub == "_measure":
        return child_main(args)
    if args.render:
        return rerender_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
