"""The loop engine: record, resume, lock, backups; stages here are small real objects, not mocks of spingen."""

from __future__ import annotations

import pytest

from spingen.loop import Loop, Record, RunLock, Stage


class CountingStage(Stage):
    """Writes one file per phase and can be told to fail once at a phase."""

    def __init__(self, name, dirname, calls, fail_at=None):
        self.name, self.dirname, self.calls, self.fail_at = name, dirname, calls, fail_at

    def _do(self, phase, ctx):
        self.calls.append((ctx.iteration, self.name, phase))
        if self.fail_at == (ctx.iteration, phase):
            self.fail_at = None
            raise RuntimeError(f"{self.name} {phase} failed")
        (self.path(ctx) / f"{phase}.done").write_text("x")

    def make(self, ctx):
        self._do("make", ctx)

    def run(self, ctx):
        self._do("run", ctx)

    def post(self, ctx):
        self._do("post", ctx)


def stages(calls, fail_at=None):
    return [CountingStage("train", "00.train", calls), CountingStage("model_devi", "01.model_devi", calls, fail_at),
            CountingStage("fp", "02.fp", calls)]


def test_full_run_order_and_record(tmp_path):
    calls = []
    Loop(tmp_path, stages(calls), n_iterations=2).run()
    assert len(calls) == 2 * 9 + 3, "two full iterations, then a closing train"
    assert calls[:3] == [(0, "train", "make"), (0, "train", "run"), (0, "train", "post")]
    assert calls[-3:] == [(2, "train", "make"), (2, "train", "run"), (2, "train", "post")]
    assert Record(tmp_path).last() == (2, 2)
    assert not (tmp_path / "iter.000002" / "01.model_devi").exists()


def test_resume_after_a_failure_repeats_only_the_failed_step(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="model_devi run failed"):
        Loop(tmp_path, stages(calls, fail_at=(0, "run")), n_iterations=1).run()
    assert Record(tmp_path).last() == (0, 3)
    calls.clear()
    Loop(tmp_path, stages(calls), n_iterations=1).run()
    assert calls[0] == (0, "model_devi", "run"), "resumed at the first unfinished step"
    assert (0, "model_devi", "make") not in calls and (0, "train", "run") not in calls


def test_rerun_of_an_unfinished_make_backs_up_instead_of_duplicating(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        Loop(tmp_path, stages(calls, fail_at=(0, "make")), n_iterations=1).run()
    half_made = tmp_path / "iter.000000" / "01.model_devi"
    (half_made / "task.000").mkdir()
    Loop(tmp_path, stages([]), n_iterations=1).run()
    assert sorted(p.name for p in half_made.iterdir()) == ["make.done", "post.done", "run.done"]
    assert (half_made.parent / "01.model_devi.bk000" / "task.000").is_dir(), "old files kept, not deleted"


def test_second_run_on_the_same_workdir_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RuntimeError, match=r"is in use by spingen pid \d+"):
            Loop(tmp_path, stages([]), n_iterations=1).run()
    Loop(tmp_path, stages([]), n_iterations=1).run()  # released: runs


def test_record_is_plain_iter_step_lines_and_rejects_garbage(tmp_path):
    record = Record(tmp_path)
    record.append(0, 0)
    record.append(0, 1)
    assert record.path.read_text() == "0 0\n0 1\n"
    record.path.write_text("0 0\nbroken line\n")
    with pytest.raises(ValueError, match="is not 'ITER STEP'"):
        record.last()
