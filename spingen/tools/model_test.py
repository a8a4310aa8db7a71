"""`spingen test`: the errors of spingen.model_errors as a table and parity plots, per data system."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spingen.errors import InputError
from spingen.model_errors import Ensemble, SystemErrors, errors_of_system


def run(models: Sequence[str], data: Sequence[str], offset: float | None = None,
        plot: str | None = None) -> list[SystemErrors]:
    from dpgen.util import expand_sys_str

    ensemble = Ensemble(models, offset)
    systems = []
    for entry in data:
        if not Path(entry).exists():
            raise InputError(f"data '{entry}' not found")
        try:
            systems += sorted(Path(p) for p in expand_sys_str(entry))
        except RuntimeError:
            raise InputError(f"data '{entry}' holds no deepmd/npy system (no type.raw below it)") from None
    results = [errors_of_system(ensemble, s) for s in systems]
    if plot:
        parity_plot(results, Path(plot))
    return results


def format_table(results: Sequence[SystemErrors]) -> str:
    lines = [f"{'system':<40} {'frames':>6} {'atoms':>5} {'E rmse meV/atom':>16} {'F rmse meV/A':>13} "
             f"{'flip asym meV/atom':>19} {'state gap rmse meV/atom':>24} {'lowest state right':>19} "
             f"{'its pick above DFT lowest meV/atom':>35}"]
    for r in results:
        flip = "-" if r.flip_asymmetry is None else f"{r.flip_asymmetry:.2f}"
        ranked = r.ranking
        gap = "-" if ranked is None else f"{ranked.state_gap_rmse:.2f}"
        lowest = "-" if ranked is None else f"{ranked.lowest_state_right}/{ranked.geometries}"
        excess = "-" if ranked is None else f"{ranked.pick_excess_mean:.2f}"
        lines.append(f"{r.name[-40:]:<40} {r.n_frames:>6} {r.n_atoms:>5} {r.rmse_e:>16.2f} {r.rmse_f:>13.1f} {flip:>19} "
                     f"{gap:>24} {lowest:>19} {excess:>35}")
    if len(results) > 1:
        e = np.concatenate([r.energies[1] - r.energies[0] for r in results])
        f = np.concatenate([r.forces[1] - r.forces[0] for r in results])
        lines.append(f"{'all':<40} {sum(r.n_frames for r in results):>6} {'':>5} "
                     f"{np.sqrt(np.mean(e ** 2)) * 1000:>16.2f} {np.sqrt(np.mean(f ** 2)) * 1000:>13.1f}")
    return "\n".join(lines)


def parity_plot(results: Sequence[SystemErrors], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for r in results:
        axes[0].plot(*r.energies, ".", label=Path(r.name).name)
        axes[1].plot(*r.forces, ".", ms=2)
    for ax, what in zip(axes, ("energy (eV/atom)", "force component (eV/A)")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"DFT {what}")
        ax.set_ylabel(f"model {what}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
