#!/usr/bin/env bash
# Install GPAW (the embedded DFT+U labeler, fp_style "gpaw") into a virtual environment.
#
# Idempotent: the Debian build libraries are installed only if missing (dpkg -s), GPAW is built
# only if the venv cannot import the pinned version. PyPI's gpaw is source-only; it builds in
# about a minute against Debian's libxc/FFTW/OpenBLAS with a serial (mpi = False) siteconfig.
# pip caches the built wheel, so a second venv installs in seconds.
#
# Usage: scripts/install_gpaw.sh [VENV]     (default: $VENV or .venv)
set -euo pipefail

GPAW_VERSION=26.7.0       # pinned: which metastable spin state an SCF reaches depends on the version
GPAW_DATA_VERSION=1.2.1   # PAW setups as a wheel (found by gpaw automatically)
DEBIAN_PACKAGES=(libxc-dev libfftw3-dev libopenblas-dev)

VENV=${1:-${VENV:-.venv}}
PY="$VENV/bin/python"
die() { echo "install_gpaw: error: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no Python at $PY: create the venv first (make install)"

if "$PY" - "$GPAW_VERSION" <<'PYEOF' 2>/dev/null
import sys
import gpaw
sys.exit(0 if gpaw.__version__.split("+")[0] == sys.argv[1] else 1)
PYEOF
then
    echo "install_gpaw: gpaw $GPAW_VERSION already in $VENV"
    exit 0
fi

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install_gpaw: installing Debian packages ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${missing[*]}"
        SUDO=sudo
    fi
    $SUDO apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
fi

# Serial build: without mpi = False the build fails where mpic++ exists but libopenmpi-dev does not.
SITECONFIG="$VENV/gpaw-siteconfig.py"
cat > "$SITECONFIG" <<'PYEOF'
# written by scripts/install_gpaw.sh
mpi = False
compiler = 'g++'
fftw = True
libraries += ['fftw3', 'blas']
PYEOF

echo "install_gpaw: building gpaw $GPAW_VERSION (about a minute; pip caches the wheel)"
GPAW_CONFIG="$(cd "$(dirname "$SITECONFIG")" && pwd)/$(basename "$SITECONFIG")" \
    "$PY" -m pip install -q "gpaw==$GPAW_VERSION" "gpaw-data==$GPAW_DATA_VERSION" \
    || die "pip install gpaw==$GPAW_VERSION failed (see the compiler output above; siteconfig $SITECONFIG)"

OMP_NUM_THREADS=1 "$PY" -c "import gpaw; print('install_gpaw: gpaw', gpaw.__version__, 'ready')" \
    || die "gpaw $GPAW_VERSION was installed but does not import"
