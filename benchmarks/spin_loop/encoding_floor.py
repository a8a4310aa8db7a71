"""Which spin encoding, loss weights, data and network can fit DFT+U state gaps of the supercell.

    PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_loop/encoding_floor.py \\
        [PARAM] --workdir WORKDIR [--virtual-scale 0.3] [--offset 0.2] [--large | --descriptor dpa1|se_e3] [--steps 6000] \\
        [--batch-size N] [--limit-pref-e P] [--limit-pref-f P] [--judge all|half|other-half|none|all-but-G] \\
        [--no-initial] [--extra-data DIR] [--seeds 1 2]

fit_floor.py showed that the spin loop's network, continued on the judge itself, stays at a state gap
RMSE of 7.7-8.1 meV/atom, and that what it misses is the magnitude of reversed ions (1.65 against
1.93 uB: 0.08 A of virtual-atom height at eta 0.3). This asks, from scratch and with nothing but the
repository, whether a larger eta (virtual_scale), another offset d, other loss weights, training
without the initial data or a larger network lift that floor. Each run trains one model per seed
(`spingen.stages.train.training_input` on PARAM's default_training_param, the data written by
`write_training_data`, the encoding beside the model) on PARAM's initial data (none with
`--no-initial`) and the judge's training part, every system drawn in proportion to its size (no
training_init_data_ratio):

- `--judge all`: every judge geometry in training and in the test (the floor: train = test);
- `--judge half`: geometries 0, 2, 4, 6 in training, judged on 1, 3, 5, 7 (held out);
- `--judge other-half`: the other way round (1, 3, 5, 7 in training: the reversed pairs whose both ions
  keep 1.60-1.65 uB, which the even half lacks);
- `--judge half-and-3`: the even half and geometry 3 (a reversed pair with both ions at 1.65 uB) in
  training, judged on 1, 5, 7: whether one label of that kind teaches geometry 5's;
- `--judge none`: the initial data alone, judged on every geometry;
- `--judge all-but-G`: the 7 other geometries in training, judged on geometry G alone (leave one out).

`--extra-data DIR` trains on more labeled systems beside those (make_judge.py --training-set: other
geometries of the judge's cell in the judge's states, never judged).

`--limit-pref-e` / `--limit-pref-f` set the final energy / force prefactors (`--limit-pref-f 0`:
energies alone from the first step); `--large` swaps in fit_floor.py's larger network (PARAM's learning
rate kept); `--descriptor dpa1` / `se_e3` swaps the descriptor for DPA-1 (attention over the neighbours,
32 wide, one layer) or the three-body se_e3 at the loop's cutoff and embedding sizes (0.3-0.7 s per
training step for DPA-1, over 0.9 s for se_e3, 0.15-0.2 s for the loop's se_e2_a; one AMD EPYC core);
`--rcut` sets the descriptor's cutoff (its sel scaled with the volume). The seeds train at once, one
core each. The ensemble of the seeds is judged as `spingen test` judges (energy RMSE, state gap RMSE,
lowest state right) and per state kind (mean gap error to FM). Rows go to WORKDIR/encoding_floor.json
and their table into docs/benchmarks/spin_loop.md (`--no-doc`: printed only; `--render-only`: the table
again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from fit_floor import LARGE  # noqa: E402
from results_block import keep_rows, write_if_marked  # noqa: E402
from state_gaps import JUDGE, judge_frames, judged  # noqa: E402
from state_gaps import KINDS as JUDGE_KINDS  # noqa: E402

PARAM = REPO / "param_examples" / "linio2_spin_loop" / "param.json"
KINDS = JUDGE_KINDS[1:]  # the kinds beside FM
DOC = REPO / "docs" / "benchmarks" / "spin_loop.md"
DOC_BEGIN = "<!-- results:begin (written by benchmarks/spin_loop/encoding_floor.py) -->"
DOC_END = "<!-- results:end -->"
SPLITS = {"all": (slice(None), slice(None)), "half": (slice(0, None, 2), slice(1, None, 2)),
          "other-half": (slice(1, None, 2), slice(0, None, 2)),
          "half-and-3": ([0, 2, 3, 4, 6], [1, 5, 7]),  # the even half and a reversed pair with both ions low
          "none": (slice(0, 0), slice(None)),  # judge geometries (trained on, judged on)
          **{f"all-but-{g}": ([h for h in range(8) if h != g], [g]) for g in range(8)}}  # leave one out
DESCRIPTORS = {  # --descriptor: other descriptors at the loop's cutoff and embedding (sel: real neighbours, as
    # the loop's; training_input doubles it for the virtual atoms)
    "dpa1": {"type": "dpa1", "sel": 56, "rcut_smth": 0.5, "rcut": 4.0, "neuron": [16, 32, 64], "axis_neuron": 8,
             "tebd_dim": 8, "attn": 32, "attn_layer": 1, "attn_dotr": True, "attn_mask": False},
    "se_e3": {"type": "se_e3", "sel": [16, 16, 24], "rcut_smth": 0.5, "rcut": 4.0, "neuron": [8, 16, 32]},
}
NETWORKS = {"loop": "the loop's", "dpa1": "DPA-1 (attention 32x1)", "se_e3": "se_e3 (three-body)"}
JUDGE_WORDS = {"all": "all 8 (train = test)", "half": "0, 2, 4, 6; judged on 1, 3, 5, 7",
               "other-half": "1, 3, 5, 7; judged on 0, 2, 4, 6", "half-and-3": "0, 2, 3, 4, 6; judged on 1, 5, 7",
               "none": "none",
               **{f"all-but-{g}": f"all but {g}; judged on {g}" for g in range(8)}}


def judge_system():
    """The judge as dpdata reads it, and its frames as (geometries, states) in KINDS order."""
    from spingen.data.npy import load_system

    system = load_system(JUDGE)
    return system, judge_frames(system.data["coords"], system.data["cells"])


def prepare(args, work: Path) -> list[Path]:
    """The training data (initial + the judge's training part) and one folder per seed."""
    from spingen.schema import load_param, thaw
    from spingen.stages.train import training_input, write_training_data

    param = load_param(args.param)
    spin = dataclasses.replace(param.spin, virtual_scale=args.virtual_scale, offset=args.offset)
    system, geometries = judge_system()
    trained = geometries[SPLITS[args.judge][0]].ravel()
    data = work / "data"
    judge_part = work / "judge_part"
    systems = list(param.init_data_sys) if args.initial else []
    if len(trained):
        system.sub_system(np.sort(trained)).to("deepmd/npy", str(judge_part))
        systems.append(judge_part)
    systems += [path.resolve() for path in args.extra_data]
    written = write_training_data(systems, data, param.type_map, spin)
    base = thaw(param.train.training_param)
    base["training"]["numb_steps"] = args.steps
    if args.batch_size is not None:
        base["training"]["training_data"]["batch_size"] = args.batch_size
    if args.limit_pref_e is not None:
        base["loss"]["limit_pref_e"] = args.limit_pref_e
    if args.limit_pref_f == 0:  # energies alone
        base["loss"]["start_pref_f"] = base["loss"]["limit_pref_f"] = 0.0
    elif args.limit_pref_f is not None:
        base["loss"]["limit_pref_f"] = args.limit_pref_f
    if args.large:
        for part, settings in LARGE.items():
            base["model"][part] = dict(settings)
    if args.descriptor != "loop":
        base["model"]["descriptor"] = json.loads(json.dumps(DESCRIPTORS[args.descriptor]))
    if args.rcut is not None:  # neighbours grow with the volume: sel scaled by (rcut / rcut before)^3
        descriptor = base["model"]["descriptor"]
        growth = (args.rcut / descriptor["rcut"]) ** 3
        descriptor["sel"] = [int(math.ceil(n * growth)) for n in descriptor["sel"]]
        descriptor["rcut"] = args.rcut
    folders = []
    for seed in args.seeds:
        folder = work / f"seed{seed}"
        folder.mkdir()
        inp = training_input(base, param.type_map, spin, [f"../data/{name}" for name, _, _ in written], seed)
        (folder / "input.json").write_text(json.dumps(inp, indent=1))
        spin.encoding.save(folder / "spin_encoding.json")
        folders.append(folder)
    return folders


def extra_frames(paths: list[Path]) -> int:
    """Frames of the --extra-data systems."""
    from spingen.data.npy import load_system

    return sum(load_system(path).get_nframes() for path in paths)


def train_all(folders: list[Path]) -> None:
    """dp --pt train then freeze in every folder, all at once (one thread each; log: train.log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DP_INTRA_OP_PARALLELISM_THREADS": "1",
           "DP_INTER_OP_PARALLELISM_THREADS": "1"}
    script = "dp --pt train input.json && dp --pt freeze -o model.pth"
    running = [subprocess.Popen(["bash", "-c", f"({script}) > train.log 2>&1"], cwd=f, env=env) for f in folders]
    failed = [str(f) for f, p in zip(folders, running) if p.wait() != 0]
    if failed:
        raise SystemExit(f"training failed in {failed} (see train.log there)")


def render(rows: list[dict]) -> str:
    """The markdown table of every recorded run."""
    columns = ["run", "eta A/uB", "d A", "network", "rcut A", "steps", "batch", "limit_pref_e", "limit_pref_f",
               "judge geometries in training", "initial data", "other supercell frames", "models", "train s", "E RMSE meV/atom",
               "state gap RMSE meV/atom", "lowest right", *(f"{k}: mean gap error to FM" for k in KINDS)]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        j = r["judged"]
        network = "larger" if r["large"] else NETWORKS[r.get("descriptor", "loop")]
        cells = [r["date"], f"{r['virtual_scale']:g}", f"{r['offset']:g}", network,
                 f"{r['rcut']:g}", r["steps"], r["batch_size"], f"{r['limit_pref_e']:g}", f"{r['limit_pref_f']:g}",
                 JUDGE_WORDS[r["judge"]], "yes" if r["initial"] else "no", r.get("extra_frames", 0), r["models"],
                 f"{r['train_s']:.0f}",
                 f"{j['e_rmse']:.1f}", f"{j['gap_rmse']:.1f}", f"{j['right']}/{j['geometries']}",
                 *(f"{j['kinds'][k]:+.1f}" for k in KINDS)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def run_name(args) -> str:
    """The run's folder under WORKDIR, from its settings."""
    parts = [f"eta{args.virtual_scale:g}", f"d{args.offset:g}", "large" if args.large else args.descriptor,
             *([] if args.rcut is None else [f"rcut{args.rcut:g}"]),
             f"{args.steps}steps", *([] if args.batch_size is None else [f"batch{args.batch_size}"])]
    if args.limit_pref_e is not None:
        parts.append(f"pref{args.limit_pref_e:g}")
    if args.limit_pref_f is not None:
        parts.append(f"preff{args.limit_pref_f:g}")
    parts.append(f"judge-{args.judge}")
    if args.extra_data:
        parts.append(f"extra{len(args.extra_data)}")
    if not args.initial:
        parts.append("no-initial")
    return "_".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("param", type=Path, nargs="?", default=PARAM)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spin_encoding_floor"))
    parser.add_argument("--virtual-scale", type=float, default=0.3, help="eta, A per uB")
    parser.add_argument("--offset", type=float, default=0.2, help="d, A")
    parser.add_argument("--large", action="store_true",
                        help="fit_floor.py's larger network (LARGE; PARAM's learning rate kept)")
    parser.add_argument("--descriptor", choices=["loop", *DESCRIPTORS], default="loop",
                        help="the loop's se_e2_a, DPA-1 (attention) or se_e3 (three-body), at the loop's cutoff")
    parser.add_argument("--rcut", type=float, default=None,
                        help="descriptor cutoff, A (sel scaled with the volume; default the network's)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=None, help="frames per training step (default PARAM's)")
    parser.add_argument("--limit-pref-e", type=float, default=None, help="energy prefactor at the end (default PARAM's)")
    parser.add_argument("--limit-pref-f", type=float, default=None,
                        help="force prefactor at the end (0: energies alone, from the start; default PARAM's)")
    parser.add_argument("--judge", choices=sorted(SPLITS), default="all")
    parser.add_argument("--no-initial", dest="initial", action="store_false",
                        help="train on the judge's part alone, without PARAM's initial data")
    parser.add_argument("--extra-data", type=Path, nargs="+", default=[], metavar="DIR",
                        help="more labeled data to train on (e.g. make_judge.py --training-set DIR: other supercell "
                             "geometries in the judge's states)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    store = args.workdir / "encoding_floor.json"
    if args.render_only and not store.is_file():
        parser.error(f"{store} does not exist: nothing to render")
    if not args.render_only:
        if args.virtual_scale <= 0:
            parser.error(f"--virtual-scale must be > 0, got {args.virtual_scale}")
        if args.judge == "none" and not args.initial:
            parser.error("--judge none --no-initial leaves nothing to train on")
        for path in args.extra_data:
            if not (path / "type.raw").is_file():
                parser.error(f"--extra-data {path}: not a deepmd/npy system (no type.raw)")
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds must differ, got {args.seeds}")
        work = args.workdir.resolve() / run_name(args)
        if work.exists():
            parser.error(f"{work} exists: remove it to train this run again")
        work.mkdir(parents=True)
        folders = prepare(args, work)
        inp = json.loads((folders[0] / "input.json").read_text())
        loss = inp["loss"]
        extra = extra_frames(args.extra_data)  # before training: an unreadable system fails first
        began = time.time()
        train_all(folders)
        row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "virtual_scale": args.virtual_scale,
               "offset": args.offset, "large": args.large, "descriptor": args.descriptor, "steps": args.steps,
               "rcut": inp["model"]["descriptor"]["rcut"], "batch_size": inp["training"]["training_data"]["batch_size"],
               "limit_pref_e": loss.get("limit_pref_e", 1.0),
               "limit_pref_f": loss.get("limit_pref_fr", 1.0),  # ener_spin: the force on real atoms
               "judge": args.judge, "initial": args.initial, "extra_frames": extra,
               "models": len(folders), "seeds": args.seeds,
               "param": str(args.param.resolve()), "train_s": time.time() - began,
               "judged": judged([f / "model.pth" for f in folders], SPLITS[args.judge][1])}
        print(json.dumps(row), flush=True)
        keep_rows(store, [row])
    text = render(json.loads(store.read_text()))
    print(text)
    if not args.no_doc:
        write_if_marked(DOC, DOC_BEGIN, DOC_END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
