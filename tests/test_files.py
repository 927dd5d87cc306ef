"""Output safety: no overwritten inputs, no partial files, ordinary permissions."""

from __future__ import annotations

import os

import pytest

from fc2conv.errors import Fc2ConvError
from fc2conv.files import atomic_output, check_output_path


def test_atomic_output_replaces_only_on_success(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("failed halfway")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_output_path_refuses_the_input_unless_in_place(tmp_path):
    src = tmp_path / "a.onnx"
    src.write_bytes(b"x")
    with pytest.raises(Fc2ConvError, match="refusing to overwrite the input file"):
        check_output_path(src, tmp_path / "." / "a.onnx")
    assert check_output_path(src, src, in_place=True) == src
    with pytest.raises(Fc2ConvError, match="does not exist"):
        check_output_path(src, tmp_path / "missing" / "b.onnx")


def test_check_output_path_refuses_a_folder(tmp_path):
    src = tmp_path / "a.onnx"
    src.write_bytes(b"x")
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(Fc2ConvError, match="is a folder"):
        check_output_path(src, tmp_path / "out.onnx")


@pytest.mark.parametrize("when", ["at", "after"])
def test_a_signal_at_the_commit_lets_the_write_finish_then_arrives(tmp_path, monkeypatch, when):
    """SIGTERM landing as the output is renamed into place (the commit) or just after: the
    output is whole, so the write is not reported as stopped (the CLI had said "stopped
    mid-write", exit 143, with the file in place); the signal goes to the handler installed
    before, once the temporary folder is gone. A signal during the write itself is
    tests/faults' SIGTERM test (Interrupted, nothing written)."""
    import signal

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    real_replace = os.replace
    out = tmp_path / "out.bin"
    payload = os.urandom(1000)

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(out) and when == "at":
            signal.raise_signal(signal.SIGTERM)
        real_replace(src, dst)
        if os.fspath(dst) == os.fspath(out) and when == "after":
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with atomic_output(out) as tmp:
            tmp.write_bytes(payload)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert out.read_bytes() == payload
    assert received == [signal.SIGTERM]
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
