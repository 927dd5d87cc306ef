"""Zoo tier, issue 10: convolutionalize on Hugging Face and MONAI CNN classifiers (2-D, 3-D).

At the training size the map's single cell equals the original logits (float64 reference of
the original); on a larger image every model returns a map of cells, and the first cell is
compared with the original on its window (exact for padding-free nets; the measured gap is
printed for the others, whose border cells see padding the window did not).
"""

from __future__ import annotations

import copy

import pytest
import torch
from zoo_models import ZOO, logits

from fc2conv import convolutionalize
from fc2conv.errors import Fc2ConvError

EPS = torch.finfo(torch.float32).eps
# (model, verify): the self-check runs on the fast ones; the others are checked here only
CNNS = [("resnet_hf", True), ("convnext", True), ("mobilenet_v1", False),
        ("mobilenet_v2", False), ("monai_resnet3d", False), ("monai_efficientnet3d", False),
        ("monai_densenet3d", False)]


@torch.no_grad()
@pytest.mark.parametrize(("name", "verify"), CNNS)
def test_dense_map_of_zoo_cnns(name: str, verify: bool) -> None:
    z = ZOO[name]
    model = z.build(0)
    x = next(iter(z.draw(1).values()))
    shape = tuple(x.shape[1:])
    dense = convolutionalize(model, shape, verify=verify)
    ref = logits(copy.deepcopy(model).double()(x.double()))
    own = logits(model(x)).double()
    got = logits(dense(x)).double().reshape(ref.shape)
    allowed = max(8 * (own - ref).abs().max().item(), 64 * EPS * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= allowed
    big = torch.randn(1, *shape[:1], *(2 * s for s in shape[1:]))
    cells = logits(dense(big))
    assert cells.dim() == len(shape) + 1 and cells.shape[2:].numel() > 1, cells.shape
    first = cells[(0, slice(None), *([0] * (len(shape) - 1)))].double()
    window = big[(..., *(slice(0, s) for s in shape[1:]))]
    want = logits(copy.deepcopy(model).double()(window.double()))[0]
    gap = (first - want).abs().max().item() / want.abs().max().item()
    print(f"{name}: map {tuple(cells.shape[2:])}, corner cell vs its window: relative {gap:.3g}")


def test_vit_is_refused_naming_the_classifier_and_why() -> None:
    z = ZOO["vit"]
    with pytest.raises(Fc2ConvError, match=r"'classifier'.*one token.*CLS token"):
        convolutionalize(z.build(0), (3, 32, 32))
