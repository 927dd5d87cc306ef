"""to_conv / to_linear on whole models: same contract, names, provenance, permute hygiene."""

from __future__ import annotations

import copy

import archs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch_refs import assert_matches_reference

from fc2conv import to_conv, to_linear
from fc2conv.core.provenance import source_of
from fc2conv.errors import Fc2ConvError
from fc2conv.pytorch import ChannelLayerNorm, inverse_move_pairs
from fc2conv.pytorch.layout import is_move


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _linear_calls(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target in (F.linear, torch.ops.aten.linear.default)
               for n in gm.graph.nodes)


SEQ_MODELS = {
    "mlp": lambda: archs.MLP(),
    "encoder": lambda: archs.EncoderBlock(),
    "stack": lambda: archs.EncoderStack(),
}


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", sorted(SEQ_MODELS))
def test_to_conv_sequence_models(name, dims):
    torch.manual_seed(1)
    model = SEQ_MODELS[name]().eval()
    before = copy.deepcopy(model.state_dict())
    conv = to_conv(model, torch.randn(2, 5, 16), dims=dims)
    assert _count(conv, nn.Linear) == 0 and _linear_calls(conv) == 0
    assert _count(conv, nn.Conv1d if dims == 1 else nn.Conv2d) == _count(model, nn.Linear)
    assert inverse_move_pairs(conv) == []
    # other batch sizes and sequence lengths than the example keep working
    for shape in [(3, 7, 16), (1, 1, 16)]:
        x = torch.randn(*shape)
        out = conv(x)
        assert out.shape == model(x).shape
        assert_matches_reference(out, model, x)
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _count(model, nn.Linear) > 0


def test_names_and_provenance_survive():
    model = archs.EncoderStack().eval()
    conv = to_conv(model, torch.randn(2, 4, 16))
    modules = dict(conv.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert isinstance(modules[name], nn.Conv2d), name
            assert source_of(modules[name]) == name
            assert modules[name].fc2conv_origin == f"Linear {mod.in_features}->{mod.out_features}"


def test_activations_stay_in_conv_layout():
    """MLP: norm -> up -> GELU -> dropout -> down: one move in, one move out per region."""
    model = archs.MLP().eval()
    conv = to_conv(model, torch.randn(2, 5, 16))
    moves = [n for n in conv.graph.nodes if n.op == "call_function"
             and "channels" in getattr(n.target, "__name__", "")]
    # in before norm (LayerNorm over channels); the residual add and the head stay in the
    # conv layout (its skip input reuses that one move); out after the head
    assert len(moves) == 2, conv.code
    x = torch.randn(3, 4, 16)
    assert_matches_reference(conv(x), model, x)
    # a LayerNorm between converted layers runs over the channels, without moving
    chain = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.LayerNorm(8), nn.Dropout(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(2, 5, 16)
    conv = to_conv(chain, x)
    moves = [n for n in conv.graph.nodes if n.op == "call_function"
             and "channels" in getattr(n.target, "__name__", "")]
    assert len(moves) == 2, conv.code
    assert isinstance(conv.get_submodule("2"), ChannelLayerNorm)
    assert_matches_reference(conv(x), chain, x)


def test_ane_layout_and_height_layout():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    seen = {}

    def hook(_m, _i, out):
        seen["shape"] = tuple(out.shape)

    for layout, want in [("auto", (2, 6, 1, 5)), ("height", (2, 6, 5, 1))]:
        conv = to_conv(model, torch.randn(2, 5, 8), layout=layout)
        conv.get_submodule("0").register_forward_hook(hook)
        x = torch.randn(2, 5, 8)
        assert_matches_reference(conv(x), model, x)
        assert seen["shape"] == want


def test_f_linear_and_exported_programs():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 8))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.tanh(F.linear(x, self.w, self.b))

    model = Functional().eval()
    x = torch.randn(3, 8)
    conv = to_conv(model, x)
    assert _linear_calls(conv) == 0 and _count(conv, nn.Conv2d) == 1
    assert source_of(next(m for m in conv.modules() if isinstance(m, nn.Conv2d))) == "w"
    assert_matches_reference(conv(x), model, x)

    mlp = archs.MLP().eval()
    xs = torch.randn(2, 5, 16)
    program = torch.export.export(mlp, (xs,))
    conv = to_conv(program, xs)
    assert _linear_calls(conv) == 0
    assert isinstance(conv.get_submodule("up"), nn.Conv2d)  # named after the user's layer
    assert_matches_reference(conv(xs), mlp, xs)


def test_conv3d_and_channels_last_images():
    model = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(2, 6, 7, 4)  # (N, H, W, C)
    conv = to_conv(model, x, dims=2)
    assert_matches_reference(conv(x), model, x)
    conv3 = to_conv(model, x, dims=3)
    assert _count(conv3, nn.Conv3d) == 2
    assert_matches_reference(conv3(x), model, x)


def test_refuses_activation_with_too_many_axes():
    model = nn.Sequential(nn.Linear(4, 5)).eval()
    with pytest.raises(Fc2ConvError, match="pass dims=3"):
        to_conv(model, torch.randn(2, 3, 3, 3, 4), dims=2)
    with pytest.raises(Fc2ConvError, match="dims must be 1, 2 or 3"):
        to_conv(model, torch.randn(2, 4), dims=4)


def test_only_converts_named_layers():
    model = archs.MLP().eval()
    conv = to_conv(model, torch.randn(2, 5, 16), only={"up"})
    assert isinstance(conv.get_submodule("up"), nn.Conv2d)
    assert isinstance(conv.get_submodule("down"), nn.Linear)
    x = torch.randn(2, 5, 16)
    assert_matches_reference(conv(x), model, x)
    with pytest.raises(Fc2ConvError, match="no convertible Linear named 'nope'"):
        to_conv(model, x, only={"nope"})


def test_to_linear_reverses_to_conv():
    model = archs.EncoderBlock().eval()
    x = torch.randn(2, 6, 16)
    back = to_linear(to_conv(model, x), x)
    assert _count(back, nn.Conv2d) == 0
    assert _count(back, nn.Linear) == _count(model, nn.Linear)
    assert _count(back, nn.LayerNorm) == 2 and _count(back, ChannelLayerNorm) == 0
    # the moves to_linear needs cancel those to_conv inserted: the graph is move-free again
    assert not any(is_move(n) for n in back.graph.nodes), back.code
    assert_matches_reference(back(x), model, x)


def test_to_linear_on_mobilenet_keeps_spatial_convs():
    model = archs.MobileNetStyle().eval()
    x = torch.randn(2, *model.INPUT_SHAPE)
    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d)
                 and m.kernel_size == (1, 1) and m.stride == (1, 1)]
    spatial = _count(model, nn.Conv2d) - len(pointwise)
    lin = to_linear(model, x)
    assert _count(lin, nn.Conv2d) == spatial
    assert _count(lin, nn.Linear) == _count(model, nn.Linear) + len(pointwise)
    assert inverse_move_pairs(lin) == []
    assert_matches_reference(lin(x), model, x)
    y = torch.randn(3, 3, 40, 24)  # another size
    assert_matches_reference(lin(y), model, y)


def test_grouped_pointwise_conv_becomes_block_diagonal_linear():
    model = nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    x = torch.randn(2, 4, 5, 5)
    lin = to_linear(model, x)
    w = lin.get_submodule("0").weight
    assert torch.count_nonzero(w[:3, 2:]) == 0 and torch.count_nonzero(w[3:, :2]) == 0
    assert_matches_reference(lin(x), model, x)


def test_convnext_block_needs_no_permute_at_all():
    """The model's own permute(0, 2, 3, 1) and permute(0, 3, 1, 2) around its Linears are
    absorbed: the converted block runs in NCHW from end to end."""
    model = archs.ConvNeXtBlock().eval()
    x = torch.randn(2, 16, 9, 11)
    conv = to_conv(model, x)
    ops = {getattr(n.target, "__name__", n.target) for n in conv.graph.nodes}
    assert "permute" not in ops and not any(is_move(n) for n in conv.graph.nodes), conv.code
    assert isinstance(conv.get_submodule("norm"), ChannelLayerNorm)
    # the layer scale gamma * y broadcasts over channels-last: it stays, read back once
    assert_matches_reference(conv(x), model, x)
    y = torch.randn(1, 16, 5, 6)
    assert_matches_reference(conv(y), model, y)
    back = to_linear(conv, x)
    assert _count(back, nn.Linear) == 2
    assert_matches_reference(back(x), model, x)


def test_multihead_attention_is_opaque_and_said(caplog):
    """nn.MultiheadAttention is one op to torch.fx: its out_proj stays a Linear, and we say so."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Block().eval()
    x = torch.randn(2, 5, 16)
    with caplog.at_level("WARNING", logger="fc2conv"):
        conv = to_conv(model, x)
    assert "'attn' (MultiheadAttention) is traced as one op" in caplog.text
    assert _count(conv, nn.Linear) == 1 and isinstance(conv.get_submodule("fc"), nn.Conv2d)
    assert_matches_reference(conv(x), model, x)


def test_wrong_example_shape_is_a_sentence():
    with pytest.raises(Fc2ConvError, match="does not run on inputs of shape 2x5x7"):
        to_conv(archs.MLP().eval(), torch.randn(2, 5, 7))


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    bias=st.booleans(),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dims=st.integers(1, 3),
    layout=st.sampled_from(["auto", "height"]),
)
def test_to_conv_then_to_linear_on_random_mlps(widths, bias, lead, dims, layout):
    """Random Linear/ReLU stacks on (N, *positions, C) inputs: both directions match float64."""
    if len(lead) - 1 > dims:
        return  # more position axes than conv axes: refused (tested above)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(*lead, widths[0])
    conv = to_conv(model, x, dims=dims, layout=layout)
    assert _count(conv, nn.Linear) == 0
    assert_matches_reference(conv(x), model, x)
    back = to_linear(conv, x)
    assert _count(back, nn.Linear) == len(widths) - 1
    assert not any(is_move(n) for n in back.graph.nodes)
    assert_matches_reference(back(x), model, x)


def test_per_channel_scale_between_pointwise_convs_stays_in_the_region():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 6, 1)
            self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
            self.b = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            return self.b(self.a(x) * self.scale)

    model = Scaled().eval()
    x = torch.randn(2, 4, 5, 7)
    lin = to_linear(model, x)
    moves = [n for n in lin.graph.nodes if is_move(n)]
    assert len(moves) == 2, lin.code  # one in, one out: the scale follows the layout
    assert_matches_reference(lin(x), model, x)
