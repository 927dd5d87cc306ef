"""The dense net, its geometry on an image, and how it travels to Dask workers.

The geometry comes from the model itself: :func:`fc2conv.receptive_field` gives, per axis, the
field ``size``, the total stride ``J`` and ``start = -padding``; the map size on the full image
comes from a shape-only (fake tensor) run, so it holds whatever the layers' rounding. Two
shape-only runs ``J`` pixels apart must differ by exactly one cell per axis: a model whose
output does not grow with its input (global or adaptive pooling) has no per-cell window.

Distributed workers get the net as a ``torch.export`` program (``.pt2`` bytes, never a
pickle), loaded once per worker process and cached by its SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """Per spatial axis: field ``size``, ``stride``, ``start``; the map of ``classes`` scores;
    ``window_size`` / ``window_offset``: the input window a cell reports on (``window(i)``
    starts at ``window_offset + i * stride``)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    start: tuple[int, ...]
    window_size: tuple[int, ...]
    window_offset: tuple[int, ...]
    classes: int
    image_size: tuple[int, ...]
    map_size: tuple[int, ...]
    exact_windows: bool

    def attrs(self) -> dict[str, Any]:
        return {"field_size": list(self.size), "stride": list(self.stride),
                "offset": list(self.window_offset), "window_size": list(self.window_size),
                "field_start": list(self.start), "image_size": list(self.image_size),
                "classes": self.classes, "window_exact": self.exact_windows}


def fully_convolutional(model: Any, input_shape: Sequence[int], convert: bool = True
                        ) -> nn.Module:
    """``model`` if fully convolutional, else ``fc2conv.convolutionalize(model, input_shape)``.

    ``model``: a module or an ``ExportedProgram`` (whose graph spells flatten as aten ops)."""
    from fc2conv.pytorch import convolutionalize
    from fc2conv.pytorch.receptive_field import NotConvolutional, _field

    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        _field(module, input_shape)
        return module
    except NotConvolutional:
        if not convert:
            raise Fc2ConvError("the model is a classifier (it flattens its features); pass "
                               "input_shape, the (C, H, W) it was trained on") from None
        return _as_module(convolutionalize(model, input_shape))
    except Fc2ConvError as err:
        if not convert:
            raise Fc2ConvError(f"{str(err).rstrip('.')}; if the model is a classifier, pass "
                               f"input_shape, the (C, H, W) it was trained on") from None
        try:
            return _as_module(convolutionalize(model, input_shape))
        except Fc2ConvError:
            raise err from None


def _as_module(net: Any) -> nn.Module:
    return net.module() if isinstance(net, torch.export.ExportedProgram) else net


def eval_mode(net: nn.Module) -> nn.Module:
    """``net.eval()``; modules of exported programs are already fixed in their mode."""
    try:
        return net.eval()
    except NotImplementedError:
        return net


def _shape_run(fcn: nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = next((p.dtype for p in fcn.parameters() if p.is_floating_point()), torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        out = fcn(torch.empty(1, *shape, dtype=dtype))
    if not isinstance(out, torch.Tensor):
        raise Fc2ConvError("the dense net must return one tensor")
    return tuple(out.shape[1:])


def geometry(fcn: nn.Module, trace_shape: Sequence[int], image_shape: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of ``fcn`` on a ``(C, *spatial)`` image."""
    from fc2conv.pytorch import receptive_field

    rf = receptive_field(fcn, tuple(trace_shape))
    start = tuple(-p for p in rf.padding)
    full = _shape_run(fcn, image_shape)
    probe = tuple(max(n, s) + 2 * j for n, s, j in zip(trace_shape[1:], rf.size, rf.stride,
                                                        strict=True))
    small = _shape_run(fcn, (image_shape[0], *probe))
    grown = _shape_run(fcn, (image_shape[0], *(p + j for p, j in zip(probe, rf.stride,
                                                                     strict=True))))
    if any(g - s != 1 for g, s in zip(grown[1:], small[1:], strict=True)):
        raise Fc2ConvError(
            "the model's output does not grow by one cell per stride of input (global or "
            "adaptive pooling?), so its cells have no fixed window; convolutionalize it with a "
            "stride-1 pool first"
        )
    if any(m < 1 for m in full[1:]):
        raise Fc2ConvError(f"the image {tuple(image_shape)} is smaller than the model's window")
    return Geometry(size=rf.size, stride=rf.stride, start=start, window_size=rf.window_size,
                    window_offset=rf.window_offset, classes=full[0],
                    image_size=tuple(image_shape[1:]), map_size=full[1:],
                    exact_windows=rf.exact)


def export_program(fcn: nn.Module, example_shape: Sequence[int]) -> bytes:
    """``fcn`` as ``.pt2`` bytes (torch.export, spatial sizes dynamic)."""
    from torch.export import Dim

    example = torch.randn(1, *example_shape)
    dims = {i: Dim.AUTO for i in range(2, 2 + len(example_shape) - 1)}
    program = torch.export.export(eval_mode(fcn), (example,), dynamic_shapes=({**dims},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def model_digest(fcn: nn.Module) -> str:
    """SHA-256 of the net's structure and weights (names where workers cache its program)."""
    h = hashlib.sha256(str(fcn).encode())
    for name, tensor in fcn.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Program:
    """A ``.pt2`` program by value, with the digest of its model (what travels to workers)."""

    digest: str
    data: bytes
    device: str
    threads: int


_LOADED: dict[str, Any] = {}
_LOCK = threading.Lock()


def load_program(program: Program) -> Any:
    """The module of ``program``, loaded once per process (and torch's threads set then)."""
    with _LOCK:
        module = _LOADED.get(program.digest)
        if module is None:
            torch.set_num_threads(max(1, program.threads))
            exported = torch.export.load(io.BytesIO(program.data))
            module = exported.module().to(program.device)
            _LOADED[program.digest] = module
            log.info("worker %d loaded dense net %s", os.getpid(), program.digest[:12])
    return module


@torch.inference_mode()
def run_tile(net: Any, tile: np.ndarray, crop: tuple[tuple[int, int], ...],
             mean: np.ndarray | None, std: np.ndarray | None, device: str) -> np.ndarray:
    """Scores ``(K, *chunk)`` of one ``(C, *tile)`` input tile, cropped to ``crop``."""
    if isinstance(net, Program):
        net = load_program(net)
    x = np.asarray(tile, dtype=np.float32)
    if mean is not None:
        x = x - mean.reshape((-1,) + (1,) * (x.ndim - 1))
    if std is not None:
        x = x / std.reshape((-1,) + (1,) * (x.ndim - 1))
    out = net(torch.from_numpy(np.ascontiguousarray(x))[None].to(device))[0]
    index = (slice(None),) + tuple(slice(j0, j1) for j0, j1 in crop)
    block = out[index].float().cpu().numpy()
    want = tuple(j1 - j0 for j0, j1 in crop)
    if block.shape[1:] != want:
        raise Fc2ConvError(f"a tile gave {tuple(out.shape[1:])} cells, fewer than the plan's "
                           f"{want}: the model's geometry is not what its layers say")
    return block
