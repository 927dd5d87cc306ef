"""Receptive fields against autograd: the input pixels an output cell depends on.

Random small models mix explicit padding (``nn.ZeroPad2d``, ``nn.ConstantPad2d``, ``F.pad``,
reflect/replicate), weight-standardized convs (the weight computed in ``forward``, BiT style),
stride-1 transposed convs, channels-last LayerNorm + Linear between permutes (ConvNeXt style),
pools and residual adds. For chosen output cells the gradient of a random projection of the
cell wrt the input marks the pixels it depends on; that set's bounding box must be the field
``[start + i * jump, start + i * jump + size)`` that :func:`fc2conv.receptive_field` states —
exactly where the field lies inside the image, within it (clipped) at the borders.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import Fc2ConvError, receptive_field


class FPad(nn.Module):
    def __init__(self, pads: tuple[int, ...], mode: str) -> None:
        super().__init__()
        self.pads, self.mode = pads, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, mode=self.mode)


class WSConv(nn.Conv2d):
    """BiT's weight-standardized conv: the weight is standardized in forward, then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.var(dim=(1, 2, 3), keepdim=True)
                                                         + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)


class ChannelsLast(nn.Module):
    """ConvNeXt's pointwise stretch: permute to NHWC, LayerNorm + Linear over C, permute back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        return self.fc(self.norm(y)).permute(0, 3, 1, 2)


class Residual(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.conv(x))


def _random_model(seed: int, c: int = 3) -> tuple[nn.Module, bool]:
    """A random stack of 4 blocks; also whether all its padding is constant."""
    rng = random.Random(seed)
    layers: list[nn.Module] = []
    constant = True
    for _ in range(4):
        kind = rng.choice(["conv", "wsconv", "zeropad", "constpad", "fpad", "pool", "tconv",
                           "last", "residual"])
        k, s, d = rng.randint(1, 4), rng.randint(1, 2), rng.randint(1, 2)
        if kind == "conv":
            layers.append(nn.Conv2d(c, c, k, stride=s, padding=rng.randint(0, 2), dilation=d))
        elif kind == "wsconv":
            layers.append(WSConv(c, c, k, stride=s, padding=rng.randint(0, 2)))
        elif kind == "zeropad":  # (left, right, top, bottom); a negative side crops
            layers.append(nn.ZeroPad2d(tuple(rng.randint(-1, 3) for _ in range(4))))
        elif kind == "constpad":
            layers.append(nn.ConstantPad2d(tuple(rng.randint(0, 2) for _ in range(4)), 0.5))
        elif kind == "fpad":
            mode = rng.choice(["constant", "reflect", "replicate"])
            constant = constant and mode == "constant"
            layers.append(FPad(tuple(rng.randint(0, 2) for _ in range(4)), mode))
        elif kind == "pool":
            layers.append(nn.AvgPool2d(max(k, 2), stride=s, padding=rng.randint(0, max(k, 2) // 2)))
        elif kind == "tconv":  # stride 1: a conv with padding d (k - 1) - p
            layers.append(nn.ConvTranspose2d(c, c, k, padding=rng.randint(0, k - 1), dilation=d))
        elif kind == "last":
            layers.append(ChannelsLast(c))
        else:
            layers.append(Residual(c, rng.choice([1, 3, 5])))
    return nn.Sequential(*layers).double().eval(), constant


def _touched(model: nn.Module, x: torch.Tensor, cell: tuple[int, int], gen: torch.Generator
             ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Bounding box ``((top, bottom), (left, right))`` (exclusive ends) of the pixels whose
    gradient for ``v . out[0, :, i, j]`` (random ``v``) is non-zero."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    v = torch.randn(out.shape[1], generator=gen, dtype=x.dtype)
    (out[0, :, cell[0], cell[1]] * v).sum().backward()
    assert x.grad is not None
    hit = x.grad[0].abs().sum(0) > 0
    if not hit.any():
        return None
    rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
    return (int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1)


@pytest.mark.parametrize(("seed", "capture"), [(s, "fx") for s in range(24)]
                         + [(s, "export") for s in range(6)])
def test_field_matches_autograd_on_random_models(seed: int, capture: str) -> None:
    """``capture="export"``: the same walk over torch.export's aten ops (aten.pad,
    aten.permute, aten.layer_norm, aten.linear, aten.conv_transpose2d, ...)."""
    model, constant = _random_model(seed)
    probe = 24
    given = model if capture == "fx" else torch.export.export(
        model, (torch.randn(1, 3, probe, probe + 2, dtype=torch.float64),))
    try:
        rf = receptive_field(given, (3, probe, probe + 2))
    except Fc2ConvError:
        pytest.fail(f"seed {seed}: {model}")
    # an input large enough that some cells' fields lie wholly inside it, away from pixels that
    # a crop (a negative pad, at most 1 per layer) removes at the far edge
    margin = tuple(4 * s for s in rf.stride)
    size = tuple(rf.size[a] + 2 * abs(rf.padding[a]) + 2 * margin[a] + 3 * rf.stride[a]
                 for a in range(2))
    size = tuple(max(s, probe) for s in size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, *size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out_hw = model(x).shape[2:]
    assert out_hw == receptive_field(model, (3, *size)).output_size
    checked_inside = 0
    for i in sorted({0, out_hw[0] // 2, out_hw[0] - 1}):
        for j in sorted({0, out_hw[1] // 2, out_hw[1] - 1}):
            box = _touched(model, x, (i, j), gen)
            field = [(-p + c * s, -p + c * s + f) for p, s, f, c in
                     zip(rf.padding, rf.stride, rf.size, (i, j), strict=True)]
            clipped = [(max(0, a), min(n, b)) for (a, b), n in zip(field, size, strict=True)]
            inside = all(a >= m and b <= n - m for (a, b), n, m in zip(field, size, margin,
                                                                       strict=True))
            if inside:
                assert box == tuple(field), (seed, (i, j), box, field, model)
                checked_inside += 1
            elif constant and box is not None and not any(
                    isinstance(layer, nn.ZeroPad2d) and min(layer.padding) < 0 for layer in model):
                assert all(ca <= ba and bb <= cb for (ba, bb), (ca, cb) in
                           zip(box, clipped, strict=True)), (seed, (i, j), box, clipped, model)
    assert checked_inside > 0


def test_mobilenet_style_tf_padding_and_windows_inside() -> None:
    """ZeroPad2d((0, 1, 0, 1)) before a stride-2 conv (TF "same"), then a zero-padded 5x5 conv:
    cell 0's field starts before the image, and windows_inside counts only windows inside."""
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 2, 3, stride=2),
                          nn.ZeroPad2d(3), nn.Conv2d(2, 2, 5)).double().eval()
    rf = receptive_field(model, (1, 32, 32))
    assert (rf.size, rf.stride, rf.padding) == ((11, 11), (2, 2), (6, 6))
    assert not rf.exact and "pads by" in str(rf.reason)
    # autograd: the cells whose dependence spans the whole 11-pixel field are the inside ones
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64, generator=gen)
    full = [i for i in range(rf.output_size[0])
            if (box := _touched(model, x, (i, i), gen)) is not None
            and box[0][1] - box[0][0] == 11 and box[0][0] == -6 + 2 * i]
    assert rf.cells_inside((32, 32))[0] == range(full[0], full[-1] + 1)
    assert rf.windows_inside((32, 32)) == (len(full), len(full))
    assert full[0] == 3  # cells 0..2 start before the image (-6, -4, -2)


def test_transposed_conv_with_stride_is_refused_in_one_sentence() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 1, 2, stride=2)).eval()
    with pytest.raises(Fc2ConvError, match=r"'1' \(ConvTranspose\).*stride 2.*no receptive"):
        receptive_field(model, (1, 16, 16))


def test_squeeze_excitation_gate_has_no_finite_field() -> None:
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))

    with pytest.raises(Fc2ConvError, match="squeeze-and-excitation.*whole input"):
        receptive_field(SE().eval(), (2, 12, 12))


class SameConv(nn.Conv2d):
    """TF "same" padding computed from the input size in forward (HF EfficientNet, BiT's
    DynamicPad2d): pad ``(ceil(n / s) - 1) s + k - n`` (``k >= s``), the smaller half low."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for n, k, s in ((x.shape[3], self.kernel_size[1], self.stride[1]),
                        (x.shape[2], self.kernel_size[0], self.stride[0])):
            total = (-(-n // s) - 1) * s + k - n
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


def test_same_padding_computed_from_the_input_size() -> None:
    """torch.export with dynamic H, W (and torch.fx): the pads are size arithmetic; the field
    is the one
    at the size asked for (odd 25 pads 1 low before the 3x3 stride 2 conv, even 26 pads 0)."""
    model = nn.Sequential(SameConv(2, 2, 3, stride=2), SameConv(2, 2, 4, stride=1)).double()
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model.eval(), (torch.randn(1, 2, 24, 26, dtype=torch.float64),),
                             dynamic_shapes=({2: auto, 3: auto},))
    rf = receptive_field(ep, (2, 25, 26))
    # 3/2 conv: (25 -> total 2: low 1), (26 -> total 1: low 0); 4/1 conv at jump 2: total 3, low 1
    assert rf.size == (3 + 3 * 2, 3 + 3 * 2) and rf.stride == (2, 2)
    assert rf.padding == (1 + 2, 0 + 2)
    assert receptive_field(model, (2, 25, 26)) == rf  # torch.fx: x.shape arithmetic
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 25, 26, dtype=torch.float64, generator=gen)
    box = _touched(model, x, (5, 6), gen)  # an interior cell
    assert box == ((-3 + 10, -3 + 10 + 9), (-2 + 12, -2 + 12 + 9))


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4)])
def test_group_and_instance_norm_have_no_finite_field(norm: nn.Module) -> None:
    """BiT's GroupNorm: statistics over all positions; autograd agrees (a corner cell's
    gradient reaches the far corner)."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.Conv2d(4, 4, 1)).double().eval()
    with pytest.raises(Fc2ConvError, match="statistics over all positions.*no finite"):
        receptive_field(model, (1, 12, 12))
    gen = torch.Generator().manual_seed(0)
    box = _touched(model, torch.randn(1, 1, 12, 12, dtype=torch.float64, generator=gen),
                   (0, 0), gen)
    assert box == ((0, 12), (0, 12))
