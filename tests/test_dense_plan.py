"""The tiling plan alone: pure arithmetic, checked against a brute-force 1-D simulation of
which input pixels each cell reads (no torch)."""

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from fc2conv.dense.plan import axis_chunks, cells_per_tile, plan_tiles


def _layers():
    return st.lists(st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2),
                              st.integers(1, 2)), min_size=1, max_size=4)


def _simulate(n, layers):
    """Per cell of the last map: the set of input pixels it reads (None = padding), by brute
    force, with PyTorch's floor output lengths; and the field (size, jump, start)."""
    cells = [frozenset([i]) for i in range(n)]
    size, jump, start = 1, 1, 0
    for k, s, p, d in layers:
        padded = [frozenset([None])] * p + cells + [frozenset([None])] * p
        out = []
        for o in range(0, len(padded)):
            last = o * s + d * (k - 1)
            if last >= len(padded):
                break
            out.append(frozenset().union(*(padded[o * s + d * t] for t in range(k))))
        cells = out
        size, jump, start = size + d * (k - 1) * jump, jump * s, start - p * jump
    return cells, (size, jump, start)


@given(_layers(), st.integers(20, 90), st.integers(1, 9))
def test_chunks_cover_the_map_and_read_all_a_cell_needs(layers, n, cells):
    full, (size, jump, start) = _simulate(n, layers)
    if not full:
        return
    chunks = axis_chunks(n, len(full), size, jump, start, cells)
    assert [c.i0 for c in chunks][0] == 0 and chunks[-1].i1 == len(full)
    assert all(a.i1 == b.i0 for a, b in zip(chunks, chunks[1:], strict=False))
    for c in chunks:
        assert c.a % jump == 0 and 0 <= c.a < c.b <= n
        # the tile's own map, simulated on the crop: its cells j0.. equal the full map's
        # cells i0.. shifted by a (pixels) whenever they do not touch the tile's padding
        tile, _ = _simulate(c.b - c.a, layers)
        j0, j1 = c.crop(jump)
        assert j0 >= 0 and j1 <= len(tile)
        for j, i in zip(range(j0, j1), range(c.i0, c.i1), strict=True):
            shifted = {None if x is None else x + c.a for x in tile[j]}
            assert shifted == set(full[i]), (c, i, j)


def test_plan_grid_and_tiles():
    plan = plan_tiles((100, 57), (45, 25), (11, 11), (2, 2), (-2, -2), (8, 8))
    assert plan.grid == (6, 4) and len(plan) == 24 and plan.chunk_cells == (8, 8)
    assert len(list(plan.blocks())) == 24
    assert max(plan.max_tile()) <= 11 + 7 * 2
    assert cells_per_tile(33, 11, 2) == 12 and cells_per_tile(5, 11, 2) == 1


def test_plan_imports_no_torch():
    probe = "import sys, fc2conv.dense.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_import_fc2conv_loads_no_dask_zarr_or_tifffile():
    probe = ("import sys, fc2conv, fc2conv.dense; fc2conv.dense_map; print(sorted(m for m in "
             "sys.modules if m.split('.')[0] in ('dask', 'zarr', 'tifffile', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", probe.replace("fc2conv.dense_map; ", "")],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
