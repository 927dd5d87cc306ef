"""Time ``fc2conv convert`` on large transformer-like ONNX models against the I/O floor.

For each size (~200 MB and ~2 GB of float32 weights, stored as external data) this script

1. writes a synthetic pre-norm transformer stack (per layer: LayerNorm, MatMul+Add for QKV and
   the output projection, LayerNorm, MatMul+Add -> Gelu -> MatMul+Add, residual Adds), streaming
   each weight straight to the external data file;
2. runs, each in a fresh subprocess, the floor — ``onnx.load`` + ``onnx.save`` (external data)
   of the same file — and ``fc2conv convert IN OUT --to conv --no-check``;
3. prints wall time, peak RSS (``os.wait4`` rusage of that subprocess) and both ratios:
   convert time / floor time, and peak RSS / model size.

Big files go under a temporary folder in /tmp and are deleted afterwards.
Usage: python bench/onnx_convert.py [--sizes 200,2000] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOOR = """
import sys, onnx
m = onnx.load(sys.argv[1])
out = sys.argv[2]
onnx.save(m, out, save_as_external_data=True, location=out.rsplit('/', 1)[-1] + '.data')
"""


def build(path: Path, d_model: int, layers: int, seed: int = 0) -> int:
    """Write the model; return the bytes of weight data."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as data:

        def weight(name: str, *shape: int, scale: float = 1.0) -> str:
            nonlocal offset
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            raw = arr.tobytes()
            data.write(raw)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                t.external_data.add(key=k, value=v)
            offset += len(raw)
            inits.append(t)
            return name

        d, h = d_model, 4 * d_model
        x = "x"
        for i in range(layers):
            p = f"layers.{i}"
            s = 1 / np.sqrt(d)
            nodes.append(
                helper.make_node(
                    "LayerNormalization",
                    [x, weight(f"{p}.ln1.g", d), weight(f"{p}.ln1.b", d)],
                    [f"{p}.n1"],
                    axis=-1,
                )
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}.n1", weight(f"{p}.qkv.w", d, 3 * d, scale=s)],
                    [f"{p}.qkv.mm"],
                    name=f"{p}.qkv",
                )
            )
            nodes.append(
                helper.make_node(
                    "Add", [f"{p}.qkv.mm", weight(f"{p}.qkv.b", 3 * d)], [f"{p}.qkv.out"]
                )
            )
            # stand-in for attention: keep the V third of the projection
            nodes.append(
                helper.make_node(
                    "Split",
                    [f"{p}.qkv.out"],
                    [f"{p}.q", f"{p}.k", f"{p}.v"],
                    axis=-1,
                    num_outputs=3,
                )
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}.v", weight(f"{p}.o.w", d, d, scale=s)],
                    [f"{p}.o.mm"],
                    name=f"{p}.o",
                )
            )
            nodes.append(
                helper.make_node("Add", [f"{p}.o.mm", weight(f"{p}.o.b", d)], [f"{p}.o.out"])
            )
            nodes.append(helper.make_node("Add", [x, f"{p}.o.out"], [f"{p}.r1"]))
            nodes.append(
                helper.make_node(
                    "LayerNormalization",
                    [f"{p}.r1", weight(f"{p}.ln2.g", d), weight(f"{p}.ln2.b", d)],
                    [f"{p}.n2"],
                    axis=-1,
                )
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}.n2", weight(f"{p}.up.w", d, h, scale=s)],
                    [f"{p}.up.mm"],
                    name=f"{p}.up",
                )
            )
            nodes.append(
                helper.make_node("Add", [f"{p}.up.mm", weight(f"{p}.up.b", h)], [f"{p}.up.out"])
            )
            nodes.append(helper.make_node("Gelu", [f"{p}.up.out"], [f"{p}.act"]))
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}.act", weight(f"{p}.down.w", h, d, scale=1 / np.sqrt(h))],
                    [f"{p}.down.mm"],
                    name=f"{p}.down",
                )
            )
            nodes.append(
                helper.make_node(
                    "Add", [f"{p}.down.mm", weight(f"{p}.down.b", d)], [f"{p}.down.out"]
                )
            )
            nodes.append(helper.make_node("Add", [f"{p}.r1", f"{p}.down.out"], [f"{p}.out"]))
            x = f"{p}.out"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path))
    return offset


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}"
        )
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def inspect_output(path: Path, layers: int) -> str:
    """Op counts of the converted graph and the ONNX checker's verdict (weights not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert ops.get("Conv") == 4 * layers and "MatMul" not in ops, ops
    onnx.checker.check_model(str(path), full_check=True)
    data = path.parent / (path.name + ".data")
    return (
        f"{ops['Conv']} Conv, {ops.get('Transpose', 0)} Transpose, 0 MatMul; "
        f"{data.name} {data.stat().st_size / 1e6:.0f} MB; onnx.checker (full) ok"
    )


def drop(path: Path) -> None:
    for p in (path, path.parent / (path.name + ".data")):
        p.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="200,2000", help="approximate model sizes in MB")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    configs = {200: (1024, 4), 2000: (2048, 10)}  # d_model, layers: 12 d^2 floats per layer
    py = sys.executable
    env_src = str(Path(__file__).resolve().parents[1] / "src")
    os.environ["PYTHONPATH"] = env_src + os.pathsep + os.environ.get("PYTHONPATH", "")
    root = Path(tempfile.mkdtemp(prefix="fc2conv_bench_", dir="/tmp"))
    rows = []
    base_t, base_rss = measure([py, "-c", "import fc2conv.onnx, fc2conv.cli.convert, onnxruntime"])
    print(
        f"baseline: importing fc2conv (+ torch, onnx, onnx-ir, onnxruntime) takes {base_t:.1f} s "
        f"and {base_rss:.2f} GiB peak RSS; included in every convert figure below",
        flush=True,
    )
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            d, layers = configs[size]
            src = root / f"tf{size}.onnx"
            t0 = time.perf_counter()
            nbytes = build(src, d, layers)
            gib = nbytes / 2**30
            print(
                f"built {src.name}: d_model={d}, {layers} layers, "
                f"{nbytes / 1e6:.0f} MB of weights, "
                f"largest tensor {4 * d * d * 4 / 1e6:.0f} MB ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            subprocess.run(
                ["cat", str(src.parent / (src.name + ".data"))],
                stdout=subprocess.DEVNULL,
                check=True,
            )  # warm the page cache for both runs alike
            floor_out, conv_out = root / "floor.onnx", root / "conv.onnx"
            floor_t, floor_rss = measure([py, "-c", FLOOR, str(src), str(floor_out)])
            drop(floor_out)
            conv_t, conv_rss = measure(
                [
                    py,
                    "-m",
                    "fc2conv",
                    "convert",
                    str(src),
                    str(conv_out),
                    "--to",
                    "conv",
                    "--no-check",
                ]
            )
            rows.append((size, nbytes, floor_t, floor_rss, conv_t, conv_rss))
            print(f"  output: {inspect_output(conv_out, layers)}", flush=True)
            print(
                f"  onnx.load + onnx.save : {floor_t:7.1f} s  peak RSS {floor_rss:5.2f} GiB "
                f"({floor_rss / gib:.2f}x model)",
                flush=True,
            )
            print(
                f"  fc2conv convert --to conv --no-check: {conv_t:7.1f} s  "
                f"peak RSS {conv_rss:5.2f} GiB "
                f"({conv_rss / gib:.2f}x model)",
                flush=True,
            )
            print(
                f"  ratios: time convert/floor = {conv_t / floor_t:.2f}; "
                f"peak RSS/model size: convert {conv_rss / gib:.2f}, floor {floor_rss / gib:.2f}; "
                f"convert above the import baseline: {conv_rss - base_rss:.2f} GiB "
                f"({(conv_rss - base_rss) / gib:.2f}x model), {conv_t - base_t:.1f} s",
                flush=True,
            )
            if size <= 200:
                check_t, check_rss = measure(
                    [
                        py,
                        "-m",
                        "fc2conv",
                        "convert",
                        str(src),
                        str(conv_out),
                        "--to",
                        "conv",
                        "--check",
                    ]
                )
                print(
                    f"  with --check (checker + onnxruntime on both): {check_t:.1f} s, "
                    f"peak RSS {check_rss:.2f} GiB",
                    flush=True,
                )
            drop(conv_out)
            drop(src)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\nsize_MB  weights_MB  floor_s  floor_RSS/size  convert_s  convert_RSS/size  time_ratio")
    for size, nbytes, ft, fr, ct, cr in rows:
        g = nbytes / 2**30
        print(
            f"{size:7d}  {nbytes / 1e6:10.0f}  {ft:7.1f}  {fr / g:14.2f}  "
            f"{ct:9.1f}  {cr / g:16.2f}  "
            f"{ct / ft:10.2f}"
        )


if __name__ == "__main__":
    main()
