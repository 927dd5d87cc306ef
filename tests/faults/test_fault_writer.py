"""The one writer (``fc2conv.files.atomic_output``) in process: sidecars, reclaim, signals,
short writes."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys

import pytest

from fc2conv.errors import Fc2ConvError, Interrupted
from fc2conv.files import atomic_output, reclaim, temporaries

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sidecars_move_with_the_output_and_nothing_else_stays(tmp_path):
    out = tmp_path / "m.onnx"
    with atomic_output(out) as tmp:
        assert tmp.name == "m.onnx" and tmp.parent != tmp_path
        assert [f for f, _pid in temporaries(out)] == [tmp.parent]
        tmp.write_bytes(b"model")
        tmp.with_name("m.onnx.data").write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert out.read_bytes() == b"model"


def test_a_dead_runs_leftovers_are_reclaimed_with_one_log_line(tmp_path, caplog):
    out = tmp_path / "m.onnx"
    dead = tmp_path / f".m.onnx.fc2conv-{_dead_pid()}-0a1b2c3d.tmp"
    live = tmp_path / f".m.onnx.fc2conv-{os.getppid()}-0a1b2c3d.tmp"  # a running process
    other = tmp_path / f".n.onnx.fc2conv-{_dead_pid()}-0a1b2c3d.tmp"  # another output's
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "m.onnx.data").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="fc2conv.files"), atomic_output(out) as tmp:
        tmp.write_bytes(b"model")
    assert not dead.exists() and live.exists() and other.exists()
    records = [r for r in caplog.records if r.name == "fc2conv.files"]
    assert len(records) == 1 and "removed 1 temporary folder" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()
    assert reclaim(out) == []  # nothing left to reclaim; the live one is not touched


@pytest.mark.parametrize(
    ("exc", "written"),
    [
        (OSError("16777216 requested and 868352 written"), None),
        (OSError(errno.ENOSPC, "No space left on device"), None),
        (OSError(errno.EFBIG, "File too large"), None),
    ],
)
def test_a_short_write_is_one_sentence_and_nothing_is_left(tmp_path, exc, written):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(Fc2ConvError) as info, atomic_output(out, expected_bytes=5000) as tmp:
        tmp.write_bytes(b"y" * 1234)
        raise exc
    msg = str(info.value)
    assert msg == (f"could not write {out}: no space left ("
                   + ("file size limit reached, " if exc.errno == errno.EFBIG else "")
                   + "1234 of 5000 bytes written); nothing was written"), msg
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_other_errors_pass_through_and_clean_up(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(PermissionError), atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_inside_the_writer_clean_up_and_restore_the_handler(tmp_path, signum):
    out = tmp_path / "m.onnx"
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as info, atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signum)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
    assert info.value.signum == signum
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) == before
