"""Eval-mode BatchNorm folded into the conv before it (fc2conv.dense.fuse): the folded net
equals a float64 run of the unfolded one by compare's rule, on fresh random weights and random
BatchNorm statistics; the caller's module is never changed; dense_map uses and logs it."""

import logging

import archs
import numpy as np
import pytest
import torch
from torch import nn

from fc2conv import convolutionalize, dense_map
from fc2conv.dense.check import check_stitched
from fc2conv.dense.fuse import fold_batchnorm


def _random_bn(net, seed):
    """Running stats and affine parameters far from the identity (var over 3 decades)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.exp(3 * torch.randn(n, generator=gen)))
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen))
    return net.eval()


def _runs(net, x):
    """(float32 run, float64 run) of ``net`` on ``x``, the float64 one on a double copy."""
    import copy

    with torch.no_grad():
        return net(x).numpy(), copy.deepcopy(net).double()(x.double()).numpy()


def _bn_count(net):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


class _Shared(nn.Module):
    """A conv whose output feeds its BatchNorm, a ReLU and a residual sum: nothing may be
    folded nor overwritten in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y) - y


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_folded_net_equals_float64_run_and_caller_is_untouched(dims):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    torch.manual_seed(dims)
    net = _random_bn(nn.Sequential(
        conv(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
        conv(8, 6, 3, stride=2, bias=True), bn(6, affine=False), nn.ReLU(),
        conv(6, 5, 1), nn.Sequential(bn(5))), seed=dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fold_batchnorm(net, owned=False)
    assert _bn_count(fused) == 0 and _bn_count(net) == 3
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, *[13] * dims)
    unfused32, ref64 = _runs(net, x)
    with torch.no_grad():
        got = fused(x).numpy()
    verdict = check_stitched(got, unfused32, ref64)
    assert verdict.equal, verdict
    # a wrong fold (the BatchNorm dropped) is caught by the same rule
    broken = fold_batchnorm(net, owned=False)
    with torch.no_grad():
        broken.get_submodule("0").bias.add_(0.5)
        assert not check_stitched(broken(x).numpy(), unfused32, ref64).equal


def test_not_folded_when_conv_output_is_shared_or_training():
    net = _random_bn(_Shared(), seed=3)
    out = fold_batchnorm(net, owned=False)
    assert out is net
    x = torch.randn(1, 4, 9, 9)
    assert check_stitched(out(x).detach().numpy(), *_runs(net, x)).equal
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(seq, owned=False) is seq


def test_dense_map_folds_resnet_batchnorm_exactly(caplog):
    torch.manual_seed(5)
    net = _random_bn(archs.ResNetStyle(classes=5, width=4), seed=5)
    fcn = convolutionalize(net, net.INPUT_SHAPE)
    image = np.random.default_rng(5).standard_normal((3, 52, 47)).astype(np.float32)
    x = torch.from_numpy(image)[None]
    unfused32, ref64 = (a[0] for a in _runs(fcn, x))
    with caplog.at_level(logging.INFO, logger="fc2conv.dense.fuse"):
        got = np.asarray(dense_map(fcn, image, tile=40))
    assert "conv+BN folded" in caplog.text
    assert "1 box-filter pool(s) moved after the 1x1 head" in caplog.text  # 8 -> 5 channels
    assert _bn_count(fcn) > 0  # the caller's net keeps its BatchNorm
    verdict = check_stitched(got, unfused32, ref64)
    assert verdict.equal, verdict
    plain = np.asarray(dense_map(fcn, image, tile=40, fuse=False))
    assert check_stitched(plain, unfused32, ref64).equal


def test_box_pool_runs_after_a_narrowing_1x1_head():
    from fc2conv.dense.pools import BoxMean

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), BoxMean((5, 4)), nn.Conv2d(12, 4, 1))
    with torch.no_grad():
        net[3].bias.normal_(0, 3)  # a bias far from zero: it must average to itself
    fused = fold_batchnorm(net.eval(), owned=False)
    order = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert order == ["0", "3", "2"]  # conv, head, pool
    x = torch.randn(2, 3, 21, 17)
    unfused32, ref64 = _runs(net, x)
    with torch.no_grad():
        verdict = check_stitched(fused(x).numpy(), unfused32, ref64)
    assert verdict.equal, verdict
    widen = nn.Sequential(nn.Conv2d(3, 4, 3), BoxMean((5, 4)), nn.Conv2d(4, 6, 1)).eval()
    assert fold_batchnorm(widen, owned=False) is widen  # 4 -> 6 channels: the pool stays first


class _Functional(nn.Module):
    """Batch norms spelled as functions in the traced graph: ``F.batch_norm`` after a conv
    module, and ``F.conv2d`` + ``F.batch_norm`` on the module's own tensors (no bias)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.w = nn.Parameter(torch.randn(5, 6, 3, 3) / 5)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.2)
        self.gamma = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = torch.nn.functional.batch_norm(self.conv(x), self.bn.running_mean,
                                           self.bn.running_var, self.bn.weight, self.bn.bias,
                                           self.training, 0.1, self.bn.eps)
        y = torch.relu(y)
        y = torch.nn.functional.conv2d(y, self.w, stride=2)
        return torch.nn.functional.batch_norm(y, self.mean, self.var, self.gamma, None, False,
                                              0.1, 1e-3)


def _bn_calls(gm):
    return [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]


@pytest.mark.parametrize("exported", [False, True])
def test_functional_and_aten_batch_norm_are_folded(exported, caplog):
    torch.manual_seed(9)
    net = _random_bn(_Functional(), seed=9)
    x = torch.randn(2, 3, 15, 14)
    unfused32, ref64 = _runs(net, x)
    src = net
    if exported:  # an exported program's graph: aten.conv2d / aten.batch_norm on get_attr
        src = torch.export.export(net, (x,)).module()
    assert len(_bn_calls(src) if exported else _bn_calls(torch.fx.symbolic_trace(net))) == 2
    with caplog.at_level(logging.INFO, logger="fc2conv.dense.fuse"):
        fused = fold_batchnorm(src, owned=False)
    assert "2 eval-mode BatchNorm(s) folded" in caplog.text
    assert _bn_calls(fused) == []
    with torch.no_grad():
        got = fused(x)
    got = (got[0] if isinstance(got, tuple) else got).numpy()
    verdict = check_stitched(got, unfused32, ref64)
    assert verdict.equal, verdict
    # the caller's net is untouched, and a net normalizing with batch statistics is not folded
    assert len(_bn_calls(src) if exported else _bn_calls(torch.fx.symbolic_trace(net))) == 2
    train = fold_batchnorm(_random_bn(_Functional(), seed=9).train(), owned=False)
    assert not hasattr(train, "graph") or len(_bn_calls(train)) == 2
