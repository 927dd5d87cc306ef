"""Every zoo entry builds from its small config, runs on a draw, and is deterministic."""

import pytest
import torch
from zoo_models import ZOO, logits


@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_runs_and_is_seeded(name: str) -> None:
    z = ZOO[name]
    a, b = z.build(seed=3), z.build(seed=3)
    x = z.draw(7)
    with torch.no_grad():
        ya, yb = logits(a(**x)), logits(b(**x))
    assert torch.isfinite(ya).all()
    assert torch.equal(ya, yb)
    assert ya.shape[0] == 2
    # different draws give different outputs (the inputs are really random)
    with torch.no_grad():
        yc = logits(a(**z.draw(8)))
    assert not torch.equal(ya, yc)
