"""Where a run keeps its files: folder names, file names, globs and the paths built from them.

A leaf module (it imports nothing of spingen): the loop, the stages, the report and the CLI read
the layout here, so that no stage imports another one to find its inputs. DP-GEN's layout::

    WORKDIR/record.spingen, spingen.log, spingen.lock
    WORKDIR/init/iter.000000/00.perturb, 02.fp       initial data of init_data_gen (a run of its own)
    WORKDIR/iter.NNNNNN/00.train/000..., graph.NNN.pth, models.json, state_ranking.json
    WORKDIR/iter.NNNNNN/01.model_devi/task.SSS.TTTTTT, candidates.SSS.extxyz, selection.json, moments.json
    WORKDIR/iter.NNNNNN/02.fp/task.SSS.CCCCCC, data.SSS, labels.json, model_errors.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

RECORD_FILE = "record.spingen"
LOCK_FILE = "spingen.lock"
LOG_FILE = "spingen.log"
PHASES = ("make", "run", "post")
ITER_GLOB = "iter.[0-9][0-9][0-9][0-9][0-9][0-9]"

TRAIN_DIR = "00.train"
EXPLORE_DIR = "01.model_devi"
FP_DIR = "02.fp"
STAGE_DIRS = (TRAIN_DIR, EXPLORE_DIR, FP_DIR)  # the stages of an iteration, in order
INIT_DIR = "init"
PERTURB_DIR = "00.perturb"
INIT_STAGE_DIRS = (PERTURB_DIR, FP_DIR)  # the stages of WORKDIR/init, in order
STAGE_NAMES = {TRAIN_DIR: "train", EXPLORE_DIR: "model_devi", FP_DIR: "fp", PERTURB_DIR: "perturb"}

# 00.train
MODEL_FILE = "frozen_model.pth"
INIT_MODEL_FILE = "init_model.pth"  # the previous iteration's model, with training_init_model
LCURVE_FILE = "lcurve.out"
MODELS_REPORT = "models.json"
STATE_RANKING_REPORT = "state_ranking.json"
MODEL_LINK_GLOB = "graph.[0-9][0-9][0-9].pth"  # post's links to every model of the stage folder

# 01.model_devi (and init's 00.perturb): what the label stage reads
CANDIDATES_FILE = "candidates.{:03d}.extxyz"
CANDIDATES_GLOB = "candidates.[0-9][0-9][0-9].extxyz"
SELECTION_FILE = "selection.json"
SELECTION_CLASSES = ("accurate", "candidate", "failed")  # the frame classes selection.json counts
MOMENTS_FILE = "moments.json"
DEVI_FILE = "model_devi.out"  # one per explore task folder

# 02.fp
LABELS_FILE = "labels.json"
MODEL_ERRORS_FILE = "model_errors.json"
LABELED_DATA_GLOB = "data.[0-9][0-9][0-9]"


def iteration_name(index: int) -> str:
    return f"iter.{index:06d}"


def labeled_systems(stage_dir: Path) -> list[Path]:
    """The deepmd/npy systems a label stage collected in its folder (data.SSS), sorted."""
    return sorted(p for p in Path(stage_dir).glob(LABELED_DATA_GLOB) if (p / "type.raw").is_file())


def init_data_systems(workdir: Path) -> list[Path]:
    """The labeled systems of WORKDIR/init (none before its label stage has finished)."""
    return labeled_systems(Path(workdir) / INIT_DIR / iteration_name(0) / FP_DIR)


def training_systems(workdir: Path, init_data_sys: Sequence[Path], iteration: int) -> list[Path]:
    """What iteration `iteration` trains on: init_data_sys, the data made in WORKDIR/init and every
    set labeled by the iterations before it."""
    systems = list(init_data_sys) + init_data_systems(workdir)
    for earlier in range(iteration):
        systems += labeled_systems(Path(workdir) / iteration_name(earlier) / FP_DIR)
    return systems
