"""Axis maps: where each axis of an original value went in its conv-layout twin, and what a
Reshape or a shape vector computed at run time becomes there.

An *axis map* ``m`` lists, for each stored (physical) axis ``q`` of a twin ``x'``, the original
(logical) axis ``m[q]`` of ``x`` it holds, or ``None`` for a unit axis the layout added::

    act layout   x'[b, c, 0, s] = x[b, s, c]        m = (0, 2, None, 1)
    permuted     x = Transpose(x', p)                m = p^-1

so ``shape(x)[i] = shape(x')[m.index(i)]``: a ``Shape(x)`` read by run-time shape arithmetic is
``Gather(Shape(x'), [m.index(i) for i in range(rank x)])`` and the arithmetic after it is left
as it is (it still computes the original, logical sizes).

A Reshape of ``x`` to a target ``t`` (constant or computed by that arithmetic) regroups runs of
logical axes: ``x`` of shape ``(d_0, .., d_n)`` to ``(e_0, .., e_k)`` where the input axes
``I_g`` become the output axes ``O_g`` with ``prod d[I_g] = prod e[O_g]``, the groups in order.
When each ``I_g`` is stored contiguously and in order in ``x'`` (unit axes of ``m`` between them
are size 1 and change nothing), the same regrouping of the stored axes is a Reshape of ``x'``
to ``t' = [t[o] for o in m_out]`` (``1`` for a unit axis), ``m_out`` listing each group's
output axes where its input run was stored. ``t'`` is a Gather of ``t``: no data moves.

Which axes group is read from the sizes; where shape inference left symbolic sizes they come
from :class:`fc2conv.onnx.rules.shape_probe.Probe`.
"""

from __future__ import annotations

from collections.abc import Sequence

AxisMap = tuple[int | None, ...]
ACT: AxisMap = (0, 2, None, 1)  # (B, S, C) stored as (B, C, 1, S)


def axes_of(perm: Sequence[int] | None, act: AxisMap = ACT) -> AxisMap:
    """The axis map of a twin: ``perm`` None is the act layout ``act``, else
    ``x = Transpose(x', perm)``."""
    if perm is None:
        return act
    out: list[int | None] = [0] * len(perm)
    for i, q in enumerate(perm):
        out[q] = i
    return tuple(out)


def perm_of(axes: AxisMap) -> tuple[int, ...] | None:
    """The permutation ``p`` with ``x = Transpose(x', p)``, for a map that is one."""
    if None in axes or sorted(axes) != list(range(len(axes))):  # type: ignore[type-var]
        return None
    return tuple(axes.index(i) for i in range(len(axes)))


def logical_order(axes: AxisMap, rank: int) -> list[int | None]:
    """For each logical axis ``i`` of a rank-``rank`` value, the stored axis holding it, or
    ``None`` for a unit axis the twin does not store: ``shape(x)[i] = shape(x')[order[i]]``."""
    return [axes.index(i) if i in axes else None for i in range(rank)]


def groups(sx: Sequence[int], so: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """The runs of input axes of ``sx`` whose sizes multiply to runs of output axes of ``so``
    (a Reshape ``sx -> so``, both concrete), in order; ``None`` when they do not pair up."""
    if any(d <= 0 for d in (*sx, *so)):
        return None
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(sx) or j < len(so):
        if i == len(sx) or j == len(so):
            return None
        ins, outs = [i], [j]
        a, b = sx[i], so[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b and i < len(sx):
                a, i = a * sx[i], i + 1
                ins.append(i - 1)
            elif b < a and j < len(so):
                b, j = b * so[j], j + 1
                outs.append(j - 1)
            else:
                return None
        out.append((ins, outs))
    return out


def reshape_axes(axes: AxisMap, runs: list[tuple[list[int], list[int]]], units: set[int],
                 act: AxisMap) -> AxisMap | None:
    """The axis map of ``Reshape(x', t')`` when the logical Reshape regroups ``runs`` (see the
    module docstring); ``units``: the output axes of size 1, which need not be stored. The
    result is ``act`` when the batch axis is kept and it stores the same axes in the same
    order (its unit axes added or left out), else a permutation; ``None`` when a run's input
    axes are not stored together in order, or the result is neither."""
    stored = [a for a in axes if a is not None]
    placed: list[tuple[int, list[int]]] = []
    for ins, outs in runs:
        kept = [i for i in ins if i in stored]
        if not kept:
            if not set(outs) <= units:
                return None
            continue
        first = stored.index(kept[0])
        if stored[first:first + len(kept)] != kept:
            return None
        placed.append((first, outs))
    order = [o for _, outs in sorted(placed) for o in outs]
    rank = sum(len(outs) for _, outs in runs)
    bare = [o for o in order if o not in units]
    if ([0], [0]) in runs and bare == [a for a in act if a is not None] \
            and rank == len(bare) + len(units & (set(range(rank)) - set(act))):
        return act
    result = tuple(order)
    return result if perm_of(result) is not None else None


def arranged_for(axes: AxisMap, runs: list[tuple[list[int], list[int]]], units: set[int],
                 act: AxisMap) -> list[int] | None:
    """When :func:`reshape_axes` refuses a Reshape that keeps the batch axis: the order of
    stored axes (a Transpose of ``x'``) after which its result has the ``act`` map, as the
    exporter's own Transpose before a head merge; ``None`` when there is none."""
    if ([0], [0]) not in runs or None in axes:
        return None
    want = [a for a in act if a is not None]
    logical: list[int] = []
    placed: set[int] = set()
    for o in want:
        k = next((k for k, (_, outs) in enumerate(runs) if o in outs), None)
        if k is None:
            return None
        if k in placed:
            continue
        ins, outs = runs[k]
        bare = [b for b in outs if b not in units]
        at = want.index(o)
        if want[at:at + len(bare)] != bare:
            return None
        placed.add(k)
        logical.extend(i for i in ins if i in axes)
    rest = [runs[k] for k in range(len(runs)) if k not in placed]
    if any(not set(outs) <= units or any(i in axes for i in ins) for ins, outs in rest) \
            or sorted(logical) != sorted(a for a in axes if a is not None):
        return None
    return [axes.index(i) for i in logical]  # type: ignore[arg-type]
