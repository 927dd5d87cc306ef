"""Quantized layers (issue 13, point 7): named, with the reason, never skipped silently; the
float layers around them still convert, exactly."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

import fc2conv


def _quantize_first(m: nn.Sequential) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(m, {"0": default_dynamic_qconfig}, dtype=torch.qint8)


def test_quantized_linear_is_named_and_the_float_one_converts(caplog) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    q = _quantize_first(m)
    x = torch.randn(3, 7, 16)
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        c = fc2conv.to_conv(q, (x,))
    text = caplog.text
    assert "'0'" in text and "quantized" in text and "stays as it is" in text
    assert "not self-checked" in text
    convs = [mod for mod in c.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].in_channels == 32 and convs[0].out_channels == 5
    # float64 reference, computed independently: the quantized layer's own output (its input
    # is untouched by the conversion), then ReLU and the last Linear in float64.
    y = torch.randn(4, 9, 16)
    with torch.no_grad():
        h = torch.relu(q[0](y)).double()
        ref = h @ m[2].weight.double().T + m[2].bias.double()
        out = c(y)
    assert out.shape == ref.shape
    eps = torch.finfo(torch.float32).eps
    tol = 32 * eps * (h.abs() @ m[2].weight.double().abs().T + m[2].bias.double().abs())
    assert ((out.double() - ref).abs() <= tol).all()


def test_all_quantized_mlp_is_returned_with_every_layer_named(caplog) -> None:
    from torch.ao.quantization import quantize_dynamic

    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        c = fc2conv.to_conv(q, (x,))
    assert "'0'" in caplog.text and "'2'" in caplog.text
    with torch.no_grad():
        assert torch.equal(c(x), q(x))  # nothing converted: the very same int8 kernels


def test_float_models_log_no_quantized_warning(caplog) -> None:
    m = nn.Sequential(nn.Linear(8, 4)).eval()
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        fc2conv.to_conv(m, (torch.randn(2, 8),))
    assert "quantized" not in caplog.text
