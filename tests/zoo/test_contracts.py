"""Zoo tier, issue 10: converted Hugging Face models keep their call contract.

Each converted model is checked against the *original* run in float64 (an independent
reference, not fc2conv code), on fresh draws at the example's shape and at other batch sizes
and sequence lengths, called with keywords as a user calls the original.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from zoo_models import ZOO, logits

from fc2conv import to_conv
from fc2conv.errors import Fc2ConvError

EPS = torch.finfo(torch.float32).eps


@torch.no_grad()
def _assert_close_to_reference(converted, original, inputs) -> None:
    ref = logits(copy.deepcopy(original).double()(**inputs)).double()
    own = logits(original(**inputs)).double()
    got = logits(converted(**inputs)).double()
    assert got.shape == ref.shape
    allowed = max(8 * (own - ref).abs().max().item(), 64 * EPS * ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= allowed, (err, allowed)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_dict_inputs_keywords_and_other_shapes(name: str) -> None:
    """A tokenizer-style dict converts; the result accepts keyword calls at other batch sizes
    and lengths (before: static export, a raw RuntimeError at any other shape)."""
    z = ZOO[name]
    model = z.build(0)
    conv = to_conv(model, z.draw(1))
    assert any(isinstance(m, torch.nn.Conv2d) for m in conv.modules())
    for seed, batch, length in [(2, 2, 8), (3, 3, 11), (4, 1, 5)]:
        _assert_close_to_reference(conv, model, z.draw(seed, batch=batch, length=length))


def test_conv_net_other_image_size() -> None:
    z = ZOO["vit"]
    model = z.build(0)
    conv = to_conv(model, z.draw(1))
    _assert_close_to_reference(conv, model, z.draw(5, batch=3))


def test_use_cache_default_is_refused_in_one_sentence() -> None:
    """GPT2Config() has use_cache=True: either it converts or one sentence says what to pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2,
                                       n_positions=32)).eval()
    ids = torch.randint(0, 97, (2, 6))
    try:
        conv = to_conv(model, {"input_ids": ids})
    except Fc2ConvError as err:
        text = str(err)
        assert "use_cache=False" in text and "\n" not in text and "http" not in text
    else:
        _assert_close_to_reference(conv, model, {"input_ids": torch.randint(0, 97, (3, 9))})


def test_pinned_axis_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """An axis the model's code fixes is named (input and axis) at conversion time."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != 4:  # data-dependent Python branch: fx cannot trace it
                raise ValueError("needs 4 rows")
            return self.fc(x.reshape(x.shape[0], 4, 6))

    x = torch.randn(2, 4, 6)
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        conv = to_conv(Fixed().eval(), {"x": x})
    assert "x axis 1 = 4" in caplog.text
    assert conv(x=torch.randn(5, 4, 6)).shape == (5, 4, 3)  # the batch axis stays dynamic
