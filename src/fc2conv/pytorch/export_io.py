"""Saving and loading models as ``torch.export`` programs (``.pt2``): no pickles.

A ``.pt2`` file holds the graph and the weights as tensors; loading it executes no Python code
from the file. ``save`` exports with a dynamic batch axis and, when asked, dynamic spatial axes
(a convolutionalized classifier must accept images larger than its training size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fc2conv.errors import Fc2ConvError, load_or_explain
from fc2conv.files import atomic_output
from fc2conv.pytorch.load import register_pytree_types

log = logging.getLogger(__name__)


def load(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` program; a file that is not one is reported as a sentence (torch's
    own logged traceback for a bad archive is silenced). A program whose inputs or outputs
    are a library's classes (a Hugging Face ``ModelOutput``) loads when that library is
    installed (:func:`fc2conv.pytorch.load.register_pytree_types`), else one sentence names it."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if os.path.isdir(path):
        raise Fc2ConvError(f"{path} is a folder, not a torch.export program (.pt2)")
    if _is_onnx(path):
        raise Fc2ConvError(
            f"{path} is ONNX, not a torch.export program (.pt2); rename it to .onnx and use "
            f"the ONNX path (fc2conv convert IN.onnx OUT.onnx --to conv [--dynamic-spatial])"
        )
    register_pytree_types(path)  # a ModelOutput class: import its installed module first

    def _load() -> torch.export.ExportedProgram:
        with quiet():
            program = torch.export.load(path)
            program.module()  # a damaged graph that loads fails here: the same sentence
            return program

    return load_or_explain(path, "pt2", _load)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Load ``.pt2`` files in here: torch.export's warnings and logged tracebacks are silenced
    (a bad file is reported by fc2conv in one sentence) and no pickle is ever unpickled.

    ``torch.export.load`` reads the example inputs and constants of an archive with
    ``torch.load(weights_only=True)`` and, when that fails, retries with
    ``weights_only=False`` -- which runs whatever code a hostile archive put there.
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes torch refuse that retry.
    """
    logger = logging.getLogger("torch.export")
    catcher = _Catcher()
    old = logger.propagate, logger.handlers[:], logger.disabled
    logger.propagate, logger.handlers, logger.disabled = False, [catcher], False
    saved = {k: os.environ.get(k) for k in _WEIGHTS_ONLY_ENV}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        # torch logs the real reason with its traceback, then raises "We ran into an error
        # when deserializing the saved file. Please check the warnings above": raise the reason
        if catcher.errors and "warnings above" in str(exc):
            raise catcher.errors[-1] from None
        raise
    finally:
        logger.propagate, logger.handlers, logger.disabled = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Catcher(logging.Handler):
    """Keeps the exceptions torch.export logs instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


_WEIGHTS_ONLY_ENV = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def _is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ONNX model: a ``.pt2`` is a zip archive (``PK``), an ONNX file a
    protobuf starting with its ``ir_version`` field (tag byte ``0x08``) that onnx can parse."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x08":
        return False
    try:
        import onnx

        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception:
        return False
    return bool(model.ir_version) and model.HasField("graph")


def _size_oblivious() -> Any:
    """A context in which export keeps sizes symbolic even where the example has a size of 1
    (a dense map is 1x1 at the training size); a no-op on torch versions without it."""
    import contextlib

    try:
        from torch.fx.experimental import _config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]


def export(model: nn.Module, example_inputs: tuple[Any, ...], *, dynamic_batch: bool = True,
           min_spatial: tuple[int, ...] | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` with a dynamic batch axis and, when ``min_spatial``
    is given, dynamic spatial axes of at least those sizes on the first input. Falls back to
    static shapes (with a log message) if torch cannot export the dynamic version."""
    from torch.export import Dim

    kwargs = getattr(example_inputs, "kwargs", None)
    if kwargs:  # keyword inputs (a Hugging Face model): every axis dynamic where it can be
        from fc2conv.pytorch.trace import export_dynamic

        return export_dynamic(model, example_inputs)  # type: ignore[arg-type]
    first = example_inputs[0]
    if dynamic_batch and isinstance(first, torch.Tensor) and first.shape[0] == 1:
        # export specializes size-1 axes; a batch of 2 keeps the batch axis symbolic
        example_inputs = tuple(t.expand(2, *t.shape[1:]).contiguous()
                               if isinstance(t, torch.Tensor) and t.shape[:1] == (1,) else t
                               for t in example_inputs)
        first = example_inputs[0]
    spec: dict[int, Any] = {}
    if dynamic_batch and isinstance(first, torch.Tensor):
        spec[0] = Dim("batch", min=1, max=1 << 16)
    if min_spatial is not None:
        auto = getattr(Dim, "AUTO", None)  # torch >= 2.5: let export infer the constraints
        for axis, low in enumerate(min_spatial, start=2):
            spec[axis] = auto if auto is not None else Dim(f"size{axis}", min=int(low),
                                                           max=1 << 16)
        if auto is not None and 0 in spec:
            spec[0] = auto
    auto = getattr(Dim, "AUTO", None)
    if auto is not None and dynamic_batch:  # every axis that can vary stays symbolic
        dyn_all = tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                        for t in example_inputs)
        try:
            with _size_oblivious():
                return torch.export.export(model, example_inputs, dynamic_shapes=dyn_all)
        except Exception as exc:
            log.info("export with automatic dynamic shapes failed (%s)", type(exc).__name__)
    if spec:
        dyn = (spec,) + tuple(None for _ in example_inputs[1:])
        try:
            return torch.export.export(model, example_inputs, dynamic_shapes=dyn)
        except Exception as exc:  # constraint violations: export with static shapes
            log.warning("exporting with dynamic shapes failed (%s); saving static shapes",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return torch.export.export(model, example_inputs)


def save(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> None:
    """Write ``program`` to ``path`` atomically (no partial file on failure)."""
    with atomic_output(path, suffix=".tmp.pt2") as tmp:
        torch.export.save(program, tmp)


def example_input_of(program: torch.export.ExportedProgram) -> tuple[Any, ...]:
    """Random inputs of the shapes and dtypes the program was exported with: a tuple, or, for
    a program called with keywords (a Hugging Face model's ``input_ids=...``), an
    :class:`~fc2conv.pytorch.trace.Inputs` carrying them (integer inputs are zeros -- valid
    token ids -- and ones for masks)."""
    from torch.utils._pytree import tree_unflatten

    from fc2conv.pytorch.trace import Inputs

    inputs: list[Any] = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name in program.graph_signature.inputs_to_parameters \
                or node.name in program.graph_signature.inputs_to_buffers \
                or node.name in program.graph_signature.inputs_to_lifted_tensor_constants:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise Fc2ConvError("the program takes a non-tensor input; fc2conv needs tensor inputs")
        shape = [int(s) if isinstance(s, int) else int(s.node.hint or 2) for s in val.shape]
        if val.is_floating_point():
            inputs.append(torch.randn(shape, dtype=val.dtype))
        else:
            fill = torch.ones if "mask" in node.name else torch.zeros
            inputs.append(fill(shape, dtype=val.dtype))
    spec = program.call_spec.in_spec
    if spec is not None and spec.num_leaves == len(inputs):
        args, kwargs = tree_unflatten(inputs, spec)
        if kwargs:
            return Inputs(tuple(args), dict(kwargs))
    return tuple(inputs)
