"""A converted GraphModule's eager forward calls aten ops through their C++ entry points.

fx writes a call of an aten op as ``torch.ops.aten.add.Tensor(x, y)``: four attribute look-ups,
then the Python frame of ``OpOverload.__call__``, which only calls ``OpOverload._op`` (the op's
C++ entry) with the same arguments. That costs about 1.1 us a call on top of the op itself
(a small ``add``: 1.3 us as ``torch.add``, 2.4 us through the overload). A graph captured by
``torch.export`` holds every op of the model that way (T5's zoo encoder: 105 calls), so the
converted model paid about 0.1 ms per call that the eager original never pays: 1.14x the
original's CPU time, 1.01x with direct calls (``bench/converted_overhead.py --quick``).

:func:`install_direct_calls` compiles a second forward from the GraphModule's own generated
source, each ``torch.ops.<ns>.<op>.<overload>(`` replaced by a global bound to that overload's
``_op``: the same ops with the same arguments in the same order, so the same computation bit
for bit. It runs in eager PyTorch; while a graph is being captured
(:func:`~fc2conv.core.pointwise_conv.capturing`: dynamo cannot trace the C++ entry points, and
``torch.export`` and the ONNX exporters should record what fx wrote) the standard forward
runs. The graph, ``gm.code``, printing and pickling are fx's own; a ``recompile()`` installs
the direct calls of the new code, and a deepcopy gives back fx's forward (correct, without the
saving).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import fx

from fc2conv.core.pointwise_conv import capturing

_CALL = re.compile(r"(?<![\w.])torch\.ops\.(\w+)\.(\w+)\.(\w+)\(")


def _entry(namespace: str, op: str, overload: str) -> Any:
    """The C++ entry of ``torch.ops.<namespace>.<op>.<overload>`` when calling the overload
    only forwards to it (a plain :class:`torch._ops.OpOverload`), else ``None``."""
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        return None
    if type(target).__call__ is not torch._ops.OpOverload.__call__:  # e.g. torchbind ops
        return None
    return getattr(target, "_op", None)


def install_direct_calls(gm: fx.GraphModule) -> int:
    """Give ``gm`` (recompiled, as every pass leaves it) an eager forward that calls aten ops
    directly (see the module docstring); returns how many call sites it rewrote (0: ``gm`` is
    left as it was)."""
    cls = type(gm)
    standard = cls.forward
    namespace = dict(getattr(standard, "__globals__", {}))
    if not namespace:
        return 0
    count = 0

    def direct(match: re.Match[str]) -> str:
        nonlocal count
        entry = _entry(*match.groups())
        if entry is None:
            return match.group(0)
        name = "_direct_" + "_".join(match.groups())
        namespace[name] = entry
        count += 1
        return name + "("

    source = _CALL.sub(direct, gm.code)
    if not count:
        return 0
    exec(compile(source, f"<fc2conv direct calls of {cls.__name__}>", "exec"), namespace)
    fast = namespace["forward"]

    @functools.wraps(standard)
    def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        if capturing():
            return standard(self, *args, **kwargs)
        return fast(self, *args, **kwargs)

    cls.forward = forward  # type: ignore[method-assign]
    if "_fc2conv_direct" not in cls.__dict__:  # a later recompile() (pickling makes one) or
        standard_recompile = cls.recompile  # pass installs the direct calls of its new code

        def recompile(self: fx.GraphModule) -> Any:
            code = standard_recompile(self)
            install_direct_calls(self)
            return code

        cls.recompile = recompile  # type: ignore[method-assign]
        cls._fc2conv_direct = True  # type: ignore[attr-defined]
    return count
