"""Will a comparison fit in memory? Estimated from the weights before anything runs.

``compare`` holds, per ONNX model, its weights once as arrays (``M``: the bytes of them held in
memory; external data is memory-mapped, not counted) and, for a ``ModelProto`` the caller
passed, that proto too (``M`` again; a model read from a file is split and its proto dropped,
:func:`fc2conv.verify.models.load`); onnxruntime's copy of the deployed session's weights
(``W``, the weights as stored); for model ``a`` its float64 twin (``T``, the weights in
float64), its magnitude twin (``W`` when it runs in float32, see
:func:`fc2conv.verify.onnx_backend._magnitude_single`, else ``T``) and, while the rounding
noise is measured, one shaken twin (``T``). A PyTorch model: the module (``W``) and, for
``a``, its two float64 twins. Plus a fixed ~1.5 GB for torch and onnxruntime themselves, and
the activations of the draws (small beside the weights for the models this bounds). So::

    need = FIXED + k_a M_a + W_a + T_a + G_a + T_a + k_b M_b + W_b     (ONNX, as deployed)
    need = FIXED + k_a M_a + T_a + max(G_a, T_a) + k_b M_b             (ONNX, lean)
    need = FIXED + W_a + 2 T_a + W_b                                   (PyTorch)

(``k`` = 1 for a file, 2 for a proto; ``G`` the magnitude twin). For a float32 pair read from
files that is ``FIXED + 7 W`` as deployed (``W`` per model), within the issue's budget
``FIXED + 3 x (W_a + W_b)``. When the deployed plan does not fit, the lean one feeds the weights
to onnxruntime as inputs (no copies of its own; results the same up to its kernel choice) and
drops the magnitude twin while the shaken one exists. When even that exceeds the memory
available (``MemAvailable``, or the cgroup's limit when lower), compare refuses before
starting, in one sentence, instead of being killed half way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)

FIXED = int(1.5 * 2**30)
GB = 1e9


def weight_bytes(model: Any) -> tuple[int, int, int]:
    """``(W, T, M)``: bytes of the model's weights as stored, as float64, and of those held in
    this process's memory (ONNX external data is memory-mapped, not read)."""
    if model.kind == "onnx":
        import numpy as np
        import onnx

        w = t = m = 0
        split = model.cache.get("split")
        arrays = split[1] if split else {}
        for init in model.onnx_model.graph.initializer:
            n = int(np.prod(init.dims)) if init.dims else 1
            size = itemsize(init.data_type)
            w += n * size
            t += n * 8 if init.data_type in (1, 10, 11, 16) else n * size
            held = arrays.get(init.name)
            if held is not None:
                m += 0 if isinstance(held, np.memmap) else held.nbytes
            elif init.data_location != onnx.TensorProto.EXTERNAL:
                m += n * size
        return w, t, m
    if model.module is None:
        return 0, 0, 0
    w = t = 0
    for p in [*model.module.parameters(), *model.module.buffers()]:
        w += p.numel() * p.element_size()
        t += p.numel() * (8 if p.is_floating_point() else p.element_size())
    return w, t, w


def itemsize(data_type: int) -> int:
    """Bytes per element of an ONNX tensor type (4 for a type numpy does not know: the
    estimate stays an estimate; running the model will say what is wrong with it)."""
    import numpy as np
    import onnx

    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


def needed(ma: Any, mb: Any, *, lean: bool = False) -> int:
    """Estimated peak bytes of comparing ``ma`` with ``mb`` (see module docstring); ``lean``:
    with the ONNX weights fed to onnxruntime (no copies of its own) and the magnitude twin
    dropped while the shaken one exists."""
    wa, ta, ma_mem = weight_bytes(ma)
    wb, _, mb_mem = weight_bytes(mb)
    if ma.kind == "onnx":
        mag = wa if _single_magnitude(ma) else ta
        need_a = _held(ma, ma_mem) + ta + (max(mag, ta) if lean else wa + mag + ta)
    else:
        need_a = wa + 2 * ta
    need_b = (_held(mb, mb_mem) + (0 if lean else wb)) if mb.kind == "onnx" else wb
    return FIXED + need_a + need_b


def _held(model: Any, mem: int) -> int:
    """The weights an ONNX model holds in memory: once when compare split it on loading (its
    proto dropped), twice for a caller's proto (the proto and the arrays split from it)."""
    return mem if "split" in model.cache else 2 * mem


def _single_magnitude(model: Any) -> bool:
    from fc2conv.verify import onnx_weights
    from fc2conv.verify.onnx_backend import LAYOUT_OPS

    return onnx_weights.single_precision_ok(model.onnx_model, LAYOUT_OPS)


def available() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2 limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return 1 << 62  # no way to tell: do not refuse
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def check(ma: Any, mb: Any) -> str | None:
    """Choose how to run: as deployed when it fits; else lean (ONNX: marks the models, returns
    the sentence the report prints); else raise :class:`Fc2ConvError` before starting."""
    have = available()
    need = needed(ma, mb)
    log.debug("compare needs about %.2f GB, %.2f GB available", need / GB, have / GB)
    if need <= have:
        return None
    lean = needed(ma, mb, lean=True)
    if "onnx" in (ma.kind, mb.kind) and lean <= have:
        for m in (ma, mb):
            if m.kind == "onnx":
                m.cache["lean"] = True
        note = (f"to fit in memory ({need / GB:.1f} GB needed as deployed, {have / GB:.1f} GB "
                "available) the ONNX weights were fed to onnxruntime as inputs, not constants "
                "(no packed copies)")
        ma.cache["budget_note"] = note
        return note
    raise Fc2ConvError(
        f"comparing these models needs about {min(need, lean) / GB:.1f} GB of memory (their "
        f"weights, model A's float64 twins and the runtimes) and this machine has "
        f"{have / GB:.1f} GB available: free memory or compare on a larger machine")
