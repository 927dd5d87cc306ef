"""The stages of a staged dense map: the planner's choice (:mod:`fc2conv.dense.stages`) turned
into runnable stage nets (:mod:`fc2conv.dense.split`) with their own geometry and tile.

Everything here is cached per prepared net (the object :func:`fc2conv.dense.model.prepare`
returns, itself cached while the model is unchanged): the profile per image shape, the
choice per tile, the stage nets and their geometries per cut. Profiling and geometry run on
the CPU (a CPU copy of a net that lives on a GPU); the stage nets that run share the prepared
net's modules and weights on its device.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fc2conv.dense import model as dmodel
from fc2conv.dense import split as dsplit
from fc2conv.dense.stages import Profile, Staging, choose_stages, relative
from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage: its net (on the map's device), its geometry over its input (the image or
    the previous stage's map), and its tile in its input's cells."""

    net: nn.Module
    geo: dmodel.Geometry
    tile: tuple[int, ...]


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _entry(fcn: nn.Module) -> dict[Any, Any]:
    """The cache of ``fcn``: emptied when its structure or weights changed (a module's
    settings changed in place change its stages' geometry; :func:`~fc2conv.dense.key.
    model_token`) and when it holds many image shapes and tiles."""
    from fc2conv.dense.key import model_token

    token = model_token(fcn)
    try:
        entry = _CACHE.setdefault(fcn, {})
    except TypeError:  # not weak-referenceable: no cache
        return {}
    if entry.get("token") != token or len(entry) > 64:
        entry.clear()
        entry["token"] = token
    return entry


def _cpu(fcn: nn.Module, cache: dict[Any, Any]) -> Any:
    """``fcn`` as a GraphModule on the CPU (a traced copy when it lives elsewhere)."""
    if "cpu" not in cache:
        on = next((t.device for t in (*fcn.parameters(), *fcn.buffers())), None)
        copied = on is not None and on.type != "cpu"
        cache["cpu"] = dsplit.as_graph(copy.deepcopy(fcn).cpu() if copied else fcn)
        cache["copied"] = copied
    return cache["cpu"]


def net_profile(fcn: nn.Module, geo: dmodel.Geometry, trace: Sequence[int],
                shape: Sequence[int], cache: dict[Any, Any] | None = None
                ) -> tuple[Profile, list[str]]:
    """The planner's :class:`~fc2conv.dense.stages.Profile` of ``fcn`` on a ``shape`` image,
    and its candidate cuts' names (cached)."""
    cache = _entry(fcn) if cache is None else cache
    key = ("profile", tuple(trace), tuple(shape))
    if key not in cache:
        cache[key] = dsplit.profile(_cpu(fcn, cache), trace, shape, geo.field)
    result: tuple[Profile, list[str]] = cache[key]
    return result


def plan_stages(fcn: nn.Module, geo: dmodel.Geometry, trace: Sequence[int],
                shape: Sequence[int], tile: Sequence[int], stages: int | None, device: str,
                memory: float) -> list[Stage] | None:
    """The stages of ``fcn``'s map of a ``shape`` image with ``tile`` (image pixels), or
    ``None`` for one stage (see :func:`~fc2conv.dense.stages.choose_stages`)."""
    cache = _entry(fcn)
    key = ("stages", tuple(trace), tuple(shape), tuple(tile), stages, device,
           int(memory // 2**26))
    if key in cache:
        hit: list[Stage] | None = cache[key]
        return hit
    try:
        prof, names = net_profile(fcn, geo, trace, shape, cache)
    except Fc2ConvError:
        if stages not in (None, 1):
            raise
        cache[key] = None
        return None
    choice = choose_stages(prof, tile, stages, memory)
    log.info("dense map stages: %d (cuts %s, tiles %s; predicted cost %.3g vs %.3g in one "
             "stage)", choice.stages, [names[c - 1] for c in choice.cuts], choice.tiles,
             choice.cost, choice.single)
    try:
        found = None if choice.stages == 1 else _build(fcn, prof, names, choice, trace, cache)
    except Fc2ConvError as err:
        if stages is not None:
            raise
        log.info("dense map: one stage (%s)", err)
        found = None
    cache[key] = found
    return found


def _build(fcn: nn.Module, prof: Profile, names: list[str], choice: Staging,
           trace: Sequence[int], cache: dict[Any, Any]) -> list[Stage]:
    at = [names[c - 1] for c in choice.cuts]
    key = ("nets", tuple(at))
    if key not in cache:
        cpu = dsplit.split(_cpu(fcn, cache), at)
        run = dsplit.split(dsplit.as_graph(fcn), at) if cache["copied"] else cpu
        bounds = [0, *choice.cuts, len(prof.boundaries) - 1]
        geos = []
        for k, (stage, u) in enumerate(zip(cpu, bounds[:-1], strict=True)):
            inner, outer = prof.boundaries[u], prof.boundaries[bounds[k + 1]]
            field = relative(outer, inner)
            in_shape = (inner.channels, *inner.cells)
            stage_trace = (inner.channels, *(
                max(f[0] + f[1], min(n, -(-t // j)))
                for f, n, t, j in zip(field, inner.cells, trace[1:], inner.stride,
                                      strict=True)))
            g = dmodel.geometry(dsplit.out_of_place(stage), stage_trace, in_shape)
            if (g.size, g.stride, g.start) != tuple(tuple(f[i] for f in field)
                                                      for i in range(3)) or (
                    g.map_size != outer.cells):
                raise Fc2ConvError(f"stage {k + 1}'s geometry {g.size}/{g.stride}/{g.start} "
                                   f"is not the planner's {field}")
            geos.append(g)
        cache[key] = (run, geos)
    nets, geos = cache[key]
    return [Stage(net, g, tuple(t)) for net, g, t in zip(nets, geos, choice.tiles, strict=True)]
