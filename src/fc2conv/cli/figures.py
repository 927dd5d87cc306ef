"""Figures of ``fc2conv demo`` and ``fc2conv explain`` (matplotlib, Agg, imported on use).

Colour code shared by every figure: one colour per output *position*. A cell of a matrix
``M`` (rows: outputs, columns: inputs) is painted in its row's position colour when the layer
can make it non-zero, light grey when it is a structural zero. PNGs are written atomically
(:func:`fc2conv.files.atomic_output`).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, cast

import torch

from fc2conv.files import atomic_output

if TYPE_CHECKING:
    from fc2conv.cli.experiments import SeedExample

POSITION_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
ZERO_COLOUR = "#f2f2f2"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    plt = _pyplot()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)


def _colour(group: int) -> str:
    return POSITION_COLOURS[group % len(POSITION_COLOURS)]


def _cell_colours(matrix: torch.Tensor, row_group: list[int]) -> Any:
    """RGBA image: non-zero cells in their row's colour, shaded by |value|; zeros light grey."""
    import numpy as np
    from matplotlib.colors import to_rgba

    m = matrix.detach().double().abs().numpy()
    scale = m.max() if m.max() > 0 else 1.0
    img = np.empty((*m.shape, 4))
    img[:] = to_rgba(ZERO_COLOUR)
    for r in range(m.shape[0]):
        base = np.array(to_rgba(_colour(row_group[r])))
        nz = m[r] > 0
        shade = 0.45 + 0.55 * (m[r, nz] / scale)  # mix with white: faint for small |w|
        img[r, nz] = (1 - shade[:, None]) * np.ones(4) + shade[:, None] * base
        img[r, nz, 3] = 1.0
    return img


def matrix_panel(ax: Any, matrix: torch.Tensor, row_group: list[int], *, title: str,
                 row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                 col_group: list[int] | None = None, annotate: bool | None = None) -> None:
    """Draw ``matrix`` on ``ax`` in the position colour code, values written when small."""
    rows, cols = matrix.shape
    ax.imshow(_cell_colours(matrix, row_group), interpolation="nearest", aspect="equal")
    if annotate is None:
        annotate = rows * cols <= 24 * 48
    if annotate:
        scale = float(matrix.abs().max()) or 1.0
        for r in range(rows):
            for c in range(cols):
                v = float(matrix[r, c])
                ax.text(c, r, "0" if v == 0 else f"{v:+.2f}", ha="center", va="center",
                        fontsize=7 if v else 6.5,
                        color="#b0b0b0" if not v else "white" if abs(v) > 0.7 * scale
                        else "#1a1a1a")
        ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(rows + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if row_labels is not None:
        ax.set_yticks(range(rows), row_labels, fontsize=8)
        for tick, g in zip(ax.get_yticklabels(), row_group, strict=True):
            tick.set_color(_colour(g))
    else:
        ax.set_yticks([])
    if col_labels is not None:
        ax.set_xticks(range(cols), col_labels, fontsize=7, rotation=90)
        if col_group is not None:
            for tick, g in zip(ax.get_xticklabels(), col_group, strict=True):
                tick.set_color(_colour(g))
    else:
        ax.set_xticks([])
    ax.set_title(title, fontsize=10, loc="left")


def _position_names(spatial: tuple[int, ...]) -> list[str]:
    """``(2, 2)`` -> ``["(0,0)", "(0,1)", "(1,0)", "(1,1)"]`` (row-major)."""
    import itertools

    return ["(" + ",".join(map(str, idx)) + ")"
            for idx in itertools.product(*(range(s) for s in spatial))]


def _network_panel(ax: Any, ex: SeedExample) -> None:
    """Inputs (grouped by position, channels-last) -> outputs: four dense 2->1 layers."""
    c, h, w = ex.x.shape
    positions = h * w
    weight = ex.weight[0]
    n_in = c * positions
    gap, step = 0.7, 1.15  # vertical space between position groups / between inputs
    in_y = {}
    for p in range(positions):
        for k in range(c):
            in_y[(p, k)] = -step * (p * c + k) - p * gap
    out_y = {p: sum(in_y[(p, k)] for k in range(c)) / c for p in range(positions)}
    x_in, x_out = 0.0, 3.0
    for p in range(positions):
        colour = _colour(p)
        for k in range(c):
            y0, y1 = in_y[(p, k)], out_y[p]
            ax.plot([x_in + 0.25, x_out - 0.25], [y0, y1], color=colour, lw=2.2, zorder=1)
            tx, ty = x_in + 0.42 * (x_out - x_in), y0 + 0.42 * (y1 - y0)
            ax.text(tx, ty, f"w{k}={float(weight[k]):+.2f}", fontsize=7.5, ha="center",
                    va="center", color=colour,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"}, zorder=3)
        i, j = divmod(p, w)
        for k in range(c):
            y = in_y[(p, k)]
            ax.scatter([x_in], [y], s=420, color="white", edgecolor=colour, lw=2, zorder=2)
            ax.text(x_in - 0.32, y, f"x[{k},{i},{j}] = {float(ex.x[k, i, j]):+.2f}", ha="right",
                    va="center", fontsize=8)
        ax.scatter([x_out], [out_y[p]], s=520, color=colour, zorder=2)
        ax.text(x_out + 0.4, out_y[p], f"y[{i},{j}] = {float(ex.y_conv[p]):+.3f}", ha="left",
                va="center", fontsize=8.5, color=colour, fontweight="bold")
    bottom = min(in_y.values())
    ax.text((x_in + x_out) / 2, bottom - 1.2,
            f"every output also adds the same bias b = {float(ex.bias[0]):+.2f}",
            ha="center", fontsize=8, color="#555555")
    ax.set_xlim(-2.4, 5.2)
    ax.set_ylim(bottom - 1.6, 0.8)
    ax.axis("off")
    ax.set_title(f"(a) the 1x1 conv as {positions} dense layers {c}->1, one per position,\n"
                 f"all sharing one weight vector w ({n_in} inputs, {positions} outputs)",
                 fontsize=10, loc="left")


def draw_seed_example(ex: SeedExample, path: str | os.PathLike[str]) -> None:
    """Figure of demo part 1: the per-position dense layers and the 4x8 matrix, chw and hwc."""
    plt = _pyplot()
    c, h, w = ex.x.shape
    names = [f"({i},{j})" for i in range(h) for j in range(w)]
    rows = list(range(h * w))
    fig = plt.figure(figsize=(15, 5.2))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.25, 1, 1], wspace=0.28)
    _network_panel(fig.add_subplot(grid[0]), ex)
    out_labels = [f"y{n}" for n in names]
    chw_cols = [f"x[{k}]{names[p]}" for k in range(c) for p in rows]
    hwc_cols = [f"x[{k}]{names[p]}" for p in rows for k in range(c)]
    matrix_panel(fig.add_subplot(grid[1]), ex.matrix_chw, rows,
                 title="(b) one FC 8->4, inputs flattened chw (PyTorch)\n"
                       "M = as_matrix(conv, (2, 2, 2))  =  w ⊗ I4",
                 row_labels=out_labels, col_labels=chw_cols,
                 col_group=[p for _ in range(c) for p in rows])
    matrix_panel(fig.add_subplot(grid[2]), ex.matrix_hwc, rows,
                 title="(c) the same FC, inputs flattened hwc (channels-last)\n"
                       "block diagonal I4 ⊗ w: one copy of w per position",
                 row_labels=out_labels, col_labels=hwc_cols,
                 col_group=[p for p in rows for _ in range(c)])
    fig.suptitle(f"A 1x1 conv (2 channels of 2x2 -> 1 channel) is a fully connected layer: "
                 f"the three computations agree to {ex.max_difference:.1e}",
                 fontsize=12, fontweight="bold", x=0.5, y=1.04)
    fig.text(0.66, 0.08, "colour = output position; grey 0 = structural zero (a position never "
             "reads another position's inputs)", ha="center", fontsize=9, color="#555555")
    _save(fig, path)


def draw_conv_matrix(conv: torch.nn.Module, in_shape: tuple[int, ...],
                     path: str | os.PathLike[str], title: str) -> None:
    """Small specs: the exact matrix of ``conv`` on ``in_shape`` in chw and hwc order, each
    row in its output position's colour (weights: whatever ``conv`` holds)."""
    from fc2conv.core import as_matrix
    from fc2conv.core.matrix import conv_output_shape

    plt = _pyplot()
    out_shape = conv_output_shape(conv, in_shape)  # type: ignore[arg-type]
    out_ch, n_out = out_shape[0], math.prod(out_shape[1:])
    m_chw = as_matrix(conv, in_shape)
    m_hwc = as_matrix(conv, in_shape, order="hwc")
    rows, cols = m_chw.shape
    annotate = rows * cols <= 16 * 40
    labels: dict[str, tuple[list[str] | None, list[str] | None]] = {"chw": (None, None),
                                                                     "hwc": (None, None)}
    if rows <= 24 and cols <= 48:
        in_ch, n_in = in_shape[0], math.prod(in_shape[1:])
        out_pos, in_pos = _position_names(out_shape[1:]), _position_names(in_shape[1:])
        labels["chw"] = ([f"y{o}{out_pos[p]}" for o in range(out_ch) for p in range(n_out)],
                         [f"x{c}{in_pos[i]}" for c in range(in_ch) for i in range(n_in)])
        labels["hwc"] = ([f"y{o}{out_pos[p]}" for p in range(n_out) for o in range(out_ch)],
                         [f"x{c}{in_pos[i]}" for i in range(n_in) for c in range(in_ch)])
    chw_group = [r % n_out for r in range(rows)]
    hwc_group = [r // out_ch for r in range(rows)]
    cell = min(0.45, 7.5 / cols, 9.0 / rows)  # inches per matrix entry
    fig, axes = plt.subplots(1, 2, figsize=(2 * cols * cell + 2.5, rows * cell + 2.2),
                             layout="constrained")
    matrix_panel(axes[0], m_chw, chw_group, annotate=annotate,
                 title=f"chw order (PyTorch flatten): {rows} x {cols}",
                 row_labels=labels["chw"][0], col_labels=labels["chw"][1])
    matrix_panel(axes[1], m_hwc, hwc_group, annotate=annotate,
                 title=f"hwc order (channels-last): {rows} x {cols}",
                 row_labels=labels["hwc"][0], col_labels=labels["hwc"][1])
    nnz = int((m_chw != 0).sum())
    fig.suptitle(f"{title}\n{nnz} of {rows * cols} entries can be non-zero "
                 f"({1 - nnz / (rows * cols):.1%} structural zeros); colour = output position",
                 fontsize=11, fontweight="bold")
    _save(fig, path)


def draw_position_structure(kernel: tuple[int, ...], spatial: tuple[int, ...],
                            block: tuple[int, int], path: str | os.PathLike[str], title: str,
                            max_side: int = 8) -> None:
    """Large specs: which input positions each output position reads, one cell per
    ``block = (out_channels, in_channels)`` sub-matrix, on a crop of at most ``max_side`` per
    spatial side (the pattern only repeats further in)."""
    from torch import nn

    from fc2conv.core import as_matrix
    from fc2conv.core.layers import conv_class

    plt = _pyplot()
    crop = tuple(min(s, max(max_side, k)) for s, k in zip(spatial, kernel, strict=True))
    probe = conv_class(len(kernel))(1, 1, cast(Any, kernel), bias=False, device="cpu")
    with torch.no_grad():
        probe.weight.fill_(1.0)
    pattern = as_matrix(probe, (1, *crop), order="hwc")
    assert isinstance(probe, nn.Module)
    rows, cols = pattern.shape
    fig, ax = plt.subplots(figsize=(max(5.0, min(13.0, cols * 0.22 + 2)),
                                    max(3.0, min(11.0, rows * 0.22 + 1.5))),
                           layout="constrained")
    matrix_panel(ax, pattern, list(range(rows)), annotate=False,
                 title=f"each cell = one {block[0]} x {block[1]} block (out x in channels)")
    cropped_map = crop != tuple(spatial)
    ax.set_xlabel(f"input positions{' of the crop' if cropped_map else ''} (row-major)")
    ax.set_ylabel("output positions")
    cropped = "" if not cropped_map else (
        f"; shown on a {'x'.join(map(str, crop))} crop of the "
        f"{'x'.join(map(str, spatial))} map")
    fig.suptitle(f"{title}{cropped}", fontsize=11, fontweight="bold")
    _save(fig, path)


def draw_flatten_columns(in_shape: tuple[int, ...], out_features: int, order: str,
                         path: str | os.PathLike[str], title: str, max_cols: int = 96,
                         max_rows: int = 8) -> None:
    """A Linear over a flattened ``(C, *S)`` map: its weight columns coloured by the spatial
    position (kernel tap) they read, in chw and hwc order, the chosen ``order`` marked. Each
    kernel tap of the equivalent conv is one colour; large layers are cropped to the first
    ``max_rows`` x ``max_cols`` entries."""
    import numpy as np
    from matplotlib.colors import to_rgba

    plt = _pyplot()
    positions = math.prod(in_shape[1:])
    n_in = in_shape[0] * positions
    # Crop to the first few channels (all their positions), so both orders show the same inputs.
    channels = max(1, min(in_shape[0], max_cols // positions))
    cols, rows = min(channels * positions, max_cols), min(out_features, max_rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, min(16.0, cols * 0.16 + 2)),
                                            max(4.0, rows * 0.3 * 2 + 2.5)),
                             layout="constrained")
    taps = [f"({','.join(map(str, np.unravel_index(p, in_shape[1:])))})" for p in range(positions)]
    for ax, view in zip(axes, ("chw", "hwc"), strict=True):
        pos = [(j % positions) if view == "chw" else (j // channels) for j in range(cols)]
        chan = [(j // positions) if view == "chw" else (j % channels) for j in range(cols)]
        img = np.array([[to_rgba(_colour(p)) for p in pos]] * rows)
        ax.imshow(img, interpolation="nearest", aspect="auto")
        for j in range(1, cols):
            if chan[j] != chan[j - 1] and view == "chw":
                ax.axvline(j - 0.5, color="white", lw=2)
            if pos[j] != pos[j - 1] and view == "hwc":
                ax.axvline(j - 0.5, color="white", lw=2)
        step = max(1, cols // 24)
        ax.set_xticks(range(0, cols, step),
                      [f"c{chan[j]}{taps[pos[j]]}" for j in range(0, cols, step)],
                      rotation=90, fontsize=7)
        for tick, j in zip(ax.get_xticklabels(), range(0, cols, step), strict=True):
            tick.set_color(_colour(pos[j]))
        ax.set_yticks([])
        ax.set_ylabel("outputs", fontsize=8)
        chosen = "  <- this layer" if view == order else ""
        layout = ("channel-major: one kernel plane per channel" if view == "chw"
                  else "position-major: all channels of one tap together")
        ax.set_title(f"flatten order {view} ({layout}){chosen}", fontsize=10, loc="left",
                     fontweight="bold" if view == order else "normal")
    crop = "" if (cols, rows) == (n_in, out_features) else (
        f"\n(cropped: {rows} of {out_features} outputs, {cols} of {n_in} inputs: "
        f"{channels} of {in_shape[0]} channels)")
    fig.suptitle(f"{title}{crop}\ncolour = kernel tap (spatial position) of the equivalent "
                 f"conv that the column becomes", fontsize=11)
    _save(fig, path)
