"""Where a converted layer came from.

Every module fc2conv creates carries ``fc2conv_source`` (the user's qualified name of the layer
it replaces, e.g. ``"blocks.0.up"``) and ``fc2conv_origin`` (a description such as
``"Linear 64->256"``). Reports and ``compare`` use them to speak the user's names and to match
layers between an original and a converted model. ONNX nodes carry the same two strings in
``metadata_props`` under the keys :data:`SOURCE_KEY` and :data:`ORIGIN_KEY`.
"""

from __future__ import annotations

from torch import nn

SOURCE_KEY = "fc2conv.source"
ORIGIN_KEY = "fc2conv.origin"


def mark(new: nn.Module, source: str | None, origin: str) -> nn.Module:
    """Record on ``new`` that it replaces the layer named ``source`` described by ``origin``."""
    new.fc2conv_source = source  # type: ignore[assignment]
    new.fc2conv_origin = origin  # type: ignore[assignment]
    return new


def source_of(module: nn.Module) -> str | None:
    """The user's name of the layer ``module`` was converted from, or ``None``."""
    value = getattr(module, "fc2conv_source", None)
    return value if isinstance(value, str) else None
