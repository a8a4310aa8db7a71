"""The stages of a run, in the order of spingen.layout: an iteration's 00.train, 01.model_devi, 02.fp
(DP-GEN's), and WORKDIR/init's 00.perturb, 02.fp (the initial data of init_data_gen)."""

from __future__ import annotations

from dataclasses import replace

from spingen.layout import PERTURB_DIR
from spingen.loop import Stage
from spingen.schema import Machines, MachineSection, Param, label_settings
from spingen.stages.explore import ExploreStage
from spingen.stages.init import PerturbStage
from spingen.stages.label import LabelStage
from spingen.stages.train import TrainStage


def build_stages(param: Param, machines: Machines) -> list[Stage]:
    """The stage objects of an iteration, in order."""
    return [TrainStage(param, machines.train), ExploreStage(param, machines.model_devi), LabelStage(param, machines.fp)]


def build_init_stages(param: Param, fp_machine: MachineSection) -> list[Stage]:
    """The stages of WORKDIR/init: perturb, then label every frame (no per-system cap)."""
    settings = replace(label_settings(param), spin_init="predicted", task_max=10 ** 9, task_min=0,
                       ratio_failed=param.init_gen.ratio_failed)
    return [PerturbStage(param), LabelStage(param, fp_machine, settings, candidates_dir=PERTURB_DIR)]
