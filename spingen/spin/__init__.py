"""Pure-numpy spin core: encoding of moments for deepmd-kit, discrete moment levels, and the
ground-state search over a calculator-style energy model. Imports nothing of deepmd-kit."""

from spingen.spin.encoding import SpinEncoding
from spingen.spin.levels import MomentLevels, infer_magnitudes
from spingen.spin.model import (
                                AnalyticSpinModel,
                                EnergyModel,
                                Exchange,
                                SymmetrizedModel,
                                minimum_image_distances,
                                triangular_layers,
)
from spingen.spin.search import SearchResult, SearchSettings, search_ground_state
from spingen.spin.surrogate import PairSurrogate

__all__ = [
    "AnalyticSpinModel", "EnergyModel", "Exchange", "MomentLevels", "PairSurrogate", "SearchResult",
    "SearchSettings", "SpinEncoding", "SymmetrizedModel", "infer_magnitudes",
    "minimum_image_distances", "search_ground_state", "triangular_layers",
]
