"""``to_conv`` / ``to_linear``: the public ONNX conversions, returning the type they were given.

* ``onnx.ModelProto`` -> a new ``onnx.ModelProto`` (the input is untouched unless
  ``inplace=True``, then it is updated and returned);
* ``onnx_ir.Model`` -> a converted clone (or the same object with ``inplace=True``);
* a path -> the converted model is written to ``output`` (required; with external data when the
  input had it or is large) and the output path is returned. Paths never load the weights
  into memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar, overload

import onnx
import onnx_ir as ir

from fc2conv.errors import Fc2ConvError
from fc2conv.files import check_output_path
from fc2conv.onnx import io
from fc2conv.onnx.convert import ConversionReport, convert_model

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
M = TypeVar("M", onnx.ModelProto, ir.Model)


def convert_file(
    in_path: PathLike,
    out_path: PathLike,
    to: str,
    *,
    only: Collection[str] | None = None,
    dynamic_spatial: bool = False,
    in_place: bool = False,
    check: bool = True,
    layout: str = "channels_first",
    verify: bool = False,
) -> ConversionReport:
    """Load ``in_path``, convert toward ``to``, write ``out_path`` atomically; return the report.

    Refuses ``out_path == in_path`` unless ``in_place`` and refuses an output whose external
    data file would overwrite the input's. ``check``: run the ONNX checker on input and output.
    ``verify``: compare the written file with the input (:mod:`fc2conv.onnx.selfcheck`).
    """
    src = Path(in_path)
    dst = check_output_path(src, out_path, in_place=in_place)
    model = io.load(src, check=check)
    sidecar = dst.parent / f"{dst.name}.data"
    for data in {
        Path(str(v.const_value.path))
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }:
        if sidecar.exists() and os.path.samefile(data, sidecar) and not in_place:
            raise Fc2ConvError(
                f"writing {dst} would overwrite {sidecar}, the external data of "
                f"the input {src}; choose another output name"
            )
    external = io.wants_external_data(model)
    report = convert_model(model, to, only=only, dynamic_spatial=dynamic_spatial, layout=layout)
    assert report.context is not None
    io.save(model, dst, external=external, sources=report.context.sources)
    if check:
        io.check_file(dst)
    if verify:
        if os.path.exists(src) and not os.path.samefile(src, dst):
            from fc2conv.onnx.selfcheck import self_check

            self_check(src, dst, what=f"converted file {dst.name}")
        else:
            log.warning("%s was converted in place, so it is not checked against the original; "
                        "run fc2conv compare on a copy", dst)
    return report


def _convert(
    model: M, to: str, only: Collection[str] | None, dynamic_spatial: bool, inplace: bool,
    layout: str = "channels_first",
    verify: bool = False,
) -> tuple[M, ConversionReport]:
    if verify and isinstance(model, onnx.ModelProto | ir.Model):
        from fc2conv.onnx.selfcheck import self_check

        original: Any = model
        if inplace:
            original = (ir.serde.serialize_model(model) if isinstance(model, ir.Model)
                        else onnx.ModelProto.FromString(model.SerializeToString()))
        converted, report = _convert(model, to, only, dynamic_spatial, inplace, layout)
        self_check(original, converted, what=f"model converted to {to}")
        return converted, report
    if isinstance(model, onnx.ModelProto):
        graph_ir = ir.serde.deserialize_model(model)
        report = convert_model(graph_ir, to, only=only, dynamic_spatial=dynamic_spatial,
                               layout=layout)
        proto = ir.serde.serialize_model(graph_ir)
        if inplace:
            model.CopyFrom(proto)
            return model, report
        return proto, report
    if isinstance(model, ir.Model):
        target = model if inplace else model.clone()
        return target, convert_model(target, to, only=only, dynamic_spatial=dynamic_spatial,
                                     layout=layout)
    raise Fc2ConvError(
        f"expected an onnx.ModelProto, an onnx_ir.Model or a path, got {type(model).__name__}"
    )


@overload
def to_conv(
    model: M,
    output: None = None,
    *,
    only: Collection[str] | None = None,
    dynamic_spatial: bool = False,
    inplace: bool = False,
    layout: str = "channels_first",
    verify: bool = True,
) -> M: ...
@overload
def to_conv(
    model: PathLike,
    output: PathLike,
    *,
    only: Collection[str] | None = None,
    dynamic_spatial: bool = False,
    inplace: bool = False,
    layout: str = "channels_first",
    verify: bool = True,
) -> Path: ...
def to_conv(model, output=None, *, only=None, dynamic_spatial=False, inplace=False,  # type: ignore[no-untyped-def]
            layout="channels_first", verify=True):
    """Rewrite every convertible Gemm / MatMul(+Add) / Flatten+Gemm into a Conv.

    Exact: each new Conv computes the same numbers as the layer it replaces (up to float
    rounding of a different summation order). Layers that cannot be converted are left as they
    are; :func:`convert` returns the report that lists them and why.

    ``layout="ane"``: rank-3 MatMuls become Conv2d on ``(B, C, 1, S)`` and activations stay in
    that layout across residuals, LayerNorm (as a ReduceMean-based norm over axis 1), softmax,
    elementwise ops and attention (Einsum on the heads' channel slices), so the graph changes
    layout about once per input and once per output. The default ``"channels_first"`` keeps the
    file's own ops (Conv1d on ``(B, C, S)`` between shared Transposes).
    ``verify``: run both models on a fresh random draw with :func:`fc2conv.compare` and
    raise :class:`~fc2conv.errors.Fc2ConvError` naming the first diverging node if the
    result is "different" (``False`` skips it, for speed).
    """
    return _dispatch(model, output, "conv", only, dynamic_spatial, inplace, layout, verify)


@overload
def to_linear(
    model: M, output: None = None, *, only: Collection[str] | None = None,
    inplace: bool = False, verify: bool = True,
) -> M: ...
@overload
def to_linear(
    model: PathLike, output: PathLike, *, only: Collection[str] | None = None,
    inplace: bool = False, verify: bool = True,
) -> Path: ...
def to_linear(model, output=None, *, only=None, inplace=False, verify=True):  # type: ignore[no-untyped-def]
    """Rewrite every 1x1, stride-1, unpadded Conv (any groups) into MatMul(+Add) on a
    channels-last view. ``verify``: the self-check of :func:`to_conv`."""
    return _dispatch(model, output, "linear", only, False, inplace, verify=verify)


def convert(
    model: M,
    to: str,
    *,
    only: Collection[str] | None = None,
    dynamic_spatial: bool = False,
    inplace: bool = False,
    layout: str = "channels_first",
    verify: bool = True,
) -> tuple[M, ConversionReport]:
    """Like :func:`to_conv` / :func:`to_linear` for in-memory models, also returning the report."""
    return _convert(model, to, only, dynamic_spatial, inplace, layout, verify)


def _dispatch(model, output, to, only, dynamic_spatial, inplace, layout="channels_first",  # type: ignore[no-untyped-def]
              verify=True):
    if isinstance(model, str | os.PathLike):
        if output is None:
            raise Fc2ConvError(
                f"converting the file {model} needs an output path: "
                f"to_{to}({str(model)!r}, 'out.onnx'); or pass onnx.load(...) to get a ModelProto"
            )
        convert_file(
            model, output, to, only=only, dynamic_spatial=dynamic_spatial, in_place=inplace,
            layout=layout,
            verify=verify,
        )
        return Path(output)
    if output is not None:
        raise Fc2ConvError("output= is only for path inputs; an in-memory model is returned")
    return _convert(model, to, only, dynamic_spatial, inplace, layout, verify)[0]
