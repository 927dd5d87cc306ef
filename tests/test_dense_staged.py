"""Staged tiling (fc2conv.dense.stages / split / staged): the net split at layer boundaries,
each stage tiled with its own receptive field, gives the map of the untiled float64 run
(dtype-derived tolerance) in 2-D and 3-D, with padding, ceil_mode pools, dilation, strides no
tile divides, ragged images, skip connections, BatchNorm and a dense GAP head; on the pool and
through Dask's own schedulers; written to zarr and resumed after a run killed mid-way; from
the CLI; and auto picks stages only where they are cheap and fit in memory."""

import copy
from pathlib import Path

import archs
import numpy as np
import pytest
import torch
from torch import nn

from fc2conv import Fc2ConvError, convolutionalize, dense_map
from fc2conv.dense import api as dapi
from fc2conv.dense import split as dsplit
from fc2conv.dense import staged as dstaged
from fc2conv.dense.writer import MapStore

EPS = float(np.finfo(np.float32).eps)


def _net2d(seed, padded=True):
    torch.manual_seed(seed)
    p = int(padded)
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=2 * p), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(6, 8, 3, padding=2 * p, dilation=2), nn.ReLU(),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(8, 8, 3, stride=3, padding=p), nn.ReLU(),
        nn.Conv2d(8, 5, 4)).eval()


def _net3d(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, 2, ceil_mode=True),
        nn.Conv3d(4, 4, 3, dilation=2), nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 2)).eval()


def _ref64(net, image):
    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.from_numpy(image).double()[None])[0].numpy()


def _close(got, ref, layers):
    """Within float32 rounding of the float64 run: a cell from a wrong window, from a tile's
    own border padding or from a misplaced stage map is off by O(scale)."""
    got = np.asarray(got)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max()) + 1.0
    assert np.abs(got - ref).max() <= 16 * layers * EPS * scale


class _Seen(list):
    def __init__(self):
        super().__init__()
        self.later_tiled = []


@pytest.fixture
def chosen(monkeypatch):
    """The stages each dense_map call ran (1 when it ran one); ``.later_tiled``: whether a
    stage after the first ran in more than one tile."""
    seen = _Seen()
    real = dstaged.plan_stages

    def spy(*args, **kwargs):
        found = real(*args, **kwargs)
        seen.append(1 if found is None else len(found))
        seen.later_tiled.append(found is not None and any(
            len(dapi._plan(s.tile, s.geo.image_size, s.geo.map_size, s.geo.size, s.geo.stride,
                           s.geo.start)[1]) > 1 for s in found[1:]))
        return found

    monkeypatch.setattr(dstaged, "plan_stages", spy)
    return seen


CASES = [  # (net, image shape, tiles) -- sizes no stride divides, tiles that divide nothing
    (lambda s: _net2d(s), (3, 131, 97), [37, (53, 41)]),
    (lambda s: _net2d(s, padded=False), (3, 173, 151), [55, (71, 47)]),
    (_net3d, (2, 29, 33, 23), [13, (17, 11, 19)]),
]


@pytest.mark.parametrize(("make", "shape", "tiles"), CASES, ids=["2d", "2d-valid", "3d"])
def test_staged_equals_the_untiled_run(make, shape, tiles, chosen):
    seed = int(np.random.SeedSequence().generate_state(1)[0])  # fresh inputs every run
    net = make(seed % 1000)
    image = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ref = _ref64(net, image)
    kept = image.copy()
    for tile in tiles:
        for stages in (2, 3):
            chosen.clear()
            got = dense_map(net, image, tile=tile, threads=1, stages=stages)
            assert chosen == [stages]
            _close(got, ref, len(net))
            _close(np.asarray(got), ref, len(net))  # computed twice: the same map
    np.testing.assert_array_equal(image, kept)  # a stage's in-place ReLU never reaches it
    assert any(chosen.later_tiled)  # the maps between stages were read tile by tile too


def test_staged_on_the_pool_through_dask_and_with_normalization(chosen):
    import dask

    net = _net2d(3)
    pixels = np.random.default_rng(4).integers(0, 256, (3, 120, 111), dtype=np.uint8)
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 70.0]
    x = (pixels.astype(np.float64) - np.array(mean)[:, None, None]) / np.array(std)[:, None,
                                                                                    None]
    ref = _ref64(net, x)
    lazy = dense_map(net, pixels, tile=41, threads=2, mean=mean, std=std, stages=2)
    _close(lazy, ref, len(net))
    for scheduler in ("sync", "threads"):  # Dask's own path: the stage map is a task too
        _close(lazy.compute(scheduler=scheduler), ref, len(net))
    _close(lazy[:, 1:4, 1:3].compute(), ref[:, 1:4, 1:3], len(net))
    with dask.config.set(scheduler="sync"):
        _close(np.asarray(lazy), ref, len(net))
    assert chosen == [2]


def test_staged_resnet_with_skips_batchnorm_and_dense_gap(chosen):
    torch.manual_seed(5)
    net = archs.ResNetStyle().eval()
    for m in net.modules():  # BatchNorm that is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(6).standard_normal((3, 75, 83)).astype(np.float32)
    ref = _ref64(fcn, image)
    got = dense_map(fcn, image, tile=45, threads=1, stages=2)
    _close(got, ref, 12)
    assert chosen == [2]
    # cut only where one tensor carries everything: between the blocks, never inside one
    gm = dsplit.as_graph(fcn)
    inside = {n.name for n in gm.graph.nodes if n.name.startswith(("layer1_conv1",
                                                                   "layer2_conv1"))}
    assert not inside & set(dsplit.cuts(gm))


def test_a_staged_run_killed_mid_way_resumes(tmp_path, monkeypatch):
    net = _net2d(7)
    image = np.random.default_rng(8).standard_normal((3, 140, 120)).astype(np.float32)
    ref = _ref64(net, image)
    out = tmp_path / "m.zarr"
    real = MapStore.write
    written = []

    def dies_on_the_third(self, index, origin, block):
        if len(written) == 2:
            raise RuntimeError("killed")
        written.append(index)
        return real(self, index, origin, block)

    monkeypatch.setattr(MapStore, "write", dies_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        dense_map(net, image, tile=50, out=out, threads=1, stages=2, batch=1)
    monkeypatch.setattr(MapStore, "write", real)
    progress = []
    result = dense_map(net, image, tile=50, out=out, threads=1, stages=2, batch=1,
                       progress=lambda d, t: progress.append((d, t)))
    total = progress[0][1]
    assert progress[0] == (2, total) and progress[-1] == (total, total) and total > 2
    _close(result, ref, len(net))
    again = []  # every chunk done: nothing computed, not even the first stage
    monkeypatch.setattr(MapStore, "write", lambda *a: again.append(a))
    _close(dense_map(net, image, tile=50, out=out, threads=1, stages=2), ref, len(net))
    assert again == []


def test_auto_stages_only_where_cheaper_and_in_memory(tmp_path, monkeypatch, chosen):
    import zarr

    net = _net2d(9)
    image = np.random.default_rng(10).standard_normal((3, 400, 400)).astype(np.float32)
    ref = _ref64(net, image)
    _close(dense_map(net, image, tile=150, threads=1), ref, len(net))
    assert chosen[-1] > 1  # small tiles, a wide field: staged
    before = len(chosen)
    _close(dense_map(net, image, threads=1), ref, len(net))
    assert chosen[before:] in ([], [1])  # the whole image in one tile: no halo to save
    path = tmp_path / "img.zarr"
    zarr.create_array(str(path), shape=image.shape, dtype="float32")[...] = image
    before = len(chosen)
    _close(dense_map(net, str(path), tile=150, threads=1), ref, len(net))
    assert len(chosen) == before  # a file may exceed memory: one stage, memory bound kept
    monkeypatch.setattr(dapi, "_memory", lambda dev: 1e4)  # no map between stages fits
    _close(dense_map(net, image, tile=150, threads=1), ref, len(net))
    assert chosen[-1] == 1
    with pytest.raises(Fc2ConvError, match="places to split"):
        dense_map(net, image, tile=150, threads=1, stages=2)


def test_a_setting_changed_in_place_gets_new_stages(chosen):
    net = _net2d(15)
    image = np.random.default_rng(16).standard_normal((3, 150, 140)).astype(np.float32)
    _close(dense_map(net, image, tile=60, threads=1, stages=2), _ref64(net, image), len(net))
    net[3].dilation = (1, 1)  # same module, same weights: another field
    _close(dense_map(net, image, tile=60, threads=1, stages=2), _ref64(net, image), len(net))
    assert chosen == [2, 2]


def test_stage_errors():
    import dask.array as da

    net = _net2d(11)
    image = np.random.default_rng(12).standard_normal((3, 90, 90)).astype(np.float32)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(Fc2ConvError, match="stages must be a positive"):
            dense_map(net, image, tile=40, stages=bad)
    with pytest.raises(Fc2ConvError, match="9 stages need 8 places"):
        dense_map(net, image, tile=40, stages=9)
    with pytest.raises(Fc2ConvError, match="not on a dask array"):
        dense_map(net, da.from_array(image), tile=40, stages=2)


def test_cli_dense_stages(tmp_path, capsys):
    import zarr

    from fc2conv.cli.main import main

    torch.manual_seed(13)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 5, 4)).eval()  # torch.export: no ceil_mode pools
    model = tmp_path / "fcn.pt2"
    dims = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 96, 96),),
                                          dynamic_shapes=(dims,)), model)
    image = np.random.default_rng(14).standard_normal((3, 150, 130)).astype(np.float32)
    path = tmp_path / "img.zarr"
    zarr.create_array(str(path), shape=image.shape, dtype="float32")[...] = image
    out = tmp_path / "map.zarr"
    main(["dense", str(model), str(path), "--out", str(out), "--tile", "60", "--stages", "2"])
    got = np.asarray(zarr.open_group(str(out), mode="r")["scores"])
    _close(got, _ref64(net, image), len(net))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["dense", str(model), str(path), "--out", str(tmp_path / "b.zarr"), "--tile",
              "60", "--stages", "7"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "7 stages need" in err and "Traceback" not in err
    assert Path(path).exists()


@pytest.mark.parametrize("stages", [2, 3])
def test_progress_counts_every_stages_chunks(stages, caplog):
    """The progress of a staged run counts the chunks of every stage, not only the last's:
    it rises one step per chunk from 0 to the sum of the stages' chunks (the log's)."""
    import logging
    import re

    net = _net2d(11)
    image = np.random.default_rng(12).standard_normal((3, 170, 150)).astype(np.float32)
    caplog.set_level(logging.INFO, logger="fc2conv.dense")
    calls = []
    result = dense_map(net, image, tile=45, threads=1, stages=stages, batch=1,
                       progress=lambda d, t: calls.append((d, t)))
    _close(result, _ref64(net, image), len(net))
    tiles = re.findall(r"dense map stages: (\d+) \(cuts .*?, tiles (.*?)\); predicted",
                       caplog.text)
    assert tiles and int(tiles[-1][0]) == stages
    last = int(re.findall(r"in (\d+) chunks", caplog.text)[-1])
    total = calls[0][1]
    assert total > last  # the early stages' chunks are counted too
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == list(range(total + 1))  # one step per chunk, every stage's
