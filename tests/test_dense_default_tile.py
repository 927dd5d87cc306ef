"""dense_map's default tile on the CPU (speed and memory, :func:`fc2conv.dense.plan.default_tile`):
its properties as pure arithmetic against the plan it makes (never more memory than the memory
rule, the halo bounded, at least one chunk per task, the whole image when small), and maps at
the default tile of images that it tiles, against independent float64 untiled runs."""

import logging
import math
import re

import archs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fc2conv import convolutionalize, dense_map
from fc2conv.dense import api
from fc2conv.dense.plan import MAX_HALO, WHOLE_CALLS, chunk_cells, default_tile, plan_tiles

EPS = float(np.finfo(np.float32).eps)


def _geometry(draw_n, size, jump, start):
    """The map length of an axis of ``draw_n`` pixels (PyTorch's floor rule)."""
    return (draw_n - size - 2 * start) // jump + 1


@st.composite
def _cases(draw):
    dims = draw(st.sampled_from([2, 2, 3]))
    top = 1500 if dims == 2 else 160
    size = tuple(draw(st.integers(3, 90)) for _ in range(dims))
    jump = tuple(draw(st.integers(1, min(16, s))) for s in size)
    start = tuple(-draw(st.integers(0, s // 2)) for s in size)
    image = tuple(draw(st.integers(s, max(s, top))) for s in size)
    maps = tuple(_geometry(n, s, j, a) for n, s, j, a in zip(image, size, jump, start,
                                                                strict=True))
    bpp = draw(st.floats(6.0, 2000.0))
    whole = draw(st.sampled_from([2.0**20, 2.0**26, 2.0**30]))
    per_task = whole / draw(st.integers(1, 8))
    call = draw(st.sampled_from([2.0**16, 2.0**18, 2.0**20, 2.0**22]))
    tasks = draw(st.integers(1, 8))
    return image, size, jump, start, maps, bpp, whole, per_task, call, tasks


def _plan(tile, image, size, jump, start, maps):
    cells = chunk_cells(tile, image, maps, size, jump)
    return plan_tiles(image, maps, size, jump, start, cells)


@given(_cases())
def test_default_tile_properties(case):
    image, size, jump, start, maps, bpp, whole, per_task, call, tasks = case
    memory = default_tile(image, size, bpp, whole, per_task)
    tile = default_tile(image, size, bpp, whole, per_task, stride=jump, start=start,
                        map_size=maps, call_bytes=call, tasks=tasks)
    assert all(1 <= t <= n for t, n in zip(tile, image, strict=True))
    pixels = math.prod(image)
    if pixels * bpp <= whole and pixels <= WHOLE_CALLS * call / bpp:
        assert tile == image  # small enough: one call, the untiled run
    if tile == memory:
        return
    plan = _plan(tile, image, size, jump, start, maps)
    # never more memory than the memory rule: no tile larger on any axis
    assert all(t <= m for t, m in zip(plan.max_tile(), memory, strict=True))
    # the halo bounded: the tiles read at most (1 + MAX_HALO) x the image's pixels
    read = sum(math.prod(c.b - c.a for c in chunks) for _, chunks in plan.blocks())
    assert read <= (1 + MAX_HALO) * pixels
    assert len(plan) >= tasks  # no core left idle for want of a chunk
    # a speed tile is taken only for an image of more than WHOLE_CALLS calls
    assert pixels > WHOLE_CALLS * call / bpp


def test_default_tile_measured_nets():
    """AlexNet-style (field 57, stride 8, 12 bytes of largest activation per pixel, x6 for a
    tile's memory) and VGG-style (70, 8, padding 7, 32) geometries with a 32 MiB cache on
    2 cores (call: 32 MiB / 4 / 2 of largest activation): the whole image at 768^2 for
    AlexNet, tiles within the cache at 3072^2; on a GPU (no call budget) the whole image."""
    def tile(n, size, start, bpp, tasks=2):
        maps = (_geometry(n, size, 8, start),) * 2
        return default_tile((n, n), (size, size), 6 * bpp, 2**30, 2**30 / tasks, stride=(8, 8),
                            start=(start, start), map_size=maps,
                            call_bytes=6 * 32 * 2**20 / 4 / tasks, tasks=tasks), maps

    assert tile(768, 57, 0, 12)[0] == (768, 768)
    for n, size, start, bpp in ((3072, 57, 0, 12), (3072, 70, -7, 32), (1536, 70, -7, 32)):
        got, maps = tile(n, size, start, bpp)
        plan = _plan(got, (n, n), (size, size), (8, 8), (start, start), maps)
        read = sum(math.prod(c.b - c.a for c in ch) for _, ch in plan.blocks())
        assert len(plan) >= 4 and read <= 1.3 * n * n
        if bpp == 12:  # in the cache: at most 4 MiB of largest activation per tile
            assert math.prod(plan.max_tile()) * bpp <= 4 * 2**20
    assert default_tile((3072, 3072), (57, 57), 72, 2**30, 2**29) == (3072, 3072)


def _ref64(net, image):
    with torch.no_grad():
        return net.double()(torch.as_tensor(image).double()[None])[0].numpy(), net.float()


def _check(got, ref64, net, image):
    with torch.no_grad():
        ref32 = net(torch.as_tensor(image)[None])[0].numpy()
    got = np.asarray(got)
    assert got.shape == ref64.shape
    scale = float(np.abs(ref64).max()) + 1.0
    err = float(np.abs(got - ref64).max())
    assert err <= 4 * float(np.abs(ref32 - ref64).max()) + 64 * EPS * scale, err


def _chunks(caplog, image):
    """The chunks of the last map (its last stage), from dense_map's log; its default tile
    must be smaller than the image."""
    found = re.findall(r"in (\d+) chunks", caplog.text)
    tile = re.findall(r"default tile \(([\d, ]+)\) px", caplog.text)
    assert found and tile, caplog.text
    sides = tuple(int(t) for t in tile[-1].split(","))
    assert sides != image.shape[1:] and all(t <= n for t, n in zip(sides, image.shape[1:],
                                                                     strict=True))
    caplog.clear()
    return int(found[-1])


@pytest.fixture
def small_cache(monkeypatch, caplog):
    """A 4 MiB last-level cache: the default tiles images of a few 10^5 pixels (the rule is
    the same at any cache size; the images of a real cache take seconds to map)."""
    monkeypatch.setattr(api, "_last_cache", lambda: 4.0 * 2**20)
    caplog.set_level(logging.INFO, logger="fc2conv.dense")


@pytest.mark.parametrize("threads", [1, 2])
def test_default_tiles_a_large_in_memory_image_exactly(small_cache, caplog, threads):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 16, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.Conv2d(16, 5, 3)).eval()
    image = np.random.default_rng(1).standard_normal((3, 301, 257)).astype(np.float32)
    one = dense_map(net, image, threads=threads, stages=1)
    assert _chunks(caplog, image) >= 2 * threads  # tiled: several chunks
    out = dense_map(net, image, threads=threads)  # auto stages, reading the default tile
    _chunks(caplog, image)
    ref64, net32 = _ref64(net, image)
    _check(one, ref64, net32, image)
    _check(out, ref64, net32, image)


def test_default_tiles_a_3d_volume_exactly(small_cache, caplog):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv3d(2, 24, 3, padding=1), nn.ReLU(),
                        nn.MaxPool3d(2, ceil_mode=True), nn.Conv3d(24, 6, 3, stride=2),
                        nn.ReLU(), nn.Conv3d(6, 3, 2)).eval()
    image = np.random.default_rng(3).standard_normal((2, 45, 38, 51)).astype(np.float32)
    one = dense_map(net, image, threads=2, stages=1)
    assert _chunks(caplog, image) >= 2
    out = dense_map(net, image, threads=2)
    _chunks(caplog, image)
    ref64, net32 = _ref64(net, image)
    _check(one, ref64, net32, image)
    _check(out, ref64, net32, image)


def test_default_tile_of_a_convolutionalized_classifier_with_stages(small_cache, caplog):
    """AlexNet-style, convolutionalized: the default tiles the image, the auto staged plan
    reads that tile, and the map equals the untiled float64 run."""
    torch.manual_seed(4)
    net = archs.AlexNetStyle(padded=True).eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(5).standard_normal((3, 740, 661)).astype(np.float32)
    out = dense_map(fcn, image, threads=2)
    _chunks(caplog, image)
    ref64, net32 = _ref64(fcn, image)
    _check(out, ref64, net32, image)


def test_last_cache_is_read_and_bounded():
    size = api._last_cache()
    assert 4 * 2**20 <= size <= 512 * 2**20


def test_a_cpu_batch_stays_within_the_cache_share(small_cache):
    """Batched tiles (fc2conv.dense.batch) hold no more pixels a call than the default tile's
    cache share allows (else a batch of default tiles spills out of the cache again); the
    batched map still equals the float64 run."""
    from fc2conv.dense import model as dmodel

    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 3, stride=2)).eval()
    image = np.random.default_rng(7).standard_normal((3, 300, 280)).astype(np.float32)
    fcn, geo = dmodel.prepare(net, (3, 256, 256), image.shape, convert=False, device="cpu")
    _, plan = api._plan((40, 40), geo.image_size, geo.map_size, geo.size, geo.stride,
                        geo.start)
    share = 4 * 2**20 / api.CACHE_SHARE / geo.bytes_per_pixel  # one task's call, in pixels
    n = api._batch(geo, "cpu", plan, 1, None)
    assert 2 <= n <= share // math.prod(plan.max_tile())
    assert n * math.prod(plan.max_tile()) < 2**19  # tighter than CPU_PIXELS here
    ref64, net32 = _ref64(net, image)
    _check(dense_map(net, image, tile=40, threads=1), ref64, net32, image)
