"""``fc2conv dense``: a .pt2 classifier on a TIFF, into zarr, with preview, resume, errors."""

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import archs
import numpy as np
import torch

from fc2conv import convolutionalize


class _Result:
    def __init__(self, code, stderr):
        self.returncode, self.stderr = code, stderr


def _run(capsys, *args):
    """``fc2conv dense ARGS`` in this process (torch is already imported): exit code, stderr."""
    from fc2conv.cli.main import main

    capsys.readouterr()
    try:
        main(["dense", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return _Result(code, capsys.readouterr().err)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_dense_tiff_preview_resume_and_errors(tmp_path, capsys):
    import tifffile
    import zarr

    torch.manual_seed(4)
    net = archs.AlexNetStyle().eval()
    model = tmp_path / "alex.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, *net.INPUT_SHAPE),)), model)
    pixels = np.random.default_rng(3).integers(0, 256, (140, 170, 3), dtype=np.uint8)
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, pixels, photometric="rgb", tile=(32, 32))
    hashes = (_sha(model), _sha(image))
    out, preview = tmp_path / "map.zarr", tmp_path / "map.png"
    args = [str(model), str(image), "--out", str(out), "--input-shape", "3,63,63", "--tile",
            "90", "--mean", "127", "--std", "64", "--argmax"]
    first = _run(capsys, *args, "--preview", str(preview))
    assert first.returncode == 0, first.stderr
    fcn = copy.deepcopy(convolutionalize(net, net.INPUT_SHAPE)).double()
    x = (torch.from_numpy(np.moveaxis(pixels, -1, 0).astype(np.float64)) - 127) / 64
    with torch.no_grad():
        ref = fcn(x[None])[0].numpy()
    got = np.asarray(zarr.open_group(str(out), mode="r")["scores"])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 256 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1)
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _run(capsys, *args)
    assert again.returncode == 0 and "already done" in again.stderr
    assert (_sha(model), _sha(image)) == hashes
    for bad in ([str(model), str(tmp_path / "none.tif"), "--out", str(tmp_path / "x.zarr")],
                [str(model), str(image), "--out", str(image)],
                [str(model), str(image), "--out", str(tmp_path / "y.zarr"), "--mean", "a,b"]):
        res = _run(capsys, *bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert (_sha(model), _sha(image)) == hashes


def test_cli_error_is_one_line_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fc2conv", "dense", str(tmp_path / "m.pt2"),
                          str(tmp_path / "img.tif"), "--out", str(tmp_path / "o.zarr")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("fc2conv: error:")
    assert len(res.stderr.strip().splitlines()) == 1
