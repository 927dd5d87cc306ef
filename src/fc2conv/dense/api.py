"""``dense_map``: the exact score map of a convolutionalized net on an image of any size.

The map is cut into chunks of output cells (:mod:`fc2conv.dense.plan`); each chunk is one Dask
task that reads exactly the input tile it needs, runs the dense net on it and keeps the cells
its field places inside the tile (or across an image border). The stitched chunks equal the
untiled ``fcn(image)``; see the plan's docstring for the argument.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fc2conv.dense import model as dmodel
from fc2conv.dense.batch import CPU_PIXELS, Chunk, batch_size, batches, run_batch
from fc2conv.dense.plan import TilePlan, chunk_cells, default_tile, plan_tiles
from fc2conv.dense.readers import Reader, open_image
from fc2conv.dense.schedule import DenseArray, LocalScheduler, scheduled
from fc2conv.dense.writer import MapStore
from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


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


def _block(source: Any, window: tuple[slice, ...], *, net: Any,
           crop: tuple[tuple[int, int], ...], mean: np.ndarray | None, std: np.ndarray | None,
           device: str, store: MapStore | None = None, index: tuple[int, ...] = (),
           origin: tuple[int, ...] = (), threads: int | None = None) -> Any:
    """One Dask task: read the tile, run the net (with ``threads`` torch threads, restored
    afterwards), crop; write and commit it when ``store``."""
    tile = source.read(window) if isinstance(source, Reader) else source
    block = dmodel.run_tile(net, tile, crop, mean, std, device, threads)
    if store is None:
        return block
    return store.write(index, origin, block)


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
              batch: int | None = None) -> Any:
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
    from memory and the receptive field (:func:`_auto_tile`): the whole image in one model
    call when its activations fit (no halo, no per-task cost; torch's threads share the cores
    inside the call), else the largest tiles that fit the memory shared by the chunks that
    run at once.
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

    Returns a dask array (``np.asarray`` computes it), read from the zarr store when ``out``
    is given (the map is then already computed).
    """
    import torch

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
    cells, plan = _plan(tile_px, geo.image_size, geo.map_size, geo.size, geo.stride, geo.start)
    small = [(t, s) for t, s, n in zip(tile_px, geo.size, geo.image_size, strict=True)
             if t < min(s, n)]
    if small:
        log.warning("tile %s is smaller than the receptive field %s: every chunk recomputes a "
                    "whole field for one cell (%d chunks); a tile of 2x the field or more "
                    "wastes less", tile_px, geo.size, len(plan))
    mean_a = _per_channel(mean, shape[0], "mean")
    std_a = _per_channel(std, shape[0], "std")
    # Dask threads: no more than there are tasks; torch's threads share the cores among them
    # (set inside each task and restored, never process-wide)
    cores = n_threads  # ``threads`` caps the cores used, Dask's and torch's together
    n_batch = 1 if distributed or not isinstance(source, Reader) else _batch(
        geo, dev, plan, cores, batch)
    tasks = len(plan) if n_batch == 1 else len(_layout(plan, n_batch, geo.classes)[0])
    n_threads = min(n_threads, tasks)
    per_task = max(1, cores // n_threads)
    log.info("dense map %s -> (%d, %s) in %d chunks of %s cells (tiles up to %s px), %d "
             "tasks", shape, geo.classes, geo.map_size, len(plan), cells, plan.max_tile(),
             tasks)

    if out is None and not distributed and progress is None:
        return _lazy(plan, source, fcn, mean_a, std_a, dev, geo.classes, n_threads, per_task,
                     n_batch)

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
    if progress is not None:
        progress(skipped, len(plan))

    if distributed:
        client, close = _client(scheduler, workers)
        try:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
            program = dmodel.Program(dmodel.model_digest(fcn), dmodel.export_program(fcn, trace),
                                     dev, max(1, (os.cpu_count() or 1) // n_workers))
            net: Any = client.scatter(program, broadcast=True, hash=False)
            src: Any = client.scatter(source, broadcast=True, hash=False) if isinstance(
                source, Reader) and not hasattr(source, "path") else source
            result = _eager(plan, src, net, mean_a, std_a, dev, store, skipped, progress, client,
                            geo.classes)
        finally:
            if isinstance(close, tuple):
                close[0].close()
                close[1].close()
            elif close is not None:
                close.close()
    else:
        result = _eager(plan, source, fcn, mean_a, std_a, dev, store, skipped, progress,
                        None, geo.classes, n_threads, per_task, n_batch)
    if store is not None:
        store.finish()
        return store.scores()
    return result


def _tile_source(source: Any, window: tuple[slice, ...]) -> tuple[Any, tuple[slice, ...]]:
    """(what the task reads from, window): a dask slice is a graph dependency."""
    if isinstance(source, Reader) or type(source).__name__ == "Future":
        return source, window
    return source[(slice(None), *window)], window


def _pending(plan: TilePlan, store: MapStore | None) -> Any:
    """``(index, window, crop, origin)`` of each chunk not yet in ``store``: the input window
    the chunk reads, the part of the tile's output it keeps, and its first output cell."""
    for index, chunks in plan.blocks():
        if store is not None and store.is_done(index):
            continue
        yield (index, tuple(slice(c.a, c.b) for c in chunks),
               tuple(c.crop(j) for c, j in zip(chunks, plan.stride, strict=True)),
               tuple(c.i0 for c in chunks))


def _tasks(plan: TilePlan, source: Any, net: Any, mean: Any, std: Any, dev: str,
           store: MapStore | None, per_task: int | None = None
           ) -> list[tuple[tuple[int, ...], Any]]:
    import dask

    token = uuid.uuid4().hex  # keys unique to this call (tasks are not pure: they write)
    # what every task shares rides in a partial, not in the task's arguments, which Dask
    # walks one by one looking for collections; a scattered net (a Future) must stay one
    shared = functools.partial(_block, mean=mean, std=std, device=dev, store=store,
                               threads=per_task)
    local = type(net).__name__ != "Future"
    if local:
        shared = functools.partial(shared, net=net)
    tasks = []
    for index, window, crop, origin in _pending(plan, store):
        src, win = _tile_source(source, window)
        name = f"fc2conv-tile-{token}-{'-'.join(map(str, index))}"
        extra = {} if local else {"net": net}
        task = dask.delayed(shared, pure=False)(src, win, crop=crop, index=index, origin=origin,
                                                dask_key_name=name, **extra)
        tasks.append((index, task))
    return tasks


def _assemble(plan: TilePlan, blocks: dict[tuple[int, ...], Any], classes: int) -> Any:
    import dask.array as da

    def nest(prefix: tuple[int, ...]) -> Any:
        if len(prefix) == len(plan.grid):
            chunks = [plan.axes[a][k] for a, k in enumerate(prefix)]
            value = blocks[prefix]
            if isinstance(value, np.ndarray):
                return value
            return da.from_delayed(value, (classes, *(c.i1 - c.i0 for c in chunks)),
                                   dtype=np.float32)
        return [nest((*prefix, k)) for k in range(plan.grid[len(prefix)])]

    if len(plan) == 1:  # one chunk: the array is that task
        return nest((0,) * len(plan.grid))
    return da.block(nest(()))


def _graph(plan: TilePlan, source: Reader, net: Any, mean: Any, std: Any, dev: str,
           store: MapStore | None, per_task: int | None, batch: int,
           groups: Sequence[Sequence[Chunk]] | None = None
           ) -> tuple[str, dict[Any, Any], Sequence[Sequence[Chunk]]]:
    """``(name, graph, batches)``: one task per batch of pending same-shaped chunks
    (:mod:`~fc2conv.dense.batch`; ``groups`` when the caller has them), keyed
    ``(name + '-batch', b)``, written as plain tuples ``(call,)``: whatever a task needs rides
    in its partial, so Dask neither tokenizes (hashes) the image and net nor walks the
    arguments (what ``dask.delayed`` + ``da.block`` did, milliseconds per call and per
    chunk)."""
    name = f"fc2conv-dense-{uuid.uuid4().hex}"  # unique: tasks are not pure (they may write)
    shared = functools.partial(run_batch, net=net, mean=mean, std=std, device=dev, store=store,
                               threads=per_task)
    if groups is None:
        groups = batches(_pending(plan, store), batch)
    dsk = {(f"{name}-batch", b): (functools.partial(shared, source, group),)
           for b, group in enumerate(groups)}
    return name, dsk, groups


@functools.lru_cache(maxsize=64)
def _layout(plan: TilePlan, batch: int, classes: int) -> tuple[Any, ...]:
    """What a lazy map's graph needs from its plan alone, kept for the next call (the same
    plan and batch: mapping many images of one size): ``(batches, the map slices of each
    batch's chunks, their block indices, the dask chunks)``."""
    groups = tuple(tuple(group) for group in batches(_pending(plan, None), batch))
    where = {index: (slice(None), *(slice(c.i0, c.i1) for c in chunks))
             for index, chunks in plan.blocks()}
    wheres = tuple([where[chunk[0]] for chunk in group] for group in groups)
    members = tuple([chunk[0] for chunk in group] for group in groups)
    chunks = ((classes,), *(tuple(c.i1 - c.i0 for c in ax) for ax in plan.axes))
    return groups, wheres, members, chunks


def _lazy(plan: TilePlan, source: Any, net: Any, mean: Any, std: Any, dev: str, classes: int,
          workers: int, per_task: int, batch: int) -> Any:
    """The map as a dask array computed, by default, ``workers`` tasks at a time (one: in the
    calling thread) by :class:`~fc2conv.dense.schedule.LocalScheduler`."""
    if not isinstance(source, Reader):  # a dask array: its slices are graph dependencies
        blocks = dict(_tasks(plan, source, net, mean, std, dev, None, per_task))
        return scheduled(_assemble(plan, blocks, classes), workers)
    groups, wheres, members, chunks = _layout(plan, batch, classes)
    name, dsk, _ = _graph(plan, source, net, mean, std, dev, None, per_task, batch, groups)
    calls = [(w, task[0]) for w, task in zip(wheres, dsk.values(), strict=True)]
    return DenseArray.build(name, chunks, calls, dsk, list(members), workers)


def _eager(plan: TilePlan, source: Any, net: Any, mean: Any, std: Any, dev: str,
           store: MapStore | None, skipped: int, progress: Progress | None, client: Any,
           classes: int, threads: int = 1, per_task: int | None = None, batch: int = 1) -> Any:
    """Compute every pending chunk now (writing it when ``store``), reporting progress."""
    import dask
    import dask.array as da

    plain = client is None and isinstance(source, Reader)  # plain tasks (see _graph)
    tasks = [] if plain else _tasks(plan, source, net, mean, std, dev, store, per_task)
    total = len(plan)
    done = skipped
    results: dict[tuple[int, ...], Any] = {}
    if client is not None:
        from distributed import as_completed

        futures = client.compute([t for _, t in tasks])
        index_of = {f.key: i for f, (i, _) in zip(futures, tasks, strict=True)}
        for future in as_completed(futures):
            results[index_of[future.key]] = future.result()
            done += 1
            if progress is not None:
                progress(done, total)
    else:
        from dask.callbacks import Callback

        if plain:
            _, dsk, groups = _graph(plan, source, net, mean, std, dev, store, per_task, batch)
            members = {k: [chunk[0] for chunk in group]
                       for k, group in zip(dsk, groups, strict=True)}
        else:
            members = {t.key: [i] for i, t in tasks}

        class _Count(Callback):  # type: ignore[misc]
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any
                          ) -> None:
                nonlocal done
                if key in members:
                    done += len(members[key])
                    if progress is not None:
                        progress(done, total)

        local = LocalScheduler(threads)  # one at a time: in the calling thread
        with _Count():
            if plain:
                values = local(dsk, list(members))
                if store is None:  # each batch's blocks, in its chunks' order
                    results = {i: block for k, v in zip(members, values, strict=True)
                               for i, block in zip(members[k], v, strict=True)}
            else:
                values = dask.compute(*[t for _, t in tasks], scheduler=local)
                results = {i: v for (i, _), v in zip(tasks, values, strict=True)}
    if store is not None:
        return None
    blocks = {i: results[i] for i, _ in plan.blocks()}
    return scheduled(da.asarray(_assemble(plan, blocks, classes)), 1)  # in memory already


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
    :data:`~fc2conv.dense.batch.CPU_PIXELS` input pixels a call), at most ``batch`` when
    given."""
    if batch is not None and int(batch) < 1:
        raise Fc2ConvError(f"batch must be a positive number of tiles, got {batch}")
    if len(plan) == 1 or batch == 1:
        return 1
    at_once = max(1, min(cores, len(plan)))
    n = batch_size(geo.bytes_per_pixel, plan.max_tile(), _memory(dev) / at_once, len(plan),
                   at_once, None if dev.startswith("cuda") else CPU_PIXELS)
    return n if batch is None else min(n, int(batch))


def _auto_tile(geo: dmodel.Geometry, dev: str, tasks_at_once: int) -> tuple[int, ...]:
    """The default tile (:func:`fc2conv.dense.plan.default_tile`): the whole image when its
    activations fit in :func:`_memory`, else tiles of that memory shared by the tasks that
    run at once. A tile's memory is taken as 6x the net's largest tensor (the float input,
    a layer's input and output, pool indices, workspace: measured 3.4-5.8x on VGG-style
    nets on the CPU)."""
    budget = _memory(dev)
    tile = default_tile(geo.image_size, geo.size, 6 * geo.bytes_per_pixel, budget,
                        budget / max(1, tasks_at_once))
    log.info("default tile %s px (largest activation ~%.0f bytes per input pixel, %.0f MiB "
             "for activations)", tile, geo.bytes_per_pixel, budget / 2**20)
    return tile


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
