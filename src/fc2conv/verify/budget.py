"""Will a comparison fit in memory? Estimated from the weights before anything runs.

``compare`` holds, per ONNX model, its ModelProto (``W`` bytes of weights), the weights read
once as arrays (``W``), onnxruntime's copy and packed copy of the deployed session (``2 W``;
the float64 twins and layer captures are fed the arrays, not copied); for model ``a`` also the
float64 and magnitude twins (``2 x T``, ``T`` the weights in float64) and, while the rounding
noise is measured, one shaken twin (``T``). A PyTorch model: the module (``W``) and, for
``a``, its two float64 twins. Plus a fixed ~1.5 GB for torch and onnxruntime themselves, and
the activations of the draws (small beside the weights for the models this bounds). So::

    need = FIXED + 2 M_a + 2 W_a + 3 T_a + 2 M_b + 2 W_b     (ONNX, as deployed)
    need = FIXED + 2 M_a + 2 T_a + 2 M_b                     (ONNX, lean)
    need = FIXED + W_a + 2 T_a + W_b                         (PyTorch)

(``M``: the weights held in memory; external data is memory-mapped and not counted). When the
deployed plan does not fit, the lean one feeds the weights to onnxruntime as inputs (no copies
of its own; results the same up to its kernel choice) and drops the magnitude twin while the
shaken one exists.

which stays under the issue's budget ``3 x (T_a + T_b) + FIXED`` for float32 models
(``T = 2 W``). When ``need`` exceeds the
memory available (``MemAvailable``, or the cgroup's limit when lower), compare refuses before
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
        for init in model.onnx_model.graph.initializer:
            n = int(np.prod(init.dims)) if init.dims else 1
            size = itemsize(init.data_type)
            w += n * size
            t += n * 8 if init.data_type in (1, 10, 11, 16) else n * size
            if init.data_location != onnx.TensorProto.EXTERNAL:
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
        need_a = 2 * ma_mem + (2 * ta if lean else 2 * wa + 3 * ta)
    else:
        need_a = wa + 2 * ta
    need_b = (2 * mb_mem + (0 if lean else 2 * wb)) if mb.kind == "onnx" else wb
    return FIXED + need_a + need_b


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
