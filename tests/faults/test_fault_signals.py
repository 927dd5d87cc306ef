"""SIGTERM and SIGKILL mid-write of a >= 200 MB convert; short writes via RLIMIT_FSIZE.

Each signal is sent after the writer's temporary folder has appeared (the write has begun),
at moments spread over the write. What must hold afterwards:

* the output is absent, or whole: byte-identical to a clean run's output and data file;
* after SIGTERM: exit 143, one line on stderr, no temporary left beside the output;
* after SIGKILL: the temporaries a killed run left are removed by the next run to the same
  output, which says so in one line.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from builders import big_onnx
from harness import (
    clean_outputs,
    command,
    env,
    fingerprint,
    limited_run,
    signal_trial,
    write_seconds,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

# when each signal is sent, as fractions of a clean run's write (measured on this machine, so
# that as many land mid-write on a fast disk as on a slow one); 7 fall in the first half
FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.3)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    src = big_onnx(folder / "big.onnx", megabytes=210)
    out = folder / "out.onnx"
    args = ["convert", str(src), str(out), "--to", "conv", "--no-check"]
    subprocess.run(command(*args), check=True, capture_output=True, env=env())
    reference = fingerprint(out)
    assert set(reference) == {"out.onnx", "out.onnx.data"}
    assert sum((folder / n).stat().st_size for n in reference) >= 200_000_000
    clean_outputs(out)
    span = write_seconds(args, out)
    clean_outputs(out)
    yield src, out, args, reference, {"big.onnx", "big.onnx.data"}, span
    for p in folder.iterdir():
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()


def test_sigterm_mid_write_leaves_the_output_absent_or_whole_and_no_litter(big):
    src, out, args, reference, inputs, span = big
    signalled = 0
    for delay in (f * span for f in FRACTIONS):
        clean_outputs(out)
        got = signal_trial(args, out, signal.SIGTERM, delay, reference, inputs)
        assert got.output in ("absent", "whole"), (delay, got)
        assert got.litter == [], (delay, got)
        if got.signalled and got.returncode == 128 + signal.SIGTERM:  # stopped mid-write
            signalled += 1
            assert got.output == "absent"
            assert len(got.stderr_lines) == 1 and "SIGTERM" in got.stderr, got.stderr
            assert "Traceback" not in got.stderr
        elif got.signalled and got.returncode != 0:  # the signal came after the commit
            assert got.returncode == -signal.SIGTERM and got.output == "whole", got
    assert signalled >= 5, "too few SIGTERMs landed during the write"


def test_sigkill_mid_write_leftovers_are_reclaimed_by_the_next_run(big):
    src, out, args, reference, inputs, span = big
    killed_with_litter = 0
    for delay in (f * span for f in FRACTIONS):
        clean_outputs(out)
        got = signal_trial(args, out, signal.SIGKILL, delay, reference, inputs)
        assert got.output in ("absent", "whole"), (delay, got)
        leftovers = [n for n in got.litter if ".fc2conv-" in n]
        if got.signalled and got.returncode == -signal.SIGKILL:
            # what a kill leaves is only the writer's own temporary folder (and, if it landed
            # between the two final renames, the whole new data file)
            assert set(got.litter) - set(leftovers) <= {"out.onnx.data"}, got.litter
            killed_with_litter += bool(leftovers)
    assert killed_with_litter >= 5, "too few SIGKILLs landed during the write"
    # the last kill's litter: the next run removes it, says so in one line, and finishes
    clean_outputs(out)
    got = signal_trial(args, out, signal.SIGKILL, 0.0, reference, inputs)
    assert any(".fc2conv-" in n for n in got.litter)
    run = subprocess.run(command(*args), capture_output=True, text=True, env=env())
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "removed 1 temporary folder" in lines[0], run.stderr
    assert fingerprint(out) == reference
    assert {p.name for p in out.parent.iterdir()} == inputs | set(reference)


@pytest.mark.parametrize("limit", [1 << 16, 1 << 20, 20 << 20, 150 << 20])
def test_short_write_is_one_line_exit_2_and_nothing_left(big, limit):
    src, out, args, reference, inputs, _span = big
    clean_outputs(out)
    got = limited_run(args, limit, out, inputs)
    assert got.returncode == 2, got
    assert len(got.stderr_lines) == 1, got.stderr
    line = got.stderr_lines[0]
    assert line.startswith(f"fc2conv: error: could not write {out}: no space left"), line
    assert line.endswith("bytes written); nothing was written"), line
    assert got.output == "absent" and got.litter == [], got


def test_two_converts_racing_to_one_output_leave_one_whole_model(big):
    src, out, args, reference, inputs, _span = big
    clean_outputs(out)
    procs = [subprocess.Popen(command(*args), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env()) for _ in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert fingerprint(out) == reference
    assert {p.name for p in out.parent.iterdir()} == inputs | set(reference)
