"""The staged-tiling planner alone (fc2conv.dense.stages): pure arithmetic, no torch.

A stage's field over the previous boundary's map is checked against the field of the
suffix layers computed on their own (fc2conv.core's AxisField, layer by layer); tiles keep the
memory of the given tile; the choice follows the cost, the asked number of stages and memory."""

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fc2conv.core.receptive import AxisField
from fc2conv.dense.stages import (
    Boundary,
    Profile,
    Segment,
    choose_stages,
    relative,
    stage_tiles,
    staging_cost,
)
from fc2conv.errors import Fc2ConvError


def _field(layers):
    f = AxisField()
    for k, s, p, d in layers:
        f = f.through(k, s, p, d)
    return f


def _boundary(f, channels=4, cells=100):
    return Boundary((f.size,), (f.jump,), (f.start,), channels, (cells,))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2),
                          st.integers(1, 2)), min_size=2, max_size=6), st.data())
def test_a_stage_field_is_the_suffix_layers_own_field(layers, data):
    cut = data.draw(st.integers(1, len(layers) - 1))
    head, whole = _field(layers[:cut]), _field(layers)
    suffix = _field(layers[cut:])  # the stage's layers alone, on the head's map
    assert relative(_boundary(whole), _boundary(head)) == (
        (suffix.size, suffix.jump, suffix.start),)


def test_fields_that_do_not_compose_are_refused():
    with pytest.raises(Fc2ConvError, match="compose"):
        relative(Boundary((10,), (3,), (0,), 1, (5,)), Boundary((5,), (2,), (0,), 1, (9,)))


def _profile(n=768, stem_work=400.0, rest_work=4000.0, rest_field=25):
    """An AlexNet-like profile: a full-resolution stem (stride 4, small field) that holds the
    largest activation, then a stride-2 segment and a wide head (stride 8 in all)."""
    image = Boundary((1, 1), (1, 1), (0, 0), 3, (n, n))
    stem = Boundary((9, 9), (4, 4), (-2, -2), 8, (n // 4, n // 4))
    mid = Boundary((rest_field, rest_field), (8, 8), (-6, -6), 16, (n // 8, n // 8))
    out = Boundary((rest_field + 8 * 10, rest_field + 8 * 10), (8, 8), (-6, -6), 10,
                   (n // 8 - 10, n // 8 - 10))
    return Profile((image, stem, mid, out), (
        Segment(stem_work * 16, 48.0 * 16), Segment(rest_work, 100.0),
        Segment(rest_work * 4, 128.0)))


def test_stage_tiles_keep_the_memory_of_the_tile():
    prof = _profile()
    tile = (300, 300)
    tiles = stage_tiles(prof, (1, 2), tile)
    assert tiles[0] == tile  # the stage with the net's largest activation keeps the tile
    beta = max(s.peak / math.prod(b.stride) for s, b in zip(prof.segments, prof.boundaries[1:],
                                                            strict=True))
    for k, (t, u) in enumerate(zip(tiles, (0, 1, 2), strict=True)):
        inner = prof.boundaries[u]
        assert all(1 <= x <= n for x, n in zip(t, inner.cells, strict=True))
        seg = prof.segments[k]
        per_image_pixel = seg.peak / math.prod(prof.boundaries[k + 1].stride)
        pixels = math.prod(x * j for x, j in zip(t, inner.stride, strict=True))
        assert per_image_pixel * pixels <= beta * math.prod(tile) * 1.001
    # the later stages get more image pixels per tile, up to their whole input
    assert tiles[2] == prof.boundaries[2].cells


def test_choice_follows_cost_count_and_memory():
    prof = _profile()
    single, _ = staging_cost(prof, (), (300, 300))
    auto = choose_stages(prof, (300, 300), None, 2**30)
    assert auto.stages > 1 and auto.cost < single and auto.single == single
    for cuts in ((1,), (2,), (1, 2)):  # the cheapest
        assert auto.cost <= staging_cost(prof, cuts, (300, 300))[0]
    assert choose_stages(prof, (300, 300), 1, 2**30).stages == 1
    two = choose_stages(prof, (300, 300), 2, 2**30)
    assert two.stages == 2 and two.cost == min(staging_cost(prof, (c,), (300, 300))[0]
                                               for c in (1, 2))
    assert choose_stages(prof, (300, 300), 3, 2**30).cuts == (1, 2)
    with pytest.raises(Fc2ConvError, match="4 stages need 3 places"):
        choose_stages(prof, (300, 300), 4, 2**30)
    # a map between stages must fit in half the memory: 8 x 192^2 x 4 bytes = 1.2 MB
    assert choose_stages(prof, (300, 300), None, 1e5).stages == 1
    assert choose_stages(prof, (300, 300), None, 2 * 4 * 8 * 192 * 192).cuts in ((1,), (1, 2),
                                                                                (2,))
    with pytest.raises(Fc2ConvError, match="2 stages need 1 places"):
        choose_stages(prof, (300, 300), 2, 1e3)
    # the whole image in one tile has no halo to save: one stage
    assert choose_stages(prof, (768, 768), None, 2**30).stages == 1
    with pytest.raises(Fc2ConvError, match="positive"):
        choose_stages(prof, (300, 300), 0, 2**30)


def test_stages_imports_no_torch():
    probe = "import sys, fc2conv.dense.stages; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
