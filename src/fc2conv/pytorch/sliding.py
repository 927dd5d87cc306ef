"""The naive reference for dense maps: classify every window of an image crop by crop."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch.ops import main_output


@torch.no_grad()
def sliding_window(model: nn.Module, image: torch.Tensor, window: int | Sequence[int],
                   stride: int | Sequence[int], batch_size: int = 64,
                   progress: bool | None = None) -> torch.Tensor:
    """Run ``model`` on every ``window``-sized crop of ``image`` (``(C, H, W)`` or
    ``(N, C, H, W)``) taken every ``stride`` pixels, ``batch_size`` crops at a time.

    Returns ``(N, K, rows, cols)`` with ``rows = (H - window_h) // stride_h + 1``, where
    ``K`` is the number of values the model returns per crop (its main output: a
    ``ModelOutput``'s logits). ``progress``: a rich progress bar
    (default: on when stderr is a terminal and there are more than 20 batches).
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise Fc2ConvError(
            f"image must be (C, H, W) or (N, C, H, W), got shape {tuple(image.shape)}"
        )
    wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    n, _, h, w = image.shape
    if wh > h or ww > w or min(wh, ww, sh, sw) < 1:
        raise Fc2ConvError(
            f"window {wh}x{ww} with stride {sh}x{sw} does not fit an image of {h}x{w}"
        )
    rows, cols = (h - wh) // sh + 1, (w - ww) // sw + 1
    # (N, C, rows, cols, wh, ww) view of all crops, without copying.
    crops = image.unfold(2, wh, sh).unfold(3, ww, sw).permute(0, 2, 3, 1, 4, 5)
    crops = crops.reshape(n * rows * cols, image.shape[1], wh, ww)
    total = crops.shape[0]
    batches = math.ceil(total / batch_size)
    show = progress if progress is not None else (batches > 20 and sys.stderr.isatty())
    outputs = []
    if show:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"sliding {wh}x{ww} window", total=total)
            for start in range(0, total, batch_size):
                outputs.append(main_output(model(crops[start:start + batch_size])).reshape(
                    min(batch_size, total - start), -1))
                bar.advance(task, outputs[-1].shape[0])
    else:
        for start in range(0, total, batch_size):
            outputs.append(main_output(model(crops[start:start + batch_size])).reshape(
                min(batch_size, total - start), -1))
    scores = torch.cat(outputs)
    return scores.reshape(n, rows, cols, -1).permute(0, 3, 1, 2).contiguous()
