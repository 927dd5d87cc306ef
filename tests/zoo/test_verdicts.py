"""Issue 9 on the zoo: compare's verdicts on real models built from small random configs.

Clean ``to_conv`` conversions of BERT-family encoders were called "different" on 2-4 of 10
token draws (one layer-table ratio just above 1 overturned agreeing outputs); one changed weight
in Llama was diagnosed as "a scale factor 1.00001". The full >= 20-draw sweep with planted bugs
is ``bench/verdicts.py``; here a few draws per model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zoo_models
from _onnx_helpers import run_ort

import fc2conv

pytestmark = pytest.mark.zoo

RATIO = 10.0  # the definition: a bug must be caught when B's error > 10x A's


def _inputs(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(zoo_models.ZOO[name].draw(seed, batch=4, length=16).values())


def _errors(a: torch.nn.Module, b: torch.nn.Module,
            x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """A's and B's largest error on the main output against A's float64 twin (independent of
    compare: a plain float64 forward pass), A's floored at one unit roundoff of the scale."""
    with torch.no_grad():
        x64 = [t.double() if t.is_floating_point() else t for t in x]
        r = zoo_models.logits(copy.deepcopy(a).double()(*x64)).double()
        ya = zoo_models.logits(a(*x)).double()
        yb = zoo_models.logits(b(*x)).double().reshape(ya.shape)
    return max(float((ya - r).abs().max()), 2**-24 * float(r.abs().max())), \
        float((yb - r).abs().max())


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_clean_to_conv_is_never_different(name: str) -> None:
    a = zoo_models.ZOO[name].build(0)
    b = fc2conv.to_conv(a, _inputs(name, 100))
    for seed in range(4):
        report = fc2conv.compare(a, b, inputs=_inputs(name, seed), layers=True)
        assert report.verdict in ("identical", "equivalent"), str(report)


def test_one_changed_weight_in_llama_is_caught_and_no_scale_factor_is_named() -> None:
    a = zoo_models.ZOO["llama"].build(0)
    bad = copy.deepcopy(a)
    q = bad.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[0, 1] += 1e-3
    x = _inputs("llama", 0)
    b = fc2conv.to_conv(bad, x)
    ea, eb = _errors(a, b, x)
    assert eb > RATIO * ea  # significant by the definition
    report = fc2conv.compare(a, b, inputs=x, layers=True)
    assert report.verdict == "different", str(report)
    assert report.first_divergence is not None
    assert "layers.0.self_attn.q_proj" in report.first_divergence
    assert report.diagnosis is not None and "times a constant" not in report.diagnosis


def test_inputs_as_a_dict_and_a_list_of_draws(tmp_path) -> None:
    """A tokenizer-style dict (keys in any order) and a list of draws; the CLI's --inputs npz."""
    import numpy as np

    from fc2conv.cli.compare import read_npz

    a = zoo_models.ZOO["bert"].build(0)
    d0, d1 = zoo_models.ZOO["bert"].draw(0), zoo_models.ZOO["bert"].draw(1)
    b = fc2conv.to_conv(a, tuple(d0.values()))
    shuffled = {"attention_mask": d0["attention_mask"], "input_ids": d0["input_ids"]}
    one = fc2conv.compare(a, b, inputs=shuffled, layers=False)
    assert one.verdict in ("identical", "equivalent")
    assert one.outputs[0].total == zoo_models.logits(a(**d0)).numel()
    two = fc2conv.compare(a, b, inputs=[d0, d1], layers=False)
    assert "(2 draws)" in two.inputs and two.outputs[0].total == 2 * one.outputs[0].total
    with pytest.raises(fc2conv.Fc2ConvError, match="no input named 'pixels'"):
        fc2conv.compare(a, b, inputs={"pixels": d0["input_ids"]})
    path = tmp_path / "draws.npz"
    np.savez(path, **{f"{k}:{n}": v.numpy() for k, d in enumerate([d0, d1]) for n, v in d.items()})
    assert [sorted(d) for d in read_npz(str(path))] == [sorted(d0), sorted(d1)]  # type: ignore


def _export(name: str, tmp_path, seed: int = 0, change=None):
    """The zoo model exported with the legacy torch exporter (module scopes in node names),
    optionally with one weight changed first."""
    import onnx

    m = zoo_models.ZOO[name].build(0)
    if change is not None:
        with torch.no_grad():
            change(m)
    x = zoo_models.ZOO[name].draw(seed, batch=2, length=8)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return zoo_models.logits(self.m(*args))

    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(Logits(), tuple(x.values()), str(path), dynamo=False,
                      input_names=list(x), opset_version=18)
    return onnx.load(str(path))


def _onnx_draw(name: str, seed: int) -> tuple:
    return tuple(v.numpy() for v in zoo_models.ZOO[name].draw(seed, batch=2, length=8).values())


def test_onnx_layers_pair_by_provenance_not_by_scope(tmp_path) -> None:
    """DistilBERT's ONNX export has two Adds in each block's scope (residuals) next to the bias
    Adds; fc2conv folds some biases into its Convs. Each A layer must pair with the B layer
    computing the same value: on a clean conversion no pair strays (the residual Add used to
    be paired with the other residual Add of its scope) and a changed q_lin weight is located
    there."""
    from fc2conv.onnx import to_conv

    a = _export("distilbert", tmp_path)
    b = to_conv(a)
    report = fc2conv.compare(a, b, inputs=_onnx_draw("distilbert", 1), layers=True)
    assert report.verdict in ("identical", "equivalent"), str(report)
    assert report.layers and all(row.ok for row in report.layers), str(report)
    assert not any("strays" in n for n in report.notes), report.notes
    paired = {row.a_name for row in report.layers}
    assert {"m.transformer.layer.0.attention.q_lin", "m.transformer.layer.1.ffn.lin2"} <= paired

    def bump(m: torch.nn.Module) -> None:
        m.transformer.layer[1].ffn.lin2.weight[0, 1] += 1e-3

    bad = to_conv(_export("distilbert", tmp_path, change=bump))
    a64 = zoo_models.ZOO["distilbert"].build(0).double()
    for seed in range(2):
        x = _onnx_draw("distilbert", seed)
        feeds = dict(zip([i.name for i in a.graph.input], x, strict=True))
        with torch.no_grad():  # the float64 reference: A's torch source in float64
            ref = zoo_models.logits(a64(*(torch.from_numpy(t) for t in x))).numpy()
        ea = max(float(np.abs(run_ort(a, feeds)[0] - ref).max()), 2**-24 * np.abs(ref).max())
        assert float(np.abs(run_ort(bad, feeds)[0] - ref).max()) > RATIO * ea  # significant
        report = fc2conv.compare(a, bad, inputs=x, layers=True)
        assert report.verdict == "different", str(report)
        assert report.first_divergence is not None
        assert "layer.1.ffn.lin2" in report.first_divergence, str(report)


def _onnx_errors(a, b, name: str, x: tuple, change=None) -> tuple[float, float]:
    """A's and B's largest error (ONNX files run by onnxruntime) against the torch source of A
    in float64, A's floored at one unit roundoff of the output's scale."""
    feeds = dict(zip([i.name for i in a.graph.input], x, strict=True))
    with torch.no_grad():
        ref = zoo_models.logits(zoo_models.ZOO[name].build(0).double()(
            *(torch.from_numpy(t) for t in x))).numpy()
    ea = max(float(np.abs(run_ort(a, feeds)[0] - ref).max()), 2**-24 * float(np.abs(ref).max()))
    return ea, float(np.abs(run_ort(b, feeds)[0] - ref).max())


def test_onnx_noise_is_measured_for_attention_and_rmsnorm(tmp_path) -> None:
    """T5's encoder (attention, softmax, RMSNorm as Pow/ReduceMean/Sqrt/Div) exported to ONNX:
    the rounding noise is measured (it used to be refused as 'weightless reductions') and is
    the size of real float32 errors, not a loose bound."""
    from fc2conv.verify.models import load
    from fc2conv.verify.noise import elementwise_noise

    a = _export("t5_encoder", tmp_path)
    x = _onnx_draw("t5_encoder", 3)
    ((noise,),) = elementwise_noise(load(a, "A"), [tuple(torch.from_numpy(t) for t in x)],
                                    2**-24)
    real, _ = _onnx_errors(a, a, "t5_encoder", x)
    assert real <= float(noise.max()) <= 1e2 * real


def test_onnx_t5_weight_bug_is_different_and_the_clean_conversion_is_not(tmp_path) -> None:
    """+1e-3 on one weight of T5's encoder (ONNX, converted by fc2conv): "different" from the
    outputs alone (layers=False) on every draw where B's error exceeds 10x A's; the clean
    conversion is never "different"."""
    from fc2conv.onnx import to_conv

    a = _export("t5_encoder", tmp_path)

    def bump(m: torch.nn.Module) -> None:
        m.encoder.block[1].layer[1].DenseReluDense.wo.weight[0, 1] += 1e-3

    clean, bad = to_conv(a), to_conv(_export("t5_encoder", tmp_path, change=bump))
    significant = 0
    for seed in range(3):
        x = _onnx_draw("t5_encoder", seed)
        assert fc2conv.compare(a, clean, inputs=x, layers=False).verdict != "different"
        ea, eb = _onnx_errors(a, bad, "t5_encoder", x)
        if eb > RATIO * ea:
            significant += 1
            report = fc2conv.compare(a, bad, inputs=x, layers=False)
            assert report.verdict == "different", str(report)
    assert significant


def test_resnet_classifier_bug_is_localized_though_the_worst_case_bound_is_loose() -> None:
    """ResNet's magnitude bound grows through its batch norms beyond the logits themselves, so
    no layer is ever beyond it; the first layer where B's error exceeds 10x A's localizes the
    planted bug (the classifier was 'not localized', or blamed elsewhere, before)."""
    a = zoo_models.ZOO["resnet_hf"].build(0)
    bad = copy.deepcopy(a)
    with torch.no_grad():
        bad.classifier[1].weight[0].mul_(1.01)
    b = fc2conv.to_conv(bad, _inputs("resnet_hf", 100))
    for seed in range(2):
        x = _inputs("resnet_hf", seed)
        ea, eb = _errors(a, b, x)
        assert eb > RATIO * ea
        report = fc2conv.compare(a, b, inputs=x, layers=True)
        assert report.verdict == "different", str(report)
        assert report.first_divergence == "classifier.1", str(report)
        assert "none of the tested causes" in (report.diagnosis or ""), report.diagnosis


def test_vit_bug_is_blamed_on_its_layer_not_on_the_next_one_beyond_its_bound() -> None:
    """One row of ViT's q_proj scaled by 1.01: q_proj's B error is ~1e4x A's but within its
    (loose, attention) worst-case bound, while o_proj downstream is beyond its own; the first
    divergence is q_proj (it was o_proj)."""
    a = zoo_models.ZOO["vit"].build(0)
    bad = copy.deepcopy(a)
    planted = "vit.layers.1.attention.q_proj"
    with torch.no_grad():
        bad.get_submodule(planted).weight[0].mul_(1.01)
    b = fc2conv.to_conv(bad, tuple(zoo_models.ZOO["vit"].draw(10_000, batch=2).values()))
    significant = 0
    for seed in range(3):  # the bug must be caught on every draw where it is beyond rounding
        x = tuple(zoo_models.ZOO["vit"].draw(seed, batch=2).values())
        ea, eb = _errors(a, b, x)
        if eb <= RATIO * ea:  # on some CPUs' kernels one draw sits just under 10x
            continue
        significant += 1
        report = fc2conv.compare(a, b, inputs=x, layers=True)
        assert report.verdict == "different", str(report)
        assert report.first_divergence == planted, str(report)
    assert significant
