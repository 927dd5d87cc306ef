"""Mutated model files through convert, compare, convolutionalize and the Python API, in process.

:func:`mutate_onnx` and :func:`mutate_pt2` make one damaged file from a good one (seeded);
:func:`run_cli` runs ``fc2conv.cli.main.main`` in this process with a watchdog, and
:func:`run_api` a Python entry point; each returns an :class:`Exercise` that records the exit
status, stderr and any file that appeared next to the input.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import signal
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

ONNX_KINDS = ("truncate", "bitflip", "dims", "dtype", "dangling", "cycle", "drop_init",
              "bytes", "attr", "opset")
PT2_KINDS = ("truncate", "bitflip", "json_cut", "json_value", "json_key", "weight_cut",
             "weight_pickle", "weight_garbage", "drop_member", "archive_version")


class Hang(BaseException):  # noqa: N818 - like KeyboardInterrupt: not swallowed by the code
    """The watchdog fired: the call ran past its time limit."""


@contextlib.contextmanager
def watchdog(seconds: float):
    def fire(signum, frame):
        raise Hang(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Exercise:
    entry: str
    kind: str
    code: int  # 0 ok, 1 "different", 2 refused with one line; -1 traceback; -2 hang
    stderr: str
    new_files: list[str]

    @property
    def outcome(self) -> str:
        if self.code == -2:
            return "HANG"
        if self.code == -1 or "Traceback" in self.stderr:
            return "TRACEBACK"
        if self.code == 2 and "internal error" in self.stderr:
            return "exit 2 (internal error)"
        return f"exit {self.code}"


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def run_cli(argv: list[str], entry: str, kind: str, watched: Path,
            seconds: float = 60) -> Exercise:
    """``fc2conv *argv`` in process; ``watched``: the input's folder (nothing may appear)."""
    from fc2conv.cli.main import main

    before = _listing(watched)
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            with watchdog(seconds):
                main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except Hang:
            code = -2
        except BaseException as exc:  # noqa: BLE001 - what the user would see as a traceback
            code = -1
            err.write(f"Traceback: {type(exc).__name__}: {exc}")
    return Exercise(entry, kind, code, err.getvalue(), sorted(_listing(watched) - before))


def run_api(call: Callable[[], object], entry: str, kind: str, watched: Path,
            seconds: float = 60) -> Exercise:
    """A Python API call: returning is exit 0, ``Fc2ConvError`` exit 2, anything else -1."""
    from fc2conv.errors import Fc2ConvError

    before = _listing(watched)
    code, text = 0, ""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            with watchdog(seconds):
                call()
        except Fc2ConvError as exc:
            code, text = 2, f"fc2conv: error: {exc}"
        except Hang:
            code = -2
        except BaseException as exc:  # noqa: BLE001
            code, text = -1, f"Traceback: {type(exc).__name__}: {exc}"
    return Exercise(entry, kind, code, text, sorted(_listing(watched) - before))


# -- ONNX mutations ---------------------------------------------------------------------------

def mutate_onnx(good: onnx.ModelProto, seed: int) -> tuple[str, bytes]:
    """One damaged serialization of ``good``: (mutation kind, bytes)."""
    rng = random.Random(seed)
    kind = ONNX_KINDS[seed % len(ONNX_KINDS)]
    raw = good.SerializeToString()
    m = onnx.ModelProto()
    m.CopyFrom(good)
    g = m.graph
    if kind == "truncate":
        return kind, raw[: rng.randrange(1, len(raw))]
    if kind == "bitflip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "bytes":
        b = bytearray(raw)
        i = rng.randrange(len(b))
        if rng.random() < 0.5:
            del b[i: i + rng.randint(1, 16)]
        else:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        return kind, bytes(b)
    if kind == "dims":
        target = rng.choice([*g.initializer, *g.input, *g.output])
        if isinstance(target, onnx.TensorProto):
            i = rng.randrange(len(target.dims))
            target.dims[i] = rng.choice([0, 1, target.dims[i] + 1, target.dims[i] * 2, 10**6])
            if rng.random() < 0.3:
                target.dims.append(rng.randint(1, 4))
        else:
            dims = target.type.tensor_type.shape.dim
            d = dims[rng.randrange(len(dims))]
            d.dim_value = rng.choice([0, 1, 3, 7, 10**9])
    elif kind == "dtype":
        target = rng.choice([*g.initializer, *g.input, *g.output])
        new = rng.choice([0, 2, 3, 6, 7, 9, 10, 11, 16, 8, 99])
        if isinstance(target, onnx.TensorProto):
            target.data_type = new
        else:
            target.type.tensor_type.elem_type = new
    elif kind == "dangling":
        node = rng.choice(list(g.node))
        i = rng.randrange(len(node.input))
        node.input[i] = f"missing_{seed}"
    elif kind == "cycle":
        nodes = list(g.node)
        i = rng.randrange(len(nodes))
        j = rng.randrange(i, len(nodes))
        nodes[i].input[0] = nodes[j].output[0]  # a node that reads its own or a later output
    elif kind == "drop_init":
        del g.initializer[rng.randrange(len(g.initializer))]
    elif kind == "attr":
        node = rng.choice(list(g.node))
        a = node.attribute.add()
        a.name = rng.choice(["transA", "transB", "alpha", "axis", "bogus"])
        a.type = onnx.AttributeProto.INT
        a.i = rng.choice([-1, 0, 1, 2, 7])
    elif kind == "opset":
        m.opset_import[0].version = rng.choice([1, 6, 9, 30, 999])
    return kind, m.SerializeToString()


# -- .pt2 mutations ---------------------------------------------------------------------------

class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bomb(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(_Boom(str(marker)))


def mutate_pt2(good: bytes, seed: int, marker: Path) -> tuple[str, bytes]:
    """One damaged ``.pt2`` archive (zip) from ``good``: (mutation kind, bytes)."""
    rng = random.Random(seed)
    kind = PT2_KINDS[seed % len(PT2_KINDS)]
    if kind == "truncate":
        return kind, good[: rng.randrange(1, len(good))]
    if kind == "bitflip":
        b = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    src = zipfile.ZipFile(io.BytesIO(good))
    members = {i.filename: src.read(i.filename) for i in src.infolist()}
    jsons = [n for n in members if n.endswith(".json")]
    weights = [n for n in members if "/data/weights/weight_" in n]
    if kind == "json_cut":
        n = rng.choice(jsons)
        members[n] = members[n][: rng.randrange(len(members[n]))]
    elif kind in ("json_value", "json_key"):
        n = rng.choice(jsons)
        doc = json.loads(members[n])
        _damage_json(doc, rng, keys=kind == "json_key")
        members[n] = json.dumps(doc).encode()
    elif kind == "weight_cut":
        n = rng.choice(weights)
        members[n] = members[n][: rng.randrange(len(members[n]))]
    elif kind == "weight_pickle":
        bomb = pickle_bomb(marker)
        for n in rng.sample(weights, rng.randint(1, len(weights))):
            members[n] = bomb
        for n in members:
            if n.endswith(".pt"):
                members[n] = bomb
    elif kind == "weight_garbage":
        n = rng.choice(weights)
        members[n] = rng.randbytes(len(members[n]) + rng.choice([-4, 0, 4]))
    elif kind == "drop_member":
        del members[rng.choice(sorted(members))]
    elif kind == "archive_version":
        n = next(n for n in members if n.endswith("archive_version"))
        members[n] = rng.choice([b"0", b"99", b"x", b""])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    return kind, buf.getvalue()


def _damage_json(doc: object, rng: random.Random, keys: bool) -> None:
    """Change one value (or delete/rename one key) somewhere in a JSON document, in place."""
    path = []
    node = doc
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            k = rng.choice(sorted(node))
            path.append((node, k))
            node = node[k]
        elif isinstance(node, list) and node:
            k = rng.randrange(len(node))
            path.append((node, k))
            node = node[k]
        else:
            break
    if not path:
        return
    parent, k = path[-1]
    if keys and isinstance(parent, dict):
        value = parent.pop(k)
        if rng.random() < 0.5:
            parent[f"{k}_x"] = value
        return
    parent[k] = rng.choice([None, -1, 0, 10**12, "x", [], {}, 1.5, True])


# -- campaigns: one loop for the test tier and for bench/faults.py ------------------------------

def _onnx_entries(reference: Path) -> list[tuple[str, Callable[[Path, Path, str, Path], Exercise]]]:
    import fc2conv
    from fc2conv.onnx import convert_file

    return [
        ("convert", lambda f, out, kind, w: run_cli(
            ["convert", str(f), str(out), "--to", "conv"], "convert", kind, w)),
        ("convert --no-check", lambda f, out, kind, w: run_cli(
            ["convert", str(f), str(out), "--to", "conv", "--no-check"],
            "convert --no-check", kind, w)),
        ("compare", lambda f, out, kind, w: run_cli(
            ["compare", str(reference), str(f), "--samples", "2"], "compare", kind, w)),
        ("api convert_file", lambda f, out, kind, w: run_api(
            lambda: convert_file(f, out, "conv", check=False), "api convert_file", kind, w)),
        ("api compare", lambda f, out, kind, w: run_api(
            lambda: fc2conv.compare(reference, f, samples=2, layers=False),
            "api compare", kind, w)),
    ]


def _pt2_entries(reference: Path) -> list[tuple[str, Callable[[Path, Path, str, Path], Exercise]]]:
    import fc2conv

    return [
        ("convert", lambda f, out, kind, w: run_cli(
            ["convert", str(f), str(out), "--to", "conv", "--no-check"], "convert", kind, w)),
        ("compare", lambda f, out, kind, w: run_cli(
            ["compare", str(reference), str(f), "--samples", "2"], "compare", kind, w)),
        ("convolutionalize", lambda f, out, kind, w: run_cli(
            ["convolutionalize", str(f), str(out), "--input-shape", "3,8,8", "--no-check"],
            "convolutionalize", kind, w)),
        ("api compare", lambda f, out, kind, w: run_api(
            lambda: fc2conv.compare(reference, f, samples=2, layers=False),
            "api compare", kind, w)),
    ]


def campaign(fmt: str, folder: Path, files: int, *, every_entry: bool,
             marker: Path | None = None) -> list[Exercise]:
    """``files`` mutants of a good ``fmt`` file ("onnx" or "pt2") through the entry points.

    ``every_entry``: each mutant goes through every entry (the benchmark's tally); otherwise
    mutant ``seed`` goes through entry ``seed mod n`` (the test tier's budget; the ONNX API
    entries share one slot). ``marker``: the file a pickle bomb would create (pt2 only).
    """
    import numpy as np
    from builders import mlp_onnx, small_pt2  # the test tier's builders, beside this module

    inputs, outputs = folder / "in", folder / "out"
    inputs.mkdir(), outputs.mkdir()
    if fmt == "onnx":
        good_model = mlp_onnx(np.random.default_rng(0))
        reference = folder / "good.onnx"
        reference.write_bytes(good_model.SerializeToString())
        entries = _onnx_entries(reference)
        slots = [[0], [1], [2], [3, 4]]
    else:
        reference = small_pt2(folder / "good.pt2")
        good_bytes = reference.read_bytes()
        entries = _pt2_entries(reference)
        slots = [[i] for i in range(len(entries))]
    results: list[Exercise] = []
    for seed in range(files):
        if fmt == "onnx":
            kind, data = mutate_onnx(good_model, seed)
        else:
            kind, data = mutate_pt2(good_bytes, seed, marker or folder / "PWNED")
        f = inputs / f"m{seed}.{fmt}"
        f.write_bytes(data)
        out = outputs / f"o{seed}.{fmt}"
        chosen = range(len(entries)) if every_entry else slots[seed % len(slots)]
        for i in chosen:
            results.append(entries[i][1](f, out, kind, inputs))
        f.unlink()
    return results
