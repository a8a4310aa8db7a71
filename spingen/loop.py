"""The concurrent-learning loop: iterations of stages, a record file, a lock, resume.

The loop knows no physics. It calls stage objects through `Stage.make/run/post` in
`iter.NNNNNN/<stage.dirname>` and appends "ITER STEP" to `record.spingen` after every finished
step (DP-GEN's record.dpgen convention: edit its last lines by hand to roll back).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spingen.errors import InputError
from spingen.layout import LOCK_FILE, LOG_FILE, PHASES, RECORD_FILE, iteration_name

log = logging.getLogger("spingen")



@dataclass(frozen=True)
class StageContext:
    """Where a stage works: the run's work dir, the iteration and this stage's folder."""

    workdir: Path
    iteration: int

    @property
    def iter_dir(self) -> Path:
        return self.workdir / iteration_name(self.iteration)

    def previous(self) -> list[StageContext]:
        return [StageContext(self.workdir, i) for i in range(self.iteration)]


class Stage(ABC):
    """One stage of an iteration. `make` writes tasks, `run` dispatches them, `post` collects."""

    name: str
    dirname: str

    def path(self, ctx: StageContext) -> Path:
        return ctx.iter_dir / self.dirname

    @abstractmethod
    def make(self, ctx: StageContext) -> None: ...

    @abstractmethod
    def run(self, ctx: StageContext) -> None: ...

    @abstractmethod
    def post(self, ctx: StageContext) -> None: ...


class Record:
    """The append-only progress file; every write replaces the file atomically."""

    def __init__(self, workdir: Path):
        self.path = workdir / RECORD_FILE

    def last(self, n_steps: int | None = None) -> tuple[int, int] | None:
        """The last (iteration, step) recorded; InputError, naming the file, for a line that is not one
        (ITER >= 0, 0 <= STEP < n_steps when given)."""
        if not self.path.is_file():
            return None
        try:
            text = self.path.read_text()
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: not a text file of 'ITER STEP' lines (undecodable bytes)") from None
        lines = [ln.split() for ln in text.splitlines() if ln.strip()]
        if not lines:
            return None
        line = " ".join(lines[-1])
        try:
            iteration, step = (int(value) for value in lines[-1][:2])
        except ValueError:
            raise InputError(f"{self.path}: last line '{line}' is not 'ITER STEP'") from None
        if iteration < 0 or step < 0 or (n_steps is not None and step >= n_steps):
            steps = "STEP >= 0" if n_steps is None else f"STEP in 0..{n_steps - 1}"
            raise InputError(f"{self.path}: last line '{line}' is not 'ITER STEP' with ITER >= 0 and {steps}")
        return iteration, step

    def append(self, iteration: int, step: int) -> None:
        old = self.path.read_text() if self.path.is_file() else ""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(old + f"{iteration} {step}\n")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)


class RunLock:
    """An exclusive lock on the work dir, released by the OS even when the process is killed."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self._handle = None

    def __enter__(self) -> RunLock:
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise RuntimeError(f"work dir '{self.path.parent}' is in use by {holder} "
                               f"(lock {self.path}); wait for it or stop it first") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"spingen pid {os.getpid()} on {socket.gethostname()}\n")
        self._handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def backup_dir(path: Path) -> None:
    """Move an existing folder aside as path.bkNNN (DP-GEN's convention); never delete."""
    if not path.exists():
        return
    index = 0
    while path.with_name(f"{path.name}.bk{index:03d}").exists():
        index += 1
    shutil.move(str(path), str(path.with_name(f"{path.name}.bk{index:03d}")))


class Loop:
    """Runs `stages` for `n_iterations` iterations, then the first `closing_stages` stages once more.

    With DP-GEN's defaults (closing_stages=1) the run ends by training on every label.
    """

    def __init__(self, workdir: Path, stages: Sequence[Stage], n_iterations: int, closing_stages: int = 1):
        self.workdir = Path(workdir)
        self.stages = list(stages)
        self.n_iterations = n_iterations
        self.closing_stages = closing_stages
        self.record = Record(self.workdir)

    def steps(self):
        """Every (iteration, step number, stage, phase) of the whole run, in order."""
        for iteration in range(self.n_iterations + 1):
            stages = self.stages if iteration < self.n_iterations else self.stages[: self.closing_stages]
            for s_index, stage in enumerate(stages):
                for p_index, phase in enumerate(PHASES):
                    yield iteration, s_index * len(PHASES) + p_index, stage, phase

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.workdir):
            done = self.record.last(len(self.stages) * len(PHASES))
            if done is not None:
                log.info("resuming after iter %06d step %02d (%s)", done[0], done[1], self.record.path)
            for iteration, step, stage, phase in self.steps():
                if done is not None and (iteration, step) <= done:
                    continue
                ctx = StageContext(self.workdir, iteration)
                log.info("iter %06d step %02d: %s_%s", iteration, step, phase, stage.name)
                start = time.monotonic()
                if phase == "make":
                    backup_dir(stage.path(ctx))
                    stage.path(ctx).mkdir(parents=True)
                getattr(stage, phase)(ctx)
                self.record.append(iteration, step)
                log.info("iter %06d step %02d: %s_%s done in %.1f s", iteration, step, phase, stage.name,
                         time.monotonic() - start)
            log.info("finished: %d iterations", self.n_iterations)


def setup_logging(workdir: Path, debug: bool = False) -> None:
    """Log to the console and to spingen.log in the work dir, DP-GEN style."""
    workdir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("spingen")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False  # deepmd-kit and dpdispatcher configure the root logger too
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in (logging.StreamHandler(), logging.FileHandler(workdir / LOG_FILE)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
