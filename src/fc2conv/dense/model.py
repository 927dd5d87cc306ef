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

import copy
import hashlib
import io
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fc2conv.core.receptive import ReceptiveField
from fc2conv.dense.fuse import fold_batchnorm
from fc2conv.dense.key import model_token
from fc2conv.dense.pools import fast_pools
from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """A dense net's :class:`~fc2conv.core.receptive.ReceptiveField` (``field``) placed on one
    image: the map of ``classes`` scores has ``map_size`` cells on ``image_size`` pixels.
    Per axis cell ``i`` depends on pixels ``[start + i * stride, start + i * stride + size)``
    and reports on the window ``[window_offset + i * stride, ... + window_size)``; everything
    but the two sizes and the class count is read from ``field``, not recomputed.
    ``bytes_per_pixel``: the net's largest activation per input pixel (a shape-only estimate
    that sizes the default tile)."""

    field: ReceptiveField
    classes: int
    image_size: tuple[int, ...]
    map_size: tuple[int, ...]
    bytes_per_pixel: float = 0.0

    @property
    def size(self) -> tuple[int, ...]:
        return self.field.size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.field.stride

    @property
    def start(self) -> tuple[int, ...]:
        return tuple(-p for p in self.field.padding)

    @property
    def window_size(self) -> tuple[int, ...]:
        return self.field.window_size

    @property
    def window_offset(self) -> tuple[int, ...]:
        return self.field.window_offset

    @property
    def exact_windows(self) -> bool:
        return self.field.exact

    def attrs(self) -> dict[str, Any]:
        return {"field_size": list(self.size), "stride": list(self.stride),
                "offset": list(self.window_offset), "window_size": list(self.window_size),
                "field_start": list(self.start), "image_size": list(self.image_size),
                "classes": self.classes, "window_exact": self.exact_windows}


def _flattens(module: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether ``module`` returns no spatial axes at ``input_shape`` (a classifier): one
    shape-only run. ``False`` when that run fails (the receptive field then says why)."""
    try:
        out, _ = _shape_run(module, input_shape)
    except Exception:  # noqa: BLE001 - any failure is judged by receptive_field next
        return False
    return len(out) < len(input_shape)


def fully_convolutional(model: Any, input_shape: Sequence[int], convert: bool = True
                        ) -> nn.Module:
    """``model`` if fully convolutional, else ``fc2conv.convolutionalize(model, input_shape)``.

    ``model``: a module or an ``ExportedProgram`` (whose graph spells flatten as aten ops).
    A classifier (its output has no spatial axes) is convolutionalized when ``convert``;
    only the public :func:`fc2conv.receptive_field` and :func:`fc2conv.convolutionalize` are
    used."""
    return _fully_convolutional(model, input_shape, convert)[0]


def _fully_convolutional(model: Any, input_shape: Sequence[int], convert: bool
                         ) -> tuple[nn.Module, ReceptiveField]:
    from fc2conv.pytorch import convolutionalize, receptive_field

    module = _as_module(model)
    shape = tuple(input_shape)
    classifier_msg = ("the model is a classifier (it flattens its features); pass "
                      "input_shape, the (C, H, W) it was trained on")
    if _flattens(module, shape):
        if not convert:
            raise Fc2ConvError(classifier_msg)
        fcn = _as_module(convolutionalize(model, shape))
        return fcn, receptive_field(fcn, shape)
    try:
        return module, receptive_field(module, shape)
    except Fc2ConvError as err:
        if not convert:
            raise Fc2ConvError(f"{str(err).rstrip('.')}; if the model is a classifier, pass "
                               f"input_shape, the (C, H, W) it was trained on") from None
        try:
            fcn = _as_module(convolutionalize(model, shape))
        except Fc2ConvError:
            raise err from None
        return fcn, receptive_field(fcn, shape)


def _as_module(net: Any) -> nn.Module:
    return net.module() if isinstance(net, torch.export.ExportedProgram) else net


def _training(net: nn.Module) -> bool:
    """Whether ``net.eval()`` would change a module of ``net`` (one in training mode). The
    module of an exported program has its mode fixed in its graph (its ``eval`` raises)."""
    fixed = "eval" in vars(net) or "train" in vars(net)
    return not fixed and any(m.training for m in net.modules())


def eval_mode(net: nn.Module) -> nn.Module:
    """``net.eval()``; modules of exported programs are already fixed in their mode."""
    try:
        return net.eval()
    except NotImplementedError:
        return net


class _Peak(TorchDispatchMode):
    """Records the largest tensor any op returns (bytes), on fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel() * t.element_size())
        return out


def _shape_run(fcn: nn.Module, shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """(output shape without the batch axis, largest activation in bytes): a fake-tensor run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if _training(fcn):  # a training-mode forward would update the caller's BatchNorm counters
        fcn = eval_mode(copy.deepcopy(fcn))
    dtype = next((p.dtype for p in fcn.parameters() if p.is_floating_point()), torch.float32)
    peak = _Peak()
    with FakeTensorMode(allow_non_fake_inputs=True), peak, torch.no_grad():
        out = fcn(torch.empty(1, *shape, dtype=dtype))
    if not isinstance(out, torch.Tensor):
        raise Fc2ConvError("the dense net must return one tensor")
    return tuple(out.shape[1:]), peak.peak


_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def prepare(model: Any, trace_shape: Sequence[int], image_shape: Sequence[int],
            convert: bool, device: str = "cpu", fuse: bool = True
            ) -> tuple[nn.Module, Geometry]:
    """``(dense net on device, its Geometry on image_shape)``, cached per model object while
    its structure and weights are unchanged (tracing costs more than mapping a small image).

    The geometry is traced on the CPU (a CPU copy of a model that lives elsewhere); the
    caller's module is never changed or moved: a net that must change (a pool made a
    :class:`~fc2conv.dense.pools.BoxMean`, eval-mode BatchNorm folded into its conv when
    ``fuse``: :mod:`~fc2conv.dense.fuse`) or move to ``device`` is a copy."""
    key = (tuple(trace_shape), tuple(image_shape), convert, str(device), fuse,
           model_token(_as_module(model)))
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        per_model = {}
    hit = per_model.get(key)
    if hit is not None:  # the model itself is not kept in its own entry (a weak key)
        return (model if hit[0] is None else hit[0]), hit[1]
    source = _as_module(model)
    on = next((t.device for t in (*source.parameters(), *source.buffers())), None)
    if on is not None and on.type != "cpu":
        source = copy.deepcopy(source).cpu()
    elif source is model and _training(source):  # eval mode on a copy: the caller's flags
        log.info("dense map: the model is in training mode; its map is computed in eval mode "
                 "on a copy (the model itself is left as it is)")
        source = copy.deepcopy(source)
    if source is not model:
        source = eval_mode(source)
    fcn, rf = _fully_convolutional(source, trace_shape, convert)
    fcn = fast_pools(eval_mode(fcn) if fcn is not model else fcn, owned=fcn is not model)
    if fuse:
        fcn = fold_batchnorm(fcn, owned=fcn is not model)
    geo = _geometry(fcn, rf, trace_shape, image_shape)
    if fcn is model and torch.device(device) != (on or torch.device("cpu")):
        fcn = copy.deepcopy(fcn)
    fcn = fcn.to(device)
    per_model.clear()  # one entry per model: the newest
    per_model[key] = (None if fcn is model else fcn, geo)
    return fcn, geo


def geometry(fcn: nn.Module, trace_shape: Sequence[int], image_shape: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of ``fcn`` on a ``(C, *spatial)`` image."""
    from fc2conv.pytorch import receptive_field

    return _geometry(fcn, receptive_field(fcn, tuple(trace_shape)), trace_shape, image_shape)


def _geometry(fcn: nn.Module, rf: ReceptiveField, trace_shape: Sequence[int],
              image_shape: Sequence[int]) -> Geometry:
    full, _ = _shape_run(fcn, image_shape)
    probe = tuple(max(n, s) + 2 * j for n, s, j in zip(trace_shape[1:], rf.size, rf.stride,
                                                        strict=True))
    small, peak = _shape_run(fcn, (image_shape[0], *probe))
    grown, _ = _shape_run(fcn, (image_shape[0], *(p + j for p, j in zip(probe, rf.stride,
                                                                        strict=True))))
    double = tuple(2 * p for p in probe)
    _, peak2 = _shape_run(fcn, (image_shape[0], *double))
    # activations grow with the pixels, weights do not: the slope between two probes
    per_pixel = max(peak2 - peak, 0) / (math.prod(double) - math.prod(probe))
    if any(g - s != 1 for g, s in zip(grown[1:], small[1:], strict=True)):
        raise Fc2ConvError(
            "the model's output does not grow by one cell per stride of input (global or "
            "adaptive pooling?), so its cells have no fixed window; convolutionalize it with a "
            "stride-1 pool first"
        )
    if any(m < 1 for m in full[1:]):
        raise Fc2ConvError(f"the image {tuple(image_shape)} is smaller than the model's window")
    return Geometry(field=rf, classes=full[0], image_size=tuple(image_shape[1:]),
                    map_size=full[1:], bytes_per_pixel=per_pixel)


def export_program(fcn: nn.Module, example_shape: Sequence[int]) -> bytes:
    """``fcn`` as ``.pt2`` bytes (torch.export, spatial sizes dynamic)."""
    from torch.export import Dim

    example = torch.randn(1, *example_shape)
    dims = {i: Dim.AUTO for i in range(2, 2 + len(example_shape) - 1)}
    net = eval_mode(copy.deepcopy(fcn)) if _training(fcn) else fcn
    program = torch.export.export(net, (example,), dynamic_shapes=({**dims},))
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


def gpu_workers(device: str, workers: int | None, scheduler: Any, device_count: int
                ) -> int | None:
    """How many worker processes to start: ``workers`` when given; one per visible GPU when
    ``device`` is a bare ``cuda`` with several GPUs and no scheduler was given; else ``None``
    (no cluster: Dask's threads in this process)."""
    if workers is not None or scheduler is not None:
        return workers
    if device == "cuda" and device_count > 1:
        return device_count
    return None


def pinned_device(device: str, rank: int | None, device_count: int) -> str:
    """The device worker ``rank`` runs on: ``cuda:<rank mod device_count>`` for a bare
    ``cuda`` when there are several GPUs (one worker per GPU), else ``device`` itself."""
    if device != "cuda" or rank is None or device_count < 2:
        return device
    return f"cuda:{rank % device_count}"


def _worker_rank() -> int | None:
    """This Dask worker's number (LocalCluster names its workers 0, 1, ...), else ``None``."""
    try:
        from distributed import get_worker

        return int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return None


def load_program(program: Program) -> Any:
    """The module of ``program``, loaded once per process (and torch's threads set then, in
    the worker process only); on its own GPU when there are several."""
    with _LOCK:
        module = _LOADED.get(program.digest)
        if module is None:
            torch.set_num_threads(max(1, program.threads))
            count = torch.cuda.device_count() if program.device.startswith("cuda") else 0
            device = pinned_device(program.device, _worker_rank(), count)
            if device.startswith("cuda:"):
                torch.cuda.set_device(torch.device(device))
            exported = torch.export.load(io.BytesIO(program.data))
            module = exported.module().to(device)
            _LOADED[program.digest] = module
            log.info("worker %d loaded dense net %s", os.getpid(), program.digest[:12])
    return module


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, then restored (``None``: left
    alone). With torch's OpenMP backend the setting belongs to the calling thread, so a Dask
    worker thread never changes the caller's; with any backend it is restored."""
    old = torch.get_num_threads()
    if n is None or max(1, n) == old:  # nothing to set (the calling thread, one chunk)
        yield
        return
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device_of(net: Any, default: str) -> str:
    for t in (*net.parameters(), *net.buffers()):
        return str(t.device)
    return default


@torch.inference_mode()
def run_tile(net: Any, tile: np.ndarray, crop: tuple[tuple[int, int], ...],
             mean: np.ndarray | None, std: np.ndarray | None, device: str,
             threads: int | None = None) -> np.ndarray:
    """Scores ``(K, *chunk)`` of one ``(C, *tile)`` input tile, cropped to ``crop``; with
    ``threads`` torch threads (restored afterwards)."""
    return run_tiles(net, [tile], [crop], mean, std, device, threads)[0]


@torch.inference_mode()
def run_tiles(net: Any, tiles: Sequence[np.ndarray], crops: Sequence[tuple[tuple[int, int], ...]],
              mean: np.ndarray | None, std: np.ndarray | None, device: str,
              threads: int | None = None) -> list[np.ndarray]:
    """Scores ``(K, *chunk)`` per tile of same-shaped ``(C, *tile)`` input tiles, run as ONE
    batched call ``net(stack(tiles))`` (``(B, C, *tile)``), each cropped to its ``crop``.

    What is guaranteed: every sample of a batch is the net on that tile alone, so each block
    equals the unbatched :func:`run_tile` up to the rounding of torch's kernels. Whether it
    is bitwise equal depends on the kernels: a kernel that computes each sample with the same
    algorithm whatever the batch gives identical bits (measured and tested: torch's CPU
    convolutions and pools with ``torch.backends.mkldnn`` and ``torch.backends.nnpack``
    disabled, one torch thread); oneDNN's CPU convolutions, NNPACK (which torch picks for
    batches of 16 and more), BLAS matmuls and cuDNN may block the work differently for another
    batch size (last-bit differences, about one float32 ulp, were measured on the CPU).
    Either way the stitched map stays within compare's rounding judgement of the untiled
    run."""
    if isinstance(net, Program):
        net = load_program(net)
        device = _device_of(net, device)  # a worker pinned to its own GPU
    with torch_threads(threads if not device.startswith("cuda") else None):
        return _run(net, tiles, crops, mean, std, device)


def _input(tiles: Sequence[np.ndarray], mean: np.ndarray | None, std: np.ndarray | None,
           device: str) -> torch.Tensor:
    """The ``(B, C, *tile)`` float32 input on ``device``: the pixels travel in their own dtype
    (uint8 moves 4x fewer bytes to a GPU), are cast there, and normalized in place once they
    are a copy (the caller's array is never written). One tile is not copied on the CPU."""
    batch = tiles[0][None] if len(tiles) == 1 else np.stack(tiles)
    try:
        raw = torch.from_numpy(np.ascontiguousarray(batch))
    except TypeError:  # a dtype torch has no tensor for
        raw = torch.from_numpy(np.asarray(batch, dtype=np.float32))
    x = raw.to(device)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    owned = x.data_ptr() != raw.data_ptr() or len(tiles) > 1  # a stack is a copy already
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if mean is not None:
        m = torch.from_numpy(mean).to(x.device).view(shape)
        x = x.sub_(m) if owned else x - m
        owned = True
    if std is not None:
        d = torch.from_numpy(std).to(x.device).view(shape)
        x = x.div_(d) if owned else x / d
    return x


def _run(net: Any, tiles: Sequence[np.ndarray], crops: Sequence[tuple[tuple[int, int], ...]],
         mean: np.ndarray | None, std: np.ndarray | None, device: str) -> list[np.ndarray]:
    out = net(_input(tiles, mean, std, device))
    host = out.float().cpu().numpy()  # one transfer for the whole batch
    blocks = []
    for b, crop in enumerate(crops):
        index = (b, slice(None)) + tuple(slice(j0, j1) for j0, j1 in crop)
        block = host[index]
        want = tuple(j1 - j0 for j0, j1 in crop)
        if block.shape[1:] != want:
            raise Fc2ConvError(f"a tile gave {tuple(out.shape[2:])} cells, fewer than the "
                               f"plan's {want}: the model's geometry is not what its layers "
                               f"say")
        blocks.append(block)
    return blocks
