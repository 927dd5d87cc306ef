"""dense_map's inputs (arrays, dask, zarr, TIFF pyramids, PNG/JPEG, OpenSlide) and its zarr
output: geometry attributes, argmax, chunk commits, resume, refusals."""

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fc2conv import Fc2ConvError, dense_map

C, H, W = 3, 83, 101


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 4, 3, stride=2)).eval()


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).integers(0, 256, (H, W, C), dtype=np.uint8)  # channels last


def _ref(fcn, chw, mean=None, std=None):
    x = torch.from_numpy(np.asarray(chw, dtype=np.float64))
    if mean is not None:
        x = (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
            std, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        return copy.deepcopy(fcn).double()(x[None])[0].numpy()


def _close(got, ref):
    got = np.asarray(got)
    assert got.shape == ref.shape
    tol = 256 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1)
    assert np.abs(got - ref).max() <= tol


def test_numpy_torch_dask_and_zarr_inputs(fcn, pixels, tmp_path):
    import dask.array as da
    import zarr

    chw = np.ascontiguousarray(np.moveaxis(pixels, -1, 0))
    ref = _ref(fcn, chw)
    z = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=chw.shape, chunks=(3, 32, 32),
                        dtype="uint8")
    z[:] = chw
    for image in (chw, torch.from_numpy(chw), da.from_array(chw, chunks=(3, 40, 40)), z,
                  str(tmp_path / "img.zarr")):
        _close(dense_map(fcn, image, tile=37), ref)


def test_tiff_pyramid_png_jpeg_channels_last_and_mean_std(fcn, pixels, tmp_path):
    import tifffile
    from PIL import Image

    chw = np.moveaxis(pixels, -1, 0)
    small = pixels[::2, ::2]
    with tifffile.TiffWriter(tmp_path / "img.ome.tif", bigtiff=True) as tif:
        tif.write(pixels, photometric="rgb", tile=(32, 32), subifds=1)
        tif.write(small, photometric="rgb", tile=(32, 32), subfiletype=1)
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 70.0)
    ref = _ref(fcn, chw, mean, std)
    _close(dense_map(fcn, tmp_path / "img.ome.tif", tile=40, mean=mean, std=std), ref)
    ref1 = _ref(fcn, np.moveaxis(small, -1, 0))
    _close(dense_map(fcn, str(tmp_path / "img.ome.tif"), tile=40, level=1), ref1)
    with pytest.raises(Fc2ConvError, match="level 5"):
        dense_map(fcn, str(tmp_path / "img.ome.tif"), level=5)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray(pixels).save(tmp_path / "img.jpg", quality=90)
    _close(dense_map(fcn, str(tmp_path / "img.png"), tile=50), _ref(fcn, chw))
    decoded = np.moveaxis(np.asarray(Image.open(tmp_path / "img.jpg")), -1, 0)
    _close(dense_map(fcn, str(tmp_path / "img.jpg"), tile=50), _ref(fcn, decoded))


def test_openslide_when_installed(fcn, pixels, tmp_path):
    openslide = pytest.importorskip("openslide")
    import tifffile

    path = tmp_path / "slide.tif"  # a tiled TIFF: OpenSlide's generic-tiff reader opens it
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(32, 32))
    slide = openslide.OpenSlide(str(path))
    rgb = np.moveaxis(np.asarray(slide.read_region((0, 0), 0, (W, H)).convert("RGB")), -1, 0)
    from fc2conv.dense.readers import SlideReader

    ref = _ref(fcn, rgb)
    _close(dense_map(fcn, SlideReader(str(path)), tile=40), ref)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_zarr_output_geometry_argmax_resume_and_commit(fcn, pixels, tmp_path):
    import tifffile
    import zarr

    src = tmp_path / "img.tif"
    tifffile.imwrite(src, pixels, photometric="rgb")
    before = _digest(src)
    ref = _ref(fcn, np.moveaxis(pixels, -1, 0))
    out = tmp_path / "map.zarr"
    calls = []
    result = dense_map(fcn, str(src), tile=30, out=out, argmax=True,
                       progress=lambda d, t: calls.append((d, t)))
    _close(result, ref)
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and total > 4
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)["fc2conv_dense"]
    assert attrs["stride"] == [4, 4] and attrs["classes"] == 4 and group.attrs["complete"]
    # cell (i, j) reads input pixels [offset + i * stride, + field_size): check one by hand
    assert attrs["field_size"] == [5 + 1 * 1 + 2 * 2, 10] and attrs["field_start"] == [-2, -2]
    np.testing.assert_array_equal(np.asarray(group["labels"]), ref.argmax(axis=0))
    assert _digest(src) == before
    # a chunk whose task died mid-write: data half there, no commit marker
    done = out / ".fc2conv-done"
    victim = sorted(done.iterdir())[3]
    victim.unlink()
    scores = zarr.open_group(str(out), mode="r+")["scores"]
    scores[:, :3, :3] = 1e6  # a torn write of chunk (0, 0): garbage, and its marker gone
    (done / "0.0").unlink()
    calls.clear()
    result = dense_map(fcn, str(src), tile=30, out=out, argmax=True,
                       progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (total - 2, total) and calls[-1] == (total, total)
    _close(result, ref)
    assert _digest(src) == before
    # a worker SIGKILLed while committing chunk (0, 1) left its temporary (fc2conv.files'
    # naming: hidden, the dead writer's pid): the rerun reclaims it and commits the chunk
    dead = 2**22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    (done / "0.1").unlink()
    stale = done / f".0.1.fc2conv-{dead}-0a1b2c3d.tmp"
    stale.mkdir()
    (stale / "0.1").write_text("half")
    result = dense_map(fcn, str(src), tile=30, out=out, argmax=True)
    _close(result, ref)
    assert (done / "0.1").read_text() == "done\n"
    assert not [p.name for p in done.iterdir() if p.name.startswith(".")]


def test_output_refusals(fcn, pixels, tmp_path):
    import tifffile

    src = tmp_path / "img.tif"
    tifffile.imwrite(src, pixels, photometric="rgb")
    with pytest.raises(Fc2ConvError, match="overwritten"):
        dense_map(fcn, str(src), out=str(src))
    dense_map(fcn, str(src), tile=60, out=tmp_path / "m.zarr")
    with pytest.raises(Fc2ConvError, match="another map"):
        dense_map(fcn, str(src), tile=40, out=tmp_path / "m.zarr")
    with pytest.raises(Fc2ConvError, match="channels"):
        dense_map(fcn, str(src), mean=(1.0, 2.0))
    with pytest.raises(Fc2ConvError, match="no such image"):
        dense_map(fcn, str(tmp_path / "missing.tif"))
    assert os.path.getsize(src) > 0


def test_chunk_commit_is_o1_in_the_chunks_done(tmp_path, monkeypatch):
    """Committing a chunk never lists the marker folder (it held one entry per finished
    chunk, so each commit cost O(chunks)); what killed workers left there is reclaimed once,
    when the store is opened."""
    from fc2conv.dense.writer import DONE, MapStore

    n = 3000
    store = MapStore(str(tmp_path / "m.zarr"), (2, n, 4), (2, 1, 4), {"k": 1}, labels=False)
    assert store.open() == 0
    done = tmp_path / "m.zarr" / DONE
    for i in range(n - 3):  # as if n - 3 chunks were committed
        (done / f"{i}.0").touch()
    dead = _dead_pid()
    stale = done / f".{n - 2}.0.fc2conv-{dead}-0a1b2c3d.tmp"  # a killed worker's commit
    stale.mkdir()
    listed: list[str] = []
    real_scandir, real_iterdir = os.scandir, Path.iterdir

    def scandir(path="."):
        listed.append(str(path))
        return real_scandir(path)

    def iterdir(self):
        listed.append(str(self))
        return real_iterdir(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    again = MapStore(str(tmp_path / "m.zarr"), (2, n, 4), (2, 1, 4), {"k": 1}, labels=False)
    assert again.open() == n - 3 and not stale.exists()  # reclaimed at open
    listed.clear()
    rng = np.random.default_rng(3)
    blocks = {i: rng.standard_normal((2, 1, 4)).astype(np.float32) for i in range(n - 3, n)}
    for i, block in blocks.items():
        again.write((i, 0), (i, 0), block)
    assert [p for p in listed if Path(p) == done] == []
    assert all(again.is_done((i, 0)) for i in range(n))
    assert [p.name for p in done.iterdir() if p.name.startswith(".")] == []
    got = np.asarray(again.scores()[:, n - 3:])
    np.testing.assert_array_equal(got, np.concatenate(list(blocks.values()), axis=1))


def _dead_pid():
    pid = 2**22 + 4321
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1
