"""Labelers: the DFT codes that label candidates, one file each, registered by their fp_style.

The label stage (spingen.stages.label) knows a code only through the interface of
spingen.labelers.base. This package imports every labeler file, so a new file (a Labeler
subclass with its `style`) and its line below are all a new code needs.
"""

from spingen.labelers import gpaw, vasp  # noqa: F401 (registers the labelers)
from spingen.labelers.base import LABELERS, Labeler, LabelResult, create_labeler

__all__ = ["LABELERS", "LabelResult", "Labeler", "create_labeler"]
