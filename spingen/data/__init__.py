"""spingen's data: deepmd/npy systems with raw DFT moments, and VASP import.

Stored data keep the raw per-atom moments S (uB) as spins (0, 0, S); the spin encoding's offset
is applied only where deepmd-kit sees spins (spingen.spin.encoding).
"""

from spingen.data.npy import (
    AppendResult,
    append_frames,
    build_system,
    ensure_spin_dtype,
    frame_hashes,
    get_moments,
    load_system,
    set_moments,
    write_system_atomic,
)
from spingen.data.vasp import (
    ImportReport,
    VaspFrame,
    VaspImportError,
    composition_name,
    import_vasp,
    read_vasp_frames,
    scan_outcar,
)

__all__ = [
    "AppendResult",
    "ImportReport",
    "VaspFrame",
    "VaspImportError",
    "append_frames",
    "build_system",
    "composition_name",
    "ensure_spin_dtype",
    "frame_hashes",
    "get_moments",
    "import_vasp",
    "load_system",
    "read_vasp_frames",
    "scan_outcar",
    "set_moments",
    "write_system_atomic",
]
