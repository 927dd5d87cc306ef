"""The Python classes a ``.pt2`` archive's inputs and outputs are made of, found without
unpickling anything.

``torch.export.save`` writes the program's input and output structure as pytree specs in JSON
(``models/*.json``: ``module_call_graph[].signature.in_spec / out_spec``), naming each container
class by its qualified name (``transformers.modeling_outputs.BaseModelOutputWithPooling``).
``torch.export.load`` rebuilds them only if that class is registered with ``torch.utils._pytree``
-- which a library does when its module is imported. :func:`register_pytree_types` reads the
names from the archive and imports each named module from an *installed* package (importing
installed code, as ``import transformers`` would; no code or pickle from the file is run), or
says in one sentence which package is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from fc2conv.errors import Fc2ConvError

log = logging.getLogger(__name__)

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def pytree_types(path: str | os.PathLike[str]) -> list[str]:
    """The qualified class names in the pytree specs of the ``.pt2`` archive at ``path``
    (empty when it is not a zip archive or holds no spec)."""
    found: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if "/models/" not in f"/{name}" or not name.endswith(".json"):
                    continue
                try:
                    doc = json.loads(archive.read(name))
                except (ValueError, UnicodeDecodeError):
                    continue
                for spec in _specs(doc):
                    for type_name in _spec_types(spec):
                        if type_name not in found:
                            found.append(type_name)
    except (zipfile.BadZipFile, OSError):
        return []
    return found


def _specs(doc: Any) -> Iterator[str]:
    """Every ``in_spec`` / ``out_spec`` string of a serialized program."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("in_spec", "out_spec") and isinstance(value, str):
                yield value
            else:
                yield from _specs(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _specs(item)


def _spec_types(spec: str) -> Iterator[str]:
    """The ``type`` names in one serialized pytree spec (``[protocol, {"type": ...,
    "children_spec": [...]}]``)."""
    try:
        tree = json.loads(spec)
    except ValueError:
        return
    stack = [tree[1] if isinstance(tree, list) and len(tree) == 2 else tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        type_name = node.get("type")
        if isinstance(type_name, str):
            yield type_name
        children = node.get("children_spec")
        if isinstance(children, list):
            stack.extend(children)


def _registered() -> set[str]:
    from torch.utils import _pytree

    return set(getattr(_pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {}))


def register_pytree_types(path: str | os.PathLike[str]) -> None:
    """Make every pytree class the archive at ``path`` names loadable: import its module from
    the installed package; raise :class:`Fc2ConvError` naming the package when it is not
    installed, or the class when importing its module does not register it."""
    missing = [t for t in pytree_types(path) if t not in _registered()]
    for type_name in missing:
        module = type_name.rpartition(".")[0]
        if not _DOTTED.match(type_name):
            raise Fc2ConvError(
                f"{path} returns or takes a {type_name!r}, which is not a Python class name "
                f"that torch can rebuild"
            )
        package = module.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise Fc2ConvError(
                f"{path} returns or takes {type_name}, a class from the package "
                f"{package!r}, which is not installed: install {package} to load it"
            )
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a library's import can raise anything
            raise Fc2ConvError(
                f"{path} returns or takes {type_name}, and importing {module} to register it "
                f"failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]})"
            ) from None
        log.info("imported %s so that torch can rebuild %s from %s", module, type_name, path)
    unregistered = [t for t in missing if t not in _registered()]
    if unregistered:
        raise Fc2ConvError(
            f"{path} returns or takes {unregistered[0]}, which importing "
            f"{unregistered[0].rpartition('.')[0]} does not register as a torch pytree class "
            f"(register it with torch.utils._pytree.register_pytree_node before loading)"
        )
