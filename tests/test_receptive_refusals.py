"""Refusals name the layer where a classifier head stops being convertible, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fc2conv import Fc2ConvError, convolutionalize, receptive_field


class DistilledHead(nn.Module):
    """DeiT/SwiftFormer-style: ``x.flatten(2).mean(-1)``, then two heads averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.head, self.dist_head = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(pixel_values).flatten(2).mean(-1)
        return {"logits": (self.head(x) + self.dist_head(x)) / 2}


class GlobalMax(nn.Module):
    """A head fine in itself, but no flatten or average pool before it: a global max."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(pixel_values).amax(dim=(2, 3)))


class SingleHead(DistilledHead):
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(pixel_values).flatten(2).mean(-1)
        return {"logits": torch.relu(self.head(x)) / 2}


def test_distillation_head_names_the_join_and_its_branches() -> None:
    with pytest.raises(Fc2ConvError) as err:
        convolutionalize(DistilledHead().eval(), (3, 16, 16))
    msg = str(err.value)
    assert "'head' and 'dist_head'" in msg and "joins 2 branches" in msg
    assert "pixel_values" not in msg and "must return one tensor" not in msg


def test_no_pool_before_the_head_names_the_op_not_the_input() -> None:
    with pytest.raises(Fc2ConvError) as err:
        convolutionalize(GlobalMax().eval(), (3, 12, 12))
    msg = str(err.value)
    assert "amax" in msg and "(read by 'fc')" in msg and "pixel_values" not in msg


def test_flatten_mean_pool_and_dict_output_convert() -> None:
    """``x.flatten(2).mean(-1)`` is a global average pool; a ``{"logits": ...}`` output is
    read as its logits. The dense map's cells equal the classifier on their windows (no
    padding here), checked against float64 crops."""
    model = SingleHead().double().eval()
    dense = convolutionalize(model, (3, 16, 16))
    x = torch.randn(1, 3, 20, 22, dtype=torch.float64)
    out = dense(x)["logits"]
    rf = receptive_field(dense, (3, 16, 16))
    assert out.shape[2:] == (3, 4) and rf.stride == (2, 2)
    for i, j in [(0, 0), (2, 3), (1, 2)]:
        top, left, bottom, right = rf.window(i, j)
        ref = model(x[..., top:bottom, left:right])["logits"][0]
        torch.testing.assert_close(out[0, :, i, j], ref, rtol=1e-12, atol=1e-12)


def test_global_statistics_at_the_input_are_named() -> None:
    class Standardize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x - x.mean())

    with pytest.raises(Fc2ConvError, match="'mean'.*global pooling") as err:
        receptive_field(Standardize().eval(), (3, 12, 12))
    assert "convolutionalize(model" not in str(err.value)
