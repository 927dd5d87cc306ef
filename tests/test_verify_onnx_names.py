"""Layer names read from the legacy ONNX exporter's scopes are the modules' qualified names:
``/transformer/layer.0/Add`` is ``transformer.layer.0`` (a ModuleList child under its owner),
not ``layer.0``, which two blocks of an encoder and a decoder would share."""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

from fc2conv.verify import onnx_backend


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = Stack(), Stack()
        self.head = nn.Sequential(nn.Linear(8, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def test_legacy_scopes_give_qualified_module_names() -> None:
    model = Model().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8),), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    names = {onnx_backend._user_name(n) for n in proto.graph.node if n.op_type == "Add"
             and n.name.startswith("/")}
    modules = {name for name, _ in model.named_modules()}
    residuals = {f"{side}.layer.{k}" for side in ("encoder", "decoder") for k in (0, 1)}
    assert residuals <= names, names
    assert names <= modules, names - modules  # every name is a real module's
