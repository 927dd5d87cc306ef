"""convolutionalize + receptive_field + is_window_exact + sliding_window over the reference
classifiers: equal logits at the training size, dense maps on larger images, windows."""

from __future__ import annotations

import logging

import archs
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_refs import assert_matches_reference, reference

from fc2conv import (
    convolutionalize,
    is_window_exact,
    receptive_field,
    sliding_window,
)
from fc2conv.errors import Fc2ConvError

MODELS = archs.classifiers()
WINDOW_EXACT = {"lenet5", "alexnet_valid", "channels_last_head"}


def _linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_logits_at_training_size(name):
    model = MODELS[name]
    shape = model.INPUT_SHAPE
    dense = convolutionalize(model, shape)
    assert _linears(dense) == 0
    x = torch.randn(3, *shape)
    out = dense(x)
    assert out.shape == (3, model(x).shape[1], 1, 1)
    assert_matches_reference(out, model, x)
    # the original is untouched
    assert _linears(model) > 0 or name == "channels_last_head"


@pytest.mark.parametrize("name", sorted(WINDOW_EXACT))
def test_dense_cells_equal_classifier_on_their_windows(name):
    model = MODELS[name]
    shape = model.INPUT_SHAPE
    dense = convolutionalize(model, shape)
    rf = receptive_field(dense, shape)
    assert rf.exact and rf.window_size == shape[1:]
    big = (shape[1] + 3 * rf.stride[0], shape[2] + 2 * rf.stride[1] + 1)
    image = torch.randn(1, shape[0], *big)
    scores = dense(image)
    rows, cols = rf.windows_inside(big)
    assert (rows, cols) == (4, 3)
    assert scores.shape[2] >= rows and scores.shape[3] >= cols
    ref_model = model.double()
    try:
        for i, j in [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (1, 1)]:
            top, left, bottom, right = rf.window(i, j)
            crop = image[..., top:bottom, left:right]
            ref = ref_model(crop.double())[0]
            got = scores[0, :, i, j].double()
            tol = 64 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
            assert (got - ref).abs().max().item() <= tol, (i, j)
    finally:
        model.float()


@pytest.mark.parametrize("name", ["alexnet_padded", "vgg"])
def test_padded_nets_are_not_window_exact_by_a_measured_amount(name):
    model = MODELS[name]
    dense = convolutionalize(model, model.INPUT_SHAPE)
    rf = receptive_field(dense, model.INPUT_SHAPE)
    assert not rf.exact and "pads by" in rf.reason
    check = is_window_exact(dense, model.INPUT_SHAPE)
    assert not check
    assert check.max_abs_error > 1e-4  # far above float error: padding is not image content
    assert "pads by" in str(check)


def test_classifiers_are_convolutionalized_for_their_field():
    model = MODELS["lenet5"]
    direct = receptive_field(model, model.INPUT_SHAPE)
    assert direct == receptive_field(convolutionalize(model, model.INPUT_SHAPE),
                                     model.INPUT_SHAPE)
    assert direct.stride == (4, 4) and direct.size == (32, 32) and direct.exact
    assert is_window_exact(model, model.INPUT_SHAPE)


def test_window_exact_nets_measure_float_error_only():
    model = MODELS["alexnet_valid"]
    dense = convolutionalize(model, model.INPUT_SHAPE)
    check = is_window_exact(dense, model.INPUT_SHAPE)
    assert check and check.max_rel_error < 1e-5


def test_dense_map_equals_sliding_window_reference():
    model = MODELS["alexnet_valid"]
    shape = model.INPUT_SHAPE
    dense = convolutionalize(model, shape)
    rf = receptive_field(dense, shape)
    image = torch.randn(2, 3, 90, 80)
    slid = sliding_window(model, image, rf.window_size, rf.stride, batch_size=5)
    rows, cols = rf.windows_inside((90, 80))
    assert slid.shape == (2, 10, rows, cols)
    got = dense(image)[..., :rows, :cols]
    eps = torch.finfo(torch.float32).eps
    assert (got - slid).abs().max().item() <= 64 * eps * slid.abs().max().item()


def test_sliding_window_crops_independently():
    """Against a plain loop over crops (independent of unfold)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 2, 4)).eval()
    image = torch.randn(2, 8, 9)
    out = sliding_window(model, image, (5, 4), (3, 2), batch_size=3)
    assert out.shape == (1, 4, 2, 3)
    for i in range(2):
        for j in range(3):
            crop = image[None, :, 3 * i:3 * i + 5, 2 * j:2 * j + 4]
            torch.testing.assert_close(out[0, :, i, j], model(crop)[0], rtol=0, atol=1e-6)
    with pytest.raises(Fc2ConvError, match="does not fit"):
        sliding_window(model, image, 10, 1)


def test_vgg_identity_pool_is_dropped_and_said(caplog):
    model = MODELS["vgg"]
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        dense = convolutionalize(model, model.INPUT_SHAPE)
    assert "dropped 'avgpool'" in caplog.text
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in dense.modules())


def test_vgg_non_identity_pool_is_folded_exactly():
    model = MODELS["vgg"]
    dense = convolutionalize(model, (3, 112, 112))  # map 14x14 -> adaptive 7x7 = avg pool 2
    assert isinstance(dense.get_submodule("avgpool"), nn.AvgPool2d)
    x = torch.randn(2, 3, 112, 112)
    assert_matches_reference(dense(x), model, x)
    assert receptive_field(dense, (3, 112, 112)).stride == (16, 16)
    assert dense(torch.randn(1, 3, 144, 128)).shape[2:] == (3, 2)  # 112 + 2 x 16, 112 + 16


def test_non_foldable_adaptive_pool_is_refused_with_a_sentence():
    model = MODELS["vgg"]
    with pytest.raises(Fc2ConvError, match=r"'avgpool' .*windows have sizes 2 and 3 and overlap"):
        convolutionalize(model, (3, 80, 80))  # map 10x10 -> 7x7


def test_resnet_global_pool_keep_and_drop():
    model = MODELS["resnet"]
    shape = model.INPUT_SHAPE
    keep = convolutionalize(model, shape, global_pool="keep")
    drop = convolutionalize(model, shape, global_pool="drop")
    x = torch.randn(2, *shape)
    assert_matches_reference(keep(x), model, x)
    big = torch.randn(1, 3, 48, 40)
    assert keep(big).shape == (1, 10, 1, 1)
    assert_matches_reference(keep(big), model, big)  # GAP: any size is still the classifier
    scores = drop(x)
    assert scores.shape == (2, 10, 16, 16)
    # the pre-pool map averages to the logits: mean_p (W x_p + b) = W mean_p x_p + b
    ref = reference(model, x)
    torch.testing.assert_close(scores.double().mean((2, 3)), ref, rtol=1e-5, atol=1e-5)
    rf = receptive_field(drop, shape)
    assert rf.stride == (2, 2) and not rf.exact
    check = is_window_exact(drop, shape)  # crops' maps vs the big map: borders differ
    assert not check and check.max_abs_error > 1e-3 and check.cells == 3 * 16 * 16
    with pytest.raises(Fc2ConvError, match="global pooling"):
        receptive_field(keep, shape)


def test_global_pool_drop_refuses_nonlinear_head():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc1 = nn.Linear(4, 5)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)
            return self.fc2(F.relu(self.fc1(x)))

    model = Head().eval()
    keep = convolutionalize(model, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert_matches_reference(keep(x), model, x)
    with pytest.raises(Fc2ConvError, match="not affine"):
        convolutionalize(model, (3, 8, 8), global_pool="drop")


def test_mobilenet_mean_pool_head():
    model = MODELS["mobilenet"]
    drop = convolutionalize(model, model.INPUT_SHAPE, global_pool="drop")
    x = torch.randn(2, *model.INPUT_SHAPE)
    ref = reference(model, x)
    torch.testing.assert_close(drop(x).double().mean((2, 3)), ref, rtol=1e-5, atol=1e-5)


def test_channels_last_flatten_and_exported_program():
    model = MODELS["alexnet_valid"]
    shape = model.INPUT_SHAPE
    program = torch.export.export(model, (torch.randn(2, *shape),))
    dense = convolutionalize(program, shape)
    x = torch.randn(3, *shape)  # batch 3: the export guards are gone
    assert_matches_reference(dense(x), model, x)
    assert dense(torch.randn(1, 3, 80, 71)).shape[2:] == (3, 2)
    assert isinstance(dense.get_submodule("classifier.1"), nn.Conv2d)


def test_refusals_name_the_layer():
    class BN1dFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm1d(2 * 4 * 4)
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x).flatten(1)))

    with pytest.raises(Fc2ConvError, match="'bn'.*normalizes each pixel"):
        convolutionalize(BN1dFirst().eval(), (1, 6, 6))
    with pytest.raises(Fc2ConvError, match="no flatten"):
        convolutionalize(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), (1, 6, 6))
    with pytest.raises(Fc2ConvError, match="does not run on inputs of shape 2x3x40x40"):
        convolutionalize(MODELS["lenet5"], (3, 40, 40))


def test_batchnorm1d_and_softmax_in_head():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 8), nn.BatchNorm1d(8),
                          nn.ReLU(), nn.Linear(8, 4), nn.Softmax(dim=-1))
    archs.randomize_batchnorm(model)
    model.eval()
    dense = convolutionalize(model, (2, 5, 5))
    x = torch.randn(3, 2, 5, 5)
    assert_matches_reference(dense(x), model, x)
    scores = dense(torch.randn(1, 2, 9, 9))
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 5, 5))  # softmax over classes


class _Flat(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(2, 3, 3, stride=2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        x = self.conv(x)
        if self.form == "module":
            x = self.flat(x)
        elif self.form == "function":
            x = torch.flatten(x, 1)
        elif self.form == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.fc(x)


@pytest.mark.parametrize("form", ["module", "function", "view", "reshape"])
def test_flatten_forms_are_alike(form):
    model = _Flat(form).eval()
    dense = convolutionalize(model, (2, 7, 7))
    x = torch.randn(2, 2, 7, 7)
    assert_matches_reference(dense(x), model, x)
    big = torch.randn(1, 2, 11, 9)
    scores = dense(big)
    assert scores.shape == (1, 4, 3, 2)
    rf = receptive_field(dense, (2, 7, 7))
    top, left, bottom, right = rf.window(2, 1)
    assert_matches_reference(scores[..., 2, 1], model, big[..., top:bottom, left:right])


def test_misaligned_branches_are_refused():
    class TwoBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 2, 2, stride=2)  # 8 -> 4, one cell per 2 pixels
            self.b = nn.Conv2d(1, 2, 5)  # 8 -> 4, one cell per pixel

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(Fc2ConvError, match="do not align: one steps 2 input pixels"):
        receptive_field(TwoBranch().eval(), (1, 8, 8))


def test_sliding_window_progress_bar_runs():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)).eval()
    image = torch.randn(1, 1, 12, 12)
    shown = sliding_window(model, image, 3, 1, batch_size=4, progress=True)
    plain = sliding_window(model, image, 3, 1, batch_size=100, progress=False)
    torch.testing.assert_close(shown, plain)
    assert shown.shape == (1, 3, 10, 10)


def test_valid_fully_convolutional_maps_are_window_exact():
    """A net whose output is a map already: crops' maps equal the big map's cells."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3),
                          nn.Conv2d(3, 5, 1)).eval()
    rf = receptive_field(model, (2, 16, 16))
    assert (rf.size, rf.stride, rf.padding) == ((8, 8), (2, 2), (0, 0))
    assert rf.window(1, 2) == (2, 4, 10, 12)  # the receptive field of cell (1, 2)
    check = is_window_exact(model, (2, 16, 16))
    assert check and check.max_rel_error < 1e-5
