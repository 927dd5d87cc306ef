"""Run an original and a converted model in onnxruntime on the same random inputs.

``_verify`` is deliberately one small function: the lead replaces it with ``fc2conv.compare``
when the verification issue lands. Until then its verdict is a max-error check: each output's
worst absolute difference must stay within ``sqrt(eps(dtype)) * max|original|`` — rounding of a
re-ordered sum is orders of magnitude below that, and any layout or weight mistake far above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from fc2conv.errors import Fc2ConvError


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    allowed: float
    index: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.allowed)


@dataclass
class VerifyResult:
    outputs: list[OutputCheck] = field(default_factory=list)
    seed: int = 0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def _session(model: onnx.ModelProto | str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, str | os.PathLike) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_inputs(session, rng: np.random.Generator, dim: int = 2) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Fresh normal draws for float inputs (symbolic dims -> ``dim``), small ints for indices."""
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dim for d in arg.shape]
        kind = arg.type.removeprefix("tensor(").removesuffix(")")
        if kind in ("float", "double", "float16"):
            dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}[kind]
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif kind in ("int64", "int32"):
            feeds[arg.name] = rng.integers(0, 2, shape).astype(
                np.int64 if kind == "int64" else np.int32
            )
        elif kind == "bool":
            feeds[arg.name] = rng.random(shape) < 0.5
        else:
            raise Fc2ConvError(
                f"cannot draw random values for input {arg.name!r} of type {arg.type}"
            )
    return feeds


def _verify(
    original: onnx.ModelProto | str | Path,
    converted: onnx.ModelProto | str | Path,
    *,
    seed: int | None = None,
    feeds: dict[str, np.ndarray] | None = None,
) -> VerifyResult:
    """Run both models on the same fresh random inputs (or ``feeds``) and bound the difference."""
    seed = int(np.random.default_rng().integers(2**32)) if seed is None else seed
    rng = np.random.default_rng(seed)
    ref_session, new_session = _session(original), _session(converted)
    feeds = feeds if feeds is not None else random_inputs(ref_session, rng)
    names = [o.name for o in ref_session.get_outputs()]
    expected = ref_session.run(names, feeds)
    actual = new_session.run(names, feeds)
    result = VerifyResult(seed=seed)
    for name, ref, new in zip(names, expected, actual, strict=True):
        ref, new = np.asarray(ref), np.asarray(new)
        if ref.shape != new.shape:
            squeezable = ref.size == new.size and tuple(d for d in new.shape if d != 1) == tuple(
                d for d in ref.shape if d != 1
            )
            if not squeezable:
                result.outputs.append(OutputCheck(name, ref.shape, float("inf"), 0.0, ()))
                continue
            new = new.reshape(ref.shape)
        if not np.issubdtype(ref.dtype, np.floating):
            diff = (ref != new).astype(np.float64)
            allowed = 0.0
        else:
            diff = np.abs(ref.astype(np.float64) - new.astype(np.float64))
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            allowed = float(np.sqrt(np.finfo(ref.dtype).eps)) * max(
                scale, float(np.finfo(ref.dtype).tiny)
            )
        if diff.size == 0:
            result.outputs.append(OutputCheck(name, ref.shape, 0.0, allowed, ()))
            continue
        worst = np.unravel_index(int(np.nanargmax(np.nan_to_num(diff, nan=np.inf))), diff.shape)
        result.outputs.append(
            OutputCheck(name, ref.shape, float(diff[worst]), allowed, tuple(int(i) for i in worst))
        )
    return result
