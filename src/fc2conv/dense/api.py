"""``dense_map``: the exact score map of a convolutionalized net on an image of any size.

The map is cut into chunks of output cells (:mod:`fc2conv.dense.plan`); each chunk reads
exactly the input tile it needs, runs the dense net on it and keeps the cells its field places
inside the tile (or across an image border); same-shaped tiles run as one batched call
(:mod:`fc2conv.dense.batch`), as the tasks of a Dask graph (:mod:`fc2conv.dense.graph`). The
stitched chunks equal the untiled ``fcn(image)``; see the plan's docstring for the argument.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fc2conv.dense import model as dmodel
from fc2conv.dense.batch import CPU_PIXELS, batch_size
from fc2conv.dense.graph import Progress, eager, layout, lazy
from fc2conv.dense.plan import TilePlan, chunk_cells, default_tile, plan_tiles
from fc2conv.dense.readers import ArrayReader, Reader, StageMap, open_image
from fc2conv.dense.writer import MapStore
from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


def _per_channel(value: float | Sequence[float] | None, channels: int, name: str
                 ) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise Fc2ConvError(f"{name} has {arr.size} values; the image has {channels} channels")
    if name == "std" and np.any(arr == 0):
        raise Fc2ConvError("std must not be 0")
    return arr


@functools.lru_cache(maxsize=64)
def _plan(tile: tuple[int, ...], image_size: tuple[int, ...], map_size: tuple[int, ...],
          size: tuple[int, ...], stride: tuple[int, ...], start: tuple[int, ...]
          ) -> tuple[tuple[int, ...], TilePlan]:
    """``(cells per chunk, plan)`` (pure arithmetic on integers, kept for the next call: a
    :class:`TilePlan` is immutable)."""
    cells = chunk_cells(tile, image_size, map_size, size, stride)
    return cells, plan_tiles(image_size, map_size, size, stride, start, cells)


def _client(scheduler: Any, workers: int | None) -> tuple[Any, Any]:
    """(client, what to close afterwards)."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, None
    if isinstance(scheduler, str):
        client = Client(scheduler)
        return client, client
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    return client, (client, cluster)


def _spatial(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    out = (value,) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dims or min(out) < 1:
        raise Fc2ConvError(f"tile must be a positive size per spatial axis ({dims}), got {value}")
    return out


def dense_map(model: Any, image: Any, *, input_shape: Sequence[int] | None = None,
              tile: int | Sequence[int] | None = None, out: str | os.PathLike[str] | None = None,
              device: str | None = None, scheduler: Any = None, workers: int | None = None,
              level: int = 0, mean: float | Sequence[float] | None = None,
              std: float | Sequence[float] | None = None, argmax: bool = False,
              overwrite: bool = False, threads: int | None = None,
              progress: Progress | None = None, fuse: bool = True,
              batch: int | None = None, stages: int | None = None) -> Any:
    """The dense score map ``(K, *out_spatial)`` of ``model`` on ``image`` ``(C, *spatial)``,
    equal to the untiled ``fcn(image[None])[0]`` and computed tile by tile with Dask.

    ``model``: a fully convolutional net, or a classifier together with its ``input_shape``
    ``(C, H, W)`` (convolutionalized first); an ``ExportedProgram`` is run as its module.
    ``image``: numpy / torch / dask / zarr array ``(C, *spatial)`` (or ``(*spatial)`` with one
    channel when ``input_shape`` says how many axes), a zarr path, a TIFF / OME-TIFF (pyramid
    ``level``), PNG / JPEG, or an OpenSlide file. Pixels are cast to float32 unchanged, then
    ``(x - mean) / std`` per channel when given.
    ``tile``: input pixels per tile side, at most; each axis gets as many chunks as tiles of
    that size need, evened out (:func:`~fc2conv.dense.plan.chunk_cells`). By default it comes
    from memory, speed and the receptive field (:func:`_auto_tile`,
    :func:`~fc2conv.dense.plan.default_tile`): the whole image in one model call when it is
    small (no halo, no per-task cost; torch's threads share the cores inside the call); on
    the CPU, once the image holds more than :data:`~fc2conv.dense.plan.WHOLE_CALLS` calls of
    a quarter of a running task's share of the last-level cache, tiles whose largest
    activation stays within such a call, reading at most
    1.3x the image's pixels, at least one chunk per core; else (and on a GPU) the whole image
    when its activations fit in memory, or the largest tiles that fit the memory shared by the
    chunks that run at once.
    ``out``: a zarr group written chunk by chunk (``scores``,
    ``labels`` when ``argmax``); re-running resumes. ``scheduler``: None (Dask's threads),
    a scheduler address, or a ``distributed.Client``; ``workers=N`` starts a LocalCluster.
    ``threads``: the cores to use in this process (default: all), shared by Dask's threads
    (one per chunk running at once) and torch's threads inside each chunk. One chunk at a
    time (one chunk, or ``threads=1``) runs in the calling thread; more run on one pool the
    process reuses (:mod:`~fc2conv.dense.schedule`).
    ``progress(done, total)`` is called as chunks finish (first with the chunks skipped).
    ``batch``: the most same-shaped tiles run as one batched model call
    (:mod:`~fc2conv.dense.batch`; default: as many as the memory of a task holds, spread over
    the tasks that run at once; 1: one call per tile). Local maps read from an image only; a
    ``dask.distributed`` map keeps one task per chunk. Batched blocks equal unbatched ones up
    to the rounding of torch's kernels (:func:`~fc2conv.dense.model.run_tiles`).
    ``fuse``: fold eval-mode BatchNorm into the conv before it (:mod:`~fc2conv.dense.fuse`,
    on a copy of the net; exact up to rounding); False runs the net's layers as they are.
    ``stages``: split the net at layer boundaries into stages, each tiled with only its own
    receptive field, the map between stages held whole in memory
    (:mod:`~fc2conv.dense.stages`): ``None`` (default) when its cost model predicts it is
    cheaper (on the CPU, for a local map of an image held in memory as an array, and only when
    every map between stages fits in half of the memory budget), ``1`` never, ``N`` exactly
    ``N`` stages (a local map of an array or a file).
    Each stage's tile gets the memory of ``tile``. The staged map equals the one-stage map up
    to the rounding of torch's kernels (the same values through the same layers).

    Returns a dask array (``np.asarray`` computes it), read from the zarr store when ``out``
    is given (the map is then already computed).
    """
    import torch

    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                              or batch < 1):
        raise Fc2ConvError(f"batch must be a positive number of tiles, got {batch!r}")
    dims_hint = len(input_shape) - 1 if input_shape is not None else None
    source = open_image(image, dims_hint, level)
    shape = tuple(int(n) for n in source.shape)
    dims = len(shape) - 1
    if dims not in (2, 3):
        raise Fc2ConvError(f"the image must be (C, H, W) or (C, D, H, W), got shape {shape}")
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise Fc2ConvError(f"model must be a torch module or ExportedProgram, got "
                           f"{type(model).__name__}")
    if input_shape is not None and int(input_shape[0]) != shape[0]:
        raise Fc2ConvError(f"the image has {shape[0]} channels; input_shape {tuple(input_shape)}"
                           f" expects {input_shape[0]}")
    on = _module_device(model)
    if device is None and on is not None and on.type != "cpu":
        device = str(on)  # run the tiles where the model is, unless device says otherwise
    dev = str(device or "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise Fc2ConvError("device cuda was asked for, but torch sees no CUDA device")
    workers = dmodel.gpu_workers(dev, workers, scheduler,
                                 torch.cuda.device_count() if dev.startswith("cuda") else 0)
    distributed = scheduler is not None or workers is not None
    trace = tuple(input_shape) if input_shape is not None else (
        shape[0], *(min(n, 256 if dims == 2 else 64) for n in shape[1:]))
    # the net on the device its tiles run on (on the CPU when workers load it as a program)
    fcn, geo = dmodel.prepare(model, trace, shape, convert=input_shape is not None,
                              device="cpu" if distributed else dev, fuse=fuse)
    n_threads = max(1, threads or os.cpu_count() or 1)
    tile_px = _spatial(tile, dims) if tile is not None else _auto_tile(
        geo, dev, 1 if distributed else n_threads)
    staged = _stages(fcn, geo, trace, shape, tile_px, stages, dev,
                     distributed or not isinstance(source, Reader),
                     isinstance(source, ArrayReader))
    mean_a = _per_channel(mean, shape[0], "mean")
    std_a = _per_channel(std, shape[0], "std")
    cores = n_threads  # ``threads`` caps the cores used, Dask's and torch's together
    run_net, run_geo, run_tile, run_mean, run_std = fcn, geo, tile_px, mean_a, std_a
    early: list[_Early] = []  # the stages before the last, to run with progress
    if staged is not None:  # every stage but the last: a lazy map the next stage reads
        for stage in staged[:-1]:
            _, stage_plan = _plan(stage.tile, stage.geo.image_size, stage.geo.map_size,
                                  stage.geo.size, stage.geo.stride, stage.geo.start)
            n_b, n_t, per = _threads(stage.geo, dev, stage_plan, source, cores, batch, False)
            stage_map = StageMap(lazy(stage_plan, source, stage.net, run_mean, run_std, dev,
                                      stage.geo.classes, n_t, per, n_b))
            early.append(_Early(stage_plan, source, stage.net, run_mean, run_std,
                                stage.geo.classes, n_t, per, n_b, stage_map))
            source = stage_map
            run_mean = run_std = None
        run_net, run_geo, run_tile = staged[-1].net, staged[-1].geo, staged[-1].tile
    cells, plan = _plan(run_tile, run_geo.image_size, run_geo.map_size, run_geo.size,
                        run_geo.stride, run_geo.start)
    small = [(t, s) for t, s, n in zip(tile_px, geo.size, geo.image_size, strict=True)
             if t < min(s, n)]
    if small and staged is None:
        log.warning("tile %s is smaller than the receptive field %s: every chunk recomputes a "
                    "whole field for one cell (%d chunks); a tile of 2x the field or more "
                    "wastes less", tile_px, geo.size, len(plan))
    n_batch, n_threads, per_task = _threads(run_geo, dev, plan, source, cores, batch,
                                            distributed)
    log.info("dense map %s -> (%d, %s) in %d chunks of %s cells (tiles up to %s px), %d "
             "stage(s)", shape, geo.classes, geo.map_size, len(plan), cells, plan.max_tile(),
             1 if staged is None else len(staged))

    if out is None and not distributed and progress is None:
        return lazy(plan, source, run_net, run_mean, run_std, dev, geo.classes, n_threads,
                    per_task, n_batch)

    store = None
    if out is not None:
        if isinstance(image, (str, os.PathLike)) and os.path.abspath(image) == os.path.abspath(
                out):
            raise Fc2ConvError("--out is the input image; it would be overwritten")
        digest = dmodel.model_digest(fcn)
        attrs = {**geo.attrs(), "model_sha256": digest, "chunk_cells": list(cells),
                 "input_shape": list(trace), "mean": None if mean_a is None else mean_a.tolist(),
                 "std": None if std_a is None else std_a.tolist(), "argmax": argmax,
                 "source": getattr(source, "source", "array")}
        store = MapStore(str(out), (geo.classes, *geo.map_size), (geo.classes, *cells),
                         json.loads(json.dumps(attrs)), argmax)
        skipped = store.open(overwrite)
        if skipped:
            log.warning("resuming %s: %d of %d chunks already done", out, skipped, len(plan))
    else:
        skipped = 0
    # progress counts every stage's chunks; a resumed run recomputes the early stages
    before = sum(len(stage.plan) for stage in early) if skipped < len(plan) else 0
    if progress is not None:
        progress(skipped, before + len(plan))

    if distributed:
        client, close = _client(scheduler, workers)
        try:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
            program = dmodel.Program(dmodel.model_digest(fcn), dmodel.export_program(fcn, trace),
                                     dev, max(1, (os.cpu_count() or 1) // n_workers))
            net: Any = client.scatter(program, broadcast=True, hash=False)
            src: Any = client.scatter(source, broadcast=True, hash=False) if isinstance(
                source, Reader) and not hasattr(source, "path") else source
            result = eager(plan, src, net, mean_a, std_a, dev, store, skipped, progress, client,
                            geo.classes)
        finally:
            if isinstance(close, tuple):
                close[0].close()
                close[1].close()
            elif close is not None:
                close.close()
    else:
        try:
            last = progress
            if isinstance(source, StageMap) and skipped < len(plan):
                if progress is not None:  # stage by stage, counted
                    _run_early(early, dev, progress, skipped, before + len(plan))
                    last = functools.partial(_shifted, progress, before, before + len(plan))
                source.materialize()  # here, before the last stage's tasks read it
            result = eager(plan, source, run_net, run_mean, run_std, dev, store, skipped,
                           last, None, geo.classes, n_threads, per_task, n_batch)
        finally:
            for stage_map in [*(stage.map for stage in early), source]:
                if isinstance(stage_map, StageMap):
                    stage_map.release()
    if store is not None:
        store.finish()
        return store.scores()
    return result


def _shifted(progress: Progress, offset: int, total: int, done: int, _: int) -> None:
    progress(offset + done, total)


class _Early(NamedTuple):
    """A stage before the last: what :func:`~fc2conv.dense.graph.eager` runs it with, and the
    map that holds its result."""

    plan: TilePlan
    source: Any
    net: Any
    mean: Any
    std: Any
    classes: int
    threads: int
    per_task: int
    batch: int
    map: StageMap


def _run_early(early: list[_Early], dev: str, progress: Progress, skipped: int,
               total: int) -> None:
    """Compute the maps of the stages before the last, in order, each held by its
    :class:`~fc2conv.dense.readers.StageMap`, reporting their chunks as done after the
    ``skipped`` chunks of the last stage (of ``total`` in all)."""
    offset = skipped
    for e in early:
        if not e.map.held:
            result = eager(e.plan, e.source, e.net, e.mean, e.std, dev, None, 0,
                           functools.partial(_shifted, progress, offset, total), None,
                           e.classes, e.threads, e.per_task, e.batch)
            e.map.hold(np.asarray(result))
        offset += len(e.plan)


def _threads(geo: dmodel.Geometry, dev: str, plan: TilePlan, source: Any, cores: int,
             batch: int | None, distributed: bool) -> tuple[int, int, int]:
    """``(tiles per call, Dask threads, torch threads per task)`` of one map: Dask threads no
    more than there are tasks, torch's threads sharing the cores among them (set inside each
    task and restored, never process-wide)."""
    n_batch = 1 if distributed or not isinstance(source, Reader) else _batch(
        geo, dev, plan, cores, batch)
    tasks = len(plan) if n_batch == 1 else len(layout(plan, n_batch, geo.classes)[0])
    n_threads = min(cores, tasks)
    return n_batch, n_threads, max(1, cores // n_threads)


def _stages(fcn: Any, geo: dmodel.Geometry, trace: Sequence[int], shape: Sequence[int],
            tile: tuple[int, ...], stages: int | None, dev: str, elsewhere: bool,
            in_memory: bool = True) -> list[Any] | None:
    """The stages of the map (:mod:`fc2conv.dense.staged`), ``None`` for one. Staged maps
    run in this process from a :class:`~fc2conv.dense.readers.Reader`. Auto (``None``)
    stages only an image held in memory (an array: the maps between stages, at most half of
    :func:`_memory` each, sit beside it), never an image read from a file, which may exceed
    memory: its map keeps peak RSS independent of the image's size; never a map in one tile
    (no halo to save); and it stays one stage on a GPU, where the map between stages would
    travel through host memory."""
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int)
                               or stages < 1):
        raise Fc2ConvError(f"stages must be a positive number, got {stages!r}")
    whole = all(t >= n for t, n in zip(tile, shape[1:], strict=True))  # no halo to save
    if stages == 1 or (stages is None and (elsewhere or not in_memory or whole
                                           or dev.startswith("cuda"))):
        return None
    if elsewhere:
        raise Fc2ConvError("stages > 1 run in this process on an image read from an array or "
                           "a file, not on a dask array image or a dask.distributed cluster")
    from fc2conv.dense.staged import plan_stages

    return plan_stages(fcn, geo, trace, shape, tile, stages, dev, _memory(dev))


def _memory(dev: str) -> float:
    """Bytes this process may give the net's activations: on a GPU an eighth of its free
    memory, on the CPU an eighth of the available RAM, at most 1 GiB (peak RSS stays low on a
    shared machine; tiles past ~10^7 pixels gain nothing)."""
    if dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return free / 8
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    return float(min(2**30, avail / 8))


def _batch(geo: dmodel.Geometry, dev: str, plan: TilePlan, cores: int, batch: int | None
           ) -> int:
    """Tiles per model call (:func:`~fc2conv.dense.batch.batch_size`): as many as fit the
    memory of one of the tasks that run at once (on the CPU at most
    :data:`~fc2conv.dense.batch.CPU_PIXELS` input pixels a call, and no more than keeps the
    call's largest activation within its task's cache share, :func:`_call_bytes`, as the
    default tile is sized: a batch of default tiles is one tile), at most ``batch`` when
    given."""
    if len(plan) == 1 or batch == 1:
        return 1
    at_once = max(1, min(cores, len(plan)))
    cap = None if dev.startswith("cuda") else min(
        CPU_PIXELS, _call_bytes(at_once) / max(geo.bytes_per_pixel, 1e-12))
    n = batch_size(geo.bytes_per_pixel, plan.max_tile(), _memory(dev) / at_once, len(plan),
                   at_once, cap)
    return n if batch is None else min(n, batch)


def _auto_tile(geo: dmodel.Geometry, dev: str, tasks_at_once: int) -> tuple[int, ...]:
    """The default tile (:func:`fc2conv.dense.plan.default_tile`). Memory: the whole image
    when its activations fit in :func:`_memory`, else tiles of that memory shared by the tasks
    that run at once; a tile's memory is taken as 6x the net's largest tensor (the float
    input, a layer's input and output, pool indices, workspace: measured 3.4-5.8x on
    VGG-style nets on the CPU). Speed, on the CPU: tiles whose largest activation stays
    within :func:`_call_bytes` (the cache's share of each task that runs at once) once the
    image holds more than :data:`~fc2conv.dense.plan.WHOLE_CALLS` such calls; on a GPU the
    memory rule alone."""
    budget = _memory(dev)
    cpu = not dev.startswith("cuda")
    call = _call_bytes(tasks_at_once) if cpu else None
    tile = default_tile(geo.image_size, geo.size, 6 * geo.bytes_per_pixel, budget,
                        budget / max(1, tasks_at_once), stride=geo.stride, start=geo.start,
                        map_size=geo.map_size, call_bytes=None if call is None else 6 * call,
                        tasks=tasks_at_once)
    log.info("default tile %s px (largest activation ~%.0f bytes per input pixel, %.0f MiB "
             "for activations%s)", tile, geo.bytes_per_pixel, budget / 2**20,
             "" if call is None else f", {call / 2**20:.1f} MiB a call in the cache")
    return tile


CACHE_SHARE = 4
"""A call's largest activation gets ``1 / CACHE_SHARE`` of the last-level cache (of the share
of each task that runs at once): its input, its output and the layer's workspace beside it."""


def _call_bytes(tasks_at_once: int) -> float:
    """Bytes of a CPU call's largest activation that keep it in the cache: the last-level
    cache shared by the tasks that run at once, a quarter each (:data:`CACHE_SHARE`); 32 MiB
    assumed where the size cannot be read."""
    return _last_cache() / CACHE_SHARE / max(1, tasks_at_once)


@functools.lru_cache(maxsize=1)
def _last_cache() -> float:
    """The largest CPU cache in bytes (Linux: sysfs; else ``sysconf``; else 32 MiB), within
    [4 MiB, 512 MiB]."""
    size = 0.0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            size = max(size, float(text.rstrip("KMG") or 0) * scale)
        except (OSError, ValueError):
            continue
    if not size:
        try:
            size = float(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            size = 0.0
    return min(max(size or 32 * 2**20, 4 * 2**20), 512 * 2**20)


def _module_device(model: Any) -> Any:
    """The device of ``model``'s first parameter (else buffer; ``None`` when it has none)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    # the first one found, from the modules' own dicts (``parameters()`` builds generators
    # and memo sets: ~50 us a call, a fraction of a percent of a small map)
    first = _first(model, "_parameters")
    first = _first(model, "_buffers") if first is None else first
    return None if first is None else first.device


def _first(module: Any, kind: str) -> Any:
    for tensor in module.__dict__[kind].values():
        if tensor is not None:
            return tensor
    for child in module.__dict__["_modules"].values():
        found = None if child is None else _first(child, kind)
        if found is not None:
            return found
    return None
