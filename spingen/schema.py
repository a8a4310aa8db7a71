"""Every key of param.json and machine.json: dargs schemas, strict checks, typed settings.

Key names follow DP-GEN where the meaning is the same. machine.json is DP-GEN's format and its
sections are checked with DP-GEN's own schema (``dpgen.dispatcher.Dispatcher.mdata_arginfo``,
built on dpdispatcher's ``Machine.arginfo``/``Resources.arginfo``).
Stages never read raw dicts: they get the frozen dataclasses built here.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from dargs import Argument, Variant
from dargs.dargs import ArgumentError

from spingen.spin.encoding import SpinEncoding

MACHINE_SECTIONS = ("train", "model_devi", "fp")
FP_STYLES = ("gpaw", "vasp")
SPIN_INIT_STRATEGIES = ("predicted", "random", "states")
MD_ENSEMBLES = ("nvt", "nvt-langevin", "nvt-berendsen", "nvt-nose-hoover", "npt", "npt-berendsen")


class InputError(ValueError):
    """Bad user input: one message naming the file, the key and what was expected."""


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
            Argument("min_virtual_distance", float, optional=True, default=0.05,
                     doc="Smallest allowed |eta*S + d| (A) for any moment in the data or the levels; "
                         "below it the virtual atom sits on its real atom."),
            Argument("flip_augmentation", bool, optional=True, default=True,
                     doc="Add the globally reversed twin (all moments negated, same energy and forces) of "
                         "every frame to the training inputs: collinear DFT+U energies are invariant "
                         "under reversing all moments. Stored data is not rewritten."),
        ],
    )


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
                     doc="Re-optimize the moments every spin_opt_freq MD steps."),
        ],
        repeat=True,
    )


def _fp_variant() -> Variant:
    ldau = Argument("fp_ldau", dict, optional=True, default={},
                    doc="DFT+U per element: {\"Ni\": {\"L\": 2, \"U\": 6.3, \"J\": 0}}.")
    spin_init = Argument("fp_spin_init", str, optional=True, default="predicted",
                         doc=f"Initial moments of each label: one of {', '.join(SPIN_INIT_STRATEGIES)}.")
    vasp = [
        Argument("fp_pp_path", str, optional=False, doc="Folder of the POTCAR files."),
        Argument("fp_pp_files", [list, dict], optional=False,
                 doc="POTCAR files in type_map order, or a mapping element -> file."),
        Argument("fp_incar", str, optional=False, doc="INCAR template file."),
        ldau, spin_init,
    ]
    gpaw = [
        Argument("fp_gpaw", dict, optional=True, default={},
                 doc="GPAW settings: mode/cutoff, kpts or kspacing, smearing, maxiter."),
        ldau, spin_init,
    ]
    return Variant("fp_style", [
        Argument("vasp", dict, vasp, doc="VASP on HPC (POSCAR/INCAR/KPOINTS/POTCAR per task)."),
        Argument("gpaw", dict, gpaw, doc="GPAW PW-mode DFT+U, runs on one machine."),
    ], optional=False, doc="The DFT+U code that labels candidates.")


def param_arginfo() -> Argument:
    """The schema of param.json."""
    fields = [
        Argument("type_map", list, optional=False, doc="Element symbols, in the order of the model's types."),
        Argument("mass_map", [list, str], optional=True, default="auto",
                 doc="Atomic masses in type_map order, or \"auto\" (ASE's standard masses)."),
        Argument("init_data_prefix", str, optional=True, default="", doc="Prefix of init_data_sys paths."),
        Argument("init_data_sys", list, optional=False,
                 doc="deepmd/npy systems (or folders holding them) of the initial data, with spin.npy."),
        Argument("sys_configs_prefix", str, optional=True, default="", doc="Prefix of sys_configs globs."),
        Argument("sys_configs", list, optional=False,
                 doc="Start structures of exploration: a list of lists of globs (POSCAR/extxyz...)."),
        Argument("sys_format", str, optional=True, default="vasp",
                 doc="ASE format name of the sys_configs files."),
        Argument("numb_models", int, optional=True, default=4, doc="Models in the ensemble."),
        Argument("default_training_param", dict, optional=False,
                 doc="deepmd-kit input.json (PyTorch backend); spingen fills type_map, spin, loss type, "
                     "data systems and seeds."),
        _spin_arginfo(),
        _model_devi_job_arginfo(),
        Argument("model_devi_dt", float, optional=True, default=0.002, doc="MD time step (ps), as in DP-GEN."),
        Argument("model_devi_skip", int, optional=True, default=0, doc="Frames skipped at the start of each trajectory."),
        Argument("model_devi_f_trust_lo", float, optional=False, doc="Force deviation (eV/A) below which a frame is accurate."),
        Argument("model_devi_f_trust_hi", float, optional=False, doc="Force deviation (eV/A) at and above which a frame failed."),
        Argument("model_devi_spin_trust", float, optional=True, default=0.2,
                 doc="Fraction of magnetic ions whose ground-state moment the ensemble disagrees on, "
                     "above which a frame is a candidate."),
        Argument("fp_task_max", int, optional=False, doc="At most this many labels per system and iteration."),
        Argument("fp_task_min", int, optional=True, default=1, doc="Fewer candidates than this: label none."),
        Argument("ratio_failed", float, optional=True, default=0.05,
                 doc="Largest fraction of failed label tasks before the run stops."),
    ]
    return Argument("param", dict, fields, [_fp_variant()], doc="param.json: what to learn and how.")


# ---------------------------------------------------------------- machine.json schema
def machine_arginfo() -> Argument:
    """The schema of machine.json: DP-GEN's, plus spingen's optional `check_interval`."""
    from dpgen.dispatcher.Dispatcher import mdata_arginfo

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
    flip_augmentation: bool

    @property
    def encoding(self) -> SpinEncoding:
        return SpinEncoding(self.magnetic, self.virtual_scale, self.offset)


@dataclass(frozen=True)
class TrainSettings:
    numb_models: int
    training_param: Mapping[str, Any]


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
    for name in MACHINE_SECTIONS:
        section = data.get(name)
        if isinstance(section, list):
            if len(section) != 1:
                raise InputError(f"{path}: key '{name}': expected a dict or a list of one dict, "
                                 f"got a list of {len(section)}")
            data[name] = section = section[0]
        if isinstance(section, dict) and isinstance(section.get("machine"), dict) \
                and isinstance(section.get("resources"), dict):
            section["resources"].setdefault("batch_type", section["machine"].get("batch_type"))
    data = _normalize(machine_arginfo(), data, path)

    def build(name: str) -> MachineSection:
        s = data[name]
        return MachineSection(s["command"], _freeze(s["machine"]), _freeze(s["resources"]),
                              s["check_interval"], tuple(s.get("user_forward_files", ())),
                              tuple(s.get("user_backward_files", ())))

    return Machines(*(build(name) for name in MACHINE_SECTIONS))


def load_param(path: str | Path) -> Param:
    """Read param.json, check every key and the data it points to, return typed settings."""
    from spingen.checks import check_param_data

    path = Path(path).resolve()
    raw = _normalize(param_arginfo(), _read_json(path, "param"), path)
    base = path.parent
    type_map = tuple(raw["type_map"])
    if len(set(type_map)) != len(type_map) or not type_map:
        raise InputError(f"{path}: key 'type_map': expected distinct element symbols, got {list(type_map)}")
    spin = _spin_settings(raw["spin"], type_map, path)
    param = Param(
        path=path,
        type_map=type_map,
        mass_map=_mass_map(raw["mass_map"], type_map, path),
        init_data_sys=_data_paths(raw, base, path),
        sys_configs=_sys_configs(raw, base, path),
        spin=spin,
        train=TrainSettings(raw["numb_models"], _freeze(raw["default_training_param"])),
        model_devi_jobs=_freeze(raw["model_devi_jobs"]),
        raw=_freeze(raw),
    )
    _check_explore_keys(param, path)
    check_param_data(param)
    return param


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
    return SpinSettings(spin["enabled"], magnetic, float(spin["virtual_scale"]), float(spin["offset"]),
                        moments, float(spin["min_virtual_distance"]), spin["flip_augmentation"])


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


def _data_paths(raw: dict, base: Path, path: Path) -> tuple[Path, ...]:
    from dpgen.util import expand_sys_str

    prefix = base / raw["init_data_prefix"]
    if not raw["init_data_sys"]:
        raise InputError(f"{path}: key 'init_data_sys': expected at least one deepmd/npy system")
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


def _sys_configs(raw: dict, base: Path, path: Path) -> tuple[tuple[Path, ...], ...]:
    prefix = base / raw["sys_configs_prefix"]
    groups = []
    for index, patterns in enumerate(raw["sys_configs"]):
        patterns = [patterns] if isinstance(patterns, str) else patterns
        files = sorted({Path(f) for p in patterns for f in glob.glob(str(prefix / p))})
        if not files:
            raise InputError(f"{path}: key 'sys_configs[{index}]': the globs {patterns} match no file "
                             f"under '{prefix}'")
        groups.append(tuple(files))
    return tuple(groups)


def _check_explore_keys(param: Param, path: Path) -> None:
    raw = param.raw
    if raw["model_devi_f_trust_lo"] > raw["model_devi_f_trust_hi"]:
        raise InputError(f"{path}: keys 'model_devi_f_trust_lo' ({raw['model_devi_f_trust_lo']}) > "
                         f"'model_devi_f_trust_hi' ({raw['model_devi_f_trust_hi']}): expected lo <= hi")
    if not param.model_devi_jobs:
        raise InputError(f"{path}: key 'model_devi_jobs': expected at least one job (iteration 0)")
    for it, job in enumerate(param.model_devi_jobs):
        for idx in job["sys_idx"]:
            if not isinstance(idx, int) or not 0 <= idx < len(param.sys_configs):
                raise InputError(f"{path}: key 'model_devi_jobs[{it}]/sys_idx': index {idx} is not in "
                                 f"0..{len(param.sys_configs) - 1} (sys_configs)")
        if job["ensemble"] not in MD_ENSEMBLES:
            raise InputError(f"{path}: key 'model_devi_jobs[{it}]/ensemble': expected one of "
                             f"{list(MD_ENSEMBLES)}, got '{job['ensemble']}'")
    if raw["fp_spin_init"] not in SPIN_INIT_STRATEGIES:
        raise InputError(f"{path}: key 'fp_spin_init': expected one of {list(SPIN_INIT_STRATEGIES)}, "
                         f"got '{raw['fp_spin_init']}'")
    for element in raw["fp_ldau"]:
        if element not in param.type_map:
            raise InputError(f"{path}: key 'fp_ldau/{element}': '{element}' is not in type_map")
    if raw["fp_style"] == "vasp":
        pp_files = raw["fp_pp_files"]
        if not isinstance(pp_files, Mapping) and len(pp_files) != len(param.type_map):
            raise InputError(f"{path}: key 'fp_pp_files': expected {len(param.type_map)} POTCARs (one per "
                             f"type_map entry {list(param.type_map)}), got {len(pp_files)}")
        names = pp_files.values() if isinstance(pp_files, Mapping) else pp_files
        for name in names:
            if not (path.parent / raw["fp_pp_path"] / name).is_file():
                raise InputError(f"{path}: key 'fp_pp_files': POTCAR '{name}' not found in "
                                 f"'{path.parent / raw['fp_pp_path']}'")
        if not (path.parent / raw["fp_incar"]).is_file():
            raise InputError(f"{path}: key 'fp_incar': file '{raw['fp_incar']}' not found")
