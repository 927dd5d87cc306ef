"""The one exception family of fc2conv.

Two levels, like einops: a specific reason is raised deep inside (``Fc2ConvError("in_shape
(512, 6, 6) flattens to 18432 features, the layer expects 25088")``) and the public entry point
wraps it with what the user gave (layer name, op, shapes) using :func:`wrap`, ``from None``, so
the user reads one sentence instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Fc2ConvError(ValueError):
    """A conversion, comparison or input that fc2conv refuses, with a sentence saying why.

    Subclasses ``ValueError`` so code written against "raises ValueError" keeps working.
    """


class UnsafeFileError(Fc2ConvError):
    """A file that would execute code when loaded (a pickle) and was not explicitly trusted."""


def wrap(context: str, err: Exception) -> Fc2ConvError:
    """Return ``Fc2ConvError("<context>: <reason>")``; raise it ``from None`` at entry points."""
    reason = str(err).rstrip(".")
    return (
        type(err)(f"{context}: {reason}.")
        if isinstance(err, Fc2ConvError)
        else Fc2ConvError(f"{context}: {reason}.")
    )


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Error
    """SIGTERM or SIGHUP arrived while fc2conv was writing; raised so that cleanup runs.

    A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        try:
            self.name = signal.Signals(signum).name
        except ValueError:
            self.name = f"signal {signum}"
        super().__init__(f"interrupted by {self.name}")


# Sentences foreign libraries add that mean nothing to the reader of one line.
_NOISE = (
    "Please check the warnings above",
    "This may indicate a path traversal attack",
)


def reason(err: BaseException, *, with_type: bool = True) -> str:
    """The underlying reason of ``err`` as a short clause: its first meaningful line, without
    the noise foreign libraries append ("Please check the warnings above"), else its type."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    for line in text.splitlines():
        line = line.strip()
        for noise in _NOISE:
            line = line.split(noise)[0].strip().rstrip(".,;:")
        if line and line not in ("None",):
            if len(line) > 300:
                line = line[:297] + "..."
            if not with_type or line.startswith(type(err).__name__):
                return line
            return f"{type(err).__name__}: {line}"
    return type(err).__name__


def unreadable(path: object, fmt: str, err: BaseException) -> Fc2ConvError:
    """The one sentence for a model file that cannot be loaded, used by convert, compare and
    convolutionalize alike. ``fmt``: ``"onnx"`` or ``"pt2"``. Keeps the library's reason."""
    if isinstance(err, Fc2ConvError):
        return err
    if isinstance(err, OSError) and not _is_format_error(err):
        return file_error(err, f"could not read {path}")
    if type(err).__name__ == "ValidationError":  # onnx.checker's, raised by onnx.load too
        return checker_error(path, err)
    what = {
        "onnx": "is not a readable ONNX model",
        "pt2": "is not a torch.export program (.pt2) that this torch can load",
    }.get(fmt, f"is not a readable {fmt} file")
    hint = {
        "pt2": "; save one with torch.export.save(torch.export.export(model, args), path)",
    }.get(fmt, "")
    return Fc2ConvError(f"{path} {what} ({reason(_root_cause(err))}){hint}")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain: torch wraps the real reason of a bad archive in
    "We ran into an error when deserializing the saved file. Please check the warnings above"
    (the warnings are silenced), so the reason worth printing is the one it wraps."""
    seen = {id(err)}
    while True:
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


def checker_error(path: object, err: BaseException) -> Fc2ConvError:
    """The one sentence for a model refused by a validator (onnx.checker, onnx-ir's external
    data containment check): the validator's own reason, one line."""
    return Fc2ConvError(f"{path} fails the ONNX checker: {reason(err, with_type=False)}")


def _is_format_error(err: OSError) -> bool:
    # torch / zipfile raise OSError subclasses for a damaged archive, with no errno
    return err.errno is None


def file_error(err: OSError, doing: str = "") -> Fc2ConvError:
    """An ``OSError`` as one sentence: what fc2conv was doing, the OS's reason, the file."""
    why = err.strerror or reason(err)
    where = f": {err.filename}" if err.filename and str(err.filename) not in doing else ""
    lead = f"{doing}: " if doing else ""
    return Fc2ConvError(f"{lead}{why}{where}")


def load_or_explain(path: object, fmt: str, loader: Callable[[], T]) -> T:
    """``loader()``, with any failure turned into :func:`unreadable`'s one sentence."""
    try:
        return loader()
    except Fc2ConvError:
        raise
    except Exception as err:  # noqa: BLE001 - foreign loaders raise anything
        raise unreadable(path, fmt, err) from None
