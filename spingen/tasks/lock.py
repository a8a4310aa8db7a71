"""One run at a time per task directory.

A job can be running twice: `spingen run` killed between dpdispatcher's submit and its writing of
the submission record resubmits on resume while the first copy still runs. Both copies would write
the same files (an exploration's model_devi.out would get the rows of both). A task holds an
exclusive lock on its directory while it runs; a second copy waits for it, then finds the task
finished and leaves its outputs as they are.
"""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".spingen-task.lock"


@contextmanager
def exclusive_task(task_dir: Path) -> Iterator[None]:
    """Hold task_dir's lock (blocking); where the file system has no locks, run unlocked with a warning."""
    with open(Path(task_dir) / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            print(f"spingen: no lock on {task_dir} ({err}); running unlocked", file=sys.stderr)
        yield
