"""Issue 10 (part A): every stored-weight product converts or is named; converted models keep
their weights' contract (ties, names, module types, state dicts).

References are float64 einsums over the weights themselves, on fresh random inputs.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fc2conv import to_conv, to_linear
from fc2conv.pytorch.ops import TransposedLinear

EPS = torch.finfo(torch.float32).eps
C_IN, C_OUT = 6, 5


def _tol(x: torch.Tensor, w_in_out: torch.Tensor) -> float:
    """float32 rounding bound of a C-term dot product, from the magnitudes involved."""
    mag = torch.einsum("...c,co->...o", x.double().abs(), w_in_out.double().abs())
    return 4 * C_IN * EPS * (mag.max().item() + 1.0)


class Conv1DLike(nn.Module):
    """GPT-2's ``Conv1D``: weight stored (in, out), ``addmm(b, x.view(-1, nx), W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C_IN, C_OUT))
        self.bias = nn.Parameter(torch.randn(C_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (C_OUT,)
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return y.view(size_out)


class Product(nn.Module):
    """``x`` times a stored weight, in one of the spellings a model may use."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        out_in = form in ("x_at_WT", "linear_WT_is_in_out")
        w = torch.randn(C_OUT, C_IN) if out_in else torch.randn(C_IN, C_OUT)
        if form == "matmul_buffer":
            self.register_buffer("w", w)
        else:
            self.w = nn.Parameter(w)

    def w_in_out(self) -> torch.Tensor:
        return self.w.detach().t() if self.form in ("x_at_WT", "linear_WT_is_in_out") \
            else self.w.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "x_at_W":
            return torch.relu(x @ self.w)
        if self.form == "x_at_WT":
            return torch.relu(x @ self.w.T)
        if self.form == "linear_WT_is_in_out":
            return torch.relu(torch.matmul(x, self.w.t()))
        if self.form == "F_linear_of_WT":
            return torch.relu(F.linear(x, self.w.t()))
        return torch.relu(torch.matmul(x, self.w))  # matmul_buffer


class Net(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.block = Conv1DLike() if form == "conv1d" else Product(form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if isinstance(b, Conv1DLike):
            return torch.einsum("...c,co->...o", x.double(), b.weight.double()) + b.bias.double()
        return torch.relu(torch.einsum("...c,co->...o", x.double(), b.w_in_out().double()))

    def w_in_out(self) -> torch.Tensor:
        b = self.block
        return b.weight.detach() if isinstance(b, Conv1DLike) else b.w_in_out()


FORMS = ["conv1d", "x_at_W", "x_at_WT", "linear_WT_is_in_out", "F_linear_of_WT",
         "matmul_buffer"]


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("form", FORMS)
def test_stored_weight_product_converts(form: str, exported: bool) -> None:
    """Every spelling of ``x @ W`` with a stored W (either orientation) becomes a 1x1 conv
    (before: only nn.Linear/F.linear(x, W) converted; GPT-2's Conv1D stayed, silently)."""
    torch.manual_seed(0)
    net = Net(form).eval()
    x = torch.randn(2, 7, C_IN)
    model = torch.export.export(net, (x,)) if exported else net
    conv = to_conv(model, (x,))
    convs = [m for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1
    left = [n for n in conv.graph.nodes if n.op == "call_function"
            and any(k in str(n.target) for k in ("addmm", "mm", "matmul", "linear"))]
    assert not left, left
    shapes = [(2, 7, C_IN), (3, 4, C_IN)] if not exported else [(2, 7, C_IN)]
    for shape in shapes:
        x = torch.randn(*shape)
        got, ref = conv(x).double(), net.reference(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= _tol(x, net.w_in_out())


def test_conv1d_round_trip_keeps_in_out_layout() -> None:
    """to_linear(to_conv(m)) gives back a weight stored (in, out), so it loads m's state dict
    (strict), and the loaded numbers are used as m uses them."""
    torch.manual_seed(0)
    net, other = Net("conv1d").eval(), Net("conv1d").eval()
    x = torch.randn(2, 7, C_IN)
    conv = to_conv(net, (x,))
    back = to_linear(conv, (x,))
    assert isinstance(back.get_submodule("block"), TransposedLinear)
    back.load_state_dict(other.state_dict(), strict=True)
    conv.load_state_dict(other.state_dict(), strict=True)  # (in, out) -> (out, in, 1, 1)
    x = torch.randn(3, 5, C_IN)
    for model in (back, conv):
        err = (model(x).double() - other.reference(x)).abs().max().item()
        assert err <= _tol(x, other.w_in_out())
    # a square (in, out) weight: the model's own state dict loads unchanged, not transposed
    conv.load_state_dict(conv.state_dict(), strict=True)
    err = (conv(x).double() - other.reference(x)).abs().max().item()
    assert err <= _tol(x, other.w_in_out())


class Left(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(7, 7))
        self.cube = nn.Parameter(torch.randn(2, C_IN, C_IN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix @ x @ self.cube


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Left()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
def test_product_that_stays_is_named_with_reason(exported: bool,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = Outer().eval()
    x = torch.randn(2, 7, C_IN)
    model = torch.export.export(net, (x,)) if exported else net
    with caplog.at_level(logging.WARNING, logger="fc2conv"):
        conv = to_conv(model, (x,))
    lines = [r.getMessage() for r in caplog.records if "stays unconverted" in r.getMessage()]
    assert any("'proj'" in m and "from the left" in m for m in lines), lines
    assert any("'proj'" in m and "3 axes" in m for m in lines), lines
    ref = torch.einsum("ts,bsc,bcd->btd", net.proj.mix.detach().double(), x.double(),
                       net.proj.cube.detach().double())
    got = conv(x).double()
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight (GPT-2's wte / lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, C_IN)
        self.norm = nn.LayerNorm(C_IN)
        self.head = nn.Linear(C_IN, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}


def _tied_reference(m: TiedLM, ids: torch.Tensor) -> torch.Tensor:
    e = m.emb.weight.double()[ids]
    h = F.layer_norm(e, (C_IN,), m.norm.weight.double(), m.norm.bias.double(), m.norm.eps)
    return h @ e.new_tensor(m.emb.weight.double()).T


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
def test_tied_weight_stays_tied(exported: bool) -> None:
    """The converted head shares the embedding's storage (no copy: the same number of unique
    storages), and converting back makes it the very same parameter again."""
    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.randint(0, 11, (2, 5))
    model = torch.export.export(m, (ids,)) if exported else m
    conv = to_conv(model, (ids,))
    assert len(_storages(conv)) == len(_storages(m))
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in m.parameters())
    assert isinstance(conv.get_submodule("head"), nn.Conv2d)
    back = to_linear(conv, (ids,))
    assert back.get_submodule("head").weight is back.get_submodule("emb").weight
    other = TiedLM().eval()
    for target in (conv, back):
        target.load_state_dict(other.state_dict(), strict=True)
        ids = torch.randint(0, 11, (3, 4))
        ref = _tied_reference(other, ids)
        err = (target(ids).double() - ref).abs().max().item()
        assert err <= 64 * EPS * ref.abs().max().item()
    # still one storage: writing the embedding changes the head
    with torch.no_grad():
        conv.get_submodule("emb").weight.mul_(2)
    assert torch.equal(conv.get_submodule("head").weight.flatten(),
                       conv.get_submodule("emb").weight.flatten())


class Pinned(nn.Module):
    """torch.fx cannot trace the shape check, so conversion goes through torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, C_IN)
        self.norm = nn.LayerNorm(C_IN)
        self.fc = nn.Linear(C_IN, C_OUT)
        self.out_norm = nn.LayerNorm(C_OUT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] > 64:
            raise ValueError("batch too large")
        h = self.norm(self.emb(ids))
        return torch.softmax(self.fc(h), -1).mean(1) + self.out_norm.weight


def test_export_path_keeps_module_names_and_types() -> None:
    """On the torch.export path, unchanged modules are themselves again (an Embedding, a
    LayerNorm at their names), and every parameter not converted keeps its name."""
    torch.manual_seed(0)
    m = Pinned().eval()
    ids = torch.randint(0, 11, (2, 5))
    conv = to_conv(m, (ids,))
    mods = dict(conv.named_modules())
    assert isinstance(mods["emb"], nn.Embedding)
    assert isinstance(mods["out_norm"], nn.LayerNorm)
    assert isinstance(mods["fc"], nn.Conv2d)
    names = dict(conv.named_parameters())
    for name, p in m.named_parameters():
        assert name in names and names[name].numel() == p.numel(), name
    back = to_linear(conv, (ids,))
    assert isinstance(back.get_submodule("fc"), nn.Linear)
    assert isinstance(back.get_submodule("norm"), nn.LayerNorm)
    other = Pinned().eval()
    back.load_state_dict(other.state_dict(), strict=True)
    ids = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        ref = other.double()(ids)
    assert (back(ids).double() - ref).abs().max().item() <= 64 * EPS * ref.abs().max().item()


def test_to_linear_accepts_the_conv_nets_state_dict() -> None:
    """A Linear made from a model's own 1x1 conv loads that conv's (O, C, 1, 1) weight."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()

    m, other = net(), net()
    x = torch.randn(2, 3, 6, 6)
    lin = to_linear(m, (x,))
    assert isinstance(lin.get_submodule("2"), nn.Linear)
    lin.load_state_dict(other.state_dict(), strict=True)
    lin.load_state_dict(lin.state_dict(), strict=True)
    with torch.no_grad():
        ref = other.double()(x.double())
    assert (lin(x).double() - ref).abs().max().item() <= 1e3 * EPS * ref.abs().max().item()
