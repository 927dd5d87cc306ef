"""Load, check and save ONNX models safely and without holding the weights in memory.

* :func:`load` reads the graph with ``onnx.load(load_external_data=False)`` and hands it to
  onnx-ir: external tensors stay memory-mapped and are only read when needed. Every problem
  (missing file, not ONNX, truncated, missing external data) is one :class:`Fc2ConvError`
  sentence naming the file.
* :func:`save` writes through :func:`fc2conv.files.atomic_output` (one hidden temporary
  folder, cleaned up on errors and signals, reclaimed after a kill); external data goes to
  ``<final name>.data`` beside the output, moved into place just before the model, tensor by
  tensor, releasing each source mapping once it is written, so peak
  memory stays near the largest tensor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from fc2conv.errors import Fc2ConvError, checker_error, reason, unreadable
from fc2conv.files import atomic_output

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Above this much weight data a model is saved with external data even if it had none.
EXTERNAL_THRESHOLD = 1 << 30


def _readable(path: Path) -> None:
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file")
    if path.is_dir():
        raise Fc2ConvError(f"{path} is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise Fc2ConvError(f"{path} is empty, not an ONNX model")


def external_files(proto: onnx.ModelProto, base: Path) -> dict[Path, int]:
    """External data files the model refers to -> the bytes it needs from each.

    Refuses, as the ONNX checker does, a location that is absolute, leaves the model's folder
    (``..``) or is a symbolic link: loading it would read a file the model's author chose
    anywhere on the reader's disk. Checked even with ``check=False``.
    """
    needed: dict[Path, int] = {}
    root = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        _contained(tensor.name, location, base, root)
        where = base / location
        try:
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        except ValueError:
            raise Fc2ConvError(
                f"tensor '{tensor.name}' has a malformed external data offset or length"
            ) from None
        needed[where] = max(needed.get(where, 0), end)
    return needed


def _contained(name: str, location: str, base: Path, root: Path) -> None:
    where = base / location
    if not location:
        raise Fc2ConvError(f"external tensor '{name}' has no location")
    if os.path.isabs(location):
        raise Fc2ConvError(
            f"location of external tensor '{name}' should be a relative path, but it is an "
            f"absolute path: {location}"
        )
    if where.is_symlink():
        raise Fc2ConvError(
            f"data of tensor '{name}' should be stored in {where}, but it is a symbolic link"
        )
    if not where.resolve().is_relative_to(root):
        raise Fc2ConvError(
            f"data of tensor '{name}' should be a file inside '{root}', but '{location}' points "
            f"outside the directory"
        )


def load(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Load ``path`` as an ``onnx_ir.Model`` with lazily mapped external data.

    ``check``: also run ``onnx.checker`` (full check) on the file. Raises :class:`Fc2ConvError`.
    """
    path = Path(path)
    proto = read_proto(path)
    try:
        needed = external_files(proto, path.parent)
    except Fc2ConvError as exc:
        raise Fc2ConvError(f"{path} fails the ONNX checker: {exc}") from None
    for data, end in needed.items():
        if not data.is_file():
            raise Fc2ConvError(f"{path} refers to external data {data}, which does not exist")
        if data.stat().st_size < end:
            raise Fc2ConvError(
                f"{path}: its external data {data} is truncated "
                f"({data.stat().st_size} bytes, needs {end})"
            )
    if check:
        check_file(path)
    wiring_error = wiring(proto.graph)
    if wiring_error:
        raise Fc2ConvError(f"{path} is not a valid ONNX graph: {wiring_error}")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx-ir refuses malformed protos in many ways
        raise unreadable(path, "onnx", exc) from None
    for g in model.graphs():
        for name, value in g.initializers.items():
            try:
                if value.const_value is not None:
                    value.const_value.nbytes  # noqa: B018 - needs a known dtype and shape
            except Exception as exc:  # noqa: BLE001 - onnx-ir refuses unknown dtypes, dims
                raise Fc2ConvError(
                    f"{path} is not a valid ONNX model: initializer '{name}' is malformed "
                    f"({reason(exc)})"
                ) from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def read_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """``onnx.load(path, load_external_data=False)``; a file that is not ONNX is one sentence
    (from :func:`fc2conv.errors.unreadable`, shared with compare)."""
    path = Path(path)
    _readable(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise unreadable(path, "onnx", exc) from None
    if not proto.graph.node and not proto.graph.output:
        raise Fc2ConvError(f"{path} is not a readable ONNX model (it has no graph)")
    return proto


def wiring(graph: onnx.GraphProto) -> str | None:
    """Why the main graph's wiring is broken (a name read but never produced, a name produced
    twice, a cycle), or None. Cheap, and run even with ``check=False``: every rewrite assumes a
    graph it can sort."""
    produced = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in produced:
                return f"the value '{name}' is produced twice (node '{node.name or node.op_type}')"
            producer[name] = i
    known = produced | set(producer)
    waiting: list[int] = []
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        deps = set()
        for name in node.input:
            if not name:
                continue
            if name not in known:
                return (
                    f"node '{node.name or node.op_type}' reads '{name}', which no node, input "
                    f"or initializer produces"
                )
            if name in producer:
                deps.add(producer[name])
        waiting.append(len(deps))
        for d in deps:
            readers.setdefault(d, []).append(i)
    for out in graph.output:
        if out.name not in known:
            return f"the graph output '{out.name}' is produced by no node, input or initializer"
    ready = [i for i, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                ready.append(r)
    if done < len(graph.node):
        stuck = next(n for i, n in enumerate(graph.node) if waiting[i] > 0)
        return f"it contains a cycle (through node '{stuck.name or stuck.op_type}')"
    return None


def check_file(path: str | os.PathLike[str]) -> None:
    """``onnx.checker.check_model(path, full_check=True)`` as one :class:`Fc2ConvError`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker and shape inference errors
        raise checker_error(path, exc) from None


def has_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in model.graphs()
        for v in g.initializers.values()
    )


def wants_external_data(model: ir.Model) -> bool:
    """Save with external data when the model had it, or its weights exceed 1 GiB."""
    return has_external_data(model) or weight_bytes(model) > EXTERNAL_THRESHOLD


def weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None
    )


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external: bool | None = None,
    sources: dict[int, list[ir.TensorProtocol]] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``external=None``: external data (``<name>.data`` beside ``path``) when the input had
    external data or the weights exceed 1 GiB. ``sources`` maps a new tensor's ``id`` to the
    memory-mapped tensors it reads (from the rules), released once it is written.
    ``on_tensor(done, total)``: progress callback.
    """
    dst = Path(path)
    if external is None:
        external = wants_external_data(model)
    sources = sources or {}
    expected = weight_bytes(model)
    if not external:
        with atomic_output(dst, expected_bytes=expected) as tmp:
            _serialize(dst, lambda: ir.save(model, tmp))
            _plain_permissions(tmp)
        return dst
    done: list[ir.TensorProtocol] = []

    def callback(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
        # Called before ``tensor`` is written: release what the previous tensors mapped.
        while done:
            _release(done.pop(), sources)
        done.append(tensor)
        if on_tensor is not None:
            on_tensor(info.index, info.total)

    with atomic_output(dst, expected_bytes=expected) as tmp:
        _serialize(
            dst,
            lambda: ir.save(
                model,
                tmp,
                external_data=f"{dst.name}.data",
                size_threshold_bytes=1024,
                callback=callback,
            ),
        )
        _plain_permissions(tmp)
    for tensor in done:
        _release(tensor, sources)
    return dst


def _serialize(dst: Path, write: Callable[[], None]) -> None:
    """Run ``write``; a model onnx-ir cannot serialize (a malformed graph loaded with
    ``check=False``) is one sentence. ``OSError`` passes to the writer (disk full, ...)."""
    try:
        write()
    except (OSError, Fc2ConvError):
        raise
    except Exception as exc:  # noqa: BLE001 - onnx-ir's serializer refuses in many ways
        raise Fc2ConvError(
            f"could not write {dst}: the model cannot be serialized as ONNX "
            f"({reason(exc)}); the input may be malformed, run without --no-check to see "
            f"what the ONNX checker says"
        ) from None


def _release(tensor: ir.TensorProtocol, sources: dict[int, list[ir.TensorProtocol]]) -> None:
    for t in (tensor, *sources.get(id(tensor), ())):
        if isinstance(t, ir.ExternalTensor):
            t.release()


def _plain_permissions(path: Path) -> None:
    """``mkstemp`` creates 0600 files; give the output the usual ``0666 & ~umask``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
