"""dense_map's fast paths stay exact and side-effect free: the default tile (whole image when it
fits), the box-filter pool of dense GAP heads, the geometry cache (invalidated by new
weights), torch's thread count left alone, one worker per GPU (plan logic, device count
mocked), and the stitched-vs-untiled judge. References are float64 runs."""

import copy

import archs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import convolutionalize, dense_map, receptive_field
from fc2conv.dense import model as dmodel
from fc2conv.dense.check import check_stitched
from fc2conv.dense.plan import default_tile
from fc2conv.dense.pools import BoxMean, fast_pools

EPS = float(np.finfo(np.float32).eps)


def _ref64(net, image):
    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.as_tensor(image).double()[None])[0].numpy()


def _close(got, ref, factor=256):
    got = np.asarray(got)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= factor * EPS * (np.abs(ref).max() + 1)


@pytest.mark.parametrize("dims,kernel", [(1, (20,)), (2, (16, 16)), (2, (5, 9)), (3, (4, 5, 3))])
def test_box_mean_is_the_stride1_average_pool(dims, kernel):
    gen = torch.Generator().manual_seed(dims)
    x = torch.randn(2, 3, *(k + 11 for k in kernel), generator=gen) * 10 + 3
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    ref = pool(x.double(), kernel, 1)
    got = BoxMean(kernel)(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # float64 sums rounded once: within a float32 rounding of the exact mean
    assert float((got.double() - ref).abs().max()) <= 2 * EPS * float(ref.abs().max())


def test_fast_pools_replaces_large_stride1_pools_on_a_copy():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(8, 1), nn.AvgPool2d(2, 2),
                        nn.AvgPool2d(3, 1), nn.Conv2d(4, 2, 1)).eval()
    fast = fast_pools(net, owned=False)
    assert isinstance(net[1], nn.AvgPool2d)  # the caller's module is untouched
    assert isinstance(fast[1], BoxMean)
    assert isinstance(fast[2], nn.AvgPool2d) and isinstance(fast[3], nn.AvgPool2d)
    x = torch.randn(1, 3, 40, 37)
    with torch.no_grad():
        _close(fast(x).numpy()[0], _ref64(net, x[0].numpy()), 16)


def test_convolutionalized_gap_net_runs_the_box_filter_exactly():
    torch.manual_seed(4)
    net = archs.ResNetStyle().eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(6).standard_normal((3, 71, 58)).astype(np.float32)
    fast, _ = dmodel.prepare(fcn, net.INPUT_SHAPE, image.shape, convert=False)
    assert any(isinstance(m, BoxMean) for m in fast.modules())
    assert not any(isinstance(m, BoxMean) for m in fcn.modules())
    ref = _ref64(fcn, image)
    for tile in (None, 56):
        _close(dense_map(fcn, image, tile=tile), ref)


def test_default_tile_whole_image_when_it_fits_else_shared_over_axes():
    assert default_tile((500, 700), (57, 57), 12.0, whole=2**30, per_task=2**28) == (500, 700)
    tile = default_tile((40000, 40000), (70, 70), 100.0, whole=2**30, per_task=2**26)
    assert tile[0] == tile[1] and 100 * tile[0] * tile[1] <= 2**26
    assert tile[0] > 500
    # a thin image: the short axis whole, the long one takes the rest of the budget
    thin = default_tile((300, 100000), (70, 70), 100.0, whole=2**20, per_task=2**24)
    assert thin[0] == 300 and 100 * 300 * thin[1] <= 2**24 + 100 * 300
    # never less than two fields
    assert default_tile((5000, 5000), (101, 101), 1e6, whole=1, per_task=1) == (202, 202)


def test_default_tile_of_a_padded_net_is_one_chunk_with_border_cells():
    """A padded net has more cells than (N - size) / stride + 1; a tile spanning the image
    must still hold them all (one chunk, one model call)."""
    torch.manual_seed(1)
    net = archs.AlexNetStyle(padded=True).eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(2).standard_normal((3, 150, 171)).astype(np.float32)
    out = dense_map(fcn, image)
    assert out.numblocks == (1, 1, 1)
    _close(out, _ref64(fcn, image))


def test_torch_threads_are_left_as_they_were(tmp_path):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    image = np.random.default_rng(3).standard_normal((3, 60, 50)).astype(np.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        lazy = dense_map(net, image, tile=30, threads=2)
        assert torch.get_num_threads() == 3
        np.asarray(lazy)
        assert torch.get_num_threads() == 3
        dense_map(net, image, tile=30, threads=2, out=tmp_path / "m.zarr")
        assert torch.get_num_threads() == 3
        with dmodel.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(old)


def test_new_weights_are_not_served_from_the_geometry_cache():
    torch.manual_seed(5)
    net = archs.AlexNetStyle().eval()
    shape = net.INPUT_SHAPE
    image = np.random.default_rng(7).standard_normal((3, 90, 97)).astype(np.float32)
    first = np.asarray(dense_map(net, image, input_shape=shape))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1.5)  # in place: same tensors, new version
    second = np.asarray(dense_map(net, image, input_shape=shape))
    _close(second, _ref64(convolutionalize(net, shape), image))
    assert np.abs(second - first).max() > 1e-3


def test_geometry_is_the_receptive_field():
    fcn = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3))
    _, geo = dmodel.prepare(fcn, (3, 32, 32), (3, 64, 50), convert=False)
    rf = receptive_field(fcn, (3, 32, 32))
    assert geo.field == rf
    assert (geo.size, geo.stride, geo.start) == (rf.size, rf.stride, tuple(-p for p in
                                                                          rf.padding))
    assert geo.map_size == (30, 23) and geo.bytes_per_pixel > 0


def test_one_worker_per_gpu_plan(monkeypatch):
    assert dmodel.gpu_workers("cuda", None, None, 4) == 4
    assert dmodel.gpu_workers("cuda", None, None, 1) is None  # one GPU: threads in-process
    assert dmodel.gpu_workers("cuda:1", None, None, 4) is None  # a device chosen by the user
    assert dmodel.gpu_workers("cuda", 2, None, 4) == 2
    assert dmodel.gpu_workers("cuda", None, "tcp://x:8786", 4) is None
    assert dmodel.gpu_workers("cpu", None, None, 0) is None
    assert [dmodel.pinned_device("cuda", r, 3) for r in range(4)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert dmodel.pinned_device("cuda", 5, 1) == "cuda"
    assert dmodel.pinned_device("cpu", 1, 4) == "cpu"
    # dense_map asks torch how many GPUs there are and starts one worker per GPU
    seen = {}

    def fake_client(scheduler, workers):
        seen["workers"] = workers
        raise RuntimeError("stop here")

    from fc2conv.dense import api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**34, 2**35))
    monkeypatch.setattr(api, "_client", fake_client)
    net = nn.Sequential(nn.Conv2d(3, 2, 3)).eval()
    with pytest.raises(RuntimeError, match="stop here"):
        dense_map(net, np.zeros((3, 20, 20), np.float32), device="cuda", tile=10)
    assert seen["workers"] == 3


def test_stitch_check_passes_rounding_and_catches_a_wrong_cell():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.Conv2d(6, 4, 3, padding=1)).eval()
    image = np.random.default_rng(9).standard_normal((3, 77, 64)).astype(np.float32)
    ref = _ref64(net, image)
    with torch.no_grad():
        untiled = net(torch.from_numpy(image)[None])[0].numpy()
    tiled = np.asarray(dense_map(net, image, tile=29))
    verdict = check_stitched(tiled, untiled, ref)
    assert verdict.equal, verdict
    wrong = tiled.copy()
    wrong[1, 5, 7] += 0.01 * np.abs(ref).max()  # a cell from the wrong window is off by more
    verdict = check_stitched(wrong, untiled, ref)
    assert not verdict.equal and verdict.failing == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiles_equal_the_untiled_cuda_run_by_compares_rule():
    """On CUDA (TF32 convolutions allowed, cuDNN picking per-shape algorithms) the stitched
    map is judged against the untiled CUDA map with a float64 reference, not a fixed bound."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.Conv2d(16, 16, 3, dilation=2, padding=2), nn.ReLU(),
                        nn.Conv2d(16, 5, 4)).eval()
    image = np.random.default_rng(13).standard_normal((3, 301, 257)).astype(np.float32)
    ref = _ref64(net, image)
    gpu = copy.deepcopy(net).cuda()
    with torch.no_grad():
        untiled = gpu(torch.from_numpy(image)[None].cuda())[0].float().cpu().numpy()
    for tile in (None, 70, 129):
        verdict = check_stitched(np.asarray(dense_map(gpu, image, tile=tile)), untiled, ref,
                                 "cuda")
        assert verdict.equal, (tile, verdict)
    assert next(gpu.parameters()).is_cuda and next(net.parameters()).device.type == "cpu"


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_normalization_never_writes_the_callers_pixels(dtype):
    torch.manual_seed(14)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).eval()
    image = np.random.default_rng(15).integers(0, 256, (3, 41, 37)).astype(dtype)
    before = image.copy()
    mean, std = np.array([100.0, 120.0, 90.0]), np.array([50.0, 60.0, 55.0])
    for tile in (None, 20):
        got = dense_map(net, image, tile=tile, mean=mean, std=std)
        norm = (image.astype(np.float64) - mean[:, None, None]) / std[:, None, None]
        _close(got, _ref64(net, norm))
        np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("classifier", [False, True])
def test_training_mode_model_is_never_touched(classifier):
    """A model in training mode (BatchNorm updating its statistics, Dropout active) is mapped
    in eval mode on a copy: its training flags, running statistics and batch counters stay."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Dropout(0.5), nn.Conv2d(6, 4, 3, stride=2))
    shape = None
    if classifier:  # convolutionalized on the fly
        net.extend([nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)])
        shape = (3, 14, 14)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.5, 2)
    net.train()
    net[1].eval()  # a mixed mode: one module already in eval
    flags = [m.training for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = np.random.default_rng(12).standard_normal((3, 45, 41)).astype(np.float32)
    got = np.asarray(dense_map(net, image, input_shape=shape, tile=24))
    assert [m.training for m in net.modules()] == flags
    changed = [k for k, v in net.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == []
    fcn = copy.deepcopy(net).eval()
    if classifier:
        fcn = convolutionalize(fcn, shape)
    _close(got, _ref64(fcn, image))
