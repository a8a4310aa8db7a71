"""How well the spin loop's models can fit the held-out judge at all: retrain on it and judge again.

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_loop/fit_floor.py \\
        TRAIN_DIR PARAM [--label-share 0.8] [--steps 3000] [--limit-pref-e 200] [--members 000 001]

TRAIN_DIR is one iteration's `00.train` of a spin-loop run and PARAM its param.json. Each member listed
is trained `--steps` more steps from its frozen model (`dp --pt train --init-frz-model`), on the data
it was trained on plus the judge (written as the train stage writes data: spingen.stages.train
.write_training_data), with `--label-share` of the batches drawn from every system but the first
(the initial data) and the energy prefactor raised to `--limit-pref-e`; `--without-judge` trains the
same way without it (the baseline). `--large` trains instead from scratch a larger network than the
loop's (LARGE: descriptor 32/64/128, axis 16, rcut 5 A, fitting 240x3; learning rate 0.002 decayed over
the steps) on the same data. Then the ensemble of the retrained members is judged on the judge:
energy RMSE, state gap RMSE and lowest state right (`spingen test`), and the gap error per state kind.

A model trained on the judge itself that still misses its state gaps shows that the model and its
training recipe, not the choice of labels, limit the gap RMSE the loop can reach. Each run trains in a
folder of its own under WORKDIR and appends its row to WORKDIR/fit_floor.json; the table of all rows is
written into docs/benchmarks/spin_loop.md (`--no-doc`: printed only; `--render-only`: the table again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from results_block import write_results  # noqa: E402
from state_gaps import KINDS as JUDGE_KINDS  # noqa: E402
from state_gaps import judged  # noqa: E402

JUDGE = HERE / "judge" / "data"
KINDS = JUDGE_KINDS[1:]  # the kinds beside FM
DOC = REPO / "docs" / "benchmarks" / "spin_loop.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/spin_loop/fit_floor.py) -->"
DOC_END = "<!-- results:end -->"
LARGE = {"descriptor": {"type": "se_e2_a", "sel": [24, 24, 40], "rcut_smth": 0.5, "rcut": 5.0,
                        "neuron": [32, 64, 128], "axis_neuron": 16},
         "fitting_net": {"neuron": [240, 240, 240]}}


def prepare(train_dir: Path, param_path: Path, work: Path, members: list[str], args) -> list[Path]:
    """One folder per member: its input (data + judge, shares, steps, prefactor), frozen model and encoding."""
    from spingen.schema import load_param
    from spingen.stages.train import write_training_data

    param = load_param(param_path)
    judge_data = work / "judge_data"
    shutil.rmtree(judge_data, ignore_errors=True)
    judge_data.mkdir(parents=True)
    write_training_data([JUDGE], judge_data, param.type_map, param.spin)
    folders = []
    for member in members:
        folder = work / member
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name in ("input.json", "frozen_model.pth", "spin_encoding.json"):
            shutil.copy(train_dir / member / name, folder / name)
        config = json.loads((folder / "input.json").read_text())
        for key in ("training_data", "validation_data"):
            systems = [str((train_dir / member / s).resolve()) for s in config["training"][key]["systems"]]
            if not args.without_judge:
                systems.append(str(judge_data / "sys.000"))
            config["training"][key]["systems"] = systems
            config["training"][key]["auto_prob"] = \
                f"prob_sys_size; 0:1:{1 - args.label_share:g}; 1:{len(systems)}:{args.label_share:g}"
        config["training"]["numb_steps"] = args.steps
        config["loss"]["limit_pref_e"] = args.limit_pref_e
        if args.large:
            for part, settings in LARGE.items():
                seed = config["model"][part].get("seed")
                config["model"][part] = {**settings, **({"seed": seed} if seed is not None else {})}
            config["learning_rate"].update(start_lr=0.002, decay_steps=max(1, args.steps // 40))
            (folder / "frozen_model.pth").unlink()
        (folder / "input.json").write_text(json.dumps(config, indent=1))
        folders.append(folder)
    return folders


def train(folder: Path) -> None:
    """dp --pt train from the member's frozen model (from scratch where there is none), then freeze to
    retrained.pth (log: train.log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = ["--init-frz-model", "frozen_model.pth"] if (folder / "frozen_model.pth").is_file() else []
    with open(folder / "train.log", "w") as log:
        for command in (["dp", "--pt", "train", "input.json", *start], ["dp", "--pt", "freeze", "-o", "retrained.pth"]):
            subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def render(rows: list[dict]) -> str:
    lines = ["| run | models | network | judge in training | steps | share of batches off the initial data | limit_pref_e | "
             "judge E RMSE meV/atom | state gap RMSE meV/atom | lowest right | "
             + " | ".join(f"{k}: mean gap error to FM" for k in KINDS) + " |",
             "|---" * (10 + len(KINDS)) + "|"]
    for r in rows:
        j = r["judged"]
        network = "larger, from scratch" if r.get("large") else "the loop's, continued"
        lines.append(f"| {r['date']} | {r['models']} | {network} | {'yes' if r['with_judge'] else 'no'} | {r['steps']} | "
                     f"{r['label_share']:g} | {r['limit_pref_e']:g} | {j['e_rmse']:.1f} | {j['gap_rmse']:.1f} | "
                     f"{j['right']}/{j['geometries']} | " + " | ".join(f"{j['kinds'][k]:+.1f}" for k in KINDS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir", type=Path, nargs="?")
    parser.add_argument("param", type=Path, nargs="?")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spin_fit_floor"))
    parser.add_argument("--members", nargs="+", default=["000", "001"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--label-share", type=float, default=0.8,
                        help="share of the batches drawn from every system but the first (the initial data)")
    parser.add_argument("--limit-pref-e", type=float, default=200.0)
    parser.add_argument("--without-judge", action="store_true", help="the baseline: the same training without it")
    parser.add_argument("--large", action="store_true", help="from scratch, the larger network LARGE")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from WORKDIR/fit_floor.json")
    args = parser.parse_args(argv)
    if not 0 < args.label_share < 1:
        parser.error(f"--label-share must lie between 0 and 1, got {args.label_share}")
    store = args.workdir / "fit_floor.json"
    if args.render_only:
        return publish(json.loads(store.read_text()), args.no_doc)
    if args.train_dir is None or args.param is None:
        parser.error("TRAIN_DIR and PARAM are needed unless --render-only")
    run = args.workdir.resolve() / "_".join(["large" if args.large else "continued",
                                              "without_judge" if args.without_judge else "with_judge",
                                              f"{args.steps}steps", f"pref{args.limit_pref_e:g}"])
    folders = prepare(args.train_dir.resolve(), args.param, run, args.members, args)
    began = time.time()
    for folder in folders:
        train(folder)
    result = judged([f / "retrained.pth" for f in folders])
    row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": len(folders),
           "with_judge": not args.without_judge, "large": args.large, "steps": args.steps, "label_share": args.label_share,
           "limit_pref_e": args.limit_pref_e, "train_s": time.time() - began, "judged": result,
           "train_dir": str(args.train_dir.resolve())}
    print(json.dumps(row), flush=True)
    rows = (json.loads(store.read_text()) if store.is_file() else []) + [row]
    store.write_text(json.dumps(rows, indent=1))
    return publish(rows, args.no_doc)


def publish(rows: list[dict], no_doc: bool) -> int:
    """Print the table of every recorded run and write it into the docs page (unless no_doc)."""
    text = render(rows)
    print(text)
    if not no_doc:
        write_results(DOC, DOC_BEGIN, DOC_END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
