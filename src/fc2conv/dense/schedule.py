"""Where a local dense map's tasks run: in the calling thread, or on one reused thread pool.

A map computed by Dask's default threaded scheduler hands every task to a pool thread, even
when there is one task: the calling thread waits while another thread is woken, and on a
loaded machine that wake-up (the OS scheduling a sleeping thread) costs milliseconds, as much
as a small net's whole run. :class:`LocalScheduler` is the ``__dask_scheduler__`` of the
arrays :func:`fc2conv.dense_map` returns (and what it uses itself when it computes a map now):

- ``workers == 1`` (one chunk, or ``threads=1``): every task runs in the calling thread, one
  after another (``dask.local.get_sync``): no hand-off, and torch's threads are the caller's;
- ``workers > 1``: the tasks run on a pool of exactly ``workers`` threads that the process
  keeps (:func:`pool`, one per size, created once, reused by every later map from any thread),
  so ``threads=N`` caps Dask's threads and their torch threads stay set (see
  :func:`fc2conv.dense.model.torch_threads`).

Dask picks a collection's own scheduler only when nothing else is asked for: a
``scheduler=`` given to ``compute``, ``dask.config.set(scheduler=...)`` or an active
``distributed.Client`` still win, as for any dask array.

Dask's ``compute`` itself (expression optimization, ordering, the async state machine) costs
about a millisecond of CPU per call whatever the graph, a few percent of a small net's run on
a 768^2 image. A map read from an image (:class:`DenseArray`) knows its chunks' calls and
where each lands in the map, so when Dask would run it with its own :class:`LocalScheduler`
(nothing else asked for, see above) ``compute()`` / ``np.asarray`` call them directly, in the
calling thread or on the same pool, and write each chunk into one preallocated map; anything
else (another scheduler, a slice of the map, ``dask.compute`` with other collections) takes
Dask's path with the same tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import dask.array as da
import numpy as np

_POOLS: dict[int, Executor] = {}
_POOLS_LOCK = threading.Lock()
THREAD_PREFIX = "fc2conv-dense"


def pool(workers: int) -> Executor:
    """The process's pool of ``workers`` threads (created on first use, then reused).

    Its threads are named ``fc2conv-dense_*``; contextvars travel with each task (as in
    Dask's own pool), so a ``dask.config.set`` around a compute still applies inside it."""
    workers = max(1, int(workers))
    with _POOLS_LOCK:
        found = _POOLS.get(workers)
        if found is None:
            from dask.threaded import ContextAwareThreadPoolExecutor as Pool

            found = Pool(workers, thread_name_prefix=THREAD_PREFIX)
            _POOLS[workers] = found
    return found


class LocalScheduler:
    """A dask ``get`` for a local dense map: ``workers`` tasks at once (see the module).

    Equal to any other :class:`LocalScheduler` and to Dask's threaded ``get``, so that a
    dense map computed together with other dask arrays (``dask.compute(a, b)``) is not
    refused for "differing default schedulers"; the first collection's scheduler runs all."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))

    def __repr__(self) -> str:
        return f"LocalScheduler(workers={self.workers})"

    def __eq__(self, other: object) -> bool:
        import dask.threaded

        return isinstance(other, LocalScheduler) or other is dask.threaded.get

    def __hash__(self) -> int:
        return hash(LocalScheduler)

    def __call__(self, dsk: Mapping[Any, Any], keys: Sequence[Any] | Any, **kwargs: Any
                 ) -> Any:
        import dask.local
        import dask.threaded

        workers = kwargs.pop("num_workers", None) or self.workers
        kwargs.pop("pool", None)
        if workers == 1:
            return dask.local.get_sync(dsk, keys, **kwargs)
        return dask.threaded.get(dsk, keys, pool=pool(workers), **kwargs)


def scheduled(array: Any, workers: int) -> Any:
    """``array`` (a dask array) computed by :class:`LocalScheduler` ``(workers)`` by default."""
    array.__dask_scheduler__ = LocalScheduler(workers)
    return array


Call = Any  # a task's call: no arguments, returns its chunks' (K, *cells) float32 blocks


class DenseArray(da.Array):  # type: ignore[misc]
    """A dense map read from an image: a dask array over plain tasks, each a batch of one or
    more chunks (:mod:`fc2conv.dense.batch`), computed directly when Dask would use its own
    :class:`LocalScheduler` (see the module).

    ``calls``: ``(wheres, call)`` per task, ``wheres`` the map slices of its chunks, in the
    order of the blocks ``call()`` returns; ``tasks``: the graph of those calls; ``members``:
    the block indices of each task's chunks (each block's key is ``(name, 0, *index)``, an
    item of its task's result); ``before``: :class:`~fc2conv.dense.readers.StageMap` s the
    calls read, computed before them and released after (``extra``: their tasks in the
    graph, which the calls' tasks depend on)."""

    __slots__ = ()

    @classmethod
    def build(cls, name: str, chunks: tuple[tuple[int, ...], ...],
              calls: list[tuple[list[tuple[slice, ...]], Call]], tasks: dict[Any, Any],
              members: list[list[tuple[int, ...]]], workers: int,
              before: Sequence[Any] = (), extra: Mapping[Any, Any] | None = None
              ) -> DenseArray:
        import operator

        from dask.highlevelgraph import HighLevelGraph

        dsk = dict(tasks)
        for key, indices in zip(tasks, members, strict=True):
            for k, index in enumerate(indices):
                dsk[(name, 0, *index)] = (operator.getitem, key, k)
        dsk.update(extra or {})  # tasks the calls' tasks depend on
        array = cls(HighLevelGraph.from_collections(name, dsk, dependencies=()), name, chunks,
                    dtype=np.float32, meta=np.empty((0,) * len(chunks), np.float32))
        array.__dict__["_fc2conv_calls"] = calls
        array.__dict__["_fc2conv_before"] = tuple(before)
        return scheduled(array, workers)

    def compute(self, **kwargs: Any) -> Any:
        from dask.base import get_scheduler

        own = self.__dict__.get("__dask_scheduler__")
        calls = self.__dict__.get("_fc2conv_calls")
        if kwargs or calls is None or get_scheduler(collections=[self]) is not own:
            return super().compute(**kwargs)
        before = self.__dict__.get("_fc2conv_before", ())
        for stage in before:  # maps of earlier stages, computed here before the calls
            stage.materialize()
        try:
            return self._direct(calls, own.workers)
        finally:
            for stage in before:  # held only while this map is computed
                stage.release()

    def _direct(self, calls: list[tuple[list[tuple[slice, ...]], Call]], workers: int) -> Any:
        if len(calls) == 1 and len(calls[0][0]) == 1:  # the whole map: the block is the result
            return calls[0][1]()[0]
        out = np.empty(self.shape, np.float32)
        if workers == 1:
            for wheres, call in calls:
                for where, block in zip(wheres, call(), strict=True):
                    out[where] = block
        else:
            futures = [(wheres, pool(workers).submit(call)) for wheres, call in calls]
            for wheres, future in futures:
                for where, block in zip(wheres, future.result(), strict=True):
                    out[where] = block
        return out
