"""The one exception family of fc2conv.

Two levels, like einops: a specific reason is raised deep inside (``Fc2ConvError("in_shape
(512, 6, 6) flattens to 18432 features, the layer expects 25088")``) and the public entry point
wraps it with what the user gave (layer name, op, shapes) using :func:`wrap`, ``from None``, so
the user reads one sentence instead of a traceback.
"""

from __future__ import annotations


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
