"""Converted models keep their weights' contract: ties, names, module types, state dicts.

- **Aliases.** A tied weight (GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``) is one
  tensor under several names; ``torch.export`` reads it through one of them everywhere.
  :func:`retarget_aliases` makes each reader use the name of its own module, so the layer that
  converts owns its name and the other readers keep theirs.
- **Ties.** A converted layer whose source weight is still read elsewhere keeps that very
  parameter (:func:`share_storage`): a ``SharedWeightConv2d`` computes with ``K = W.reshape(O,
  C, 1, 1)`` at each call, so the model holds ``W`` once; back in Linear form it is the
  Linear's weight again.
- **Types.** On the ``torch.export`` path an unchanged ``nn.LayerNorm`` or ``nn.Embedding`` is
  a bare holder of tensors; :func:`restore_modules` puts the user's module (same type, same
  tensors) back at its name.
- **State dicts.** A converted layer accepts the state-dict entry of the layer it replaced
  (:func:`accept_source_layout`): ``W (O, C)`` for a conv made from a Linear, ``W (C, O)`` for one
  made from an ``(in, out)`` Linear (GPT-2's ``Conv1D``), ``K (O, C, 1, ...)`` for a Linear made
  from a 1x1 conv; its own layout loads as before.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from fc2conv.core.pointwise_conv import PointwiseConv1d, PointwiseConv2d, PointwiseConv3d
from fc2conv.pytorch.ops import attr_of, user_name

log = logging.getLogger(__name__)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def retarget_aliases(gm: fx.GraphModule) -> None:
    """Make every ``get_attr`` of a tensor with several names read it by the name of the
    module that reads it (``lm_head.weight`` for the head, ``transformer.wte.weight`` for the
    embedding), when one of its names belongs to that module."""
    names: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(gm):
        names.setdefault(id(tensor), []).append(name)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        read = attr_of(gm, node)
        aliases = names.get(id(read), []) if read is not None else []
        if len(aliases) < 2:
            continue
        for reader in list(node.users):
            owner = user_name(reader)
            best = next((a for a in aliases if a.rpartition(".")[0] == owner), None)
            if best is None or best == node.target:
                continue
            with gm.graph.inserting_before(reader):
                new = gm.graph.get_attr(best)
            new.meta = dict(node.meta)
            reader.replace_input_with(node, new)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


class SharedWeightConv1d(PointwiseConv1d):
    """:class:`nn.Conv1d` (kernel 1) whose weight is a tied ``(O, C)`` parameter, shared with
    the other layers that read it: ``K = W.reshape(O, C, 1)`` at every call (or ``F.linear``
    with ``W`` on a channels-last input, :mod:`fc2conv.core.pointwise_conv`)."""

    tied_matrix = True


class SharedWeightConv2d(PointwiseConv2d):
    """:class:`nn.Conv2d` (kernel 1x1) whose weight is a tied ``(O, C)`` parameter, shared with
    the other layers that read it: ``K = W.reshape(O, C, 1, 1)`` at every call (or ``F.linear``
    with ``W`` on a channels-last input, :mod:`fc2conv.core.pointwise_conv`)."""

    tied_matrix = True


class SharedWeightConv3d(PointwiseConv3d):
    """:class:`nn.Conv3d` (kernel 1x1x1) whose weight is a tied ``(O, C)`` parameter, shared
    with the other layers that read it: ``K = W.reshape(O, C, 1, 1, 1)`` at every call (or
    ``F.linear`` with ``W`` on a channels-last input, :mod:`fc2conv.core.pointwise_conv`)."""

    tied_matrix = True


_SHARED_BY_DIMS = {1: SharedWeightConv1d, 2: SharedWeightConv2d, 3: SharedWeightConv3d}


def _shared_class(conv: nn.Module) -> type[nn.Module] | None:
    """The ``SharedWeightConv{1,2,3}d`` for a plain or pointwise conv (not one already
    sharing, nor another subclass with a forward of its own), else ``None``."""
    if type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, PointwiseConv1d, PointwiseConv2d,
                      PointwiseConv3d):
        return _SHARED_BY_DIMS[len(conv.kernel_size)]  # type: ignore[arg-type]
    return None


def _shared_conv(conv: nn.Module, weight: nn.Parameter) -> nn.Module:
    cls: Any = _shared_class(conv)
    new = cls(conv.in_channels, conv.out_channels, 1, bias=False,  # type: ignore[arg-type]
              device="meta")
    new.weight = weight
    new.bias = conv.bias  # type: ignore[assignment]
    for key, value in vars(conv).items():
        if key.startswith("fc2conv_"):
            setattr(new, key, value)
    new.train(conv.training)
    return new  # type: ignore[no-any-return]


def share_storage(gm: fx.GraphModule, made: Iterable[tuple[nn.Module, torch.Tensor]]) -> None:
    """Keep ties. For each ``(new module, source weight)``: when a parameter of ``gm`` outside
    the new modules still holds the source weight (a tied weight read elsewhere), the new
    module takes that very parameter -- as its weight when the shapes agree (a Linear made
    from a conv whose weight was tied), else by becoming a ``SharedWeightConv{1,2,3}d`` that
    reshapes it at each call. One parameter, as in the original: ``deepcopy``, optimizers and
    ``parameters()`` see it once."""
    made = list(made)
    own = {id(t) for m, _ in made for t in m.parameters()}
    live: dict[tuple[int, int], nn.Parameter] = {}
    for _, tensor in _named_tensors(gm):
        if id(tensor) not in own and isinstance(tensor, nn.Parameter):
            live.setdefault((tensor.untyped_storage().data_ptr(),
                             int(tensor.storage_offset())), tensor)
    where = {id(m): name for name, m in gm.named_modules()}
    for module, source in made:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or source.numel() != weight.numel():
            continue
        key = (source.untyped_storage().data_ptr(), int(source.storage_offset()))
        held = live.get(key)
        if held is None or held.numel() != source.numel() or not held.is_contiguous() \
                or not source.is_contiguous() or held.dtype != weight.dtype:
            continue
        if held.shape == weight.shape:
            module.weight = held
        elif _shared_class(module) is not None and held.dim() == 2 and id(module) in where \
                and held.shape == weight.shape[:2]:
            parent, _, leaf = where[id(module)].rpartition(".")
            new = _shared_conv(module, held)
            accept_source_layout(new)
            setattr(gm.get_submodule(parent), leaf, new)
        else:
            continue
        log.info("%s keeps its tied weight", where.get(id(module), type(module).__name__))


def restore_modules(gm: fx.GraphModule, model: Any) -> None:
    """Put each unchanged leaf module of ``model`` back at its name in ``gm``, where
    ``torch.export`` left a bare holder of its tensors or, for a module that only held an alias
    of a tied weight (T5's ``shared``), nothing: same type, the tensors ``gm`` holds."""
    if not isinstance(model, nn.Module):
        return
    aliases: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(model):
        aliases.setdefault(id(tensor), []).append(name)
    held_by_name = dict(_named_tensors(gm))
    for path, mod in model.named_modules():
        if not path or any(True for _ in mod.children()):
            continue
        own = {k: v for k, v in [*mod._parameters.items(), *mod._buffers.items()]
               if v is not None}
        parent, _, leaf = path.rpartition(".")
        try:
            owner = gm.get_submodule(parent)
        except AttributeError:
            continue
        holder = getattr(owner, leaf, None)
        if not own or (holder is not None and (type(holder) is not nn.Module
                                               or any(True for _ in holder.children()))):
            continue
        if holder is not None and {k for k, v in [*holder._parameters.items(),
                                                  *holder._buffers.items()]
                                   if v is not None} != set(own):
            continue
        memo: dict[int, Any] = {}
        for key, tensor in own.items():
            names = [f"{path}.{key}", *aliases.get(id(tensor), [])]
            found = next((held_by_name[n] for n in names if n in held_by_name
                          and held_by_name[n].shape == tensor.shape), None)
            if found is None:
                break
            memo[id(tensor)] = found
        else:
            setattr(owner, leaf, copy.deepcopy(mod, memo))


def accept_source_layout(module: nn.Module) -> None:
    """Let ``module`` (a layer fc2conv made) load the state-dict weight of the layer it
    replaced as well as its own: a weight whose shape is the source layout's is reshaped (and
    transposed for an ``(in, out)`` source) on load. Unambiguous: the two layouts differ in
    rank or, for a transposed source, only a 2-D entry is read as ``(in, out)``."""
    module.register_load_state_dict_pre_hook(_load_source_layout)


def _load_source_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                        *args: Any) -> None:
    key = prefix + "weight"
    weight = getattr(module, "weight", None)
    value = state_dict.get(key)
    if not isinstance(weight, torch.Tensor) or not isinstance(value, torch.Tensor) \
            or value.shape == weight.shape or value.numel() != weight.numel():
        return
    if getattr(module, "fc2conv_transposed", False) and value.dim() == 2 and weight.dim() > 2:
        if value.t().shape == weight.shape[:2]:  # (in, out) -> (out, in, 1, ...)
            state_dict[key] = value.t().reshape(weight.shape)
        return
    if value.dim() != weight.dim() and value.shape[:2] == weight.shape[:2] \
            and all(s == 1 for s in (*value.shape[2:], *weight.shape[2:])):
        state_dict[key] = value.reshape(weight.shape)
