"""Fault injection around real ``fc2conv`` processes: signals mid-write and short writes.

Shared by ``tests/faults`` and ``bench/faults.py``. Each trial returns an :class:`Outcome`
saying what a user would find afterwards: the exit status, stderr, whether the output is
absent, whole (byte-identical to a clean run's) or partial, and the litter left beside it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fc2conv

SRC = Path(fc2conv.__file__).resolve().parents[1]  # the fc2conv these tests import


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    e["COLUMNS"] = "200"
    return e


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fc2conv", *args]


@dataclass
class Outcome:
    returncode: int
    stderr: str
    output: str  # "absent" | "whole" | "partial"
    litter: list[str] = field(default_factory=list)
    signalled: bool = True  # False when the run finished before the signal was sent

    @property
    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(out: Path) -> dict[str, str]:
    """sha256 of the output and its sidecars (files in its folder named ``out*``)."""
    return {p.name: digest(p) for p in sorted(out.parent.glob(out.name + "*")) if p.is_file()}


def state(out: Path, reference: dict[str, str], inputs: set[str]) -> tuple[str, list[str]]:
    """("absent" | "whole" | "partial", litter): litter is every file in the output folder that
    is neither an input nor part of a whole output."""
    names = {p.name for p in out.parent.iterdir()} - inputs
    if not out.exists():
        return "absent", sorted(names)
    now = fingerprint(out)
    whole = now == reference
    return ("whole" if whole else "partial"), sorted(names - set(reference))


def clean_outputs(out: Path) -> None:
    for p in out.parent.glob(out.name + "*"):
        if p.is_file():
            p.unlink()


def writing(proc: subprocess.Popen, out: Path, timeout: float) -> bool:
    """Wait until ``proc``'s temporary folder for ``out`` exists (its write has begun);
    whether it appeared before ``proc`` ended or ``timeout`` passed."""
    from fc2conv.files import temporaries

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(pid == proc.pid for _f, pid in temporaries(out)):
            return True
        time.sleep(0.002)
    return False


def signal_trial(args: list[str], out: Path, signum: int, delay: float,
                 reference: dict[str, str], inputs: set[str], timeout: float = 120) -> Outcome:
    """Run ``fc2conv *args``; once its temporary folder for ``out`` exists, wait ``delay``
    seconds and send ``signum``. Returns what is left."""
    proc = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env())
    signalled = False
    if writing(proc, out, timeout):
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signum)
            signalled = True
    try:
        _stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _stdout, stderr = proc.communicate()
        stderr += "\n<hung: killed by the harness>"
    output, litter = state(out, reference, inputs)
    return Outcome(proc.returncode, stderr, output, litter, signalled)


def write_seconds(args: list[str], out: Path, timeout: float = 120) -> float:
    """Seconds from the appearance of the writer's temporary folder for ``out`` to the end of
    a clean ``fc2conv *args`` run: the span a signal must land in to hit the write."""
    proc = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env())
    found = writing(proc, out, timeout)
    began = time.monotonic()
    proc.wait(timeout=timeout)
    ended = time.monotonic()
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"a clean run of {args} failed or wrote no temporary folder")
    return ended - began


def limited_run(args: list[str], limit_bytes: int, out: Path, inputs: set[str],
                timeout: float = 120) -> Outcome:
    """Run ``fc2conv *args`` with ``RLIMIT_FSIZE = limit_bytes`` (what ``ulimit -f`` sets): a
    write past the limit fails as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    proc = subprocess.run(command(*args), capture_output=True, text=True, env=env(),
                          preexec_fn=limit, timeout=timeout)
    names = {p.name for p in out.parent.iterdir()} - inputs
    return Outcome(proc.returncode, proc.stderr, "whole" if out.exists() else "absent",
                   sorted(names))
