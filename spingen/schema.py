"""Every key of param.json and machine.json: dargs schemas, strict checks, typed settings.

Key names follow DP-GEN where the meaning is the same. machine.json is DP-GEN's format and its
sections are checked with DP-GEN's own schema (``dpgen.dispatcher.Dispatcher.mdata_arginfo``,
built on dpdispatcher's ``Machine.arginfo``/``Resources.arginfo``).
Stages never read raw dicts: they get the frozen dataclasses built here.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dargs import Argument, Variant
from dargs.dargs import ArgumentError

from spingen.errors import InputError
from spingen.spin.certificate import CertificateSettings
from spingen.spin.encoding import SpinEncoding
from spingen.spin.search import SEARCH_KEYS, SearchSettings

_CERTIFICATE = CertificateSettings()  # the certificate's defaults, documented as the keys'
MACHINE_SECTIONS = ("train", "model_devi", "fp")
FP_STYLES = ("gpaw", "vasp")
MODEL_DEVI_DRIVERS = {"first": 0, "mean": "mean"}  # model_devi_driver -> the MD calculator's drive
SPIN_INIT_STRATEGIES = ("predicted", "random", "states", "members", "sectors")
FLIP_SYMMETRIES = ("augment", "canonical", "none")
MD_ENSEMBLES = ("nvt", "nvt-langevin", "nvt-berendsen", "nvt-nose-hoover", "npt", "npt-berendsen")
DPGEN_FORMATS = {"vasp/poscar": "vasp", "vasp/contcar": "vasp"}  # DP-GEN's (dpdata's) names of ASE formats
DPGEN_ONLY_KEYS = {  # DP-GEN keys of param.json that spingen has no use for, and what to do
    "model_devi_engine": "spingen has one exploration engine (ASE MD with spin search); remove model_devi_engine",
}
PRE_1_0_MACHINE_KEYS = {  # keys of DP-GEN's machine.json before api_version 1.0, where they sit
    "top": ("train_machine", "train_resources", "model_devi_machine", "model_devi_resources", "fp_machine",
            "fp_resources", "deepmd_path", "python_path", "lmp_command", "fp_command"),
    "section": ("deepmd_path", "python_path"),
    "machine": ("machine_type", "batch", "work_path"),
}
SHELL_WORDS = {"source", ".", "export", "cd", "exec", "eval", "env", "time", "nice", "nohup", "command", "module"}
DPGEN_MACHINE_DOCS = "https://docs.deepmodeling.com/projects/dpgen/en/latest/run/example-of-machine.html"
GPAW_XC = ("LDA", "PW91", "PBE", "PBEsol", "revPBE", "RPBE", "BLYP", "HCTH407", "WC", "AM05", "M06-L", "TPSS",
           "revTPSS", "mBEEF", "SCAN", "vdW-DF", "vdW-DF2", "vdW-DF-cx", "optPBE-vdW", "optB88-vdW", "C09-vdW",
           "mBEEF-vdW", "BEEF-vdW", "EXX", "PBE0", "B3LYP", "HSE03", "HSE06", "YS-PBE0", "LB94", "TB09", "QNA",
           "PPLDA", "BEE2", "2D-MGGA", "null")  # gpaw.xc.XC's names (libxc names are read by pattern)
LIBXC_NAME = re.compile(r"(HYB_)?(LDA|GGA|MGGA)_(X|C|XC|K)_\w+", re.IGNORECASE)


# ---------------------------------------------------------------- param.json schema
def _spin_arginfo() -> Argument:
    return Argument(
        "spin", dict, optional=True, default={},
        doc="The collinear spin encoding z' = z + eta*S + d of the paper, one virtual atom per magnetic ion.",
        sub_fields=[
            Argument("enabled", bool, optional=True, default=True,
                     doc="false trains pristine Deep Potentials (plain `ener` loss) on the same data: the baseline."),
            Argument("magnetic", list, optional=True, default=[],
                     doc="Magnetic elements (symbols from type_map), e.g. [\"Ni\", \"Co\", \"Mn\"]."),
            Argument("virtual_scale", float, optional=True, default=0.3,
                     doc="eta (A per uB): distance of the virtual atom from its ion per uB of moment "
                         "(deepmd-kit's virtual_scale)."),
            Argument("offset", float, optional=True, default=0.2,
                     doc="d (A): constant shift of the virtual atom, so that S = 0 does not put it on its ion."),
            Argument("moments", [dict, str], optional=True, default="auto",
                     doc="Allowed moment magnitudes (uB) per magnetic element, e.g. {\"Co\": [0, 1, 4, 5]}; "
                         "each nonzero magnitude may point up or down. \"auto\": cluster the |moments| "
                         "observed in the training data."),
            Argument("min_level_support", int, optional=True, default=3,
                     doc="With moments \"auto\": a clustered level seen in fewer training frames than this is "
                         "refused (left out of the spin search, with a warning naming it): a model that has "
                         "barely seen a level makes false minima there that the search walks into. To keep "
                         "such a level, list it in spin/moments."),
            Argument("min_virtual_distance", float, optional=True, default=0.05,
                     doc="Smallest allowed |eta*S + d| (A) for any moment in the data or the levels; "
                         "below it the virtual atom sits on its real atom."),
            Argument("flip_symmetry", str, optional=True, default="canonical",
                     doc="How the models learn that collinear DFT+U energies do not change when every moment "
                         "is reversed, E(S) = E(-S). \"canonical\" (default): deepmd-kit sees one representative "
                         "of each pair {S, -S}, in training and in every evaluation (positive total moment of the "
                         "magnetic ions; when |total| <= 0.5 uB, the first magnetic ion beyond 0.5 uB up): "
                         "exact symmetry, no twins (training data not doubled), no extra evaluation, and as "
                         "accurate as no symmetry at all on the benchmark data (docs/benchmarks/paper.md); "
                         "recorded in spin_encoding.json beside each model. \"augment\": add each frame's "
                         "globally reversed twin (all moments negated, same energy and forces) to the training "
                         "inputs; the symmetry is learned, approximately. \"none\": neither (then consider "
                         "model_devi_spin_symmetrize). Stored data is never rewritten."),
        ],
    )


def _init_data_gen_arginfo() -> Argument:
    return Argument(
        "init_data_gen", dict, optional=True, default={},
        doc="Initial data made by spingen itself (like DP-GEN's init_bulk): perturbed copies of `configs`, each "
            "labeled by the fp stage in every spin state of `spin_states`, in WORKDIR/init before iteration 0 "
            "(`spingen init`, or `spingen run` on its own). The labeled frames join init_data_sys.",
        sub_fields=[
            Argument("configs", list, optional=True, default=[],
                     doc="Globs of structure files (sys_format, relative to param.json); each file is one "
                         "system. Empty: no initial data is made."),
            Argument("pert_numb", int, optional=True, default=6,
                     doc="Perturbed copies per structure (DP-GEN init_bulk's key; dpdata's perturb)."),
            Argument("pert_box", float, optional=True, default=0.03,
                     doc="Largest relative deformation of the cell (dpdata's cell_pert_fraction)."),
            Argument("pert_atom", float, optional=True, default=0.05,
                     doc="Largest displacement of an atom, A (dpdata's atom_pert_distance)."),
            Argument("spin_states", [list, str], optional=True, default="auto",
                     doc="Start moments (uB) of the magnetic ions of every structure, in their order in the "
                         "file: a list of states, each a list with one moment per magnetic ion, e.g. "
                         "[[1, 1], [1, -1]] (parallel and antiparallel). \"auto\": ferromagnetic and "
                         "alternating antiferromagnetic at each level of spin/moments (which must then be "
                         "given)."),
            Argument("fixed_total", bool, optional=True, default=True,
                     doc="Fix each run's total moment to the sum of its start moments (VASP NUPDOWN; GPAW "
                         "fixmagmom), so that each state is really computed; give formal moments then."),
            Argument("ratio_failed", float, optional=True, default=0.25,
                     doc="Largest fraction of failed initial label tasks (fixed-moment excited states do not "
                         "always converge)."),
            Argument("seed", int, optional=True, default=0, doc="Seed of the perturbations."),
        ])


def _model_devi_job_arginfo() -> Argument:
    return Argument(
        "model_devi_jobs", list, optional=False,
        doc="One exploration job per iteration (DP-GEN's key); the run ends after the last one.",
        sub_fields=[
            Argument("sys_idx", list, optional=False, doc="Indices into sys_configs."),
            Argument("temps", list, optional=False, doc="Temperatures (K)."),
            Argument("press", list, optional=True, default=[], doc="Pressures (bar), NPT only."),
            Argument("nsteps", int, optional=False, doc="MD steps per task."),
            Argument("trj_freq", int, optional=True, default=10, doc="Write a frame every trj_freq steps."),
            Argument("ensemble", str, optional=True, default="nvt", doc=f"One of {', '.join(MD_ENSEMBLES)}."),
            Argument("spin_opt_freq", int, optional=True, default=1,
                     doc="Re-optimize the moments every spin_opt_freq MD steps (1: every step; 0: never after "
                         "the start). They are also re-optimized at every frame written (every trj_freq steps)."),
            Argument("spin_devi_freq", int, optional=True, default=1,
                     doc="Compute the spin disagreement (each model's own ground state, kept from frame to "
                         "frame and certified from its -dE/dS as the driving moments are) every "
                         "spin_devi_freq-th written frame (1: every frame; 0: never). A member checks only "
                         "the competitors of its state that its certificate names: a few evaluations per frame "
                         "where its state holds, every competitor where it changed."),
            Argument("taut", float, optional=True, default=0.1,
                     doc="Coupling time of the thermostat (ps), as in DP-GEN."),
            Argument("taup", float, optional=True, default=0.5,
                     doc="Coupling time of the barostat (ps), as in DP-GEN."),
        ],
        repeat=True,
    )


def _fp_variant() -> Variant:
    ldau = Argument("fp_ldau", dict, optional=True, default={},
                    doc="DFT+U (Dudarev, LDAUTYPE 2) per element: {\"Ni\": {\"L\": 2, \"U\": 6.3, \"J\": 0}}. "
                        "L: angular momentum of the corrected shell (0..3; 2 = d); U, J: eV (>= 0, J "
                        "default 0). Elements absent from a frame are left out of its LDAU arrays, "
                        "elements present without an entry get L -1, U 0, J 0. Empty: plain DFT.")
    spin_init = Argument("fp_spin_init", str, optional=True, default="predicted",
                         doc=f"Initial moments of each label: one of {', '.join(SPIN_INIT_STRATEGIES)}. "
                             "`predicted`: the explore stage's optimized ground-state moments (MAGMOM / "
                             "GPAW initial moments), total moment free. `random`: no initial moments and no "
                             "fixed total (VASP's default start; GPAW, which has no random wavefunctions, "
                             "starts each magnetic ion from a random moment in +-fp_gpaw/random_moment uB, "
                             "seeded by the geometry). `states`: one task for the predicted ground state "
                             "and one for each excited state the spin search found. `members`: one task for "
                             "the predicted ground state and one for each other ground state a member model "
                             "found on its own (where the spin disagreement was computed): the states the "
                             "ensemble disputes, labeled so that DFT settles them (an undisputed frame is "
                             "labeled as in `predicted`). `sectors`: one task for the predicted ground state "
                             "and one for the driving model's lowest state in each of up to fp_spin_sectors "
                             "total-moment sectors around it (windows of twice the mean |moment| wide: k ions "
                             "reversed, e.g. half the ions for in-plane or layer AFM; searched by the explore "
                             "stage for each picked candidate): the orderings far from the ground state that MD "
                             "never visits, so that the labels hold their gaps; docs/benchmarks/"
                             "spin_loop.md. In `states`, `sectors` and disputed `members` frames each task "
                             "starts from its state's moments with a fixed total moment (VASP "
                             "NUPDOWN, GPAW fixmagmom): the sum of the state's moments, each element's sum "
                             "scaled by the ratio of DFT total to summed ion moments fitted on the run's "
                             "earlier labels (1 before any), rounded to an integer.")
    sectors = Argument("fp_spin_sectors", int, optional=True, default=4,
                       doc="fp_spin_init \"sectors\": most total-moment sectors labeled per candidate beside "
                           "its ground state; where a cell has more, this many spread evenly from the nearest "
                           "to the farthest. Each costs one spin search per candidate in the explore stage's "
                           "post (in the main process: 72 s for 2 candidates x 4 sectors with 8 Ni and the "
                           "mean of 4 models of 32 atoms on 2 shared CPU cores) and one DFT task.")
    tolerance = Argument("fp_moment_tolerance", float, optional=True, default=0.5,
                         doc="Largest distance (uB) of a labeled magnetic moment from the nearest allowed "
                             "magnitude of spin/moments; a frame with a moment farther away is excluded and "
                             "reported. Not checked when spin/moments is \"auto\".")
    vasp = [
        Argument("fp_pp_path", str, optional=False, doc="Folder of the POTCAR files (relative to param.json)."),
        Argument("fp_pp_files", [list, dict], optional=False,
                 doc="POTCAR files in type_map order, or a mapping element -> file (safer). Each task's "
                     "POTCAR concatenates them in its POSCAR's species order; a POTCAR whose TITEL "
                     "names another element is refused."),
        Argument("fp_incar", str, optional=False,
                 doc="INCAR template file. spingen sets ISPIN 2, LORBIT 11 (if absent), and per frame the "
                     "LDAU block (from fp_ldau), MAGMOM and NUPDOWN (from fp_spin_init); MAGMOM/NUPDOWN "
                     "of the template are dropped. Labels are single points: NSW > 0 is refused."),
        Argument("fp_kspacing", [float, type(None)], optional=True, default=None,
                 doc="KSPACING (1/A, VASP's definition, 2*pi included) written into every INCAR, with "
                     "KGAMMA .TRUE.; no KPOINTS file. null: KSPACING of the template if any."),
        Argument("fp_kpoints", [list, type(None)], optional=True, default=None,
                 doc="A Gamma-centred k-mesh [k1, k2, k3] written as KPOINTS for every task (instead of "
                     "fp_kspacing)."),
        ldau, spin_init, sectors, tolerance,
    ]
    gpaw = [
        Argument("fp_gpaw", dict, optional=True, default={},
                 doc="GPAW settings (PW mode; LCAO forces are not used for labels). Defaults are sized "
                     "for small test cells, not for production accuracy.",
                 sub_fields=[
                     Argument("ecut", float, optional=True, default=300.0,
                              doc="Plane-wave cutoff (eV); the paper used 520 with VASP."),
                     Argument("kpts", [list, type(None)], optional=True, default=None,
                              doc="Gamma-centred Monkhorst-Pack mesh [k1, k2, k3]; overrides kspacing."),
                     Argument("kspacing", float, optional=True, default=1.0,
                              doc="k-point spacing (1/A, VASP's KSPACING definition, 2*pi included): "
                                  "k_i = max(1, ceil(|b_i| / kspacing)), Gamma-centred. 1.0 gives 2x2x2 "
                                  "for a ~4-6 A cell; the paper used 0.25."),
                     Argument("h", [float, type(None)], optional=True, default=None,
                              doc="Real-space grid spacing (A) of the density and potential: each cell gets "
                                  "n_i = ceil(|a_i| / h) points along a_i. Unset: GPAW's choice from ecut, "
                                  "rounded to an efficient FFT size, which can give a cell and its supercell "
                                  "grids out of the supercell's ratio (8-atom LiNiO2 18^3, its 2x2x1 supercell "
                                  "35x35x18 at 300 eV: 3.8 meV/atom apart); `spingen check` warns of such "
                                  "pairs and names an h that fits both (docs/cathode-guide.md section 3)."),
                     Argument("width", float, optional=True, default=0.05,
                              doc="Fermi-Dirac smearing width (eV)."),
                     Argument("maxiter", int, optional=True, default=120,
                              doc="Most SCF iterations; beyond it the frame fails (KohnShamConvergenceError)."),
                     Argument("retry_maxiter", [int, type(None)], optional=True, default=None,
                              doc="A frame whose SCF did not converge within maxiter is run once more from the "
                                  "start with this many iterations (the first attempt's result.json and log are "
                                  "kept beside it; not with LazyLocalContext); null: not retried. Slow states converge "
                                  "so: reversed Ni pairs in LiNiO2 took 129-396 SCF steps "
                                  "(docs/benchmarks/spin_loop.md)."),
                     Argument("xc", str, optional=True, default="PBE", doc="Exchange-correlation functional."),
                     Argument("convergence", dict, optional=True, default={},
                              doc="GPAW's convergence criteria, e.g. {\"energy\": 1e-5} (eV/electron); "
                                  "empty: GPAW's defaults."),
                     Argument("stress", bool, optional=True, default=True,
                              doc="Compute the stress (stored as virial)."),
                     Argument("random_moment", float, optional=True, default=4.0,
                              doc="fp_spin_init \"random\": largest |initial moment| (uB) drawn per "
                                  "magnetic ion."),
                 ]),
        ldau, spin_init, sectors, tolerance,
    ]
    return Variant("fp_style", [
        Argument("vasp", dict, vasp, doc="VASP on HPC (POSCAR/INCAR/KPOINTS/POTCAR per task)."),
        Argument("gpaw", dict, gpaw, doc="GPAW PW-mode DFT+U, runs on one machine "
                                         "(`spingen label-task` per task; install: scripts/install_gpaw.sh)."),
    ], optional=False, doc="The DFT+U code that labels candidates.")


def param_arginfo() -> Argument:
    """The schema of param.json."""
    fields = [
        Argument("type_map", list, optional=False, doc="Element symbols, in the order of the model's types."),
        Argument("mass_map", [list, str], optional=True, default="auto",
                 doc="Atomic masses in type_map order, or \"auto\" (ASE's standard masses)."),
        Argument("init_data_prefix", str, optional=True, default="", doc="Prefix of init_data_sys paths."),
        Argument("init_data_sys", list, optional=True, default=[],
                 doc="deepmd/npy systems (or folders holding them) of the initial data, with spin.npy. "
                     "May be empty when init_data_gen makes the initial data."),
        _init_data_gen_arginfo(),
        Argument("sys_configs_prefix", str, optional=True, default="", doc="Prefix of sys_configs globs."),
        Argument("sys_configs", list, optional=False,
                 doc="Start structures of exploration: a list of lists of globs (POSCAR/extxyz...)."),
        Argument("sys_format", str, optional=True, default="vasp",
                 doc="ASE format name of the sys_configs (and init_data_gen/configs) files; DP-GEN's "
                     "\"vasp/poscar\" is read as \"vasp\". Every file is opened when param.json is checked."),
        Argument("numb_models", int, optional=True, default=4,
                 doc="Models in the ensemble; at least 2 (frames are selected by the deviation of their predictions)."),
        Argument("training_init_model", bool, optional=True, default=False,
                 doc="From iteration 1 on, start each model from the same model of the previous iteration "
                     "(`dp --pt train --init-frz-model`) instead of from scratch (DP-GEN's key)."),
        Argument("training_reuse_numb_steps", [None, int], optional=True, default=None,
                 alias=["training_reuse_stop_batch"],
                 doc="With training_init_model, the training steps of a model that starts from its predecessor "
                     "(iteration 1 on); default: default_training_param's numb_steps. Lets the first training "
                     "be long and the later ones short (DP-GEN's key)."),
        Argument("training_reuse_start_lr", [None, float], optional=True, default=None,
                 doc="With training_init_model, the start learning rate of a model that starts from its "
                     "predecessor; default: default_training_param's start_lr (DP-GEN's key)."),
        Argument("training_init_data_ratio", [None, float], optional=True, default=None,
                 doc="Share of training batches drawn from the initial data (init_data_sys and init_data_gen's "
                     "data), the rest from the labels of the loop's iterations; e.g. 0.5 when a few labels of a "
                     "supercell would otherwise be drowned by many initial frames of a small cell. null: "
                     "deepmd-kit's default, each system in proportion to its number of batches (frames / "
                     "batch_size). Sets training_data/auto_prob (and validation_data's) of every model from the "
                     "first iteration with labels on (DP-GEN's training_reuse_old_ratio splits by iteration "
                     "instead)."),
        Argument("default_training_param", dict, optional=False,
                 doc="deepmd-kit input.json (PyTorch backend); spingen fills type_map, spin, loss type, "
                     "data systems and seeds. The descriptor's sel counts real neighbours; for a spin model "
                     "spingen doubles it for the virtual atoms where deepmd-kit does not (se_e2_r, se_e3, dpa1)."),
        _spin_arginfo(),
        _model_devi_job_arginfo(),
        Argument("model_devi_dt", float, optional=True, default=0.002, doc="MD time step (ps), as in DP-GEN."),
        Argument("model_devi_skip", int, optional=True, default=0,
                 doc="Frames of MD steps < model_devi_skip are neither selected nor counted (DP-GEN's meaning)."),
        Argument("model_devi_f_trust_lo", float, optional=False, doc="Force deviation (eV/A) below which a frame is accurate."),
        Argument("model_devi_f_trust_hi", float, optional=False, doc="Force deviation (eV/A) at and above which a frame failed."),
        Argument("model_devi_v_trust_lo", [float, type(None)], optional=True, default=None,
                 doc="Virial deviation (eV/atom, DP-GEN's max_devi_v) from which a frame is a candidate too; "
                     "null: virial deviations select nothing (DP-GEN's default)."),
        Argument("model_devi_v_trust_hi", [float, type(None)], optional=True, default=None,
                 doc="Virial deviation (eV/atom) at and above which a frame failed, unless its force or "
                     "virial deviation makes it a candidate (DP-GEN's rule); null: no virial limit."),
        Argument("model_devi_spin_trust", float, optional=True, default=0.2,
                 doc="Fraction of magnetic ions whose ground-state moment the ensemble disagrees on, "
                     "above which a frame is a candidate (if model_devi_spin_e_trust lets it)."),
        Argument("model_devi_spin_e_trust", float, optional=True, default=0.002,
                 doc="Energy deviation (eV/atom) of the disputed spin states above which a spin disagreement "
                     "makes a frame a candidate: the std over members of each member's ground state's energy "
                     "above the frame's state (model_devi.out's spin_devi_e). Members that order nearly "
                     "degenerate states differently but agree on their energies within this level do not make "
                     "a candidate; 0: every disagreement above model_devi_spin_trust does."),
        Argument("model_devi_driver", str, optional=True, default="first",
                 doc="Which model drives the MD and its spin searches: \"first\" (model 0, as DP-GEN's LAMMPS "
                     "runs; the cheapest) or \"mean\" (the ensemble mean: numb_models times the cost). The "
                     "deviations always use every model."),
        Argument("model_devi_seed", int, optional=True, default=0,
                 doc="Seed of an iteration's explore stage (velocities, spin searches, candidate sampling), "
                     "combined with the iteration index and recorded in 01.model_devi/seed.json."),
        Argument("model_devi_compressibility", float, optional=True, default=1e-6,
                 doc="Compressibility (1/bar) of the npt-berendsen barostat (about 1e-6 for an oxide)."),
        Argument("model_devi_spin_symmetrize", bool, optional=True, default=False,
                 doc="Explore with the symmetrized energy E_sym(S) = (E(S) + E(-S)) / 2 (and its forces, "
                     "virial and spin forces): exact reversal symmetry for models trained with "
                     "spin/flip_symmetry \"none\" (or \"augment\", whose symmetry is learned only "
                     "approximately), at twice the cost of every model evaluation (batched). Models of "
                     "\"canonical\" are exactly symmetric already."),
        Argument("model_devi_spin_search", dict, optional=True, default={},
                 doc="Settings of the spin searches during MD (each warm-started from the current moments and "
                     "the previous search). Each key is a field of spingen.spin.search.SearchSettings; "
                     "null or absent: the search's own default.",
                 sub_fields=[
                     Argument("population", [int, type(None)], optional=True, default=None,
                              doc="Genetic-search population (default: 16, or the number of magnetic ions "
                                  "when larger for a cold search: the first of a trajectory and each search of "
                                  "fp_spin_sectors; warm searches keep 16)."),
                     Argument("warm_patience", [int, type(None)], optional=True, default=None,
                              doc="Generations without improvement before a warm-started search stops."),
                     Argument("patience", [int, type(None)], optional=True, default=None,
                              doc="The same for the first (cold) search of a trajectory (default: 15, or the "
                                  "number of magnetic ions when larger: a 27-ion landscape of a trained model "
                                  "needs the longer search, docs/benchmarks/spin_md.md)."),
                     Argument("enumerate_limit", [int, type(None)], optional=True, default=None,
                              doc="Enumerate every configuration when there are at most this many."),
                     Argument("max_evaluations", [int, type(None)], optional=True, default=None,
                              doc="Most configurations one search evaluates; bounds the cost of a step "
                                  "(docs/benchmarks/explore.md)."),
                     Argument("use_gradient", [bool, type(None)], optional=True, default=None,
                              doc="Ask the models for -dE/dS to screen moves (every evaluation then costs a full "
                                  "deepmd-kit evaluation, about 2.5x an energy-only one). Default: only where the "
                                  "search has no pair surrogate to screen with (more than about 80 magnetic "
                                  "ions); with trained models the spin forces found no better states "
                                  "(docs/benchmarks/spin_md.md, the 27-Ni cell)."),
                     Argument("n_lowest", [int, type(None)], optional=True, default=None,
                              doc="Lowest distinct states kept per search: the ground state and n_lowest - 1 "
                                  "excited states (excited_magmoms of the candidates)."),
                     Argument("domain_reversals", [bool, type(None)], optional=True, default=None,
                              doc="Let the genetic search reverse domains of the cell's nearest-neighbour graph "
                                  "(same-sign neighbours of a random ion) beside single ions (default: true). On "
                                  "a 27-Ni LiNiO2 cell they halved the cold search's mean and worst excess over the "
                                  "best state found (docs/benchmarks/spin_md.md, \"Domain reversals\")."),
                     Argument("polish_exchanges", [bool, type(None)], optional=True, default=None,
                              doc="Let the genetic search's greedy polish exchange the moments of two ions "
                                  "(same element, total moment kept) beside moving single ions (default: "
                                  "true): on a trained 27-Ni LiNiO2 model such exchanges went 10-203 meV/cell "
                                  "below states no single-ion move lowers (docs/benchmarks/spin_md.md, "
                                  "\"Exchanges\")."),
                     Argument("cold_runs", [int, type(None)], optional=True, default=None,
                              doc="Independent genetic runs of a cold search (the first of a trajectory, each "
                                  "search of fp_spin_sectors), the lowest kept. Default: above 16 magnetic ions 3, "
                                  "then one more at a time until two runs reach the lowest state or "
                                  "max_cold_runs ran (1 when max_evaluations is set; an explicit cold_runs makes "
                                  "exactly that many runs and splits that budget equally among them), else 1: on "
                                  "a trained 27-Ni LiNiO2 model a single run ended more than 5 meV/cell above the "
                                  "best state found in 57 of 80 runs; the best of 3 from 6 of 10 seeds, the default "
                                  "from 1 of 10, 8 runs from none (docs/benchmarks/spin_md.md, \"Cold runs until "
                                  "two agree\")."),
                     Argument("max_cold_runs", [int, type(None)], optional=True, default=None,
                              doc="The most runs a cold search of more than 16 magnetic ions makes by default "
                                  "(cold_runs unset) while fewer than two of them reach its lowest state "
                                  "(default 8)."),
                 ]),
        Argument("model_devi_spin_certify", dict, optional=True, default={},
                 doc="The ground-state certificate of spin-minimized MD (spingen.spin.certificate): at a "
                     "re-optimizing step the step's own -dE/dS predicts the gap of every competitor of the "
                     "current moments (single- and two-ion moves, the last search's lowest states); only those "
                     "predicted within `margin` (plus their measured prediction error, sized apart beyond "
                     "`max_age`; until it is measured, `probes` of each kind first) or older than `backstop_age` are "
                     "evaluated, in energy-only batches, and a "
                     "lower one moves the moments downhill over single-ion moves. A full warm search runs "
                     "every `search_every` steps. Measured in docs/benchmarks/spin_md.md.",
                 sub_fields=[
                     Argument("enable", bool, optional=True, default=True,
                              doc="false: a full warm search at every re-optimizing step (15-30x fixed-spin MD)."),
                     Argument("margin", float, optional=True, default=_CERTIFICATE.margin,
                              doc="eV (of the cell): a competitor predicted closer than this is evaluated."),
                     Argument("max_age", int, optional=True, default=_CERTIFICATE.max_age,
                              doc="Steps after which a competitor's prediction error is sized by the larger of the "
                                  "errors measured at any age and on evaluations that old (it grows faster than "
                                  "the age at first); until the latter is measured, the probes of those this old are "
                                  "evaluated, and those the error measured on them names."),
                     Argument("backstop_age", [int, type(None)], optional=True, default=_CERTIFICATE.backstop_age,
                              doc="Steps a competitor's last evaluation is trusted at most, however far its gap "
                                  "(>= max_age; null: 5 x max_age; equal to max_age: every competitor older than "
                                  "max_age is evaluated, as before 2026-12-06)."),
                     Argument("probes", int, optional=True, default=_CERTIFICATE.probes,
                              doc="Until a kind of competitor's prediction error is measured (at the start, and on "
                                  "competitors older than max_age), only this many of its nearest and this many of "
                                  "its most changed are evaluated first; the error measured on them sizes the rest "
                                  "at the same step (0: every one of them at once, the rule before probes)."),
                     Argument("search_every", int, optional=True, default=_CERTIFICATE.search_every,
                              doc="A full warm search at least this often (changes of several ions at once)."),
                     Argument("pair_limit", int, optional=True, default=_CERTIFICATE.pair_limit,
                              doc="Two-ion moves are competitors too when a configuration has at most this many "
                                  "(6 ions of 4 levels: 135); more ions: single-ion moves and the exchanges (exchange_limit)."),
                     Argument("exchange_limit", int, optional=True, default=_CERTIFICATE.exchange_limit,
                              doc="Beyond pair_limit, every exchange of two ions' moments (ions with the same allowed "
                                  "values; the total moment kept) is a competitor too when a configuration has at "
                                  "most this many (27 ions: at most 351); its gap follows the gaps of its two "
                                  "one-ion changes, evaluated where an exchange near enough rests on them. 0: none "
                                  "(single-ion moves only): on a 27-Ni LiNiO2 cell 2-3x cheaper, and 64 meV per "
                                  "cell off the best known "
                                  "state where exchanges hold it (docs/benchmarks/spin_md.md, 'Exchanges that "
                                  "follow their anchors')."),
                     Argument("remembered_states", int, optional=True, default=_CERTIFICATE.remembered_states,
                              doc="The competitors' references of this many states left last are kept: moments "
                                  "that go back to one evaluate only what its aged references do not certify "
                                  "(0: forget every state left)."),
                 ]),
        Argument("fp_task_max", int, optional=False, doc="At most this many labels per system and iteration."),
        Argument("fp_task_max_total", [int, type(None)], optional=True, default=None,
                 doc="At most this many candidates per iteration over all systems (null: no global cap); "
                     "taken in turn from each system's sampled candidates."),
        Argument("fp_task_min", int, optional=True, default=1, doc="Fewer candidates than this: label none."),
        Argument("fp_spin_only_share", float, optional=True, default=0.5,
                 doc="Share of each system's fp_task_max reserved for spin-only candidates (spin disagreement "
                     "above the spin trusts while the force deviation is below model_devi_f_trust_lo): "
                     "ceil(share x fp_task_max) of the picks are spin-only ones where there are that many, the "
                     "rest drawn from all candidates, spread so that fp_task_max_total keeps the share. Force "
                     "candidates usually outnumber them many times, and a "
                     "uniform pick would leave the states the models rank differently unlabeled (0: DP-GEN's "
                     "uniform pick)."),
        Argument("ratio_failed", float, optional=True, default=0.05,
                 doc="Largest fraction of failed label tasks before the run stops."),
    ]
    return Argument("param", dict, fields, [_fp_variant()], doc="param.json: what to learn and how.")


# ---------------------------------------------------------------- machine.json schema
def machine_arginfo() -> Argument:
    """The schema of machine.json: DP-GEN's, plus spingen's optional `check_interval`."""
    dpdispatcher_log = logging.getLogger("dpdispatcher")
    dpdispatcher_log.disabled = True  # its first line, at import, makes dpdispatcher.log in the current folder
    try:
        from dpgen.dispatcher.Dispatcher import mdata_arginfo
    finally:
        dpdispatcher_log.disabled = False

    def section(name: str) -> Argument:
        fields = mdata_arginfo() + [
            Argument("check_interval", int, optional=True, default=30,
                     doc="Seconds between two polls of the scheduler (spingen)."),
        ]
        return Argument(name, dict, fields, optional=False,
                        doc=f"command, machine and resources (dpdispatcher) of the {name} stage.")

    return Argument("machine", dict, [
        Argument("api_version", str, optional=True, default="1.0", doc="DP-GEN's; 1.0."),
        Argument("deepmd_version", str, optional=True, default="3", doc="Informational."),
        *[section(name) for name in MACHINE_SECTIONS],
    ], doc="machine.json: where and how each stage runs (DP-GEN's format).")


# ---------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class SpinSettings:
    enabled: bool
    magnetic: tuple[str, ...]
    virtual_scale: float
    offset: float
    moments: Mapping[str, tuple[float, ...]] | str
    min_virtual_distance: float
    flip_symmetry: str  # one of FLIP_SYMMETRIES
    min_level_support: int = 3  # frames; auto levels seen less are refused

    @property
    def encoding(self) -> SpinEncoding:
        return SpinEncoding(self.magnetic, self.virtual_scale, self.offset, canonical=self.flip_symmetry == "canonical")


@dataclass(frozen=True)
class TrainSettings:
    numb_models: int
    training_param: Mapping[str, Any]
    init_model: bool = False  # training_init_model
    reuse_numb_steps: int | None = None  # training_reuse_numb_steps
    reuse_start_lr: float | None = None  # training_reuse_start_lr
    init_data_ratio: float | None = None  # training_init_data_ratio

    def reused_training_param(self) -> Mapping[str, Any]:
        """default_training_param for a model that starts from its predecessor (training_reuse_*)."""
        inp = thaw(self.training_param)
        if self.reuse_numb_steps is not None:
            inp.setdefault("training", {})["numb_steps"] = self.reuse_numb_steps
        if self.reuse_start_lr is not None:
            inp.setdefault("learning_rate", {})["start_lr"] = self.reuse_start_lr
        return inp


@dataclass(frozen=True)
class MachineSection:
    command: str
    machine: Mapping[str, Any]
    resources: Mapping[str, Any]
    check_interval: int
    user_forward_files: tuple[str, ...] = ()
    user_backward_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Machines:
    train: MachineSection
    model_devi: MachineSection
    fp: MachineSection


@dataclass(frozen=True)
class InitGenSettings:
    """init_data_gen, checked: one system per structure file, every state one moment per magnetic ion."""

    configs: tuple[Path, ...]
    pert_numb: int
    pert_box: float
    pert_atom: float
    spin_states: tuple[tuple[tuple[float, ...], ...], ...]  # per config: states x magnetic ions
    fixed_total: bool
    ratio_failed: float
    seed: int


@dataclass(frozen=True)
class Param:
    """Checked param.json: paths resolved, every default filled in once."""

    path: Path
    type_map: tuple[str, ...]
    mass_map: tuple[float, ...]
    init_data_sys: tuple[Path, ...]
    sys_configs: tuple[tuple[Path, ...], ...]
    spin: SpinSettings
    train: TrainSettings
    model_devi_jobs: tuple[Mapping[str, Any], ...]
    raw: Mapping[str, Any] = field(repr=False)
    init_gen: InitGenSettings | None = None
    sys_format: str = "vasp"  # ASE's name of the structure format of sys_configs and init_data_gen/configs

    @property
    def n_iterations(self) -> int:
        return len(self.model_devi_jobs)


# ---------------------------------------------------------------- loading and checks
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} file '{path}' not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _normalize(arginfo: Argument, data: dict, path: Path) -> dict:
    try:
        data = arginfo.normalize_value(data, trim_pattern="_*")
        arginfo.check_value(data, strict=True)
    except ArgumentError as err:
        raise InputError(f"{path}: {err}") from None
    return data


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A frozen mapping/tuple tree back to plain dicts and lists (for JSON)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def load_machine(path: str | Path) -> Machines:
    """Read and check machine.json; a one-element list per section is accepted (DP-GEN)."""
    path = Path(path)
    data = _read_json(path, "machine")
    if "type_map" in data:
        raise InputError(f"{path}: this is a param.json (key 'type_map'), not a machine.json: give PARAM first, "
                         "then MACHINE (swapped?)")
    _refuse_pre_1_0_machine(data, path)
    for name in MACHINE_SECTIONS:
        section = data.get(name)
        if isinstance(section, list):
            if len(section) != 1:
                raise InputError(f"{path}: key '{name}': expected a dict or a list of one dict, "
                                 f"got a list of {len(section)}")
            data[name] = section = section[0]
        if isinstance(section, dict) and "machine" not in section:
            raise InputError(f"{path}: key '{name}/machine' is missing: each section needs command, machine "
                             "(dpdispatcher's batch_type, context_type, local_root, ...) and resources")
        if isinstance(section, dict) and isinstance(section.get("machine"), dict) \
                and isinstance(section.get("resources"), dict):
            section["resources"].setdefault("batch_type", section["machine"].get("batch_type"))
    data = _normalize(machine_arginfo(), data, path)

    def build(name: str) -> MachineSection:
        s, key = data[name], f"{path}: key '{name}"
        if not s["command"].strip():
            raise InputError(f"{key}/command' is empty: expected the program each task runs (e.g. dp, spingen, "
                             "or the full path of the one to use)")
        if s["resources"]["group_size"] < 0:
            raise InputError(f"{key}/resources/group_size': expected the tasks per job, >= 1 (0: every task in "
                             f"one job), got {s['resources']['group_size']}")
        command = s["command"]
        if s["machine"]["batch_type"].lower() == "shell" and "local" in s["machine"]["context_type"].lower():
            command = _local_command(command, s["resources"], f"{key}/command'")
        return MachineSection(command, _freeze(s["machine"]), _freeze(s["resources"]),
                              s["check_interval"], tuple(s.get("user_forward_files", ())),
                              tuple(s.get("user_backward_files", ())))

    return Machines(*(build(name) for name in MACHINE_SECTIONS))


def _refuse_pre_1_0_machine(data: dict, path: Path) -> None:
    """DP-GEN's machine.json before api_version 1.0 is named as such, with where to read the new format."""
    found = [key for key in PRE_1_0_MACHINE_KEYS["top"] if key in data]
    for name in MACHINE_SECTIONS:
        entries = data.get(name) if isinstance(data.get(name), list) else [data.get(name)]
        for section in filter(lambda entry: isinstance(entry, dict), entries):
            found += [f"{name}/{key}" for key in PRE_1_0_MACHINE_KEYS["section"] if key in section]
            machine = section.get("machine")
            if isinstance(machine, dict):
                found += [f"{name}/machine/{key}" for key in PRE_1_0_MACHINE_KEYS["machine"] if key in machine]
    try:
        if float(data.get("api_version", "1.0")) < 1.0:
            found.insert(0, "api_version")
    except (TypeError, ValueError):
        pass  # dargs names a value that is not a version
    if found:
        raise InputError(f"{path}: this is DP-GEN's pre-1.0 machine format (key '{found[0]}'); api_version 1.0 "
                         "is expected: sections train, model_devi and fp, each with command, machine (dpdispatcher's "
                         "batch_type, context_type, remote_root, remote_profile) and resources (number_node, "
                         f"cpu_per_node, group_size, ...). DP-GEN's guide to the new format: {DPGEN_MACHINE_DOCS}; "
                         "every key: `spingen doc machine`")


def _local_command(command: str, resources: Mapping[str, Any], key: str) -> str:
    """The command of tasks that run on this machine, its program resolved as the task's shell will.

    A bare name not on PATH but beside this Python (the installation running spingen, e.g. a venv not
    on PATH) is replaced by that file; one found nowhere is refused. Left as is when the resources
    change the task's environment (source_list, module_list, envs PATH) or the program is a shell word.
    """
    if resources.get("source_list") or resources.get("module_list") or "PATH" in (resources.get("envs") or {}):
        return command
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: the shell will say
        return command
    program = next((w for w in words if not re.fullmatch(r"[A-Za-z_]\w*=.*", w)), None)
    if program is None or program in SHELL_WORDS:
        return command
    if "/" in program:
        if os.path.isabs(program) and not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise InputError(f"{key}: '{program}' is not an executable file")
        return command
    if shutil.which(program):
        return command
    beside = Path(sys.executable).parent / program
    if beside.is_file() and os.access(beside, os.X_OK):
        return re.sub(rf"(?<!\S){re.escape(program)}(?!\S)", lambda _: shlex.quote(str(beside)), command, count=1)
    raise InputError(f"{key}: '{program}' is not on PATH (nor in {beside.parent}, beside this spingen): every "
                     "local task would fail with 'command not found'; give its full path")


def load_param(path: str | Path) -> Param:
    """Read param.json, check every key and the data it points to, return typed settings."""
    from spingen.checks import check_param_data

    path = Path(path).resolve()
    data = _read_json(path, "param")
    _refuse_foreign_param(data, path)
    raw = _normalize(param_arginfo(), data, path)
    raw["sys_format"] = _structure_format(raw["sys_format"], path)
    base = path.parent
    type_map = tuple(raw["type_map"])
    if len(set(type_map)) != len(type_map) or not type_map:
        raise InputError(f"{path}: key 'type_map': expected distinct element symbols, got {list(type_map)}")
    spin = _spin_settings(raw["spin"], type_map, path)
    init_gen = _init_gen_settings(raw, base, path, type_map, spin)
    param = Param(
        path=path,
        type_map=type_map,
        mass_map=_mass_map(raw["mass_map"], type_map, path),
        init_data_sys=_data_paths(raw, base, path, required=init_gen is None),
        sys_configs=_sys_configs(raw, base, path, type_map, spin),
        spin=spin,
        train=_train_settings(raw, path),
        model_devi_jobs=_freeze(raw["model_devi_jobs"]),
        raw=_freeze(raw),
        init_gen=init_gen,
        sys_format=raw["sys_format"],
    )
    _check_explore_keys(param, path)
    label_settings(param)
    check_param_data(param)
    return param


def _refuse_foreign_param(data: dict, path: Path) -> None:
    """What dargs would misname: a machine.json given as PARAM, a DP-GEN key spingen has no use for, a NaN."""
    machine_keys = sorted(set(data) & {*MACHINE_SECTIONS, *PRE_1_0_MACHINE_KEYS["top"]})
    if "type_map" not in data and machine_keys:
        raise InputError(f"{path}: this is a machine.json (keys {machine_keys}), not a param.json: give PARAM "
                         "first, then MACHINE (swapped?)")
    for name, advice in DPGEN_ONLY_KEYS.items():
        if name in data:
            raise InputError(f"{path}: key '{name}' is DP-GEN's: {advice}")
    _refuse_nan(data, path)


def _refuse_nan(value: Any, path: Path, key: str = "") -> None:
    """NaN, which Python's json reads, is no value of any key."""
    if isinstance(value, float) and math.isnan(value):
        raise InputError(f"{path}: key '{key}': NaN is not a value")
    if isinstance(value, dict):
        for name, child in value.items():
            _refuse_nan(child, path, f"{key}/{name}" if key else name)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _refuse_nan(child, path, f"{key}[{index}]")


def _structure_format(name: str, path: Path) -> str:
    """sys_format as ASE's format name (DP-GEN's "vasp/poscar" is ASE's "vasp")."""
    from ase.io.formats import ioformats

    fmt = DPGEN_FORMATS.get(name.lower(), name)
    if fmt not in ioformats or not ioformats[fmt].can_read:
        raise InputError(f"{path}: key 'sys_format': '{name}' is not a structure format ASE reads (e.g. vasp, "
                         "extxyz, cif)")
    return fmt


def _spin_settings(spin: dict, type_map: tuple[str, ...], path: Path) -> SpinSettings:
    magnetic = tuple(spin["magnetic"])
    for element in magnetic:
        if element not in type_map:
            raise InputError(f"{path}: key 'spin/magnetic': element '{element}' is not in type_map {list(type_map)}")
    if spin["enabled"] and not magnetic:
        raise InputError(f"{path}: key 'spin/magnetic': expected at least one magnetic element when "
                         "spin/enabled is true (set enabled: false for a pristine model)")
    if spin["virtual_scale"] <= 0:
        raise InputError(f"{path}: key 'spin/virtual_scale': expected a positive eta (A/uB), "
                         f"got {spin['virtual_scale']}")
    moments = spin["moments"]
    if isinstance(moments, str):
        if moments != "auto":
            raise InputError(f"{path}: key 'spin/moments': expected a mapping element -> magnitudes or "
                             f"\"auto\", got \"{moments}\"")
    else:
        for element, levels in moments.items():
            if element not in magnetic:
                raise InputError(f"{path}: key 'spin/moments/{element}': '{element}' is not in "
                                 f"spin/magnetic {list(magnetic)}")
            if not isinstance(levels, list) or not levels or \
                    not all(isinstance(m, (int, float)) and m >= 0 for m in levels):
                raise InputError(f"{path}: key 'spin/moments/{element}': expected a non-empty list of "
                                 f"magnitudes >= 0 (uB), got {levels}")
        missing = [e for e in magnetic if e not in moments]
        if missing:
            raise InputError(f"{path}: key 'spin/moments': no magnitudes for {missing}; give them or use \"auto\"")
        moments = MappingProxyType({e: tuple(float(m) for m in v) for e, v in moments.items()})
    if spin["flip_symmetry"] not in FLIP_SYMMETRIES:
        raise InputError(f"{path}: key 'spin/flip_symmetry': expected one of {list(FLIP_SYMMETRIES)}, "
                         f"got \"{spin['flip_symmetry']}\"")
    if spin["min_level_support"] < 1:
        raise InputError(f"{path}: key 'spin/min_level_support': expected at least 1 frame, "
                         f"got {spin['min_level_support']}")
    return SpinSettings(spin["enabled"], magnetic, float(spin["virtual_scale"]), float(spin["offset"]),
                        moments, float(spin["min_virtual_distance"]), spin["flip_symmetry"],
                        int(spin["min_level_support"]))


def _train_settings(raw: Mapping[str, Any], path: Path) -> TrainSettings:
    steps, start_lr = raw["training_reuse_numb_steps"], raw["training_reuse_start_lr"]
    if steps is not None and steps < 1:
        raise InputError(f"{path}: key 'training_reuse_numb_steps': expected at least 1 training step, got {steps}")
    if start_lr is not None and not start_lr > 0:
        raise InputError(f"{path}: key 'training_reuse_start_lr': expected a positive learning rate, got {start_lr}")
    if (steps is not None or start_lr is not None) and not raw["training_init_model"]:
        raise InputError(f"{path}: keys 'training_reuse_numb_steps'/'training_reuse_start_lr' apply to a model "
                         "that starts from its predecessor: set training_init_model true or remove them")
    ratio = raw["training_init_data_ratio"]
    if ratio is not None:
        _check_init_data_ratio(ratio, raw["default_training_param"], path)
    return TrainSettings(raw["numb_models"], _freeze(raw["default_training_param"]), raw["training_init_model"],
                         steps, start_lr, ratio)


def _check_init_data_ratio(ratio: float, training_param: Mapping[str, Any], path: Path) -> None:
    """training_init_data_ratio is a share, and nothing else in training_data draws or drops systems."""
    if not 0 < ratio < 1:
        raise InputError(f"{path}: key 'training_init_data_ratio': expected a share between 0 and 1 (exclusive), "
                         f"got {ratio}")
    training_data = (training_param.get("training") or {}).get("training_data") or {}
    chosen = [k for k in ("auto_prob", "auto_prob_style", "sys_probs") if training_data.get(k) is not None]
    if chosen:
        raise InputError(f"{path}: keys 'training_init_data_ratio' and 'default_training_param/training/"
                         f"training_data/{chosen[0]}' both set how often each system is drawn: keep one")
    batch_size = training_data.get("batch_size")
    if training_data.get("rglob_patterns") or (isinstance(batch_size, str) and batch_size.startswith("filter:")):
        raise InputError(f"{path}: key 'training_init_data_ratio' needs every system the train stage lists to be "
                         "trained on, in that order: remove 'default_training_param/training/training_data/"
                         "rglob_patterns' or the \"filter:\" batch_size, which drop or add systems")


def _mass_map(mass_map: list | str, type_map: tuple[str, ...], path: Path) -> tuple[float, ...]:
    from ase.data import atomic_masses, atomic_numbers

    if mass_map == "auto":
        unknown = [s for s in type_map if s not in atomic_numbers]
        if unknown:
            raise InputError(f"{path}: key 'type_map': unknown element symbols {unknown}")
        return tuple(float(atomic_masses[atomic_numbers[s]]) for s in type_map)
    if isinstance(mass_map, str) or len(mass_map) != len(type_map):
        raise InputError(f"{path}: key 'mass_map': expected \"auto\" or {len(type_map)} masses "
                         f"(one per type_map entry), got {mass_map}")
    return tuple(float(m) for m in mass_map)


def _data_paths(raw: dict, base: Path, path: Path, required: bool) -> tuple[Path, ...]:
    from dpgen.util import expand_sys_str

    prefix = base / raw["init_data_prefix"]
    if required and not raw["init_data_sys"]:
        raise InputError(f"{path}: key 'init_data_sys': expected at least one deepmd/npy system "
                         "(or init_data_gen/configs, to make the initial data)")
    systems: list[Path] = []
    for entry in raw["init_data_sys"]:
        where = prefix / entry
        if not where.exists():
            raise InputError(f"{path}: key 'init_data_sys': '{entry}' not found (looked in {where})")
        try:
            systems += sorted(Path(p) for p in expand_sys_str(where))
        except RuntimeError:
            raise InputError(f"{path}: key 'init_data_sys': '{entry}' holds no deepmd/npy system "
                             "(no type.raw below it)") from None
    return tuple(systems)


def _init_gen_settings(raw: dict, base: Path, path: Path, type_map: tuple[str, ...],
                       spin: SpinSettings) -> InitGenSettings | None:
    """init_data_gen checked against its structures; None when it has no configs."""
    from ase.io import read

    gen = raw["init_data_gen"]
    if not gen.get("configs"):  # dargs fills the sub-keys only of a section that is present
        return None
    key = f"{path}: key 'init_data_gen"
    if not spin.enabled:
        raise InputError(f"{key}': makes spin-state data; it needs spin/enabled true")
    files = sorted({Path(f) for p in gen["configs"] for f in glob.glob(str(base / p))})
    if not files:
        raise InputError(f"{key}/configs': the globs {gen['configs']} match no file under '{base}'")
    if gen["pert_numb"] < 1:
        raise InputError(f"{key}/pert_numb': expected at least 1, got {gen['pert_numb']}")
    for name in ("pert_box", "pert_atom"):
        if gen[name] < 0:
            raise InputError(f"{key}/{name}': expected a value >= 0, got {gen[name]}")
    if not 0.0 <= gen["ratio_failed"] <= 1.0:
        raise InputError(f"{key}/ratio_failed': expected a fraction in [0, 1], got {gen['ratio_failed']}")
    states_per_config = []
    for file in files:
        try:
            atoms = read(file, format=raw["sys_format"])
        except Exception as err:  # ase raises many types for unreadable files
            raise InputError(f"{key}/configs': cannot read '{file}' as {raw['sys_format']} "
                             f"({type(err).__name__}: {err})") from None
        symbols = atoms.get_chemical_symbols()
        foreign = sorted(set(symbols) - set(type_map))
        if foreign:
            raise InputError(f"{key}/configs': '{file}' holds elements {foreign} that are not in type_map "
                             f"{list(type_map)}")
        ions = [s for s in symbols if s in spin.magnetic]
        if not ions:
            raise InputError(f"{key}/configs': '{file}' holds no magnetic ion of spin/magnetic {list(spin.magnetic)}")
        states_per_config.append(_init_spin_states(gen["spin_states"], ions, spin, f"{key}/spin_states'", file))
    return InitGenSettings(tuple(files), gen["pert_numb"], float(gen["pert_box"]), float(gen["pert_atom"]),
                           tuple(states_per_config), gen["fixed_total"], float(gen["ratio_failed"]), gen["seed"])


def _init_spin_states(states: list | str, ions: list[str], spin: SpinSettings, key: str,
                      file: Path) -> tuple[tuple[float, ...], ...]:
    """The start moments of one structure's magnetic ions, one tuple per state."""
    if isinstance(states, str):
        if states != "auto":
            raise InputError(f"{key}: expected a list of states or \"auto\", got \"{states}\"")
        if isinstance(spin.moments, str):
            raise InputError(f"{key} is \"auto\", which takes the levels of spin/moments, but spin/moments is "
                             "\"auto\" too: give the states (e.g. [[1, 1], [1, -1]]) or the levels")
        return auto_spin_states(ions, spin.moments)
    if not states:
        raise InputError(f"{key}: expected at least one state")
    out = []
    for index, state in enumerate(states):
        if not isinstance(state, list) or len(state) != len(ions) or \
                not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in state):
            raise InputError(f"{key}[{index}]: expected {len(ions)} moments (uB), one per magnetic ion of "
                             f"'{file}' ({' '.join(ions)}), got {state}")
        out.append(tuple(float(m) for m in state))
    return tuple(out)


def auto_spin_states(ions: list[str], levels: Mapping[str, tuple[float, ...]]) -> tuple[tuple[float, ...], ...]:
    """Ferromagnetic and alternating antiferromagnetic states at each level rank, without repeats.

    Rank k puts every ion at its element's k-th magnitude (its last one when it has fewer).
    """
    depth = max(len(levels[e]) for e in set(ions))
    states: list[tuple[float, ...]] = []
    for rank in range(depth):
        magnitudes = [levels[e][min(rank, len(levels[e]) - 1)] for e in ions]
        for signs in ([1] * len(ions), [(-1) ** i for i in range(len(ions))]):
            state = tuple(float(s * m) for s, m in zip(signs, magnitudes))
            flipped = tuple(-m for m in state)
            if state not in states and flipped not in states:
                states.append(state)
    return tuple(states)


def _sys_configs(raw: dict, base: Path, path: Path, type_map: tuple[str, ...],
                 spin: SpinSettings) -> tuple[tuple[Path, ...], ...]:
    """The files of every sys_configs entry, each opened as the explore stage will read it."""
    from spingen.checks import read_structures

    prefix = base / raw["sys_configs_prefix"]
    groups = []
    for index, patterns in enumerate(raw["sys_configs"]):
        key = f"{path}: key 'sys_configs[{index}]'"
        patterns = [patterns] if isinstance(patterns, str) else patterns
        files = sorted({Path(f) for p in patterns for f in glob.glob(str(prefix / p))})
        if not files:
            raise InputError(f"{key}: the globs {patterns} match no file under '{prefix}'")
        for file in files:
            try:
                frames = read_structures(file, raw["sys_format"], type_map)
            except ValueError as err:
                raise InputError(f"{key}: {err}") from None
            if spin.enabled and not any(set(a.get_chemical_symbols()) & set(spin.magnetic) for a in frames):
                raise InputError(f"{key}: '{file}' holds no magnetic ion of spin/magnetic {list(spin.magnetic)} "
                                 "to explore")
        groups.append(tuple(files))
    return tuple(groups)


def _check_explore_keys(param: Param, path: Path) -> None:
    raw = param.raw
    for name in ("model_devi_f_trust_lo", "model_devi_f_trust_hi", "model_devi_v_trust_lo", "model_devi_v_trust_hi"):
        if raw[name] is not None and raw[name] < 0:
            raise InputError(f"{path}: key '{name}': expected a deviation >= 0, got {raw[name]}")
    if raw["model_devi_f_trust_lo"] > raw["model_devi_f_trust_hi"]:
        raise InputError(f"{path}: keys 'model_devi_f_trust_lo' ({raw['model_devi_f_trust_lo']}) > "
                         f"'model_devi_f_trust_hi' ({raw['model_devi_f_trust_hi']}): expected lo <= hi")
    if raw["model_devi_dt"] >= 0.1:
        raise InputError(f"{path}: key 'model_devi_dt': {raw['model_devi_dt']} ps is no MD time step: the unit is "
                         "ps, as in DP-GEN (0.001-0.002 ps for an oxide); expected < 0.1 ps")
    if not param.model_devi_jobs:
        raise InputError(f"{path}: key 'model_devi_jobs': expected at least one job (iteration 0)")
    for it, job in enumerate(param.model_devi_jobs):
        key = f"{path}: key 'model_devi_jobs[{it}]"
        if not job["sys_idx"]:
            raise InputError(f"{key}/sys_idx': expected at least one index into sys_configs")
        for idx in job["sys_idx"]:
            if not isinstance(idx, int) or not 0 <= idx < len(param.sys_configs):
                raise InputError(f"{key}/sys_idx': index {idx} is not in "
                                 f"0..{len(param.sys_configs) - 1} (sys_configs)")
        if job["ensemble"] not in MD_ENSEMBLES:
            raise InputError(f"{key}/ensemble': expected one of {list(MD_ENSEMBLES)}, got '{job['ensemble']}'")
        for name, unit, least in (("temps", "K", 0), ("press", "bar", -math.inf)):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= least for v in job[name]):
                raise InputError(f"{key}/{name}': expected numbers ({unit}{', >= 0' if least == 0 else ''}), "
                                 f"got {thaw(job[name])}")
        last = job["nsteps"] - job["nsteps"] % job["trj_freq"] if job["trj_freq"] > 0 else -1  # -1: checked later
        if last >= 0 and raw["model_devi_skip"] > last:
            raise InputError(f"{path}: key 'model_devi_skip' ({raw['model_devi_skip']}): model_devi_jobs[{it}] "
                             f"writes its last frame at step {last} (nsteps {job['nsteps']}, trj_freq "
                             f"{job['trj_freq']}) and frames of steps < model_devi_skip are left out: that "
                             "iteration would explore nothing")


# ---------------------------------------------------------------- label stage settings
@dataclass(frozen=True)
class LdauSettings:
    """DFT+U of one element: the corrected shell's angular momentum L and U, J in eV."""

    L: int
    U: float
    J: float = 0.0


@dataclass(frozen=True)
class GpawSettings:
    ecut: float
    kpts: tuple[int, int, int] | None
    kspacing: float
    h: float | None  # real-space grid spacing (A); None: GPAW's choice from ecut
    width: float
    maxiter: int
    xc: str
    convergence: Mapping[str, Any]
    stress: bool
    random_moment: float
    retry_maxiter: int | None = None  # an unconverged SCF runs once more with this many iterations; None: no retry


@dataclass(frozen=True)
class VaspSettings:
    pp_files: Mapping[str, Path]  # element -> POTCAR file (absolute)
    incar: str  # the template's text
    incar_path: Path
    kspacing: float | None
    kpoints: tuple[int, int, int] | None


@dataclass(frozen=True)
class LabelSettings:
    """Everything the label stage and its labelers read (built once by `label_settings`)."""

    style: str
    type_map: tuple[str, ...]
    magnetic: tuple[str, ...]
    spin_init: str
    ldau: Mapping[str, LdauSettings]
    moment_levels: Mapping[str, tuple[float, ...]] | None  # None: spin/moments is "auto"
    moment_tolerance: float
    ratio_failed: float
    task_max: int
    task_min: int
    vasp: VaspSettings | None = None
    gpaw: GpawSettings | None = None


@dataclass(frozen=True)
class ExploreJob:
    """One entry of model_devi_jobs: the MD runs of one iteration."""

    sys_idx: tuple[int, ...]
    temps: tuple[float, ...]
    press: tuple[float, ...]
    ensemble: str
    nsteps: int
    trj_freq: int
    taut_ps: float
    taup_ps: float
    spin_opt_freq: int
    spin_devi_freq: int

    @property
    def pressures(self) -> tuple[float | None, ...]:
        """The pressures of its runs: press for an NPT ensemble, else one run without a pressure."""
        return self.press if self.ensemble.startswith("npt") else (None,)


@dataclass(frozen=True)
class ExploreSettings:
    """The checked param.json keys of the explore stage."""

    f_trust_lo: float
    f_trust_hi: float
    spin_trust: float
    spin_e_trust: float
    skip: int
    v_trust_lo: float  # inf: virial deviations are not used
    v_trust_hi: float
    dt_ps: float
    driver: str
    seed: int
    compressibility: float
    spin_search: Mapping[str, Any]
    symmetrize: bool
    task_max: int
    task_max_total: int | None
    task_min: int
    spin_only_share: float  # of task_max, reserved for spin-only candidates
    jobs: tuple[ExploreJob, ...]  # model_devi_jobs, one per iteration
    certify: Mapping[str, Any] | None = None  # CertificateSettings fields; None: search at every re-optimizing step
    sectors: int = 0  # total-moment sectors searched per picked candidate (fp_spin_init "sectors"); 0: none


def explore_settings(param: Param) -> ExploreSettings:
    """The explore keys of param.json, checked; InputError names the key of a bad value."""
    raw, where = param.raw, f"{param.path}: key"
    if param.train.numb_models < 2:
        raise InputError(f"{where} 'numb_models': expected at least 2 models, got {param.train.numb_models}: frames "
                         "are selected by the deviation of the ensemble's predictions (DP-GEN's examples use 4)")
    if raw["model_devi_driver"] not in MODEL_DEVI_DRIVERS:
        raise InputError(f"{where} 'model_devi_driver': expected one of {list(MODEL_DEVI_DRIVERS)}, got "
                         f"'{raw['model_devi_driver']}'")
    if not 0.0 <= raw["model_devi_spin_trust"] <= 1.0:
        raise InputError(f"{where} 'model_devi_spin_trust': expected a fraction in [0, 1], "
                         f"got {raw['model_devi_spin_trust']}")
    if raw["model_devi_spin_e_trust"] < 0:
        raise InputError(f"{where} 'model_devi_spin_e_trust': expected an energy >= 0 (eV/atom), "
                         f"got {raw['model_devi_spin_e_trust']}")
    for key in ("model_devi_dt", "model_devi_compressibility"):
        if raw[key] <= 0:
            raise InputError(f"{where} '{key}': expected a positive number, got {raw[key]}")
    if raw["model_devi_skip"] < 0:
        raise InputError(f"{where} 'model_devi_skip': expected a step >= 0, got {raw['model_devi_skip']}")
    v_lo, v_hi = (math.inf if raw[k] is None else float(raw[k]) for k in ("model_devi_v_trust_lo",
                                                                          "model_devi_v_trust_hi"))
    if v_lo > v_hi:
        raise InputError(f"{where}s 'model_devi_v_trust_lo' ({v_lo}) > 'model_devi_v_trust_hi' ({v_hi}): "
                         "expected lo <= hi")
    total = raw["fp_task_max_total"]
    if raw["fp_task_max"] < 1 or (total is not None and total < 1) or raw["fp_task_min"] < 0:
        raise InputError(f"{where} 'fp_task_max'/'fp_task_max_total'/'fp_task_min': expected fp_task_max >= 1, "
                         f"fp_task_max_total null or >= 1, fp_task_min >= 0; got {raw['fp_task_max']}, {total}, "
                         f"{raw['fp_task_min']}")
    if not 0 <= raw["fp_spin_only_share"] <= 1:
        raise InputError(f"{where} 'fp_spin_only_share': expected a share in [0, 1], got {raw['fp_spin_only_share']}")
    sectors = int(raw["fp_spin_sectors"]) if raw["fp_spin_init"] == "sectors" else 0
    if raw["fp_spin_init"] == "sectors" and sectors < 1:
        raise InputError(f"{where} 'fp_spin_sectors': expected at least 1 sector with fp_spin_init \"sectors\", "
                         f"got {raw['fp_spin_sectors']}")
    search_arg = param_arginfo().sub_fields["model_devi_spin_search"]
    search = search_arg.normalize_value(thaw(raw["model_devi_spin_search"]), trim_pattern="_*")
    search = {key: value for key, value in search.items() if value is not None}  # None: the search's default
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise InputError(f"{where} 'model_devi_spin_search': the spin search has no setting {unknown}")
    for key, value in search.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < (2 if key == "population" else 1):
            raise InputError(f"{where} 'model_devi_spin_search/{key}': expected a larger value, got {value}")
    try:
        SearchSettings(**search)
    except ValueError as err:
        raise InputError(f"{where} 'model_devi_spin_search': {err}") from None
    certify_arg = param_arginfo().sub_fields["model_devi_spin_certify"]
    certify = dict(certify_arg.normalize_value(thaw(raw["model_devi_spin_certify"]), trim_pattern="_*"))
    enabled = certify.pop("enable", True)
    try:
        CertificateSettings(**certify)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where} 'model_devi_spin_certify': {err}") from None
    for it, job in enumerate(param.model_devi_jobs):
        key = f"{where} 'model_devi_jobs[{it}]"
        for name, least in (("nsteps", 0), ("trj_freq", 1), ("spin_opt_freq", 0), ("spin_devi_freq", 0)):
            if job[name] < least:
                raise InputError(f"{key}/{name}': expected an integer >= {least}, got {job[name]}")
        for name in ("taut", "taup"):
            if job[name] <= 0:
                raise InputError(f"{key}/{name}': expected a positive time (ps), got {job[name]}")
        if job["ensemble"].startswith("npt") and not job["press"]:
            raise InputError(f"{key}/press': ensemble '{job['ensemble']}' needs at least one pressure (bar)")
        if not job["temps"]:
            raise InputError(f"{key}/temps': expected at least one temperature (K)")
    return ExploreSettings(
        f_trust_lo=float(raw["model_devi_f_trust_lo"]), f_trust_hi=float(raw["model_devi_f_trust_hi"]),
        spin_trust=float(raw["model_devi_spin_trust"]), spin_e_trust=float(raw["model_devi_spin_e_trust"]),
        skip=int(raw["model_devi_skip"]), v_trust_lo=v_lo, v_trust_hi=v_hi, dt_ps=float(raw["model_devi_dt"]),
        driver=raw["model_devi_driver"], seed=int(raw["model_devi_seed"]),
        compressibility=float(raw["model_devi_compressibility"]), spin_search=search,
        symmetrize=bool(raw["model_devi_spin_symmetrize"]), task_max=int(raw["fp_task_max"]),
        task_max_total=None if total is None else int(total), task_min=int(raw["fp_task_min"]),
        spin_only_share=float(raw["fp_spin_only_share"]),
        jobs=tuple(ExploreJob(
            sys_idx=tuple(int(i) for i in job["sys_idx"]), temps=tuple(float(t) for t in job["temps"]),
            press=tuple(float(p) for p in job["press"]), ensemble=job["ensemble"], nsteps=int(job["nsteps"]),
            trj_freq=int(job["trj_freq"]), taut_ps=float(job["taut"]), taup_ps=float(job["taup"]),
            spin_opt_freq=int(job["spin_opt_freq"]), spin_devi_freq=int(job["spin_devi_freq"]))
            for job in param.model_devi_jobs),
        certify=certify if enabled else None, sectors=sectors)


def label_settings(param: Param) -> LabelSettings:
    """The checked settings of the label stage; InputError names the param.json key of a bad value."""
    raw, path, type_map = param.raw, param.path, param.type_map
    where = f"{path}: key"
    if raw["fp_spin_init"] not in SPIN_INIT_STRATEGIES:
        raise InputError(f"{where} 'fp_spin_init': expected one of {list(SPIN_INIT_STRATEGIES)}, "
                         f"got '{raw['fp_spin_init']}'")
    if not 0.0 <= raw["ratio_failed"] <= 1.0:
        raise InputError(f"{where} 'ratio_failed': expected a fraction in [0, 1], got {raw['ratio_failed']}")
    if raw["fp_moment_tolerance"] <= 0:
        raise InputError(f"{where} 'fp_moment_tolerance': expected a positive tolerance (uB), "
                         f"got {raw['fp_moment_tolerance']}")
    if raw["fp_task_max"] < 1 or raw["fp_task_min"] < 0:
        raise InputError(f"{where} 'fp_task_max'/'fp_task_min': expected fp_task_max >= 1 and fp_task_min >= 0, "
                         f"got {raw['fp_task_max']} and {raw['fp_task_min']}")
    if raw["fp_task_min"] > raw["fp_task_max"]:
        raise InputError(f"{where}s 'fp_task_min' ({raw['fp_task_min']}) > 'fp_task_max' ({raw['fp_task_max']}): "
                         "expected fp_task_min <= fp_task_max (a system with fewer candidates than fp_task_min gets "
                         "no label, one with more gets at most fp_task_max)")
    ldau = {}
    for element, entry in raw["fp_ldau"].items():
        key = f"{where} 'fp_ldau/{element}'"
        if element not in type_map:
            raise InputError(f"{key}: '{element}' is not in type_map {list(type_map)}")
        if not isinstance(entry, Mapping) or set(entry) - {"L", "U", "J"} or not {"L", "U"} <= set(entry):
            raise InputError(f"{key}: expected {{\"L\": int, \"U\": eV, \"J\": eV (optional)}}, got {thaw(entry)}")
        L, U, J = entry["L"], entry["U"], entry.get("J", 0.0)
        if isinstance(L, bool) or not isinstance(L, int) or not 0 <= L <= 3:
            raise InputError(f"{key}/L: expected an angular momentum 0..3 (2 = d), got {L!r}")
        for name, value in (("U", U), ("J", J)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"{key}/{name}: expected a number >= 0 (eV), got {value!r}")
        if U < J:
            raise InputError(f"{key}: U ({U}) < J ({J}): Dudarev's DFT+U (LDAUTYPE 2) applies U - J, which would be "
                             "negative; expected U >= J")
        ldau[element] = LdauSettings(L, float(U), float(J))
    levels = None if isinstance(param.spin.moments, str) else param.spin.moments
    common = dict(style=raw["fp_style"], type_map=type_map, magnetic=param.spin.magnetic,
                  spin_init=raw["fp_spin_init"], ldau=MappingProxyType(ldau), moment_levels=levels,
                  moment_tolerance=float(raw["fp_moment_tolerance"]), ratio_failed=float(raw["ratio_failed"]),
                  task_max=raw["fp_task_max"], task_min=raw["fp_task_min"])
    if raw["fp_style"] == "vasp":
        return LabelSettings(**common, vasp=_vasp_settings(raw, path, type_map))
    return LabelSettings(**common, gpaw=_gpaw_settings(raw, path))


def _kmesh(value: Any, key: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if len(value) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value):
        raise InputError(f"{key}: expected three integers >= 1, got {thaw(value)}")
    return tuple(value)


def _vasp_settings(raw: Mapping[str, Any], path: Path, type_map: tuple[str, ...]) -> VaspSettings:
    base = path.parent
    files = raw["fp_pp_files"]
    if isinstance(files, Mapping):
        unknown = sorted(set(files) - set(type_map))
        if unknown:
            raise InputError(f"{path}: key 'fp_pp_files': elements {unknown} are not in type_map {list(type_map)}")
        missing = [e for e in type_map if e not in files]
        if missing:
            raise InputError(f"{path}: key 'fp_pp_files': no POTCAR for {missing}")
        by_element = {e: files[e] for e in type_map}
    else:
        if len(files) != len(type_map):
            raise InputError(f"{path}: key 'fp_pp_files': expected {len(type_map)} POTCARs (one per type_map "
                             f"entry {list(type_map)}), got {len(files)}")
        by_element = dict(zip(type_map, files))
    pp = {}
    for element, name in by_element.items():
        pp[element] = (base / raw["fp_pp_path"] / name).resolve()
        if not pp[element].is_file():
            raise InputError(f"{path}: key 'fp_pp_files/{element}': POTCAR '{name}' not found in "
                             f"'{base / raw['fp_pp_path']}'")
    incar_path = (base / raw["fp_incar"]).resolve()
    if not incar_path.is_file():
        raise InputError(f"{path}: key 'fp_incar': file '{raw['fp_incar']}' not found")
    kspacing = raw.get("fp_kspacing")
    kpoints = _kmesh(raw.get("fp_kpoints"), f"{path}: key 'fp_kpoints'")
    if kspacing is not None and kspacing <= 0:
        raise InputError(f"{path}: key 'fp_kspacing': expected a positive spacing (1/A), got {kspacing}")
    if kspacing is not None and kpoints is not None:
        raise InputError(f"{path}: keys 'fp_kspacing' and 'fp_kpoints': give one of them, not both")
    return VaspSettings(MappingProxyType(pp), incar_path.read_text(), incar_path,
                        None if kspacing is None else float(kspacing), kpoints)


def _gpaw_settings(raw: Mapping[str, Any], path: Path) -> GpawSettings:
    gpaw_arg = _fp_variant().choice_dict["gpaw"].sub_fields["fp_gpaw"]
    g = gpaw_arg.normalize_value(thaw(raw["fp_gpaw"]), trim_pattern="_*")  # fills defaults of an absent fp_gpaw
    key = f"{path}: key 'fp_gpaw"
    for name in ("ecut", "kspacing", "width", "random_moment", "h"):
        if g[name] is not None and g[name] <= 0:
            raise InputError(f"{key}/{name}': expected a positive number, got {g[name]}")
    if g["maxiter"] < 1:
        raise InputError(f"{key}/maxiter': expected at least 1 SCF iteration, got {g['maxiter']}")
    if g["retry_maxiter"] is not None and g["retry_maxiter"] <= g["maxiter"]:
        raise InputError(f"{key}/retry_maxiter': expected more SCF iterations than maxiter ({g['maxiter']}), "
                         f"got {g['retry_maxiter']}")
    if not _gpaw_knows_xc(g["xc"]):
        close = [name for name in GPAW_XC if name.lower() == g["xc"].lower()]
        raise InputError(f"{key}/xc': '{g['xc']}' is no exchange-correlation functional GPAW knows"
                         + (f"; did you mean {close[0]}?" if close else
                            f" (one of {', '.join(GPAW_XC[:15])}, ..., or libxc names such as GGA_X_PBE+GGA_C_PBE)"))
    return GpawSettings(float(g["ecut"]), _kmesh(g["kpts"], f"{key}/kpts'"), float(g["kspacing"]),
                        None if g["h"] is None else float(g["h"]), float(g["width"]), int(g["maxiter"]), g["xc"],
                        _freeze(g["convergence"]), bool(g["stress"]), float(g["random_moment"]),
                        None if g["retry_maxiter"] is None else int(g["retry_maxiter"]))


def _gpaw_knows_xc(xc: str) -> bool:
    """Whether gpaw.xc.XC takes this name (its own names, their variants, libxc names; options after ':')."""
    name = xc.split(":")[0]
    return (name in GPAW_XC or name.startswith(("GLLB", "LCY-", "CAMY-", "old", "py")) or name.endswith("PZ-SIC")
            or name[:1].isdigit() or (bool(name) and all(LIBXC_NAME.fullmatch(part) for part in name.split("+"))))
