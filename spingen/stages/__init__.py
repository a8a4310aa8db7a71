"""The stages of one iteration, in DP-GEN's order: 00.train, 01.model_devi, 02.fp."""

from __future__ import annotations

from spingen.loop import Stage, StageContext
from spingen.schema import Machines, Param
from spingen.stages.label import LabelStage
from spingen.stages.train import TrainStage


class PendingStage(Stage):
    """A stage whose implementation has not landed yet: it stops the run with a clear message."""

    def __init__(self, name: str, dirname: str, issue: str):
        self.name, self.dirname, self.issue = name, dirname, issue

    def _refuse(self, ctx: StageContext) -> None:
        raise NotImplementedError(f"stage '{self.name}' is not implemented yet ({self.issue}); "
                                  f"the run stopped at iteration {ctx.iteration} after training")

    make = run = post = _refuse


def build_stages(param: Param, machines: Machines) -> list[Stage]:
    """The stage objects of a run, in order."""
    return [
        TrainStage(param, machines.train),
        PendingStage("model_devi", "01.model_devi", "explore stage, issue #4"),
        LabelStage(param, machines.fp),
    ]
