"""The stages of one iteration, in DP-GEN's order: 00.train, 01.model_devi, 02.fp."""

from __future__ import annotations

from spingen.loop import Stage
from spingen.schema import Machines, Param
from spingen.stages.explore import ExploreStage
from spingen.stages.label import LabelStage
from spingen.stages.train import TrainStage


def build_stages(param: Param, machines: Machines) -> list[Stage]:
    """The stage objects of a run, in order."""
    return [
        TrainStage(param, machines.train),
        ExploreStage(param, machines.model_devi),
        LabelStage(param, machines.fp),
    ]
