"""dense_map equals the untiled dense run fcn(image) at many tile sizes, for nets with and
without padding, ceil_mode pools, dilation and strides that do not divide the tile, in 2-D and
3-D; for window-exact nets it also equals sliding_window. References are float64 runs."""

import archs
import numpy as np
import pytest
import torch
from torch import nn

from fc2conv import convolutionalize, dense_map, receptive_field, sliding_window

EPS = float(np.finfo(np.float32).eps)


def _reference(fcn, image):
    """(float64 untiled map, float32 untiled map)."""
    x = torch.as_tensor(np.asarray(image))
    with torch.no_grad():
        ref64 = fcn.double()(x.double()[None])[0].numpy()
        ref32 = fcn.float()(x.float()[None])[0].numpy()
    return ref64, ref32


def _check(result, ref64, ref32):
    got = np.asarray(result)
    assert got.shape == ref64.shape
    scale = float(np.abs(ref64).max()) + 1.0
    err_tiled = float(np.abs(got - ref64).max())
    err_untiled = float(np.abs(ref32 - ref64).max())
    # tiled and untiled float32 runs round alike; a cell computed from the wrong window or
    # from a tile's border padding is off by O(scale)
    assert err_tiled <= 4 * err_untiled + 64 * EPS * scale, (err_tiled, err_untiled)
    return err_tiled


def _padded_ceil_dilated():
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(6, 4, 4)).eval()


def _gap_fcn(width=8):
    """ResNetStyle's GAP classifier, convolutionalized by hand: the 32x32 global average pool
    becomes a stride-1 8x8 average pool, the fc a 1x1 conv with its weights."""
    torch.manual_seed(3)
    net = archs.ResNetStyle(width=width).eval()
    head = nn.Conv2d(2 * width, 10, 1)
    head.weight.data = net.fc.weight.data[:, :, None, None].clone()
    head.bias.data = net.fc.bias.data.clone()

    class Fcn(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.pool, self.head = net, nn.AvgPool2d(16, 1), head

        def forward(self, x):
            n = self.net
            x = n.layer2(n.layer1(torch.relu(n.bn1(n.conv1(x)))))
            return self.head(self.pool(x))

    return Fcn().eval()


@pytest.mark.parametrize("size", [(61, 83), (97, 64)])
def test_padded_ceil_dilated_net_any_tile(size):
    torch.manual_seed(0)
    fcn = _padded_ceil_dilated()
    image = np.random.default_rng(1).standard_normal((3, *size)).astype(np.float32)
    ref64, ref32 = _reference(fcn, image)
    fcn.float()
    errs = [_check(dense_map(fcn, image, tile=t), ref64, ref32) for t in (13, 20, 31, 47, 500)]
    assert max(errs) < 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_alexnet_style_classifier_on_the_fly(padded):
    torch.manual_seed(1)
    net = archs.AlexNetStyle(padded=padded).eval()
    shape = net.INPUT_SHAPE
    fcn = convolutionalize(net, shape)
    image = np.random.default_rng(2).uniform(0, 255, (3, 150, 171)).astype(np.float32)
    ref64, ref32 = _reference(fcn, (image - 100) / 50)
    fcn.float()
    for tile in (64, 77, 130):
        out = dense_map(net, image, input_shape=shape, tile=tile, mean=100.0, std=50.0)
        _check(out, ref64, ref32)
    if not padded:
        rf = receptive_field(fcn, shape)
        slid = sliding_window(net, torch.from_numpy((image - 100) / 50).float(),
                              rf.window_size, rf.stride)[0].numpy()
        # the dense map may hold extra cells whose window hangs over the image edge by pixels
        # the field never reads (floor rounding); the windows sliding_window can cut agree
        common = np.asarray(out)[:, :slid.shape[1], :slid.shape[2]]
        assert np.asarray(out).shape[1] - slid.shape[1] <= 1
        _check(common, slid.astype(np.float64), slid)


def test_vgg_style_flatten_head():
    torch.manual_seed(2)
    net = archs.VGGStyle().eval()
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(3).standard_normal((3, 131, 117)).astype(np.float32)
    ref64, ref32 = _reference(fcn, image)
    fcn.float()
    for tile in (60, 89):
        _check(dense_map(fcn, image, tile=tile), ref64, ref32)


def test_gap_net_with_stride1_pool_and_residuals():
    fcn = _gap_fcn()
    image = np.random.default_rng(4).standard_normal((3, 70, 59)).astype(np.float32)
    ref64, ref32 = _reference(fcn, image)
    fcn.float()
    for tile in (33, 45):
        _check(dense_map(fcn, image, tile=tile), ref64, ref32)


def test_3d_net_ragged_edges():
    torch.manual_seed(5)
    fcn = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, ceil_mode=True),
                        nn.Conv3d(4, 3, 3, stride=2, dilation=1), nn.ReLU(),
                        nn.Conv3d(3, 3, 2)).eval()
    image = np.random.default_rng(5).standard_normal((2, 29, 23, 26)).astype(np.float32)
    ref64, ref32 = _reference(fcn, image)
    fcn.float()
    for tile in (14, 19):
        _check(dense_map(fcn, image, tile=tile), ref64, ref32)


def test_global_pool_model_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(ValueError, match="grow"):
        dense_map(net, np.zeros((3, 40, 40), np.float32), tile=16)


def test_classifier_without_input_shape_is_refused():
    net = archs.AlexNetStyle().eval()
    with pytest.raises(ValueError, match="input_shape"):
        dense_map(net, np.zeros((3, 80, 80), np.float32))
