"""spingen: concurrent learning of spin-aware Deep Potentials for DFT+U cathodes."""

__version__ = "0.1.0"
