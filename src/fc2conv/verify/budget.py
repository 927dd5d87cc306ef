"""Will a comparison fit in memory? Estimated from the weights before anything runs.

``compare`` holds, per ONNX model, its weights once as arrays (``M``: the bytes of them held in
memory; external data is memory-mapped, not counted: file pages the kernel can drop) and, for a
``ModelProto`` the caller passed, that proto too (``M`` again; a model read from a file is split
and its proto dropped, :func:`fc2conv.verify.models.load`); onnxruntime's copy of each
deployed session's weights (``W``, the weights as stored). Model ``a``'s float64 and magnitude
twins hold no weights: they read ``a``'s arrays through casts as they run
(:func:`fc2conv.verify.onnx_weights.read_through`), so only the weights of the node running
exist in float64 at once (``2 L``: twice ``a``'s largest weight in float64, for onnxruntime
scheduling a second beside it). On top of what is held, the largest of three passing costs:

- onnxruntime building a deployed session optimizes a copy of the weights before it keeps one:
  up to ``BUILD x W`` beyond ``W`` (measured 1.5x for a MatMul model, 2.5x for a 1x1-Conv one,
  whose weights it reorders; ``bench/verdicts_scale.py``);
- the float64 twin's casts (``2 L``);
- while the rounding noise is measured, one shaken twin (``T``: ``a``'s weights in float64).

A PyTorch model: the module (``W``) and, for ``a``, its two float64 twins (on a draw in the
verdict's grey zone, ``b``'s float64 twin instead of ``a``'s shaken one, which is released by
then: ``T_b`` in place of ``T_a``, the same for a conversion). Plus a fixed
~1.5 GB for torch and onnxruntime themselves, and the activations of the draws (small beside
the weights for the models this bounds). So::

    need = FIXED + k_a M_a + k_b M_b + W_a + W_b + max(BUILD max(W_a, W_b), 2 L_a, T_a)
    need = FIXED + k_a M_a + k_b M_b + max(2 L_a, T_a)                      (ONNX, lean)
    need = FIXED + W_a + 2 T_a + W_b                                         (PyTorch)

(``k`` = 1 for a file, 2 for a proto). For a float32 pair read from files that is at most
``FIXED + 6.5 W`` as deployed (``W`` per model), ``FIXED + 4.5 W`` with external data, within
the issue's budget ``FIXED + 3 x (W_a + W_b)``. When the deployed plan does not fit, the lean
one feeds the weights to onnxruntime as inputs (no copies of its own; results the same up to
its kernel choice). When even that exceeds the memory available (``MemAvailable``, or the
cgroup's limit when lower), compare refuses before starting, in one sentence, instead of being
killed half way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)

FIXED = int(1.5 * 2**30)
GB = 1e9
BUILD = 2.5  # onnxruntime's passing copies while it builds a deployed session, x W


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


def largest64(model: Any) -> int:
    """Bytes of the model's largest float weight in float64 (what a twin casts at once)."""
    if model.kind != "onnx":
        return 0
    import numpy as np

    from fc2conv.verify.onnx_weights import FLOAT_TYPES

    return max((8 * (int(np.prod(i.dims)) if i.dims else 1)
                for i in model.onnx_model.graph.initializer if i.data_type in FLOAT_TYPES),
               default=0)


def needed(ma: Any, mb: Any, *, lean: bool = False) -> int:
    """Estimated peak bytes of comparing ``ma`` with ``mb`` (see module docstring); ``lean``:
    with the ONNX weights fed to onnxruntime (no copies of its own)."""
    wa, ta, ma_mem = weight_bytes(ma)
    wb, _, mb_mem = weight_bytes(mb)
    onnx_a, onnx_b = ma.kind == "onnx", mb.kind == "onnx"
    held = (_held(ma, ma_mem) if onnx_a else wa + 2 * ta) + (_held(mb, mb_mem) if onnx_b else wb)
    passing = max(2 * largest64(ma), ta) if onnx_a else 0
    if lean:
        return FIXED + held + passing
    deployed = [w for w, onnx in ((wa, onnx_a), (wb, onnx_b)) if onnx]
    build = int(BUILD * max(deployed, default=0))
    return FIXED + held + sum(deployed) + max(build, passing)


def _held(model: Any, mem: int) -> int:
    """The weights an ONNX model holds in memory: once when compare split it on loading (its
    proto dropped), twice for a caller's proto (the proto and the arrays split from it)."""
    return mem if "split" in model.cache else 2 * mem


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
