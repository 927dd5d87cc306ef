"""The Dask graph of a dense map: one plain task per batch of chunks, run lazily or now.

A chunk is ``(index, window, crop, origin)`` (:func:`_pending`): its block index, the input
window it reads, the tile cells it keeps, its first map cell. A local map read through a
:class:`~fc2conv.dense.readers.Reader` is a :class:`~fc2conv.dense.schedule.DenseArray` over
plain tasks, one per batch of same-shaped chunks (:mod:`fc2conv.dense.batch`); a map of a
dask array image, or on a ``dask.distributed`` cluster, is ``dask.delayed`` tasks, one per
chunk. :func:`eager` computes every pending chunk now (writing it when there is a store),
reporting progress; :func:`lazy` returns the map as a dask array.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fc2conv.dense import model as dmodel
from fc2conv.dense.batch import Chunk, batches, run_batch
from fc2conv.dense.plan import TilePlan
from fc2conv.dense.readers import Reader, StageMap
from fc2conv.dense.schedule import DenseArray, LocalScheduler, scheduled
from fc2conv.dense.writer import MapStore

Progress = Callable[[int, int], None]


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
def layout(plan: TilePlan, batch: int, classes: int) -> tuple[Any, ...]:
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


def lazy(plan: TilePlan, source: Any, net: Any, mean: Any, std: Any, dev: str, classes: int,
          workers: int, per_task: int, batch: int) -> Any:
    """The map as a dask array computed, by default, ``workers`` tasks at a time (one: in the
    calling thread) by :class:`~fc2conv.dense.schedule.LocalScheduler`."""
    if not isinstance(source, Reader):  # a dask array: its slices are graph dependencies
        blocks = dict(_tasks(plan, source, net, mean, std, dev, None, per_task))
        return scheduled(_assemble(plan, blocks, classes), workers)
    groups, wheres, members, chunks = layout(plan, batch, classes)
    name, dsk, _ = _graph(plan, source, net, mean, std, dev, None, per_task, batch, groups)
    calls = [(w, task[0]) for w, task in zip(wheres, dsk.values(), strict=True)]
    if not isinstance(source, StageMap):
        return DenseArray.build(name, chunks, calls, dsk, list(members), workers)
    # the previous stage's map is computed before any task reads it (not inside one: a task
    # of the pool would wait on the pool)
    first = (f"{name}-stage",)
    dsk = {key: (functools.partial(_after, task[0]), first) for key, task in dsk.items()}
    return DenseArray.build(name, chunks, calls, dsk, list(members), workers, [source],
                            {first: (source.materialize,)})


def _after(call: Callable[[], Any], _: Any) -> Any:
    """``call()``, as a task that depends on another (whose result it ignores)."""
    return call()


def eager(plan: TilePlan, source: Any, net: Any, mean: Any, std: Any, dev: str,
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
