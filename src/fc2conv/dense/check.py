"""Whether a stitched (tiled) map equals the untiled one, by ``compare``'s rule.

Tiling is exact in real arithmetic, but floats round: a tile's convolutions may pick another
algorithm (and on CUDA run in TF32) than the whole-image call. So "equal" is judged the way
:func:`fc2conv.compare` judges two models computing in the same precision
(:func:`fc2conv.verify.judge.judge_relative`): with ``r`` the float64 run of the net, ``A`` the
untiled map and ``B`` the stitched one, a cell fails when

    |B - r| > 10 * max(max |A - r|, u * max |r|)

(``u`` the unit roundoff of the dtype the device computes in: TF32's ``2^-11`` for float32
convolutions on CUDA when cuDNN allows it). A cell computed from the wrong window, or touched
by a tile's own border padding, is off by the scale of the map and fails; rounding does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fc2conv.verify.bound import current_tf32_flags, rounding_for, tf32_in_play
from fc2conv.verify.judge import judge_relative


@dataclass(frozen=True)
class StitchCheck:
    """The verdict: ``equal`` (no cell fails), the cells that fail, the largest
    ``|stitched - untiled|`` and the largest error ratio ``|B - r| / floor``."""

    equal: bool
    failing: int
    max_abs_diff: float
    worst_ratio: float

    def __str__(self) -> str:
        verdict = "equal" if self.equal else f"DIFFERENT ({self.failing} cells)"
        return (f"{verdict} (max |tiled - untiled| {self.max_abs_diff:.2e}, worst error "
                f"{self.worst_ratio:.2g}x the untiled run's)")


def unit_roundoff(device: str, dtype: torch.dtype = torch.float32) -> float:
    """The unit roundoff the dense net's convolutions compute with on ``device``."""
    tf32 = tf32_in_play(torch.device(device).type, dtype, has_conv=True, has_matmul=True,
                        **current_tf32_flags())
    r = rounding_for(dtype, tf32=tf32)
    return max(r.u_op, r.u_out)


def check_stitched(stitched: np.ndarray, untiled: np.ndarray, reference: np.ndarray,
                   device: str = "cpu") -> StitchCheck:
    """Judge ``stitched`` against ``untiled`` with the float64 ``reference`` (see module)."""
    b = torch.as_tensor(np.asarray(stitched, dtype=np.float32))
    a = torch.as_tensor(np.asarray(untiled, dtype=np.float32))
    r = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    if a.shape != b.shape or a.shape != r.shape:
        return StitchCheck(False, int(b.numel()), float("inf"), float("inf"))
    c = judge_relative(a, b, r, unit_roundoff(device))
    diff = (a.double() - b.double()).abs()
    return StitchCheck(equal=not bool(c["fail"].any()), failing=int(c["fail"].sum()),
                       max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
                       worst_ratio=float(c["ratio"].max()) if "ratio" in c else 0.0)
