"""Issue 10: global-average-pool classifiers get a dense map (the default mode).

Each cell of the map of a larger image must equal the original classifier run on that cell's
window (a crop of the training size), computed in float64 by the original model: exactly (to
rounding) for a padding-free net, whose cells see only their window.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_refs import assert_matches_reference, reference

from fc2conv import convolutionalize


class PadFreeGap(nn.Module):
    """Valid convs, a global average pool and a head with LayerNorm over the features,
    BatchNorm1d, GELU and dropout (a ConvNeXt / MobileNet style head)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3, 2),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(12)
        self.fc1 = nn.Linear(12, 10)
        self.bn = nn.BatchNorm1d(10)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.3, inplace=True)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.flatten(self.pool(self.features(x)), 1))
        return self.fc2(self.drop(self.act(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("stride_cells", [(0, 0), (2, 3)])
def test_dense_cells_equal_the_classifier_on_their_window(stride_cells):
    torch.manual_seed(4)
    model = PadFreeGap().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    shape = (3, 17, 17)
    dense = convolutionalize(model, shape)
    x = torch.randn(2, *shape)
    assert_matches_reference(dense(x), model, x)  # training size: (N, 4, 1, 1), the logits
    big = torch.randn(1, 3, 17 + 2 * 4, 17 + 2 * 6)
    out = dense(big)
    assert out.shape == (1, 4, 5, 7)  # one cell per stride-2 window position
    i, j = stride_cells
    crop = big[..., 2 * i:2 * i + 17, 2 * j:2 * j + 17]
    want = reference(model, crop)[0]
    got = out[0, :, i, j].double()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale


def test_keep_and_drop_modes_still_there():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    big = torch.randn(1, 3, 20, 20)
    keep = convolutionalize(model, (3, 10, 10), global_pool="keep")
    assert_matches_reference(keep(big), model, big)  # the logits at any size
    drop = convolutionalize(model, (3, 10, 10), global_pool="drop")
    assert drop(big).shape == (1, 3, 18, 18)  # per-position scores before the pool
