"""Inputs drawn for compare(): shapes from specs or input_shape, fresh normal draws (never
zeros), the last one large; dynamic ONNX dimensions filled; user inputs accepted as arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fc2conv.errors import Fc2ConvError
from fc2conv.verify import compare
from fc2conv.verify.inputs import as_tensors, draw, resolve_specs
from fc2conv.verify.match import align
from fc2conv.verify.models import InputSpec, Model


def test_draws_are_fresh_normal_and_the_last_is_large() -> None:
    specs = [InputSpec("x", (None, 3, None), torch.float32), InputSpec("ids", (4,), torch.int64)]
    draws = draw(specs, 4, torch.float32)
    assert [tuple(d[0].shape) for d in draws] == [(2, 3, 8)] * 4  # dynamic dims filled
    xs = [d[0] for d in draws]
    assert all(bool((x != 0).all()) for x in xs)
    assert not torch.equal(xs[0], xs[1])
    assert float(xs[-1].abs().max()) > 100 * float(xs[0].abs().max())
    assert draws[0][1].dtype == torch.int64 and bool((draws[0][1] >= 0).all())
    assert draw(specs, 2, torch.float16)[-1][0].abs().max() < 1e3  # float16 range kept


def test_input_shape_adds_the_spec_batch_axis() -> None:
    a = Model("A", "torch", module=nn.Linear(5, 2), specs=[InputSpec("x", (7, 5), torch.float32)])
    b = Model("B", "torch", module=nn.Linear(5, 2))
    assert resolve_specs(a, b, (5,))[0].shape == (7, 5)
    assert resolve_specs(b, b, (3, 5))[0].shape == (3, 5)
    with pytest.raises(Fc2ConvError, match="input_shape"):
        resolve_specs(b, b, None)


def test_numpy_inputs_are_accepted() -> None:
    x = np.random.default_rng().standard_normal((3, 6)).astype(np.float32)
    (t,) = as_tensors(x)
    assert t.shape == (3, 6)
    lin = nn.Linear(6, 2)
    assert compare(lin, lin, x).verdict == "identical"


def test_align_finds_the_layout() -> None:
    a = torch.randn(4, 5, 6)
    b = a.permute(0, 2, 1).contiguous()
    got, al = align(a, b)  # type: ignore[misc]
    assert torch.equal(got, a) and al.perm == (0, 2, 1)
    got, al = align(a.reshape(4, 30), a.reshape(4, 30, 1, 1))  # type: ignore[misc]
    assert "reshaped" in al.describe()
    assert align(a, torch.randn(4, 5, 7)) is None
