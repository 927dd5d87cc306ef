"""Dense score maps of images of any size: exact tiling on Dask (``fc2conv[dense]``).

Modules, one job each: :mod:`~fc2conv.dense.plan` (tiling arithmetic, no torch),
:mod:`~fc2conv.dense.readers` (arrays, zarr, TIFF, PNG/JPEG, OpenSlide),
:mod:`~fc2conv.dense.model` (geometry, ``.pt2`` transport), :mod:`~fc2conv.dense.writer`
(the zarr output, chunk commits), :mod:`~fc2conv.dense.preview` (PNG preview) and
:mod:`~fc2conv.dense.api` (:func:`dense_map`); staged tiling: :mod:`~fc2conv.dense.stages`
(the planner, no torch), :mod:`~fc2conv.dense.split` (cutting the net, its profile) and
:mod:`~fc2conv.dense.staged` (the stages of one map).
"""

from __future__ import annotations

from typing import Any

__all__ = ["dense_map"]


def __getattr__(name: str) -> Any:
    if name == "dense_map":  # torch, dask and zarr load on first use, not on import
        from fc2conv.dense.api import dense_map

        return dense_map
    raise AttributeError(f"module 'fc2conv.dense' has no attribute {name!r}")
