"""spingen: concurrent learning of spin-aware Deep Potentials for cathodes from DFT+U (train, spin-minimized MD, label)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from spingen import __version__


def cmd_run(args: argparse.Namespace) -> int:
    from spingen.checks import input_warnings
    from spingen.loop import Loop, setup_logging
    from spingen.schema import label_settings, load_machine, load_param
    from spingen.stages import build_stages

    param = load_param(args.param)
    machines = load_machine(args.machine)
    stages = build_stages(param, machines)  # every setting checked before anything runs
    workdir = Path(args.workdir).resolve()
    setup_logging(workdir, args.debug)
    for line in input_warnings(param, label_settings(param)):
        logging.getLogger("spingen").warning(line)
    os.chdir(workdir)  # dpdispatcher writes its own log to the current directory
    if param.init_gen is not None:
        make_init_data(param, machines, workdir)
    Loop(workdir, stages, param.n_iterations).run()
    return 0


def make_init_data(param, machines, workdir: Path) -> None:
    """Run (or resume, or skip when finished) the one-iteration loop of WORKDIR/init."""
    from spingen.layout import INIT_DIR
    from spingen.loop import Loop
    from spingen.stages import build_init_stages

    Loop(workdir / INIT_DIR, build_init_stages(param, machines.fp), 1, closing_stages=0).run()


def cmd_init(args: argparse.Namespace) -> int:
    from spingen.errors import InputError
    from spingen.layout import init_data_systems
    from spingen.loop import setup_logging
    from spingen.schema import load_machine, load_param

    param = load_param(args.param)
    machines = load_machine(args.machine)
    if param.init_gen is None:
        raise InputError(f"{param.path}: key 'init_data_gen/configs' is empty: nothing to make")
    workdir = Path(args.workdir).resolve()
    setup_logging(workdir, args.debug)
    os.chdir(workdir)
    make_init_data(param, machines, workdir)
    for system in init_data_systems(workdir):
        print(system)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from spingen.schema import load_machine, load_param
    from spingen.stages import build_stages

    param = load_param(args.param)
    machines = load_machine(args.machine)
    build_stages(param, machines)  # each stage checks its own settings (POTCARs, INCAR, explore keys)
    print(summary(param, machines))
    print("OK: both files are valid; nothing was submitted.")
    return 0


def summary(param, machines) -> str:
    """A short human summary of a checked param/machine pair."""
    from spingen.checks import input_warnings
    from spingen.schema import label_settings

    spin = param.spin
    lines = [
        f"param    {param.path}",
        f"type_map {' '.join(param.type_map)}",
        f"data     {len(param.init_data_sys)} initial system(s)" + (
            "" if param.init_gen is None else
            f"; init_data_gen: {len(param.init_gen.configs)} structure(s) x {param.init_gen.pert_numb} perturbed "
            f"copies x {', '.join(str(len(s)) for s in param.init_gen.spin_states)} spin state(s)"),
        f"explore  {param.n_iterations} iteration(s), {sum(len(g) for g in param.sys_configs)} start structure(s)",
        f"train    {param.train.numb_models} model(s)",
    ]
    if spin.enabled:
        moments = dict(spin.moments) if not isinstance(spin.moments, str) else auto_levels(param)
        lines.append(f"spin     magnetic {' '.join(spin.magnetic)}; eta {spin.virtual_scale} A/uB, d {spin.offset} A; "
                     f"moments {moments}; flip symmetry {spin.flip_symmetry}")
    else:
        lines.append("spin     disabled: pristine Deep Potential baseline")
    lines.append(f"label    fp_style {param.raw['fp_style']}, at most {param.raw['fp_task_max']} per system")
    lines += [f"WARNING  {line}" for line in input_warnings(param, label_settings(param))]
    for name in ("train", "model_devi", "fp"):
        section = getattr(machines, name)
        lines.append(f"machine  {name:<10} {section.machine['batch_type']}/{section.machine['context_type']}: "
                     f"{section.command}")
    return "\n".join(lines)


def auto_levels(param) -> str:
    """What "auto" moment levels will be at iteration 0: clustered from init_data_sys when it has data."""
    from spingen.data.levels import supported_magnitudes

    if not param.init_data_sys:
        return "auto (clustered from the initial data once it is made)"
    try:
        levels = supported_magnitudes(param.init_data_sys, param.spin.magnetic, param.spin.min_level_support)
    except ValueError as err:
        return f"auto ({err})"
    refused = (f"; levels in fewer than spin/min_level_support {param.spin.min_level_support} frames are refused "
               "(list them in spin/moments to keep them)" if levels.refused else "")
    return (f"auto, from init_data_sys: {levels.kept} ({levels.describe()}{refused})"
            + (" + the data init_data_gen makes" if param.init_gen else ""))


def cmd_doc(args: argparse.Namespace) -> int:
    from spingen.schema import machine_arginfo, param_arginfo

    arginfo = param_arginfo() if args.which == "param" else machine_arginfo()
    print(arginfo.gen_doc(make_anchor=False))
    return 0


def cmd_init_data(args: argparse.Namespace) -> int:
    from spingen.data.vasp import import_vasp

    report = import_vasp(args.files, Path(args.output), type_map=args.type_map, all_steps=args.all_steps,
                         stride=args.stride)
    print(report.format())
    return report.exit_code


def cmd_spin_search(args: argparse.Namespace) -> int:
    from spingen.errors import InputError
    from spingen.tools.spin_search import run

    if len(args.paths) < 2:
        raise InputError("give at least one MODEL and the STRUCTURE")
    return run(args.paths[:-1], args.paths[-1], args.moments, magnetic=args.magnetic, eta=args.eta,
               offset=args.offset, nupdown=args.nupdown, k=args.k, seed=args.seed, output=args.output,
               batch_size=args.batch_size, max_evaluations=args.max_evaluations, cold_runs=args.cold_runs,
               symmetrize=args.symmetrize)


def cmd_test(args: argparse.Namespace) -> int:
    from spingen.tools.model_test import format_table, run

    print(format_table(run(args.models, args.data, offset=args.offset, plot=args.plot)))
    if args.plot:
        print(f"parity plot: {args.plot}")
    return 0


def cmd_label_task(args: argparse.Namespace) -> int:
    from spingen.tasks.label import run_label_task

    result = run_label_task(Path(args.task_dir))
    print("label-task: " + ("converged" if result["ok"] else f"failed: {result['reason']}"))
    return 0


def cmd_explore_task(args: argparse.Namespace) -> int:
    from spingen.tasks.explore import run

    return run(args.task_dir)


def cmd_status(args: argparse.Namespace) -> int:
    from spingen.report import format_json, format_status, gather

    status = gather(Path(args.workdir))
    print(format_json(status) if args.json else format_status(status))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from spingen.report import plot_report

    print(plot_report(Path(args.workdir), Path(args.output)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spingen", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"spingen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) the concurrent-learning loop")
    run.add_argument("param")
    run.add_argument("machine")
    run.add_argument("-w", "--workdir", default=".", help="work directory (default: current directory)")
    run.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    run.set_defaults(func=cmd_run)

    make_init = sub.add_parser("init", help="make the initial data of init_data_gen (perturbed structures "
                               "labeled in several spin states) in WORKDIR/init; `run` does it too")
    make_init.add_argument("param")
    make_init.add_argument("machine")
    make_init.add_argument("-w", "--workdir", default=".", help="work directory (default: current directory)")
    make_init.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    make_init.set_defaults(func=cmd_init)

    check = sub.add_parser("check", help="validate param.json, machine.json and their data; submit nothing")
    check.add_argument("param")
    check.add_argument("machine")
    check.set_defaults(func=cmd_check)

    doc = sub.add_parser("doc", help="print the key reference of param.json or machine.json")
    doc.add_argument("which", choices=["param", "machine"])
    doc.set_defaults(func=cmd_doc)

    init = sub.add_parser("init-data", help="import VASP runs (ISPIN=2) with their per-ion moments into deepmd/npy")
    init.add_argument("files", nargs="+", help="OUTCAR or vasprun.xml files (also .gz, .xz, .bz2) or run folders")
    init.add_argument("-o", "--output", required=True, help="output folder of the deepmd/npy systems")
    init.add_argument("-t", "--type-map", nargs="+", help="element order of the types (default: as found)")
    init.add_argument("--all-steps", action="store_true", help="import every complete ionic step (AIMD, "
                      "relaxation) with that step's moments, not only the last; unconverged steps are left out")
    init.add_argument("--stride", type=int, default=1, metavar="N",
                      help="with --all-steps, import ionic steps 1, 1+N, 1+2N, ... (default 1)")
    init.set_defaults(func=cmd_init_data)

    label = sub.add_parser("label-task", help="run one GPAW DFT+U label task (what the fp stage submits)")
    label.add_argument("task_dir", help="task directory holding gpaw_input.json; result.json is written there")
    label.set_defaults(func=cmd_label_task)

    explore = sub.add_parser("explore-task", help="run one spin-minimized MD exploration task (what the "
                             "model_devi stage submits)")
    explore.add_argument("task_dir", help="task directory holding task.json and conf.extxyz; traj.extxyz, "
                         "model_devi.out and the finished tag are written there")
    explore.set_defaults(func=cmd_explore_task)

    test = sub.add_parser("test", help="energy/force RMSE, flip asymmetry and spin-state ranking of model(s) on deepmd/npy data")
    test.add_argument("models", nargs="+", help="frozen model(s) (.pth); several = ensemble mean")
    test.add_argument("-s", "--data", nargs="+", required=True, help="deepmd/npy systems or folders of them")
    test.add_argument("--offset", type=float, help="spin offset d (A); default: spin_encoding.json beside the model")
    test.add_argument("--plot", help="write a DFT-vs-model parity plot (PNG)")
    test.set_defaults(func=cmd_test)

    search = sub.add_parser("spin-search", help="lowest-energy collinear moments of one structure under trained "
                            "spin model(s); prints MAGMOM for VASP")
    search.add_argument("paths", nargs="+", metavar="MODEL [MODEL ...] STRUCTURE",
                        help="frozen deepmd-kit spin model(s) (ensemble mean), then a POSCAR/extxyz read by ase")
    search.add_argument("--moments", nargs="+", required=True, metavar="EL=m1,m2",
                        help="|moment| levels (uB) per magnetic element, e.g. Ni=1,3 Co=0,1,4,5")
    search.add_argument("--magnetic", nargs="+", type=int, metavar="INDEX",
                        help="search only these atoms (0-based; default: every atom of a --moments element)")
    search.add_argument("--eta", type=float, help="virtual_scale eta (A/uB); default: read from the model")
    search.add_argument("--offset", type=float, help="offset d (A) of the encoding used in training; default: spin_encoding.json "
                        "beside the model")
    search.add_argument("--nupdown", type=float, help="fixed total moment of the searched ions (like VASP NUPDOWN)")
    search.add_argument("--k", type=int, default=5, help="how many lowest distinct states to list (default 5)")
    search.add_argument("--seed", type=int, default=0, help="random seed of the genetic search (default 0)")
    search.add_argument("--batch-size", type=int, help="most configurations per model call (default: about 1024 "
                        "atoms, real and virtual, per call)")
    search.add_argument("--max-evaluations", type=int, help="stop the search after this many evaluations")
    search.add_argument("--cold-runs", type=int, help="independent genetic runs, the lowest kept (default: above 16 "
                        "searched ions without --max-evaluations 3, then more until two reach the lowest state, "
                        "at most 8; else 1)")
    search.add_argument("--symmetrize", action="store_true",
                        help="search E_sym(S) = (E(S) + E(-S)) / 2 (models trained with spin/flip_symmetry none)")
    search.add_argument("-o", "--output", help="write the MAGMOM lines here (default: print them)")
    search.set_defaults(func=cmd_spin_search)

    status = sub.add_parser("status", help="progress of a work dir: one row per iteration (ratios, labels, "
                            "model RMSEs, the ensemble's error on new labels)")
    status.add_argument("workdir", nargs="?", default=".", help="work directory (default: current directory)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON (null where missing)")
    status.set_defaults(func=cmd_status)

    plot = sub.add_parser("plot", help="plot the progress of a work dir into one PNG")
    plot.add_argument("workdir", nargs="?", default=".", help="work directory (default: current directory)")
    plot.add_argument("-o", "--output", default="report.png", help="PNG to write (default: report.png)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spingen.errors import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"spingen: error: {err}", file=sys.stderr)
        return 2
    except (NotImplementedError, RuntimeError) as err:
        print(f"spingen: stopped: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # unwritable work dir, disk full: the data written before is intact
        print(f"spingen: stopped: {err.strerror or err} ({err.filename or 'file system'}); nothing recorded "
              "for the unfinished step: free the space or fix the permission and run the same command again",
              file=sys.stderr)
        return 1
