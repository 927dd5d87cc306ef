"""The fuzzer: >= 300 mutated files per format through convert, compare, convolutionalize and
the Python API, in process (``fc2conv.cli.main.main``, the same boundary as the console script).

Each must end in exit 0, 1 or 2 (2: exactly one ``fc2conv: error:`` line), never a traceback,
never a hang past the watchdog, never a file written next to the input. A ``.pt2`` whose
weight entries are pickles must never be unpickled (a pickle bomb would create a marker file).
"""

from __future__ import annotations

import collections

import pytest
from fuzz import campaign

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
    results = campaign("onnx", tmp_path, FILES, every_entry=False)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())
    table = _check(results)
    assert len({r.kind for r in results}) >= 10
    # the fuzzer reaches past loading: some mutants load and convert, some are refused
    assert table[("convert --no-check", "exit 0")] > 0
    assert sum(n for (_e, o), n in table.items() if o == "exit 2") > FILES // 3


def test_mutated_pt2_files_end_in_a_sentence_and_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "PWNED"
    results = campaign("pt2", tmp_path, FILES, every_entry=False, marker=marker)
    _check(results, marker)
    assert len({r.kind for r in results}) >= 10
