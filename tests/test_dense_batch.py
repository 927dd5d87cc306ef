"""Batched tiles (fc2conv.dense.batch): same-shaped tiles run as one model call give the map of
the untiled float64 run (dtype-derived tolerance), the same bits as one call per tile where
torch's kernels compute each sample alike (oneDNN and NNPACK off), in 2-D and 3-D, with padding,
ceil_mode pools and dilation, at tiles no stride divides, on images with ragged edges; a run
killed in the middle of a batch resumes from the chunks it committed."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fc2conv import Fc2ConvError, dense_map
from fc2conv.dense import batch as dbatch
from fc2conv.dense.writer import MapStore

EPS = float(np.finfo(np.float32).eps)


def _net2d(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(6, 4, 4)).eval()


def _net3d(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, 2, ceil_mode=True),
        nn.Conv3d(4, 4, 3, dilation=2), nn.ReLU(), nn.Conv3d(4, 3, 2)).eval()


class _Batches:
    """Records the batch size of every real (not shape-only) call of the net's first layer."""

    def __init__(self, net):
        self.sizes = []
        net[0].register_forward_pre_hook(self._record)

    def _record(self, _module, args):
        if not isinstance(args[0], FakeTensor):
            self.sizes.append(int(args[0].shape[0]))


def _ref64(net, image):
    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.from_numpy(image).double()[None])[0].numpy()


def _close(got, ref, layers):
    """Within float32 rounding of the float64 run: a cell from a wrong window, a tile's own
    border padding or a sample of another tile is off by O(scale)."""
    got = np.asarray(got)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max()) + 1.0
    assert np.abs(got - ref).max() <= 16 * layers * EPS * scale


CASES = [  # (net, image shape, tiles) -- sizes no stride divides, tiles that divide nothing
    (_net2d, (3, 97, 83), [23, 37, (29, 41)]),
    (_net3d, (2, 27, 31, 22), [13, (17, 11, 19)]),
]


@pytest.mark.parametrize(("make", "shape", "tiles"), CASES, ids=["2d", "3d"])
def test_batched_equals_unbatched_and_untiled(make, shape, tiles):
    seed = int(np.random.SeedSequence().generate_state(1)[0])  # fresh inputs every run
    net = make(seed % 1000)
    image = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ref = _ref64(net, image)
    seen = _Batches(net)
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(
            enabled=False):  # torch's per-sample kernels: the same bits whatever the batch
        for tile in tiles:
            seen.sizes.clear()
            one = np.asarray(dense_map(net, image, tile=tile, threads=1, batch=1))
            assert set(seen.sizes) == {1} and len(seen.sizes) > 4
            chunks = len(seen.sizes)
            seen.sizes.clear()
            batched = np.asarray(dense_map(net, image, tile=tile, threads=1))
            assert max(seen.sizes) > 1 and sum(seen.sizes) == chunks  # each chunk once
            np.testing.assert_array_equal(batched, one)
            _close(batched, ref, len(net))
            capped = np.asarray(dense_map(net, image, tile=tile, threads=1, batch=2))
            np.testing.assert_array_equal(capped, one)
    # with oneDNN's and NNPACK's kernels (the default) a batch may round differently: exact
    for tile in tiles:
        _close(dense_map(net, image, tile=tile, threads=1), ref, len(net))


def test_batched_on_the_pool_with_normalization_and_uint8():
    net = _net2d(5)
    pixels = np.random.default_rng(6).integers(0, 256, (3, 88, 75), dtype=np.uint8)
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 70.0]
    x = (pixels.astype(np.float64) - np.array(mean)[:, None, None]) / np.array(std)[:, None,
                                                                                    None]
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(torch.from_numpy(x)[None])[0].numpy()
    seen = _Batches(net)
    got = dense_map(net, pixels, tile=27, threads=2, mean=mean, std=std)
    _close(got, ref, len(net))
    assert max(seen.sizes) > 1
    assert np.array_equal(pixels, np.random.default_rng(6).integers(0, 256, (3, 88, 75),
                                                                    dtype=np.uint8))


def test_a_run_killed_mid_batch_resumes_from_its_committed_chunks(tmp_path, monkeypatch):
    net = _net2d(7)
    image = np.random.default_rng(8).standard_normal((3, 90, 70)).astype(np.float32)
    ref = _ref64(net, image)
    out = tmp_path / "m.zarr"
    seen = _Batches(net)
    real = MapStore.write
    written = []

    def dies_on_the_fourth(self, index, origin, block):
        if len(written) == 3:
            raise RuntimeError("killed")
        written.append(index)
        return real(self, index, origin, block)

    monkeypatch.setattr(MapStore, "write", dies_on_the_fourth)
    with pytest.raises(RuntimeError, match="killed"):  # one stage (staged: test_dense_staged)
        dense_map(net, image, tile=25, out=out, threads=1, stages=1)
    assert max(seen.sizes) > 3  # the fourth chunk died inside a batch
    done = {p.name for p in (out / ".fc2conv-done").iterdir()}
    assert done == {".".join(map(str, i)) for i in written}
    monkeypatch.setattr(MapStore, "write", real)
    progress = []
    result = dense_map(net, image, tile=25, out=out, threads=1, stages=1,
                       progress=lambda d, t: progress.append((d, t)))
    total = progress[0][1]
    assert progress[0] == (3, total) and progress[-1] == (total, total)
    _close(result, ref, len(net))


def test_batch_must_be_positive():
    with pytest.raises(Fc2ConvError, match="batch"):
        dense_map(_net2d(1), np.zeros((3, 60, 60), np.float32), tile=25, batch=0)


def _chunk(index, shape):
    return (index, tuple(slice(0, n) for n in shape), (), ())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([(5, 7), (5, 6), (4, 7), (4, 6)]), min_size=1, max_size=30),
       st.integers(1, 12))
def test_batches_group_by_shape_evenly_and_keep_every_chunk_once(shapes, batch):
    chunks = [_chunk((i,), s) for i, s in enumerate(shapes)]
    groups = dbatch.batches(chunks, batch)
    assert sorted(c[0] for g in groups for c in g) == [c[0] for c in chunks]
    for group in groups:
        assert len({tuple(w.stop for w in c[1]) for c in group}) == 1
        assert 1 <= len(group) <= batch
        assert [c[0] for c in group] == sorted(c[0] for c in group)  # the chunks' order
    for shape in set(shapes):
        sizes = [len(g) for g in groups if tuple(w.stop for w in g[0][1]) == shape]
        assert max(sizes) - min(sizes) <= 1 and len(sizes) == -(-shapes.count(shape) // batch)


def test_batch_size_fits_the_memory_and_spreads_over_the_workers():
    # 6 x 10 bytes per pixel x 100 pixels = 6000 bytes a tile
    assert dbatch.batch_size(10, (10, 10), 6000 * 7 + 1, 50, 1) == 7
    assert dbatch.batch_size(10, (10, 10), 100, 50, 1) == 1  # not even one fits: one anyway
    assert dbatch.batch_size(10, (10, 10), 6000 * 7, 50, 10) == 5  # 50 chunks over 10 workers
    assert dbatch.batch_size(10, (10, 10), 6e9, 9, 2) == 5
    # on the CPU a call takes at most CPU_PIXELS input pixels: 2^19 / 100^2 = 52 tiles
    assert dbatch.batch_size(1e-3, (100, 100), 6e9, 1000, 1, dbatch.CPU_PIXELS) == 52
    assert dbatch.batch_size(1e-3, (1000, 1000), 6e9, 1000, 1, dbatch.CPU_PIXELS) == 1


def test_a_setting_changed_in_place_is_not_served_from_the_cache():
    """The cached dense net and geometry key on the module tree's settings, not only on its
    weights: a conv's dilation changed in place gives the new net's map."""
    net = _net2d(9)
    image = np.random.default_rng(10).standard_normal((3, 70, 66)).astype(np.float32)
    first = np.asarray(dense_map(net, image, tile=30, threads=1))
    _close(first, _ref64(net, image), len(net))
    net[3].dilation = (1, 1)  # same module, same weights
    second = np.asarray(dense_map(net, image, tile=30, threads=1))
    ref = _ref64(net, image)
    assert second.shape != first.shape
    _close(second, ref, len(net))
