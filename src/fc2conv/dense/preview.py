"""A PNG preview of a dense map: one class's scores (or the argmax) over a thumbnail of the
image, with a colour bar. Cell ``i`` covers the input window starting at
``offset + i * stride``, so the map is drawn at ``extent`` = its windows' centres in pixels."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fc2conv.errors import Fc2ConvError
from fc2conv.files import atomic_output


def save_preview(scores: Any, image: Any, path: str | os.PathLike[str], *,
                 stride: tuple[int, ...], offset: tuple[int, ...], window: tuple[int, ...],
                 cls: int | None = None, max_side: int = 512) -> None:
    """Write ``path`` (PNG): ``scores[cls]`` (``None``: the argmax) over ``image``'s thumbnail.

    ``scores``: ``(K, H', W')`` array-like (dask or zarr: subsampled before reading);
    ``image``: a reader (:mod:`fc2conv.dense.readers`) of the ``(C, H, W)`` image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(scores.shape) != 3:
        raise Fc2ConvError("previews are drawn for 2-D maps only")
    k, h, w = scores.shape
    step = max(1, -(-max(h, w) // max_side))
    if cls is not None and not 0 <= cls < k:
        raise Fc2ConvError(f"class {cls} does not exist; the map has {k} classes")
    sub = np.asarray(scores[:, ::step, ::step]) if cls is None else np.asarray(
        scores[cls, ::step, ::step])
    data = sub.argmax(axis=0) if cls is None else sub
    thumb = image.thumbnail(max_side)
    thumb = np.moveaxis(thumb, 0, -1).astype(np.float32)
    lo, hi = float(thumb.min()), float(thumb.max())
    thumb = (thumb - lo) / (hi - lo) if hi > lo else thumb * 0
    if thumb.shape[-1] == 1:
        thumb = thumb[..., 0]
    elif thumb.shape[-1] > 3:
        thumb = thumb[..., :3]
    _, H, W = image.shape
    top = offset[0] + window[0] / 2 - stride[0] / 2
    left = offset[1] + window[1] / 2 - stride[1] / 2
    extent = (left, left + w * stride[1], top + h * stride[0], top)
    fig, ax = plt.subplots(figsize=(6, 6 * H / max(W, 1) + 0.5), dpi=100)
    ax.imshow(thumb, extent=(0, W, H, 0), cmap="gray")
    shown = ax.imshow(data, extent=extent, alpha=0.55,
                      cmap="tab10" if cls is None else "viridis", interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title("argmax class" if cls is None else f"score of class {cls}")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
