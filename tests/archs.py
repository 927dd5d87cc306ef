"""Reference architectures for the PyTorch tests and benchmarks, small and with random weights.

Each classifier records its training input size in ``INPUT_SHAPE``. Sizes are tiny so the model
sweep runs in seconds on two CPU cores; the structure is what matters (padding or not, adaptive
pooling, residual blocks, depthwise convs, flatten orders, F.linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _features_out(features: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(math.prod(features(torch.zeros(1, *shape)).shape[1:]))


class LeNet5(nn.Module):
    """LeNet-5 (valid convs, average pools) on 1x32x32."""

    INPUT_SHAPE = (1, 32, 32)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AlexNetStyle(nn.Module):
    """AlexNet's shape, small: strided conv, overlapping max pools, dropout head.
    ``padded=False`` is window-exact; ``padded=True`` pads like AlexNet."""

    def __init__(self, padded: bool = False, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        p = 1 if padded else 0
        self.INPUT_SHAPE = (3, 63, 63) if not padded else (3, 59, 59)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=2, padding=2 * p), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(width, 2 * width, 3, padding=p), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=p), nn.ReLU(inplace=True),
        )
        n = _features_out(self.features, self.INPUT_SHAPE)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(n, 32), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGGStyle(nn.Module):
    """VGG's shape: padded 3x3 convs, max pools, ``AdaptiveAvgPool2d((7, 7))``, dropout head.
    On 3x56x56 the map is 7x7 (the pool is the identity); on 3x112x112 it is 14x14."""

    INPUT_SHAPE = (3, 56, 56)

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 49, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetStyle(nn.Module):
    """ResNet's shape: stem, residual blocks with BatchNorm, global average pool, fc."""

    INPUT_SHAPE = (3, 32, 32)

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)
        randomize_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetStyle(nn.Module):
    """MobileNet's shape: depthwise 3x3 + pointwise 1x1 convs with BatchNorm and ReLU6,
    global average pooling written as ``x.mean((2, 3))``, dropout + Linear."""

    INPUT_SHAPE = (3, 32, 32)

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()

        def dw(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU6(inplace=True),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True),
            )

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(True),
            dw(width, 2 * width, 1), dw(2 * width, 4 * width, 2),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, classes))
        randomize_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ChannelsLastHead(nn.Module):
    """A Keras-style head: the map is flattened channels-last (``permute(0, 2, 3, 1)``) and
    the classifier is ``F.linear`` of stored parameters."""

    INPUT_SHAPE = (3, 20, 20)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=3)
        self.weight = nn.Parameter(torch.randn(classes, 6 * 6 * 6) / 15)
        self.bias = nn.Parameter(torch.randn(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        return F.linear(x.permute(0, 2, 3, 1).flatten(1), self.weight, self.bias)


class MLP(nn.Module):
    """A residual MLP block on ``(batch, samples, dim)``: LayerNorm, up, GELU, dropout, down."""

    def __init__(self, dim: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(self.drop(self.act(self.up(self.norm(x)))))
        return self.head(x)


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block: multi-head self-attention with explicit q/k/v
    projections, an MLP, LayerNorms and residuals, on ``(batch, tokens, dim)``."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class EncoderStack(nn.Module):
    """Two encoder blocks: the names ``blocks.0.mlp.0`` etc. must survive conversion."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(EncoderBlock(dim), EncoderBlock(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise 7x7 conv, then permute to channels-last, LayerNorm,
    Linear, GELU, Linear, permute back, layer scale, residual: the Linears are 1x1 convs
    written by hand, and ``to_conv`` should need no permute at all."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def classifiers() -> dict[str, nn.Module]:
    """Every reference classifier, in eval mode, seeded."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "lenet5": LeNet5(),
        "alexnet_valid": AlexNetStyle(padded=False),
        "alexnet_padded": AlexNetStyle(padded=True),
        "vgg": VGGStyle(),
        "resnet": ResNetStyle(),
        "mobilenet": MobileNetStyle(),
        "channels_last_head": ChannelsLastHead(),
    }
    return {k: m.eval() for k, m in models.items()}
