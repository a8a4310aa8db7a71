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
