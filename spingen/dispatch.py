"""Turn one machine.json section plus a list of task dirs into a dpdispatcher Submission."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from spingen.schema import MachineSection, thaw

log = logging.getLogger("spingen")


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one submission runs and which files travel."""

    command: str
    forward_files: Sequence[str]
    backward_files: Sequence[str]
    forward_common_files: Sequence[str] = field(default_factory=tuple)
    outlog: str = "log"
    errlog: str = "err"


def build_submission(section: MachineSection, work_base: Path, task_dirs: Sequence[str], spec: TaskSpec,
                     workdir: Path):
    """A dpdispatcher Submission for task_dirs (relative to work_base).

    local_root is the stage folder; a relative LocalContext remote_root is taken relative to the
    run's work dir, so machine files stay portable between work dirs.
    """
    from dpdispatcher import Machine, Resources, Submission, Task

    machine_dict = thaw(section.machine)
    machine_dict["local_root"] = str(work_base)
    remote_root = machine_dict.get("remote_root")
    if remote_root and not Path(remote_root).is_absolute() and "Local" in machine_dict["context_type"]:
        machine_dict["remote_root"] = str((workdir / remote_root).resolve())
        Path(machine_dict["remote_root"]).mkdir(parents=True, exist_ok=True)
    machine = Machine.load_from_dict(machine_dict)
    resources = Resources.load_from_dict(thaw(section.resources))
    tasks = [Task(command=spec.command, task_work_path=str(d), forward_files=list(spec.forward_files),
                  backward_files=list(spec.backward_files), outlog=spec.outlog, errlog=spec.errlog)
             for d in task_dirs]
    return Submission(work_base=str(work_base), machine=machine, resources=resources, task_list=tasks,
                      forward_common_files=list(spec.forward_common_files))


def run_tasks(section: MachineSection, work_base: Path, task_dirs: Sequence[str], spec: TaskSpec,
              workdir: Path) -> None:
    """Submit and wait; dpdispatcher recovers a killed run's jobs when nothing changed."""
    if not task_dirs:
        log.info("no task to run in %s", work_base)
        return
    log.info("submitting %d task(s) from %s", len(task_dirs), work_base)
    submission = build_submission(section, work_base, task_dirs, spec, workdir)
    submission.run_submission(check_interval=section.check_interval)
