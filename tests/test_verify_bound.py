"""The bounds compare() judges by: the running Higham bound must hold for real float16,
bfloat16 and float32 runs of random networks (every op kind it has a rule for), must not be
absurdly loose, and TF32 must be judged by its own unit roundoff."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fc2conv.verify.bound import coefficient, rounding_for, tf32_in_play
from fc2conv.verify.running import track

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Block(nn.Module):
    """conv -> BN(eval) -> ReLU -> residual add -> max pool -> avg pool -> linear -> tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 10)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))) + x
        y = self.avg(self.pool(y)) * 0.5
        return self.act(self.fc(y.flatten(1)))


def random_block() -> Block:
    m = Block().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.normal_()
        m.bn.bias.normal_()
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_bound_holds_on_real_low_precision_runs(dtype: torch.dtype) -> None:
    worst = 0.0
    for _ in range(5):
        m = random_block()
        x = torch.randn(3, 4, 8, 8).to(dtype)
        low = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            y = low(x).double()
            ref64 = copy.deepcopy(low).double()
            r, tracker = track(lambda: ref64(x.double()), rounding_for(dtype))  # noqa: B023
        assert not tracker.unsupported
        bound = tracker.error_of(r)
        err = (y - r).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        worst = max(worst, float((err / bound).max()))
    assert worst > 1e-4  # a bound, not a wall


def test_tf32_decision() -> None:
    f32 = torch.float32
    flags = {"cudnn_allow_tf32": True, "matmul_allow_tf32": False}  # PyTorch's defaults
    assert tf32_in_play("cuda", f32, has_conv=True, has_matmul=False, **flags)
    assert not tf32_in_play("cuda", f32, has_conv=False, has_matmul=True, **flags)
    assert tf32_in_play("cuda", f32, has_conv=False, has_matmul=True,
                        cudnn_allow_tf32=False, matmul_allow_tf32=True)
    assert not tf32_in_play("cpu", f32, has_conv=True, has_matmul=True,
                            cudnn_allow_tf32=True, matmul_allow_tf32=True)
    assert not tf32_in_play("cuda", torch.float16, has_conv=True, has_matmul=True,
                            cudnn_allow_tf32=True, matmul_allow_tf32=True)
    r = rounding_for(f32, tf32=True)
    assert r.tf32 and r.u_op == 2.0**-11 and "TF32" in r.label
    assert not rounding_for(torch.float16, tf32=True).tf32


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit significand (round to nearest even), as tensor cores
    do with matmul/conv operands."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def test_tf32_error_is_covered_only_by_the_tf32_bound() -> None:
    """An emulated TF32 Linear (operands rounded to 10 bits, float32 accumulation) exceeds the
    float32 bound, as on an H100 out of the box, and stays within the TF32 bound."""
    beyond_f32 = False
    for _ in range(5):
        lin = nn.Linear(256, 64)
        x = torch.randn(16, 256)
        y = (_tf32(x) @ _tf32(lin.weight).T + lin.bias).double()
        ref = copy.deepcopy(lin).double()
        r, t_tf32 = track(lambda: ref(x.double()), rounding_for(torch.float32, tf32=True))  # noqa: B023
        _, t_f32 = track(lambda: ref(x.double()), rounding_for(torch.float32))  # noqa: B023
        err = (y - r).abs()
        assert bool((err <= t_tf32.error_of(r)).all())
        beyond_f32 = beyond_f32 or bool((err > t_f32.error_of(r)).any())
    assert beyond_f32


def test_magnitude_coefficient_grows_with_depth_and_precision() -> None:
    from fc2conv.verify.bound import OpStats

    shallow, deep = OpStats(reductions=1, longest=64), OpStats(reductions=8, longest=64)
    f32, bf16 = rounding_for(torch.float32), rounding_for(torch.bfloat16)
    assert coefficient(f32, shallow) < coefficient(f32, deep) < coefficient(bf16, deep)
    assert coefficient(rounding_for(torch.int64), deep) == 0.0


def test_op_counter_counts_channel_layer_norm_var_mean_in_a_captured_graph() -> None:
    """Outside eager, ``ChannelLayerNorm`` reduces with ``aten.var_mean`` over axis 1; the op
    counter counts it as one reduction of ``C`` terms (it used to miss it: 0 reductions)."""
    from fc2conv.pytorch.layout import ChannelLayerNorm
    from fc2conv.verify.bound import count_ops

    c = 24
    norm = ChannelLayerNorm(c, 1e-5, torch.randn(c), torch.randn(c)).eval()
    x = torch.randn(2, c, 1, 5)
    gm = torch.export.export(norm, (x,)).module()
    assert any("var_mean" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        y, stats = count_ops(lambda: gm(x))
    assert (stats.reductions, stats.longest) == (1, c)
    # and it is the LayerNorm of the channels-last view, against float64
    ref = torch.nn.functional.layer_norm(x.double().movedim(1, -1), (c,),
                                         norm.weight.double(), norm.bias.double(), 1e-5)
    assert torch.allclose(y.double(), ref.movedim(-1, 1), atol=1e-5 * float(ref.abs().max()))
