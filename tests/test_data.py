"""spingen.data: VASP import on real OUTCAR/vasprun.xml files, deepmd/npy round trips, atomic writes.

Reference figures: tests/data/vasp/README.md (computed independently of ASE).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spingen.data import (
    VaspImportError,
    append_frames,
    build_system,
    frame_hashes,
    get_moments,
    import_vasp,
    load_system,
    read_vasp_frames,
    scan_outcar,
    set_moments,
    write_system_atomic,
)

VASP = Path(__file__).parent / "data" / "vasp"
FEO = VASP / "OUTCAR.FeO_ldau_relax_vasp535"
FEO_XML = VASP / "vasprun.FeO_ldau_relax_vasp535.xml"
KSNO = VASP / "OUTCAR.K4Sn4O6_ispin2_vasp541"
CH4 = VASP / "OUTCAR.CH4_ispin1_unconverged_vasp544"
EV_PER_A3_IN_KBAR = 1602.1766208  # 1 eV/A^3 = 160.21766208 GPa


def _with_nelm(src: Path, dst: Path, nelm: int) -> Path:
    text = src.read_text()
    new, n = re.subn(r"(NELM\s*=\s*)\d+;", lambda m: f"{m.group(1)}{nelm:5d};", text, count=1)
    assert n == 1
    dst.write_text(new)
    return dst


def _last_in_kbar(path: Path) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("in kB")]
    return np.array(lines[-1].split()[2:], dtype=float)


# ---- VASP reading ---------------------------------------------------------------------------


def test_feo_relaxation_last_step():
    (frame,) = read_vasp_frames(FEO)
    assert frame.ionic_step == 28
    assert frame.symbols == ("Fe", "Fe", "O", "O")
    assert frame.energy == pytest.approx(-28.21851457, abs=1e-8)  # free energy TOTEN
    np.testing.assert_allclose(frame.moments, [3.007, 1.397, -0.189, -0.189], atol=1e-9)
    np.testing.assert_allclose(frame.forces[0], [0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(frame.positions[0], [0, 0, 0], atol=1e-12)
    # virial = -stress*V, VASP prints the stress as "in kB" (xx yy zz xy yz zx) with opposite sign
    kb = _last_in_kbar(FEO)
    volume = abs(np.linalg.det(frame.cell))
    assert np.trace(frame.virial) == pytest.approx(kb[:3].sum() * volume / EV_PER_A3_IN_KBAR, abs=1e-6)
    assert frame.virial[0, 1] == pytest.approx(kb[3] * volume / EV_PER_A3_IN_KBAR, abs=1e-6)
    np.testing.assert_allclose(frame.virial, frame.virial.T)


def test_moments_belong_to_the_same_step(tmp_path):
    """Cut the OUTCAR after ionic step 27: the moments must be step 27's table, not step 28's."""
    lines = FEO.read_text().splitlines(keepends=True)
    start_28 = next(i for i, ln in enumerate(lines) if re.search(r"Iteration\s+28\(\s*1\)", ln))
    cut = tmp_path / "OUTCAR"
    cut.write_text("".join(lines[:start_28]))
    (frame,) = read_vasp_frames(cut)
    assert frame.ionic_step == 27
    assert frame.energy == pytest.approx(-28.21823468, abs=1e-8)
    np.testing.assert_allclose(frame.moments, [3.008, 1.393, -0.188, -0.188], atol=1e-9)


def test_k4sn4o6_single_point():
    (frame,) = read_vasp_frames(KSNO)
    assert frame.ionic_step == 1 and len(frame.symbols) == 14
    assert frame.energy == pytest.approx(-67.72457099, abs=1e-8)
    np.testing.assert_allclose(frame.moments, np.zeros(14), atol=1e-9)
    np.testing.assert_allclose(frame.positions[0], [0.07705, -0.07705, 4.18005], atol=1e-9)
    np.testing.assert_allclose(frame.forces[0], [-0.061885, 0.059448, 0.060051], atol=1e-9)


def test_vasprun_takes_moments_from_the_outcar_next_to_it():
    (frame,) = read_vasp_frames(FEO_XML)
    assert frame.source == FEO_XML and frame.outcar == FEO
    assert frame.energy == pytest.approx(-28.21851457, abs=1e-8)
    np.testing.assert_allclose(frame.moments, [3.007, 1.397, -0.189, -0.189], atol=1e-9)
    (from_outcar,) = read_vasp_frames(FEO)
    np.testing.assert_allclose(frame.forces, from_outcar.forces, atol=1e-5)
    np.testing.assert_allclose(frame.virial, from_outcar.virial, atol=1e-5)


def test_vasprun_with_plain_names(tmp_path):
    shutil.copy(FEO_XML, tmp_path / "vasprun.xml")
    with pytest.raises(VaspImportError, match="no per-ion moments.*OUTCAR") as err:
        read_vasp_frames(tmp_path / "vasprun.xml")
    assert str(tmp_path / "vasprun.xml") in str(err.value)
    shutil.copy(FEO, tmp_path / "OUTCAR")
    (frame,) = read_vasp_frames(tmp_path / "vasprun.xml")
    assert frame.ionic_step == 28
    (frame,) = read_vasp_frames(tmp_path)  # a run directory stands for its OUTCAR
    assert frame.source == tmp_path / "OUTCAR"


def test_vasprun_with_an_outcar_of_another_run(tmp_path):
    shutil.copy(FEO_XML, tmp_path / "vasprun.xml")
    shutil.copy(KSNO, tmp_path / "OUTCAR")
    with pytest.raises(VaspImportError, match="not from the same run"):
        read_vasp_frames(tmp_path / "vasprun.xml")


def test_ispin1_is_refused_with_the_file_name():
    with pytest.raises(VaspImportError, match=r"not spin-polarized: ISPIN = 1.*spingen needs ISPIN = 2") as err:
        read_vasp_frames(CH4)
    assert str(CH4) in str(err.value)


def test_scan_counts_electronic_steps():
    scan = scan_outcar(CH4)
    assert (scan.ispin, scan.nelm, scan.noncollinear) == (1, 15, False)
    assert scan.electronic_steps == {1: 15, 2: 15, 3: 12}  # steps 1 and 2 reached NELM
    assert scan_outcar(KSNO).electronic_steps == {1: 19}
    assert max(scan_outcar(FEO).electronic_steps.values()) == 40


def test_unconverged_last_step_is_refused(tmp_path):
    bad = _with_nelm(KSNO, tmp_path / "OUTCAR", 19)  # its single SCF took 19 steps
    with pytest.raises(VaspImportError, match=r"SCF not converged: 19 electronic steps = NELM 19") as err:
        read_vasp_frames(bad)
    assert str(bad) in str(err.value)
    ok = _with_nelm(KSNO, tmp_path / "OUTCAR.ok", 20)
    assert read_vasp_frames(ok)[0].energy == pytest.approx(-67.72457099)


def test_only_the_used_step_must_be_converged(tmp_path):
    relax = _with_nelm(FEO, tmp_path / "OUTCAR", 30)  # step 1 took 40 (unconverged), step 28 took 6
    assert read_vasp_frames(relax)[0].ionic_step == 28
    with pytest.raises(VaspImportError, match="SCF not converged: 6 electronic steps = NELM 6 in ionic step 28"):
        read_vasp_frames(_with_nelm(FEO, tmp_path / "OUTCAR.6", 6))


def test_missing_moment_table_and_garbage(tmp_path):
    text = KSNO.read_text().replace("magnetization (x)", "magnetisation (x)")
    (tmp_path / "OUTCAR").write_text(text)
    with pytest.raises(VaspImportError, match=r"no 'magnetization \(x\)' table.*LORBIT"):
        read_vasp_frames(tmp_path / "OUTCAR")
    (tmp_path / "junk").write_text("hello\n")
    with pytest.raises(VaspImportError, match="not a VASP OUTCAR"):
        read_vasp_frames(tmp_path / "junk")
    head = KSNO.read_text()[:30000]  # stops inside the first SCF
    (tmp_path / "OUTCAR.cut").write_text(head)
    with pytest.raises(VaspImportError, match="no complete ionic step"):
        read_vasp_frames(tmp_path / "OUTCAR.cut")


# ---- import ---------------------------------------------------------------------------------


def test_import_groups_by_composition_and_reports_refusals(tmp_path):
    out = tmp_path / "init"
    report = import_vasp([FEO, KSNO, CH4, tmp_path / "missing"], out)
    assert report.exit_code == 1
    assert {p for p, _ in report.refused} == {CH4, tmp_path / "missing"}
    assert set(report.systems) == {"Fe2O2", "K4O6Sn4"}
    text = report.format()
    assert "not spin-polarized" in text and str(CH4) in text and "Fe2O2: +1 frame(s)" in text

    feo = load_system(out / "Fe2O2")
    assert feo.get_atom_names() == ["Fe", "K", "O", "Sn"]  # one type map for the whole import
    assert feo.get_nframes() == 1
    assert feo["energies"][0] == pytest.approx(-28.21851457)
    np.testing.assert_allclose(get_moments(feo)[0], [3.007, 1.397, -0.189, -0.189])
    spin = np.load(out / "Fe2O2" / "set.000" / "spin.npy")
    assert spin.shape == (1, 12) and spin.dtype == np.float64
    np.testing.assert_allclose(spin.reshape(4, 3)[:, 2], [3.007, 1.397, -0.189, -0.189])
    np.testing.assert_allclose(spin.reshape(4, 3)[:, :2], 0.0)
    assert (out / "Fe2O2" / "set.000" / "virial.npy").is_file()

    ksno = load_system(out / "K4O6Sn4")
    sym = [ksno.get_atom_names()[t] for t in ksno["atom_types"]]
    assert sym == ["K"] * 4 + ["O"] * 6 + ["Sn"] * 4  # atoms sorted by type
    i_k1 = 0  # first K stays the first atom
    np.testing.assert_allclose(ksno["forces"][0, i_k1], [-0.061885, 0.059448, 0.060051])


def test_import_appends_and_skips_duplicates(tmp_path):
    out = tmp_path / "data"
    assert import_vasp([KSNO], out, type_map=["O", "K", "Sn"]).exit_code == 0
    cut = tmp_path / "OUTCAR.step27"
    lines = FEO.read_text().splitlines(keepends=True)
    start_28 = next(i for i, ln in enumerate(lines) if re.search(r"Iteration\s+28\(\s*1\)", ln))
    cut.write_text("".join(lines[:start_28]))

    first = import_vasp([FEO], out)
    assert first.systems["Fe2O2"].added == 1
    again = import_vasp([FEO, cut, FEO_XML], out)
    assert again.exit_code == 0
    res = again.systems["Fe2O2"]
    # FEO given with its vasprun: one run -> one frame (from the vasprun); it differs from the OUTCAR
    # frame in the printed digits, so it is added; step 27 is new too.
    assert (res.added, res.total) == (2, 3)
    assert any("same run" in n for n in again.notes)
    repeat = import_vasp([FEO, cut], out)
    assert (repeat.systems["Fe2O2"].added, repeat.systems["Fe2O2"].duplicates) == (0, 2)
    assert load_system(out / "Fe2O2").get_nframes() == 3
    assert load_system(out / "K4O6Sn4").get_atom_names() == ["O", "K", "Sn"]


# ---- deepmd/npy -----------------------------------------------------------------------------


def _toy(nframes=3, seed=0):
    rng = np.random.default_rng(seed)
    symbols = ["Li", "Ni", "O", "O"]
    moments = np.zeros((nframes, 4))
    moments[:, 1] = rng.uniform(-2, 2, nframes)
    return build_system(
        symbols, np.tile(np.eye(3) * 4, (nframes, 1, 1)), rng.uniform(0, 4, (nframes, 4, 3)),
        rng.normal(size=nframes), rng.normal(size=(nframes, 4, 3)), moments,
        virials=rng.normal(size=(nframes, 3, 3)), type_map=["Li", "Ni", "O", "Co"],
    )


def test_round_trip_keeps_raw_moments(tmp_path):
    s = _toy()
    write_system_atomic(s, tmp_path / "sys")
    back = load_system(tmp_path / "sys")
    np.testing.assert_array_equal(get_moments(back), get_moments(s))
    assert back.get_atom_names() == ["Li", "Ni", "O", "Co"]
    for key in ("coords", "cells", "energies", "forces", "virials", "spins"):
        np.testing.assert_array_equal(back[key], s[key])
    assert frame_hashes(back) == frame_hashes(s)
    np.testing.assert_array_equal(np.load(tmp_path / "sys/set.000/spin.npy").reshape(3, 4, 3)[..., 2], get_moments(s))


def test_set_and_get_moments():
    s = _toy(2)
    set_moments(s, np.array([[0, 1.5, 0, 0], [0, -0.5, 0.1, 0]]))
    assert s["spins"].shape == (2, 4, 3)
    np.testing.assert_array_equal(get_moments(s)[1], [0, -0.5, 0.1, 0])
    with pytest.raises(ValueError, match="shape"):
        set_moments(s, np.zeros((2, 3)))
    s.data["spins"][0, 1, 0] = 0.3
    with pytest.raises(ValueError, match="x/y"):
        get_moments(s)


def test_load_refuses_data_without_spins(tmp_path):
    s = _toy()
    del s.data["spins"]
    write_system_atomic(s, tmp_path / "plain")
    with pytest.raises(ValueError, match="no spin.npy"):
        load_system(tmp_path / "plain")
    assert "spins" not in load_system(tmp_path / "plain", require_spins=False).data


def test_failed_write_leaves_previous_data_intact(tmp_path, monkeypatch):
    target = tmp_path / "sys"
    old = _toy(2, seed=1)
    write_system_atomic(old, target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    calls = {"n": 0}
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        write_system_atomic(_toy(5, seed=2), target)
    monkeypatch.undo()
    assert calls["n"] == 3
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert frame_hashes(load_system(target)) == frame_hashes(old)
    assert [p.name for p in tmp_path.iterdir()] == ["sys"]  # no temporary directory left


_KILL_AFTER_FIRST_RENAME = """
import os, sys
import numpy as np
from spingen.data import build_system, write_system_atomic
real_rename = os.rename
def rename_then_die(src, dst):
    real_rename(src, dst)
    if str(dst).endswith(".spingen-old"):
        os._exit(9)  # killed between the two renames
os.rename = rename_then_die
n = 4
write_system_atomic(build_system(["Fe"], np.tile(np.eye(3) * 3, (n, 1, 1)), np.zeros((n, 1, 3)),
                                 np.arange(n, dtype=float), np.zeros((n, 1, 3)), np.ones((n, 1))), sys.argv[1])
"""


def test_kill_between_renames_is_recovered(tmp_path):
    target = tmp_path / "sys"
    old = _toy(2, seed=1)
    write_system_atomic(old, target)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_RENAME, str(target)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists() and (tmp_path / ".sys.spingen-old").is_dir()
    assert frame_hashes(load_system(target)) == frame_hashes(old)  # put back by load_system
    write_system_atomic(_toy(4, seed=3), target)
    assert load_system(target).get_nframes() == 4
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "sys")
    assert all(name.startswith(".sys.spingen-tmp-") for name in leftovers)  # what a kill may leave


def test_error_between_renames_restores_at_once(tmp_path, monkeypatch):
    target = tmp_path / "sys"
    old = _toy(2, seed=1)
    write_system_atomic(old, target)
    real_rename = os.rename

    def rename_then_fail(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".spingen-old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_system_atomic(_toy(4, seed=3), target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["sys"]
    assert frame_hashes(load_system(target)) == frame_hashes(old)


def test_frame_hashes_are_stable():
    a, b = _toy(3, seed=5), _toy(3, seed=5)
    ha = frame_hashes(a)
    assert ha == frame_hashes(b) and len(set(ha)) == 3
    assert all(len(h) == 64 for h in ha)
    b.data["spins"][1, 1, 2] += 0.01  # a different moment is a different frame
    hb = frame_hashes(b)
    assert hb[0] == ha[0] and hb[1] != ha[1] and hb[2] == ha[2]
    c = a.copy()
    c.data["coords"] = c.data["coords"].astype(np.float32).astype(np.float64)  # float32 storage
    c.data["energies"] = c.data["energies"] + 1e-9
    assert frame_hashes(c, decimals=4) == frame_hashes(a, decimals=4)
    d = a.copy()
    d.apply_type_map(["O", "Ni", "Li", "Co"])  # same atoms, other type-map order
    assert frame_hashes(d) == ha
    assert frame_hashes(a.sub_system([2, 0])) == [ha[2], ha[0]]


def test_append_frames(tmp_path):
    s = _toy(3)
    assert append_frames(tmp_path / "sys", s.sub_system([0, 1])) == (2, 0, 2)
    assert append_frames(tmp_path / "sys", s) == (1, 2, 3)
    assert frame_hashes(load_system(tmp_path / "sys")) == frame_hashes(s)


def test_stale_backup_after_a_kill_past_the_second_rename_is_dropped(tmp_path):
    target = tmp_path / "sys"
    write_system_atomic(_toy(3, seed=4), target)
    shutil.copytree(target, tmp_path / ".sys.spingen-old")  # killed before the old copy was deleted
    assert load_system(target).get_nframes() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["sys"]


# ---- issue 22: compressed files, trajectories, poisoned frames, duplicates, data without moments ----


def _compress(src: Path, dst: Path) -> Path:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}[dst.suffix]
    with opener(dst, "wb") as fh:
        fh.write(src.read_bytes())
    return dst


def _moments_per_step(path: Path) -> dict[int, np.ndarray]:
    """Independent of ASE: the tot column of the last 'magnetization (x)' table of each ionic step
    (a table after the last step's energy, VASP's closing print, belongs to the last step)."""
    lines = path.read_text().splitlines()
    ends = [i for i, ln in enumerate(lines) if "free  energy   TOTEN" in ln]  # one per ionic step
    out: dict[int, np.ndarray] = {}
    for i, ln in enumerate(lines):
        if "magnetization (x)" in ln:
            step = min(sum(1 for e in ends if e < i) + 1, len(ends))
            rows = []
            for row in lines[i + 4:]:
                if row.strip().startswith("---") or not row.split() or not row.split()[0].isdigit():
                    break
                rows.append(float(row.split()[-1]))
            out[step] = np.array(rows)
    return out


def _poison(src: Path, dst: Path, energies: dict[int, float] | None = None,
            forces: dict[int, float] | None = None) -> Path:
    """Copy an OUTCAR with the free energy TOTEN of some ionic steps replaced, or the x force of
    their first atom."""
    energies, forces = energies or {}, forces or {}
    lines = src.read_text().splitlines(keepends=True)
    toten = [i for i, ln in enumerate(lines) if "free  energy   TOTEN" in ln]
    force_blocks = [i for i, ln in enumerate(lines) if "TOTAL-FORCE" in ln]
    for step, energy in energies.items():
        lines[toten[step - 1]] = f"  free  energy   TOTEN  = {energy:18.8f} eV\n"
    for step, fx in forces.items():
        row = force_blocks[step - 1] + 2
        parts = lines[row].split()
        parts[3] = f"{fx:.6f}"
        lines[row] = "   " + "   ".join(parts) + "\n"
    dst.write_text("".join(lines))
    return dst


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
def test_compressed_outcar_reads_as_the_plain_one(tmp_path, suffix):
    packed = _compress(FEO, tmp_path / f"OUTCAR{suffix}")
    (frame,) = read_vasp_frames(packed)
    (plain,) = read_vasp_frames(FEO)
    assert frame.source == packed and frame.ionic_step == 28
    assert frame.energy == pytest.approx(-28.21851457, abs=1e-8)
    np.testing.assert_allclose(frame.moments, [3.007, 1.397, -0.189, -0.189], atol=1e-9)
    np.testing.assert_array_equal(frame.forces, plain.forces)
    assert scan_outcar(packed).electronic_steps == scan_outcar(FEO).electronic_steps


def test_gzipped_outcar_and_vasprun_import(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _compress(FEO, run / "OUTCAR.gz")
    report = import_vasp([run / "OUTCAR.gz"], tmp_path / "data")
    assert report.exit_code == 0 and report.systems["Fe2O2"].added == 1, report.format()
    np.testing.assert_allclose(get_moments(load_system(tmp_path / "data" / "Fe2O2"))[0], [3.007, 1.397, -0.189, -0.189])
    (frame,) = read_vasp_frames(run)  # a run folder holding only OUTCAR.gz
    assert frame.source == run / "OUTCAR.gz"
    # vasprun.xml.gz takes its moments from the OUTCAR.gz next to it
    _compress(FEO_XML, run / "vasprun.xml.gz")
    (frame,) = read_vasp_frames(run / "vasprun.xml.gz")
    assert frame.outcar == run / "OUTCAR.gz" and frame.ionic_step == 28
    assert frame.energy == pytest.approx(-28.21851457, abs=1e-8)
    np.testing.assert_allclose(frame.moments, [3.007, 1.397, -0.189, -0.189], atol=1e-9)


def test_damaged_archive_is_refused_with_its_name(tmp_path):
    packed = _compress(FEO, tmp_path / "OUTCAR.gz")
    cut = tmp_path / "cut" / "OUTCAR.gz"
    cut.parent.mkdir()
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(VaspImportError, match="cannot decompress this gzip file") as err:
        read_vasp_frames(cut)
    assert str(cut) in str(err.value)
    report = import_vasp([cut, packed], tmp_path / "data")
    assert [p for p, _ in report.refused] == [cut] and report.systems["Fe2O2"].added == 1


def test_all_steps_imports_the_trajectory_with_each_steps_moments(tmp_path):
    expected = _moments_per_step(FEO)
    assert len(expected) == 28
    frames = read_vasp_frames(FEO, all_steps=True)
    assert [f.ionic_step for f in frames] == list(range(1, 29))
    for f in frames:
        np.testing.assert_allclose(f.moments, expected[f.ionic_step], atol=1e-9, err_msg=f"step {f.ionic_step}")
    np.testing.assert_allclose(frames[0].moments, [2.833, -3.830, -0.346, -0.346])  # the AFM start ...
    np.testing.assert_allclose(frames[-1].moments, [3.007, 1.397, -0.189, -0.189])  # ... ends in another state
    assert frames[0].energy == pytest.approx(-20.66323714, abs=1e-8)
    assert read_vasp_frames(FEO)[0].ionic_step == 28  # without all_steps: the last step, as before

    strided = read_vasp_frames(FEO, all_steps=True, stride=5)
    assert [f.ionic_step for f in strided] == [1, 6, 11, 16, 21, 26]
    from_xml = read_vasp_frames(FEO_XML, all_steps=True, stride=5)  # vasprun: same steps, OUTCAR moments
    assert [f.ionic_step for f in from_xml] == [1, 6, 11, 16, 21, 26]
    for a, b in zip(from_xml, strided):
        np.testing.assert_allclose(a.moments, b.moments)
        assert a.energy == pytest.approx(b.energy, abs=1e-6)

    report = import_vasp([FEO], tmp_path / "data", all_steps=True)
    assert report.exit_code == 0 and not report.rejected, report.format()  # a real relaxation is no poison
    system = load_system(tmp_path / "data" / "Fe2O2")
    assert system.get_nframes() == 28
    np.testing.assert_allclose(get_moments(system), np.array([expected[s] for s in range(1, 29)]))
    np.testing.assert_allclose(system["energies"], [f.energy for f in frames])


def test_all_steps_leaves_out_and_counts_unconverged_steps(tmp_path, capsys):
    from spingen.cli import main

    # NELM 10: steps 1-5, 8, 9, 15-17 took >= 10 electronic steps (40 14 21 20 11 .. 10 14 .. 10 11 10)
    outcar = _with_nelm(FEO, tmp_path / "OUTCAR", 10)
    frames = read_vasp_frames(outcar, all_steps=True)
    unconverged = [1, 2, 3, 4, 5, 8, 9, 15, 16, 17]
    assert [f.ionic_step for f in frames] == [s for s in range(1, 29) if s not in unconverged]
    code = main(["init-data", str(outcar), "-o", str(tmp_path / "data"), "--all-steps"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Fe2O2: +18 frame(s)" in out
    assert "excluded 10 ionic step(s) whose SCF did not converge (NELM reached)" in out
    assert f"{outcar}: step(s) 1-5, 8-9, 15-17" in out
    assert load_system(tmp_path / "data" / "Fe2O2").get_nframes() == 18
    code = main(["init-data", str(outcar), "-o", str(tmp_path / "data"), "--all-steps", "--stride", "7"])
    out = capsys.readouterr().out  # steps 1, 8, 15, 22: three unconverged, 22 already stored
    assert code == 0 and "+0 frame(s), 1 duplicate(s) skipped" in out and "excluded 3 ionic step(s)" in out
    with pytest.raises(VaspImportError, match=r"SCF not converged in any of the 4 selected ionic step\(s\)"):
        read_vasp_frames(_with_nelm(FEO, tmp_path / "OUTCAR.6", 6), all_steps=True, stride=9)


def test_poisoned_frames_are_refused_and_reported(tmp_path):
    bad = _poison(FEO, tmp_path / "OUTCAR.blown", energies={10: 5.25, 14: -400.0}, forces={12: 120.0})
    report = import_vasp([bad], tmp_path / "data", all_steps=True)
    assert report.exit_code == 1
    rejected = {step: message for _, step, message in report.rejected}
    assert set(rejected) == {10, 12, 14}
    assert all(message.startswith(f"{bad}: ionic step ") for message in rejected.values())
    assert "positive total energy +5.25 eV (test: total energy > 0" in rejected[10]
    assert "force of 120 eV/A on one atom (test: |F| > 50 eV/A)" in rejected[12]
    assert re.search(r"energy -100 eV/atom is 9\d\.\d+ eV/atom from the median .* of the 26 Fe2O2 frames.*"
                     r"robust z-score .* > 10 and \|e - median\| > 2 eV/atom", rejected[14]), rejected[14]
    system = load_system(tmp_path / "data" / "Fe2O2")
    assert system.get_nframes() == 25  # not written
    assert np.all(system["energies"] < -20) and np.abs(system["forces"]).max() < 50
    text = report.format()
    assert "refused 0 file(s) and 3 frame(s)" in text and "refused frames (not written):" in text
    assert f"{bad}: ionic step 12: force" in text

    # single points: the energy test compares the files of one composition with each other
    outs = [_poison(FEO, tmp_path / f"OUTCAR.{i}", energies={28: e}) for i, e in enumerate([-28.2, -28.3, -29.0])]
    assert import_vasp(outs, tmp_path / "sp").exit_code == 0
    far = _poison(FEO, tmp_path / "OUTCAR.far", energies={28: -80.0})  # -20 eV/atom among ~-7
    report = import_vasp(outs + [far], tmp_path / "sp2")
    assert [(p, s) for p, s, _ in report.rejected] == [(far, 28)]
    assert report.systems["Fe2O2"].added == 3


def test_poison_thresholds_are_named_constants():
    import dataclasses

    from spingen.data import vasp

    thresholds = (vasp.MAX_FORCE, vasp.ENERGY_Z_MAX, vasp.ENERGY_MIN_DEVIATION, vasp.ENERGY_MIN_FRAMES)
    assert thresholds == (50.0, 10.0, 2.0, 3)
    frames = read_vasp_frames(FEO, all_steps=True)
    assert vasp.poison_reasons(frames) == [None] * 28  # spans 1.9 eV/atom, robust z up to 5.4
    two = [frames[-1], dataclasses.replace(frames[0], energy=-2000.0)]
    assert vasp.poison_reasons(two) == [None, None]  # too few frames for the energy test


def test_reimport_with_another_type_map_order_adds_no_duplicate(tmp_path):
    out = tmp_path / "data"
    first = import_vasp([FEO], out, type_map=["Fe", "O"])
    assert first.systems["Fe2O2"] == (1, 0, 1)
    again = import_vasp([FEO], out, type_map=["O", "Fe"])  # atoms sorted O O Fe Fe this time
    assert again.systems["Fe2O2"] == (0, 1, 1)
    assert "1 duplicate(s) skipped" in again.format()
    _compress(FEO, tmp_path / "OUTCAR.gz")  # the same frame from a compressed copy
    assert import_vasp([tmp_path / "OUTCAR.gz", FEO], out).systems["Fe2O2"] == (0, 2, 1)
    more = import_vasp([FEO], out, type_map=["O", "Fe"], all_steps=True, stride=9)  # steps 1, 10, 19, 28
    assert more.systems["Fe2O2"] == (3, 1, 4)
    system = load_system(out / "Fe2O2")
    assert system.get_atom_names() == ["Fe", "O"]
    np.testing.assert_allclose(get_moments(system)[0], [3.007, 1.397, -0.189, -0.189])


@pytest.mark.parametrize("types, message", [
    (["Fe", "O", "Fe"], "type map (-t) Fe O Fe: 'Fe' is given twice"),
    (["Fe", "Xx"], "type map (-t) Fe Xx: 'Xx' is not a chemical element symbol"),
    (["fe", "O"], "'fe' is not a chemical element symbol (did you mean 'Fe'?)"),
])
def test_bad_type_map_is_one_clear_error(tmp_path, capsys, types, message):
    from spingen.cli import main
    from spingen.schema import InputError

    with pytest.raises(InputError) as err:
        import_vasp([FEO], tmp_path / "data", type_map=types)
    assert message in str(err.value)
    code = main(["init-data", str(FEO), "-o", str(tmp_path / "data"), "-t", *types])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing written


def test_bad_stride_is_refused(tmp_path, capsys):
    from spingen.cli import main

    assert main(["init-data", str(FEO), "-o", str(tmp_path / "data"), "--all-steps", "--stride", "0"]) == 2
    assert "--stride must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_data_without_moments_says_what_is_missing_and_how_to_get_it(tmp_path):
    from spingen.schema import InputError

    s = _toy()
    del s.data["spins"]
    write_system_atomic(s, tmp_path / "npy")
    with pytest.raises(InputError) as err:
        load_system(tmp_path / "npy")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'npy'}: deepmd/npy data without per-ion moments: no spin.npy")
    assert "spingen init-data" in text and "OUTCAR" in text

    s.to("deepmd/raw", str(tmp_path / "raw"))  # DP-GEN's other format
    with pytest.raises(InputError, match=r"deepmd/raw data without per-ion moments: no spin.raw.*spingen init-data"):
        load_system(tmp_path / "raw")
    assert load_system(tmp_path / "raw", require_spins=False).get_nframes() == 3

    with_spins = _toy()
    with_spins.to("deepmd/raw", str(tmp_path / "raw_spin"))
    assert (tmp_path / "raw_spin" / "spin.raw").is_file()
    np.testing.assert_allclose(get_moments(load_system(tmp_path / "raw_spin")), get_moments(with_spins))
