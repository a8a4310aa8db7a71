"""The labeler interface and its registry: a Labeler subclass with a `style` registers itself.

A labeler writes one task directory per frame (`write_inputs`), names the shell line that runs
it (`command`) and the files that travel (`forward_files`/`backward_files`), tells whether a
task is finished (its result file exists) and reads the result (`read_result`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from spingen.errors import InputError
from spingen.schema import LabelSettings

LABELERS: dict[str, type[Labeler]] = {}


@dataclass(frozen=True, eq=False)
class LabelResult:
    """One labeled frame, atoms in the task's input order: eV, eV/A, virial eV (or None), moments uB.

    A failed frame has ok False, a one-line reason and no arrays. cell/positions are set when the
    code reports the geometry it computed (they must equal the input for a single point).
    """

    ok: bool
    reason: str = ""
    energy: float | None = None
    forces: np.ndarray | None = None
    virial: np.ndarray | None = None
    moments: np.ndarray | None = None
    cell: np.ndarray | None = None
    positions: np.ndarray | None = None
    total_moment: float | None = None  # the cell's total moment (uB) when the code reports it

    @classmethod
    def failed(cls, reason: str) -> LabelResult:
        return cls(False, reason)


class Labeler(ABC):
    """One DFT code. Subclasses set `style` and `result_file` and implement the abstract methods."""

    style: ClassVar[str]
    result_file: ClassVar[str]  # the task is finished once this file is in its directory

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        style = cls.__dict__.get("style")
        if style is not None:
            if style in LABELERS:
                raise TypeError(f"labeler style '{style}' is registered twice ({LABELERS[style]} and {cls})")
            LABELERS[style] = cls

    def __init__(self, settings: LabelSettings):
        self.settings = settings

    @abstractmethod
    def write_inputs(self, task_dir: Path, atoms, initial_moments: np.ndarray | None,
                     nupdown: float | None) -> None:
        """Write the code's inputs for atoms (ase.Atoms) into the existing task_dir.

        initial_moments: one per atom (uB) or None (the code's own start); nupdown: the fixed total
        moment (uB) or None (free).
        """

    @abstractmethod
    def command(self, machine_command: str) -> str:
        """The shell line run in a task directory; machine_command is machine.json's fp/command."""

    @abstractmethod
    def forward_files(self) -> Sequence[str]:
        """Files of a task directory sent to where it runs."""

    @abstractmethod
    def backward_files(self) -> Sequence[str]:
        """Files brought back from a finished task."""

    def is_finished(self, task_dir: Path) -> bool:
        """Whether the task ran to its end (converged or not): then it is never run again."""
        return (Path(task_dir) / self.result_file).is_file()

    @property
    def retries(self) -> bool:
        """Whether unconverged tasks are retried (see retry)."""
        return False

    def retry(self, task_dir: Path) -> bool:
        """Prepare a finished task whose SCF did not converge to run again with more iterations, keeping the
        first attempt's outputs; True if it will run again (a code without retries: never)."""
        return False

    def earlier_attempts(self, task_dir: Path) -> list[str]:
        """Why each earlier run of a retried task stopped (its first attempt's reason, ...); none retried: []."""
        return []

    def unfinished_reason(self, task_dir: Path) -> str:
        """Why a task that has run is not finished (the reason reported for its excluded frame)."""
        return "not finished: no result after the run"

    @abstractmethod
    def read_result(self, task_dir: Path) -> LabelResult:
        """Parse a finished task; a frame that must not become training data is a failed result."""


def create_labeler(settings: LabelSettings) -> Labeler:
    """The labeler of settings.style (an InputError lists the known styles)."""
    try:
        cls = LABELERS[settings.style]
    except KeyError:
        raise InputError(f"fp_style '{settings.style}': no such labeler; known: {sorted(LABELERS)}") from None
    return cls(settings)
