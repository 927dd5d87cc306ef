"""The PyTorch front end: whole-model conversions as torch.fx graph passes.

* :func:`to_conv` / :func:`to_linear` — every Linear <-> per-position conv, same contract;
* :func:`convolutionalize` — a classifier becomes fully convolutional (dense score maps);
* :func:`receptive_field`, :func:`is_window_exact` — which input window each cell sees;
* :func:`sliding_window` — the naive crop-by-crop reference;
* :mod:`fc2conv.pytorch.export_io` — ``torch.export`` programs (``.pt2``), never pickles.

Every weight transformation is a call into :mod:`fc2conv.core`.
"""

from fc2conv.core.receptive import ReceptiveField
from fc2conv.pytorch.convolutionalize import convolutionalize
from fc2conv.pytorch.layout import ChannelLayerNorm, inverse_move_pairs
from fc2conv.pytorch.receptive_field import WindowCheck, is_window_exact, receptive_field
from fc2conv.pytorch.sliding import sliding_window
from fc2conv.pytorch.to_conv import to_conv
from fc2conv.pytorch.to_linear import to_linear

__all__ = [
    "ChannelLayerNorm",
    "ReceptiveField",
    "WindowCheck",
    "convolutionalize",
    "inverse_move_pairs",
    "is_window_exact",
    "receptive_field",
    "sliding_window",
    "to_conv",
    "to_linear",
]
