"""fp_style "gpaw": GPAW plane-wave DFT+U, one `spingen label-task TASK_DIR` process per task.

A task directory holds `gpaw_input.json` (geometry, initial moments, fixed total moment, every
GPAW setting, the Hubbard setups) and, once run, `result.json` (written atomically by
spingen.tasks.label: energy, forces, virial, moments, or the reason of a failure) and
`gpaw.txt` (GPAW's log). DFT+U is Dudarev's: the setup string ':d,U-J' per element of fp_ldau.
A fixed total moment (the NUPDOWN analogue) is GPAW's FermiDirac(width, fixmagmom=True), which
fixes the total to the sum of the initial moments: when nupdown is given, the initial moments
are shifted uniformly over all atoms so that they sum to it. fp_spin_init "random" passes no
moments; GPAW has no random initial wavefunctions, so each magnetic ion (spin/magnetic) starts
from a random moment within +-fp_gpaw/random_moment, seeded by a stable hash of the geometry.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spingen.labelers.base import Labeler, LabelResult
from spingen.labelers.kmesh import density_grid, kpoint_mesh
from spingen.tasks.label import INPUT_FILE, LOG_FILE, RESULT_FILE, THREAD_VARIABLES, write_json_atomic

_SHELLS = "spdf"


class GpawLabeler(Labeler):
    style = "gpaw"
    result_file = RESULT_FILE

    def setups(self, symbols: Sequence[str]) -> dict[str, str]:
        """GPAW Hubbard setups of the elements present: {'Ni': ':d,6.3'} (U_eff = U - J)."""
        out = {}
        for element in dict.fromkeys(symbols):
            entry = self.settings.ldau.get(element)
            if entry is not None and entry.U - entry.J > 0:
                out[element] = f":{_SHELLS[entry.L]},{entry.U - entry.J:g}"
        return out

    def random_moments(self, atoms) -> np.ndarray:
        seed = zlib.crc32(np.round(atoms.positions, 4).tobytes() + "".join(atoms.get_chemical_symbols()).encode())
        rng = np.random.default_rng(seed)
        magnetic = np.array([s in self.settings.magnetic for s in atoms.get_chemical_symbols()])
        limit = self.settings.gpaw.random_moment
        return np.where(magnetic, rng.uniform(-limit, limit, len(atoms)), 0.0)

    def write_inputs(self, task_dir: Path, atoms, initial_moments: np.ndarray | None,
                     nupdown: float | None) -> None:
        g = self.settings.gpaw
        moments = self.random_moments(atoms) if initial_moments is None else np.asarray(initial_moments, float)
        if nupdown is not None:
            moments = moments + (nupdown - moments.sum()) / len(atoms)
        kpts = g.kpts if g.kpts is not None else kpoint_mesh(atoms.cell[:], atoms.pbc, g.kspacing)
        data = {
            "symbols": atoms.get_chemical_symbols(),
            "cell": np.asarray(atoms.cell[:]).tolist(),
            "pbc": [bool(p) for p in atoms.pbc],
            "positions": atoms.get_positions().tolist(),
            "initial_magmoms": moments.tolist(),
            "random_start": initial_moments is None,
            "fixmagmom": nupdown is not None,
            "total_moment": None if nupdown is None else float(nupdown),
            "ecut": g.ecut,
            "kpts": list(kpts),
            "gpts": None if g.h is None else list(density_grid(atoms.cell[:], g.ecut, g.h)),
            "width": g.width,
            "maxiter": g.maxiter,
            "xc": g.xc,
            "convergence": dict(g.convergence),
            "stress": g.stress,
            "setups": self.setups(atoms.get_chemical_symbols()),
        }
        write_json_atomic(Path(task_dir) / INPUT_FILE, data)

    def command(self, machine_command: str) -> str:
        pinned = " ".join(f"{v}=1" for v in THREAD_VARIABLES)
        return f"{pinned} {machine_command or 'spingen'} label-task ."

    def forward_files(self) -> Sequence[str]:
        return [INPUT_FILE]

    def backward_files(self) -> Sequence[str]:
        return [RESULT_FILE, LOG_FILE]

    @property
    def retries(self) -> bool:
        return self.settings.gpaw.retry_maxiter is not None

    def retry(self, task_dir: Path) -> bool:
        """An SCF not converged within fewer than fp_gpaw/retry_maxiter iterations: the input gets retry_maxiter,
        then result.json and gpaw.txt move to result.maxiterN.json and gpaw.maxiterN.txt (N: the first
        attempt's maxiter); a kill between the two leaves a task that is retried again."""
        limit = self.settings.gpaw.retry_maxiter
        task_dir = Path(task_dir)
        try:
            data = json.loads((task_dir / RESULT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        inp = json.loads((task_dir / INPUT_FILE).read_text())
        said = re.search(r"maxiter = (\d+)", str(data.get("reason")))  # results written before "maxiter" was
        tried = int(data.get("maxiter") or (said.group(1) if said else inp["maxiter"]))
        if limit is None or data.get("ok") or "KohnShamConvergenceError" not in str(data.get("reason")) \
                or tried >= limit:
            return False
        write_json_atomic(task_dir / INPUT_FILE, {**inp, "maxiter": limit})
        for name, kept in ((LOG_FILE, f"gpaw.maxiter{tried}.txt"), (RESULT_FILE, f"result.maxiter{tried}.json")):
            if (task_dir / name).exists():
                (task_dir / name).replace(task_dir / kept)
        return True

    def earlier_attempts(self, task_dir: Path) -> list[str]:
        """The reasons of the result.maxiterN.json files `retry` kept, fewest iterations first."""
        kept = sorted(Path(task_dir).glob("result.maxiter*.json"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        reasons = []
        for path in kept:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = None
            reasons.append(str(data.get("reason")) if isinstance(data, dict) else f"unreadable {path.name}")
        return reasons

    def read_result(self, task_dir: Path) -> LabelResult:
        path = Path(task_dir) / RESULT_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return LabelResult.failed(f"{RESULT_FILE} unreadable ({type(exc).__name__}: {exc})")
        if not data.get("ok"):
            return LabelResult.failed(data.get("reason") or "GPAW failed (no reason given)")
        virial = data.get("virial")
        return LabelResult(True, energy=float(data["energy"]), forces=np.array(data["forces"], float),
                           virial=None if virial is None else np.array(virial, float),
                           moments=np.array(data["moments"], float),
                           total_moment=None if data.get("total_moment") is None else float(data["total_moment"]))
