"""Receptive-field arithmetic (fc2conv.core.receptive) against autograd and torch's own ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fc2conv.core.receptive import (
    AxisField,
    adaptive_as_fixed,
    has_partial_window,
    output_length,
)

layer = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2))


def _dependency(layers: list[tuple[int, int, int, int]], n: int, cell: int
                ) -> tuple[int, int] | None:
    """[first, last] input pixel that output ``cell`` depends on, by autograd in float64."""
    x = torch.ones(1, 1, n, dtype=torch.float64, requires_grad=True)
    y = x
    for k, s, p, d in layers:
        w = torch.ones(1, 1, k, dtype=torch.float64)
        y = F.conv1d(F.pad(y, (p, p), value=1.0), w, stride=s, dilation=d)
    y[0, 0, cell].backward()
    nz = torch.nonzero(x.grad[0, 0]).flatten()
    if nz.numel() == 0:
        return None
    return int(nz.min()), int(nz.max())


@settings(max_examples=40, deadline=None)
@given(st.lists(layer, min_size=1, max_size=4), st.data())
def test_field_matches_autograd_dependency(layers, data):
    field = AxisField()
    n = 64
    for k, s, p, d in layers:
        field = field.through(k, s, p, d)
    x = torch.zeros(1, 1, n)
    for k, s, p, d in layers:
        padded = n_after = x.shape[-1] + 2 * p
        assume(n_after >= d * (k - 1) + 1)
        x = F.conv1d(F.pad(x, (p, p)), torch.ones(1, 1, k), stride=s, dilation=d)
        del padded
    cell = data.draw(st.integers(0, x.shape[-1] - 1))
    found = _dependency(layers, n, cell)
    start = field.start + cell * field.jump
    padded = any(p for _, _, p, _ in layers)
    if found is None:  # the cell sees only padding
        assert padded
        return
    lo, hi = found
    if not padded:  # without padding the field's ends are exactly the extreme dependencies
        assert (lo, hi) == (start, start + field.size - 1)
    else:  # padding cells are virtual pixels outside the image: the field contains the rest
        assert start <= lo and hi <= start + field.size - 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2),
       st.integers(1, 2), st.booleans())
def test_output_length_matches_torch_pool(n, k, s, p, d, ceil):
    if p > k // 2 or d * (k - 1) + 1 > n + 2 * p:
        return  # torch rejects these pools
    x = torch.randn(1, 1, n)
    y = F.max_pool1d(x, k, s, p, d, ceil_mode=ceil)
    assert output_length(n, k, s, p, d, ceil) == y.shape[-1]
    floor_len = output_length(n, k, s, p, d, False)
    assert has_partial_window(n, k, s, p, d, ceil) == (ceil and y.shape[-1] > floor_len)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10))
def test_adaptive_as_fixed_equals_adaptive_pool(n_in, n_out):
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    k = adaptive_as_fixed(n_in, n_out)
    if n_in < n_out:
        assert k is None
        return
    ref = F.adaptive_avg_pool1d(x, n_out)
    if k is None:
        # no fixed pool equals it: the windows of the adaptive pool have two sizes
        assert n_in % n_out != 0
        return
    assert torch.allclose(F.avg_pool1d(x, k, k), ref, rtol=0, atol=1e-12)


def test_union_refuses_misaligned_branches():
    import pytest

    from fc2conv.errors import Fc2ConvError

    a = AxisField(3, 2, 0)
    assert a.union(AxisField(5, 2, -1)) == AxisField(5, 2, -1)
    with pytest.raises(Fc2ConvError, match="do not align"):
        a.union(AxisField(3, 4, 0))
