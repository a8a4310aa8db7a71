"""The command line as a user meets it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spingen import __version__
from spingen.cli import main

VASP = Path(__file__).parent / "data" / "vasp"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"spingen {__version__}"


@pytest.mark.parametrize("which,key", [("param", "param/spin/virtual_scale"), ("machine", "machine/train/resources")])
def test_doc_lists_every_key(capsys, which, key):
    assert main(["doc", which]) == 0
    assert key in capsys.readouterr().out


def test_init_data_imports_moments_and_refuses_the_rest(tmp_path, capsys):
    from spingen.data.npy import get_moments, load_system

    code = main(["init-data", str(VASP / "OUTCAR.FeO_ldau_relax_vasp535"),
                 str(VASP / "OUTCAR.CH4_ispin1_unconverged_vasp544"), "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1, "a refused file makes the exit code non-zero"
    assert "OUTCAR.CH4_ispin1_unconverged_vasp544: not spin-polarized" in out
    system = load_system(tmp_path / "out" / "Fe2O2")
    np.testing.assert_allclose(get_moments(system)[0], [3.007, 1.397, -0.189, -0.189])
    np.testing.assert_allclose(system.data["energies"], [-28.21851457])


def test_reference_docs_do_not_drift():
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "write_docs.py"
    spec = importlib.util.spec_from_file_location("write_docs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_disk = (module.DOCS / "param.md").read_text()
    assert on_disk == module.reference("param"), "docs/reference/param.md is stale: run `make docs`"

    def key_paths(text: str) -> set[str]:  # dpdispatcher lists its back-ends in a random order
        return {line.strip() for line in text.splitlines() if "argument path" in line}

    on_disk = (module.DOCS / "machine.md").read_text()
    assert key_paths(on_disk) == key_paths(module.reference("machine")), "docs/reference/machine.md is stale"


def test_init_data_names_a_non_collinear_run(tmp_path, capsys):
    """VASP prints ISPIN = 1 for LNONCOLLINEAR = T runs: the refusal says non-collinear, not unpolarized."""
    outcar = tmp_path / "OUTCAR"
    text = (VASP / "OUTCAR.CH4_ispin1_unconverged_vasp544").read_text()
    outcar.write_text(text.replace("LNONCOLLINEAR =      F", "LNONCOLLINEAR =      T", 1))
    assert main(["init-data", str(outcar), "-o", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"{outcar}: non-collinear run (LNONCOLLINEAR = T)" in out and "not spin-polarized" not in out


@pytest.mark.parametrize("model_text,args,message", [
    (None, ["--max-evaluations", "0"], "--max-evaluations must be >= 1, got 0"),
    (None, ["--cold-runs", "0"], "--cold-runs must be >= 1, got 0"),
    ("not a model\n", [], "model file '{model}' is not a frozen deepmd-kit model"),
])
def test_spin_search_bad_arguments(tmp_path, capsys, model_text, args, message):
    from conftest import write_poscar

    model = tmp_path / "graph.000.pth"
    model.write_text(model_text or "")
    poscar = write_poscar(tmp_path / "POSCAR")
    assert main(["spin-search", str(model), str(poscar), "--moments", "Ni=1,3", "--offset", "0.2", *args]) == 2
    err = capsys.readouterr().err
    assert message.format(model=model) in err and err.count("\n") == 1


def test_check_warns_of_initial_labels_the_moments_cannot_tell_apart(tmp_path, capsys):
    """An initial geometry labeled twice with the same moments but about 60 meV/atom apart: `spingen check` says,
    before anything runs, that training will leave the higher label out; the example's own data draw no
    such warning."""
    import json

    from conftest import write_spin_system

    from spingen.data.npy import load_system

    repo = Path(__file__).resolve().parent.parent
    example = repo / "param_examples" / "linio2_spin_loop"
    machine = str(repo / "machine_examples" / "local.json")
    assert main(["check", str(example / "param.json"), machine]) == 0
    assert "cannot tell them apart" not in capsys.readouterr().out
    source = write_spin_system(tmp_path / "data" / "states", n_frames=2, states=[(1.7, 1.7), (1.72, 1.69)])
    system = load_system(source)
    system.data["energies"][1] += 0.5  # eV of 8 atoms: about 60 meV/atom above its geometry's first label
    system.to("deepmd/npy", str(source))
    above = 1000 * (system.data["energies"][1] - system.data["energies"][0]) / 8
    param = json.loads((example / "param.json").read_text())
    param.update(init_data_prefix=str(tmp_path / "data"), init_data_sys=["states"],
                 sys_configs=[[str(example / "POSCAR.2x2x1")]])
    (tmp_path / "param.json").write_text(json.dumps(param))
    assert main(["check", str(tmp_path / "param.json"), machine]) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if "cannot tell them apart" in line)
    assert warning.startswith("WARNING") and "1 label(s)" in warning and f"{above:.1f}-{above:.1f} meV/atom" in warning
