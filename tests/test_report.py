"""`spingen status` and `spingen plot` on a synthetic work dir: two finished iterations and a third in progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spingen.cli import main
from spingen.report import explore_summary, format_status, gather

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVI_HEADER = ("#       step max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e "
               "spin_disagree spin_devi_e\n")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_devi(path: Path, max_devi_f: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{10 * i:12d} 0.1 0.0 0.05 {f:.6e} 0.01 0.02 0.001 -1 -1\n" for i, f in enumerate(max_devi_f))
    path.write_text(DEVI_HEADER + rows + "     50 0.1 0.0")  # a row still being written


def models(rmse_e: float) -> list[dict]:
    """models.json of two models: 000 with validation data, 001 without (NaN val columns)."""
    return [{"model": "000/frozen_model.pth", "rmse_val": 0.01, "rmse_trn": 0.01, "rmse_e_val": rmse_e,
             "rmse_e_trn": rmse_e / 2, "rmse_fr_val": 0.07, "rmse_fr_trn": 0.06},
            {"model": "001/frozen_model.pth", "rmse_val": float("nan"), "rmse_trn": 0.02,
             "rmse_e_val": float("nan"), "rmse_e_trn": 0.004, "rmse_f_val": float("nan"), "rmse_f_trn": 0.05}]


def selection(accurate: int, candidate: int, failed: int) -> dict:
    """selection.json with the counts split over two systems."""
    first = {"accurate": accurate - 1, "candidate": candidate, "failed": failed, "nan": 0, "spin_only": candidate // 3}
    second = {"accurate": 1, "candidate": 0, "failed": 0, "nan": 0, "spin_only": 0}
    return {"seed": 1, "f_trust_lo": 0.05, "f_trust_hi": 0.15, "spin_trust": 0.3, "skip": 0, "fp_task_max": 5,
            "fp_task_max_total": None, "fp_task_min": 0,
            "systems": {"000": {**first, "total": sum(first[c] for c in ("accurate", "candidate", "failed")),
                                "selected": 3, "spin_only_selected": min(2, candidate // 3)},
                        "001": {**second, "total": 1, "selected": 0, "spin_only_selected": 0}},
            "selected": 3}


def labels(n_ok: int, n_failed: int) -> list[dict]:
    """n_ok converged labels (every second one in an excited state of its candidate), n_failed failed."""
    ok = [{"task": f"task.000.{i:06d}", "system": 0, "state": i % 2, "ok": True, "reason": "",
           "energy": -10.0 - i, "moments": [1.0, -1.0]} for i in range(n_ok)]
    failed = [{"task": f"task.000.{n_ok + i:06d}", "system": 0, "state": 0, "ok": False,
               "reason": "SCF did not converge"} for i in range(n_failed)]
    return ok + failed


def model_errors(rmse_e: float, rmse_f: float, agree: int) -> dict:
    """Iteration 0's file predates the count of candidates whose predicted state DFT puts lowest."""
    counted = {} if agree < 8 else {"candidates_in_states": 2, "predicted_lowest": 1, "predicted_excess_meV_atom": 2.1}
    return {"models": ["graph.000.pth", "graph.001.pth"], "n_frames": 3, "rmse_e": rmse_e, "rmse_f": rmse_f,
            "max_f_error": 3 * rmse_f, "systems": [{"name": "data.000", "n_frames": 3, "rmse_e": rmse_e,
                                                    "rmse_f": rmse_f}],
            "spin_agreement": {"ions": 8, "agree": agree, "fraction": agree / 8, "states": 4,
                               "states_kept": agree // 2, **counted},
            "parity": {"e_dft": [-5.0, -5.1, -5.2], "e_model": [-5.01, -5.08, -5.22],
                       "f_dft": [0.1, -0.2, 0.3, 0.0], "f_model": [0.12, -0.18, 0.31, 0.01]}}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Iterations 0 and 1 finished, iteration 2 after model_devi run (record '2 4')."""
    work = tmp_path / "work"
    for iteration, (acc, cand, fail, n_ok, n_failed, rmse_e, rmse_f, agree) in enumerate(
            [(50, 30, 20, 3, 1, 12.5, 150.0, 6), (90, 8, 2, 2, 0, 4.25, 80.0, 8)]):
        it = work / f"iter.{iteration:06d}"
        write_json(it / "00.train/models.json", models(0.003 - 0.001 * iteration))
        write_json(it / "00.train/state_ranking.json", {"state_gap_rmse": 9.5 - 5 * iteration,
                                                         "lowest_state_right": 3 + iteration, "geometries": 5,
                                                         "dft_next_state_gap_mean": 8.0, "frames": 12})
        write_json(it / "01.model_devi/selection.json", selection(acc, cand, fail))
        write_devi(it / "01.model_devi/task.000.000000/model_devi.out", [0.02, 0.08, 0.2])
        write_json(it / "02.fp/labels.json", labels(n_ok, n_failed))
        write_json(it / "02.fp/model_errors.json", model_errors(rmse_e, rmse_f, agree))
    write_json(work / "iter.000002/00.train/models.json", models(0.0008))
    write_devi(work / "iter.000002/01.model_devi/task.000.000000/model_devi.out", [0.01, 0.03])
    (work / "record.spingen").write_text("".join(f"{i} {s}\n" for i in range(2) for s in range(9))
                                         + "".join(f"2 {s}\n" for s in range(5)))
    (work / "spingen.log").write_text("2024-01-01 00:00:00 INFO iter 000002 step 04: run_model_devi\n")
    return work


def test_status_rows(workdir):
    rows = gather(workdir).rows
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows] == ["done", "done", "01.model_devi post"]
    first = rows[0]
    assert first["explore_frames"] == 100
    assert (first["accurate_pct"], first["candidate_pct"], first["failed_pct"]) == pytest.approx((50, 30, 20))
    assert first["spin_only_pct"] == pytest.approx(10.0) and rows[1]["spin_only_pct"] == pytest.approx(2.0)
    table = format_status(gather(workdir)).splitlines()
    header = next(line for line in table if line.lstrip().startswith("iter"))
    row = next(line for line in table if line.startswith("000000"))
    column = header.index("(spin)", header.index("selected"))  # right-aligned: ends where its header ends
    assert row[: column + len("(spin)")].split()[-2:] == ["3", "2"]  # selected 3, of them spin-only 2
    assert (first["selected"], first["labeled"], first["label_failed"]) == (3, 3, 1)
    assert first["spin_only_selected"] == rows[1]["spin_only_selected"] == 2
    older = selection(50, 30, 20)  # selection.json of a run before fp_spin_only_share
    del older["systems"]["000"]["spin_only_selected"]
    assert explore_summary(older)["spin_only_selected"] is None
    assert first["labeled_other_states"] == 1 and rows[1]["labeled_other_states"] == 1
    assert (first["ranking_right"], first["ranking_geometries"], first["state_gap_rmse_meV_atom"]) == (3, 5, 9.5)
    assert (rows[1]["ranking_right"], rows[1]["state_gap_rmse_meV_atom"]) == (4, 4.5)
    assert rows[2]["ranking_geometries"] is None and rows[2]["labeled_other_states"] is None
    assert first["models"] == [
        {"model": "000", "set": "val", "rmse_e_eV_atom": 0.003, "rmse_f_eV_A": 0.07},
        {"model": "001", "set": "trn", "rmse_e_eV_atom": 0.004, "rmse_f_eV_A": 0.05}]
    assert (first["ensemble_rmse_e_meV_atom"], first["ensemble_rmse_f_meV_A"]) == (12.5, 150.0)
    assert first["spin_agree_pct"] == pytest.approx(75.0)
    assert first["states_kept_pct"] == pytest.approx(75.0) and rows[1]["states_kept_pct"] == pytest.approx(100.0)
    assert rows[1]["candidate_pct"] == pytest.approx(8.0) and rows[1]["spin_agree_pct"] == pytest.approx(100.0)
    assert (first["predicted_lowest"], first["candidates_in_states"]) == (None, None)  # an older file: shown "-"
    assert (rows[1]["predicted_lowest"], rows[1]["candidates_in_states"]) == (1, 2)
    in_progress = rows[2]
    assert in_progress["models"][0]["rmse_e_eV_atom"] == 0.0008
    assert all(in_progress[key] is None for key in ("explore_frames", "candidate_pct", "labeled",
                                                      "ensemble_rmse_e_meV_atom", "spin_agree_pct"))


def test_status_table(workdir, capsys):
    assert main(["status", str(workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["iter", "step", "explored", "acc"]
    assert "m000 E/F" in lines[0] and "new E" in lines[0] and "(states)" in lines[0] and "ranked" in lines[0]
    assert "3/5" in lines[1].split() and "9.5" in lines[1].split() and "4/5" in lines[2].split()
    assert lines[1].split()[:3] == ["000000", "done", "100"]
    assert "0.003/0.07" in lines[1] and "0.004/0.05*" in lines[1] and "12.50" in lines[1] and "75.0" in lines[1]
    assert lines[3].startswith("000002  01.model_devi post") and lines[3].rstrip().endswith("-")
    assert lines[-1] == "last finished: iter 000002 step 04 (model_devi run)"


def test_status_json_matches_rows(workdir, capsys):
    assert main(["status", str(workdir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["iterations"] == gather(workdir).rows and out["last_finished"] == [2, 4]
    assert out["init"] is None and out["finished"] is False


def test_status_of_a_run_still_making_its_initial_data(tmp_path):
    fp = tmp_path / "init" / "iter.000000" / "02.fp"
    for k in range(3):
        (fp / f"task.000.00000{k}").mkdir(parents=True)
    (tmp_path / "init" / "record.spingen").write_text("0 0\n0 1\n0 2\n0 3\n")
    status = gather(tmp_path)
    assert status.rows == [] and status.init == {"step": "02.fp run", "tasks": 3, "labeled": None,
                                                 "label_failed": None, "labeled_other_states": None}
    (fp / "labels.json").write_text(json.dumps([{"ok": True}, {"ok": True}, {"ok": False}]))
    (tmp_path / "init" / "record.spingen").write_text("0 0\n0 1\n0 2\n0 3\n0 4\n0 5\n")
    assert format_status(gather(tmp_path)).splitlines()[0] == \
        "initial data (init/): done, 3 DFT task(s), 2 labeled, 1 failed"


def test_missing_model_errors_leaves_cells_empty(workdir):
    (workdir / "iter.000001/02.fp/model_errors.json").unlink()
    (workdir / "iter.000000/02.fp/labels.json").write_text('[{"task": ')  # being written
    rows = gather(workdir).rows
    assert rows[1]["ensemble_rmse_e_meV_atom"] is None and rows[1]["spin_agree_pct"] is None
    assert rows[0]["labeled"] is None and rows[0]["ensemble_rmse_e_meV_atom"] == 12.5
    assert rows[1]["labeled"] == 2


def test_finished_run(workdir):
    """The closing iteration trains only: after its step 2 and the loop's 'finished' line the run is done."""
    (workdir / "record.spingen").write_text("".join(f"{i} {s}\n" for i in range(2) for s in range(9))
                                            + "".join(f"2 {s}\n" for s in range(3)))
    with open(workdir / "spingen.log", "a") as log:
        log.write("2024-01-01 00:00:01 INFO iter 000002 step 02: post_train done in 0.1 s\n"
                  "2024-01-01 00:00:01 INFO finished: 2 iterations\n")
    status = gather(workdir)
    assert status.rows[2]["step"] == "done"
    assert format_status(status).splitlines()[-1] == ("last finished: iter 000002 step 02 (train post); "
                                                      "the run is finished (2 iterations)")


def test_step_after_a_finished_iteration(workdir):
    (workdir / "record.spingen").write_text("".join(f"{i} {s}\n" for i in range(2) for s in range(9)))
    assert [r["step"] for r in gather(workdir).rows] == ["done", "done", "00.train make"]


@pytest.mark.parametrize("make", [False, True])
def test_no_work_dir_is_an_input_error(tmp_path, capsys, make):
    path = tmp_path / "nowhere"
    if make:
        path.mkdir()
    assert main(["status", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"0 8\n1 9\n", "record.spingen: last line '1 9' is not 'ITER STEP' with ITER >= 0 and STEP in 0..8"),
    (b"0 0\n-1 3\n", "record.spingen: last line '-1 3' is not 'ITER STEP' with ITER >= 0 and STEP in 0..8"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "record.spingen: not a text file of 'ITER STEP' lines (undecodable bytes)"),
])
def test_corrupt_record_is_one_message_naming_it(workdir, capsys, content, message):
    (workdir / "record.spingen").write_bytes(content)
    assert main(["status", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"{workdir}/{message}" in err and err.count("\n") == 1


def test_dpgen_work_dir_is_named(tmp_path, capsys):
    (tmp_path / "iter.000000" / "00.train").mkdir(parents=True)
    (tmp_path / "record.dpgen").write_text("0 0\n0 1\n")
    assert main(["status", str(tmp_path)]) == 2
    assert f"'{tmp_path}' is a DP-GEN work dir (record.dpgen, no record.spingen)" in capsys.readouterr().err


def test_plot_writes_png(workdir, tmp_path, capsys):
    out = tmp_path / "report.png"
    assert main(["plot", str(workdir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_data(tmp_path):
    """A run that has only just started: every panel says 'no data yet'."""
    work = tmp_path / "work"
    (work / "iter.000000/00.train").mkdir(parents=True)
    out = tmp_path / "empty.png"
    assert main(["plot", str(work), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
