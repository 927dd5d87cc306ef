"""Fault injection, tallied: what a user finds after each kind of fault, over many trials.

Faults (each trial a real ``fc2conv`` run unless noted):

* SIGTERM / SIGKILL at moments spread over 1.3x a clean run's write (measured first) after
  the write of a ~200 MB ``convert`` has begun;
  after each SIGKILL trial the next run (the next trial) reclaims the dead run's temporaries;
* short writes: ``RLIMIT_FSIZE`` (``ulimit -f``) at several limits;
* fuzzed ONNX and ``.pt2`` files through convert / compare / convolutionalize / Python API
  (in process, the same CLI boundary);
* hostile external data (``../..``, absolute, symlink) and pickles in disguise.

Prints one table: fault | trials | outcomes (counts), then "nothing lost" checks.
Usage: python bench/faults.py [--moments 10] [--megabytes 210] [--fuzz 300]
Big scratch files go to a temporary folder in /tmp and are deleted.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
from builders import big_onnx, hostile_onnx, mlp_onnx  # noqa: E402
from fuzz import campaign, pickle_bomb, run_cli  # noqa: E402
from harness import (  # noqa: E402
    clean_outputs,
    command,
    env,
    fingerprint,
    limited_run,
    signal_trial,
    write_seconds,
)


def signal_rows(folder: Path, moments: int, megabytes: int) -> list[tuple[str, int, str]]:
    src = big_onnx(folder / "big.onnx", megabytes=megabytes)
    out = folder / "out.onnx"
    args = ["convert", str(src), str(out), "--to", "conv", "--no-check"]
    subprocess.run(command(*args), check=True, capture_output=True, env=env())
    reference = fingerprint(out)
    inputs = {"big.onnx", "big.onnx.data"}
    clean_outputs(out)
    span = write_seconds(args, out)  # moments spread over 1.3x this machine's write
    delays = [1.3 * span * i / max(1, moments - 1) for i in range(moments)]
    rows = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        tally: collections.Counter[str] = collections.Counter()
        reclaimed = 0
        for delay in delays:
            clean_outputs(out)
            got = signal_trial(args, out, sig, delay, reference, inputs)
            temps = [n for n in got.litter if ".fc2conv-" in n]
            other = [n for n in got.litter if ".fc2conv-" not in n]
            if not got.signalled or got.returncode == 0:
                what = "finished first"
            elif got.returncode == -sig and got.output == "whole" and sig == signal.SIGTERM:
                what = "signal after the output was committed"
            else:
                what = f"exit {got.returncode}"
            tally[f"{what}, output {got.output}"] += 1
            if temps:
                tally["temporaries left"] += 1
            if other:
                tally["other litter " + ",".join(other)] += 1
            if "removed 1 temporary folder" in got.stderr:
                reclaimed += 1
        if sig == signal.SIGKILL:
            run = subprocess.run(command(*args), capture_output=True, text=True, env=env())
            reclaimed += "removed 1 temporary folder" in run.stderr
            left = [p.name for p in folder.iterdir() if ".fc2conv-" in p.name]
            tally[f"reclaimed by the next run {reclaimed}, left at the end {len(left)}"] += 1
        rows.append((f"{signal.Signals(sig).name} mid-write ({megabytes} MB)", len(delays),
                     _fmt(tally)))
    for limit in (1 << 16, 1 << 20, 20 << 20, 100 << 20, 150 << 20):
        clean_outputs(out)
        got = limited_run(args, limit, out, inputs)
        one = len(got.stderr_lines) == 1 and "no space left" in got.stderr
        said = ("one line 'no space left'" if one else "NOT ONE LINE") if got.returncode \
            else "fit under the limit"
        rows.append((f"ulimit -f {limit >> 10} KB", 1,
                     f"exit {got.returncode}, {said}, output {got.output}, "
                     f"litter {len(got.litter)}"))
    return rows


def fuzz_rows(folder: Path, files: int) -> list[tuple[str, int, str]]:
    (folder / "onnx").mkdir(), (folder / "pt2").mkdir()
    marker = folder / "PWNED"
    results = [dataclasses.replace(r, entry=f"onnx {r.entry}")
               for r in campaign("onnx", folder / "onnx", files, every_entry=True)]
    results += [dataclasses.replace(r, entry=f"pt2 {r.entry}")
                for r in campaign("pt2", folder / "pt2", files, every_entry=True, marker=marker)]
    rows = []
    by_entry: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in results:
        by_entry[r.entry][r.outcome] += 1
        if r.new_files:
            by_entry[r.entry]["FILE WRITTEN NEXT TO THE INPUT"] += 1
    for entry, tally in by_entry.items():
        rows.append((f"fuzzed {entry}", sum(v for k, v in tally.items()
                                            if not k.startswith("FILE")), _fmt(tally)))
    rows.append(("pickles unpickled while fuzzing .pt2", files, "yes" if marker.exists()
                 else "none"))
    return rows


def hostile_rows(folder: Path) -> list[tuple[str, int, str]]:
    tally: collections.Counter[str] = collections.Counter()
    good = folder / "good.onnx"
    good.write_bytes(mlp_onnx(np.random.default_rng(0)).SerializeToString())
    n = 0
    for kind in ("dotdot", "absolute", "symlink"):
        m = hostile_onnx(folder / kind / "m", kind)
        for argv in (["convert", str(m), str(m.with_name("o.onnx")), "--to", "conv"],
                     ["convert", str(m), str(m.with_name("o.onnx")), "--to", "conv",
                      "--no-check"],
                     ["compare", str(m), str(good)]):
            r = run_cli(argv, argv[0], kind, m.parent)
            one = len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
            tally[f"exit {r.code}{', one line, checker reason' if one and 'checker' in r.stderr else ''}"] += 1  # noqa: E501
            n += 1
    marker = folder / "PWNED2"
    f = folder / "bomb.pt"
    f.write_bytes(pickle_bomb(marker))
    for argv in (["convert", str(f), str(folder / "o.pt"), "--to", "conv"],
                 ["compare", str(f), str(f)]):
        r = run_cli(argv, argv[0], "pickle", folder)
        tally[f"pickle .pt: exit {r.code}, unpickled {marker.exists()}"] += 1
        n += 1
    return [("hostile external data / pickles", n, _fmt(tally))]


def _fmt(tally: collections.Counter[str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in sorted(tally.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moments", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=210)
    parser.add_argument("--fuzz", type=int, default=300)
    a = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fc2conv-faults-", dir="/tmp"))
    try:
        rows = signal_rows(folder / "sig", a.moments, a.megabytes) if (folder / "sig").mkdir() \
            is None else []
        rows += fuzz_rows(folder / "fuzz", a.fuzz) if (folder / "fuzz").mkdir() is None else []
        rows += hostile_rows(folder / "hostile") if (folder / "hostile").mkdir() is None else []
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'fault':<{width}} | trials | outcomes")
    print(f"{'-' * width}-|--------|---------")
    for fault, trials, outcomes in rows:
        print(f"{fault:<{width}} | {trials:>6} | {outcomes}")


if __name__ == "__main__":
    main()
