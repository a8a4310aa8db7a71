"""Turn one machine.json section plus a list of task dirs into a dpdispatcher Submission."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

    log_dpdispatcher_to(workdir)
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


def log_dpdispatcher_to(workdir: Path) -> None:
    """dpdispatcher's own log in the work dir: its file handler names the folder current at its import."""
    for handler in logging.getLogger("dpdispatcher").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()  # reopened, at the new name, by the next line logged
            handler.baseFilename = str(Path(workdir).resolve() / "dpdispatcher.log")


def run_tasks(section: MachineSection, work_base: Path, task_dirs: Sequence[str], spec: TaskSpec,
              workdir: Path) -> None:
    """Submit and wait; dpdispatcher recovers a killed run's jobs when nothing changed."""
    if not task_dirs:
        log.info("no task to run in %s", work_base)
        return
    log.info("submitting %d task(s) from %s", len(task_dirs), work_base)
    submission = build_submission(section, work_base, task_dirs, spec, workdir)
    progress = Progress(submission, max(section.check_interval, PROGRESS_INTERVAL))
    progress.start()
    try:
        submission.run_submission(check_interval=section.check_interval)
    except RuntimeError as err:  # dpdispatcher gave up on a job after retry_count resubmissions
        raise RuntimeError(failure_report(submission, work_base, spec, str(err))) from None
    finally:
        progress.stop()
    log.info("%d task(s) of %s finished in %s", len(task_dirs), work_base, _duration(progress.elapsed()))


def failure_report(submission, work_base: Path, spec: TaskSpec, reason: str, tail: int = 5) -> str:
    """What failed (each unfinished task dir and, on a local machine, its last stderr lines) and how to resume."""
    context = submission.machine.context
    local = is_local(context)
    lines = [f"dpdispatcher gave up on a job of {work_base}: {' '.join(reason.split())}"]
    for task in list(submission.belonging_tasks):
        try:
            if task.has_finished_tag(context):
                continue
        except OSError:
            pass
        lines.append(f"  unfinished: {work_base / task.task_work_path}")
        errlog = Path(getattr(context, "remote_root", "")) / task.task_work_path / spec.errlog
        if local and errlog.is_file():
            last = errlog.read_text(errors="replace").strip().splitlines()[-tail:]
            lines += [f"    {spec.errlog}: {line}" for line in last]
    lines.append("Fix the cause and run the same command again: finished tasks are kept, the rest is resubmitted.")
    return "\n".join(lines)


PROGRESS_INTERVAL = 10  # s between progress lines at most once per change


class Progress(threading.Thread):
    """While dpdispatcher waits: a 'k/n task(s) finished' line whenever k changes.

    Tasks are counted by their finished tags, which only a local context can read from another
    thread; with a remote one a line gives the elapsed time about every 6 minutes.
    """

    def __init__(self, submission, interval: float):
        super().__init__(daemon=True)
        self.submission = submission
        self.interval = interval
        self.started = time.monotonic()
        self._stop_event = threading.Event()
        self._local = is_local(submission.machine.context)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finished_tasks(self) -> int | None:
        if not self._local or self.submission.submission_hash is None:
            return None
        context = self.submission.machine.context
        return sum(task.has_finished_tag(context) for task in list(self.submission.belonging_tasks))

    def run(self) -> None:
        total, last = len(self.submission.belonging_tasks), -1
        while not self._stop_event.wait(self.interval):
            try:
                done = self.finished_tasks()
            except OSError:  # the remote folder is being made or cleaned
                continue
            if done is None:
                if int(self.elapsed()) % 360 < self.interval:
                    log.info("waiting for %d task(s): %s", total, _duration(self.elapsed()))
            elif done != last:
                last = done
                bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
                log.info("[%s] %d/%d task(s) finished, %s", bar, done, total, _duration(self.elapsed()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def is_local(context) -> bool:
    """Whether a dpdispatcher context keeps the remote folder on this machine (Local, LazyLocal)."""
    return "Local" in type(context).__name__


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
