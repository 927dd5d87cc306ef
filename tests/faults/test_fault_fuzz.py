"""The fuzzer: >= 300 mutated files per format through convert, compare, convolutionalize and
the Python API, in process (``fc2conv.cli.main.main``, the same boundary as the console script).

Each must end in exit 0, 1 or 2 (2: exactly one ``fc2conv: error:`` line), never a traceback,
never a hang past the watchdog, never a file written next to the input. A ``.pt2`` whose
weight entries are pickles must never be unpickled (a pickle bomb would create a marker file).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from builders import mlp_onnx, small_pt2
from fuzz import mutate_onnx, mutate_pt2, run_api, run_cli

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

FILES = 300


def _check(results, marker=None):
    table = collections.Counter((r.entry, r.outcome) for r in results)
    bad = [r for r in results if r.outcome in ("TRACEBACK", "HANG") or r.new_files
           or r.code not in (0, 1, 2)]
    assert not bad, [(r.entry, r.kind, r.outcome, r.stderr[-300:], r.new_files) for r in bad[:5]]
    for r in results:
        if r.code == 2 and not r.entry.startswith("api"):
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("fc2conv: error: "), r
    internal = [r for r in results if "internal error" in r.stderr]
    assert not internal, [(r.entry, r.kind, r.stderr[-300:]) for r in internal[:5]]
    if marker is not None:
        assert not marker.exists(), "a pickle inside a .pt2 was loaded"
    return table


def test_mutated_onnx_files_end_in_a_sentence_never_a_traceback(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), outputs.mkdir()
    good = mlp_onnx(np.random.default_rng(0))
    reference = tmp_path / "good.onnx"
    reference.write_bytes(good.SerializeToString())
    import fc2conv
    from fc2conv.onnx import convert_file

    results = []
    for seed in range(FILES):
        kind, data = mutate_onnx(good, seed)
        f = inputs / f"m{seed}.onnx"
        f.write_bytes(data)
        out = outputs / f"o{seed}.onnx"
        entry = seed % 4
        if entry == 0:
            results.append(run_cli(["convert", str(f), str(out), "--to", "conv"],
                                   "convert", kind, inputs))
        elif entry == 1:
            results.append(run_cli(["convert", str(f), str(out), "--to", "conv", "--no-check"],
                                   "convert --no-check", kind, inputs))
        elif entry == 2:
            results.append(run_cli(["compare", str(reference), str(f), "--samples", "2"],
                                   "compare", kind, inputs))
        else:
            results.append(run_api(lambda f=f, out=out: convert_file(f, out, "conv",
                                                                      check=False),
                                   "api convert_file", kind, inputs))
            results.append(run_api(lambda f=f: fc2conv.compare(reference, f, samples=2,
                                                               layers=False),
                                   "api compare", kind, inputs))
        f.unlink()
        assert not any(p.name.startswith(".") for p in outputs.iterdir())
    table = _check(results)
    assert len({r.kind for r in results}) >= 10
    # the fuzzer reaches past loading: some mutants load and convert, some are refused
    assert table[("convert --no-check", "exit 0")] > 0
    assert sum(n for (_e, o), n in table.items() if o == "exit 2") > FILES // 3


def test_mutated_pt2_files_end_in_a_sentence_and_pickles_are_never_loaded(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), outputs.mkdir()
    reference = small_pt2(tmp_path / "good.pt2")
    good = reference.read_bytes()
    marker = tmp_path / "PWNED"
    import fc2conv

    results = []
    for seed in range(FILES):
        kind, data = mutate_pt2(good, seed, marker)
        f = inputs / f"m{seed}.pt2"
        f.write_bytes(data)
        out = outputs / f"o{seed}.pt2"
        entry = seed % 4
        if entry == 0:
            results.append(run_cli(["convert", str(f), str(out), "--to", "conv", "--no-check"],
                                   "convert", kind, inputs))
        elif entry == 1:
            results.append(run_cli(["compare", str(reference), str(f), "--samples", "2"],
                                   "compare", kind, inputs))
        elif entry == 2:
            results.append(run_cli(["convolutionalize", str(f), str(out), "--input-shape",
                                    "3,8,8", "--no-check"], "convolutionalize", kind, inputs))
        else:
            results.append(run_api(lambda f=f: fc2conv.compare(reference, f, samples=2,
                                                               layers=False),
                                   "api compare", kind, inputs))
        f.unlink()
    _check(results, marker)
    assert len({r.kind for r in results}) >= 10
