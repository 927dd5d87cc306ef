"""Where dense_map's tasks run (fc2conv.dense.schedule): a map computed one chunk at a time runs
in the calling thread (no hand-off to a pool thread), larger schedules on one thread pool the
process keeps and reuses, Dask's own path when the caller asks for a scheduler; and a chunk
spanning the image reads the caller's pixels without a copy; chunks along an axis are even.
Every map is checked against a float64 untiled run on a random image with ragged edges. These
tests assert where work runs and what it reads, never how fast."""

import copy
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fc2conv import dense_map
from fc2conv.dense import model as dmodel
from fc2conv.dense import schedule
from fc2conv.dense.plan import chunk_cells, plan_tiles

EPS = float(np.finfo(np.float32).eps)


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(6, 6, 3, dilation=2), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, stride=2)).eval()


def _image(seed, h=93, w=77):  # sizes no stride divides: ragged last chunks
    return np.random.default_rng(seed).standard_normal((3, h, w)).astype(np.float32)


def _ref64(net, image):
    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.from_numpy(image).double()[None])[0].numpy()


def _close(got, ref):
    got = np.asarray(got)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 64 * EPS * (np.abs(ref).max() + 1)


class _Threads:
    """Records the thread of every real (not shape-only) call of the net's first conv (a
    forward pre-hook; dense_map runs this very module, which it has no reason to copy)."""

    def __init__(self, net):
        self.seen = []
        net[0].register_forward_pre_hook(self._record)

    def _record(self, _module, args):
        if not isinstance(args[0], FakeTensor):
            self.seen.append(threading.current_thread())


def test_a_one_chunk_map_runs_in_the_calling_thread():
    net, image = _net(1), _image(2)
    ref = _ref64(net, image)
    calls = _Threads(net)
    lazy = dense_map(net, image)  # the default tile: the whole image, one chunk
    assert lazy.numblocks == (1, 1, 1)
    got = np.asarray(lazy)
    assert calls.seen == [threading.current_thread()]
    _close(got, ref)


@pytest.mark.parametrize("store", [False, True])
def test_threads_1_runs_every_chunk_in_the_calling_thread(tmp_path, store):
    net, image = _net(3), _image(4)
    ref = _ref64(net, image)
    calls = _Threads(net)
    out = tmp_path / "m.zarr" if store else None
    seen = []
    got = dense_map(net, image, tile=31, threads=1, out=out, batch=1,  # a call per chunk
                    progress=lambda done, total: seen.append((done, total)),
                    stages=1)  # one stage: its tiles (staged maps: test_dense_staged)
    chunks = len(seen) - 1
    assert chunks > 4 and seen[-1] == (chunks, chunks)
    assert calls.seen == [threading.current_thread()] * chunks
    _close(got, ref)


def test_parallel_chunks_run_on_one_pool_reused_across_calls():
    net, image = _net(5), _image(6)
    calls = _Threads(net)
    ref = _ref64(net, image)
    _close(dense_map(net, image, tile=31, threads=2), ref)
    first = set(calls.seen)
    pool = schedule.pool(2)
    assert all(t.name.startswith(schedule.THREAD_PREFIX) for t in first)
    before = threading.active_count()
    calls.seen.clear()
    _close(dense_map(net, image, tile=29, threads=2), ref)  # another tiling, same pool
    assert schedule.pool(2) is pool and threading.active_count() == before
    assert set(calls.seen) <= set(pool._threads)  # type: ignore[attr-defined]
    assert threading.current_thread() not in calls.seen


def test_a_map_computes_with_other_dask_arrays_and_under_another_scheduler():
    net, image = _net(7), _image(8)
    ref = _ref64(net, image)
    lazy = dense_map(net, image, tile=40, threads=2, stages=1)  # staged: test_dense_staged
    other = da.ones((5,), chunks=2)
    got, ones = dask.compute(lazy, other)  # one default scheduler for both
    _close(got, ref)
    assert ones.tolist() == [1.0] * 5
    _, got2 = dask.compute(other, lazy)  # the plain array first
    _close(got2, ref)
    calls = _Threads(net)
    _close(lazy.compute(scheduler="threads"), ref)  # what the caller asks for still wins
    assert threading.current_thread() not in calls.seen
    calls.seen.clear()
    with dask.config.set(scheduler="threads"):  # and so does the configured scheduler
        _close(np.asarray(lazy), ref)
    assert calls.seen and threading.current_thread() not in calls.seen
    # the direct path (no Dask machinery) and Dask's own run the same calls: the same bits
    np.testing.assert_array_equal(np.asarray(lazy), lazy.compute(scheduler="sync"))
    _close(lazy[:, 2:9, 1:].compute(), ref[:, 2:9, 1:])  # a derived array: Dask's defaults


def test_a_chunk_spanning_the_image_reads_the_callers_pixels_without_a_copy():
    """The last chunk of an axis reads to the image's end, so a one-chunk plan's window is the
    whole image and the net's input shares the caller's buffer."""
    net, image = _net(9), _image(10, 94, 83)  # the last cells read to 93 and 81
    ref = _ref64(net, image)
    _, geo = dmodel.prepare(net, image.shape, image.shape, convert=False)
    plan = plan_tiles(geo.image_size, geo.map_size, geo.size, geo.stride, geo.start,
                      geo.map_size)
    assert [(ax[0].a, ax[-1].b) for ax in plan.axes] == [(0, 94), (0, 83)]
    for ax, n in zip(plan_tiles(geo.image_size, geo.map_size, geo.size, geo.stride, geo.start,
                                (5, 7)).axes, image.shape[1:], strict=True):
        assert len(ax) > 1 and ax[-1].b == n
    inputs = []
    net[0].register_forward_pre_hook(
        lambda _, args: None if isinstance(args[0], FakeTensor) else inputs.append(args[0]))
    got = np.asarray(dense_map(net, image))
    assert len(inputs) == 1 and inputs[0].data_ptr() == image.ctypes.data
    _close(got, ref)


def test_chunks_along_an_axis_are_even_and_within_the_tile():
    # 89 cells, a 384-px tile holds 41: three chunks of 30 (the last 29), not 41 + 41 + 7
    assert chunk_cells((384, 900), (768, 768), (89, 89), (63, 63), (8, 8)) == (30, 89)
    for m, c in [(89, 41), (10, 3), (100, 7), (5, 5), (6, 5)]:
        tile = 63 + (c - 1) * 8
        (q,) = chunk_cells((tile,), (10**6,), (m,), (63,), (8,))
        k = -(-m // c)
        assert q <= c and -(-m // q) == k  # as many chunks as full ones need, none larger
    net, image = _net(11), _image(12, 101, 90)
    ref = _ref64(net, image)
    _close(dense_map(net, image, tile=45), ref)  # even chunks, still exact
